"""Designs of targets in every direction type, against expectations computed by hand from
src/medmat/catalog/canonical.yaml and the subsets table (see the comments at each test)."""

from __future__ import annotations

import json
import argparse

import pandas as pd
import pytest

from medmat.catalog import load_catalog
from medmat.designs import (DesignError, DesignsConfig, build_designs, related_set, resolve_target,
                            scaleup_set, run, write_designs)


@pytest.fixture(scope="module")
def cat():
    return load_catalog()


@pytest.fixture(scope="module")
def records(cat):
    """A small records table: 40 train + 10 test records, two labels, per classification subset."""
    rows = []
    for no in cat.classification_subsets():
        t = cat.triplet_of_subset(no)
        for split, n in (("train", 40), ("test", 10)):
            for i in range(n):
                label = "Normal" if i % 2 else f"lesion{no}"
                rows.append({"record_id": f"sub{no:02d}-{split}-{i}", "subset_no": no, "split": split,
                             "modality": t.modality, "area": t.area, "task": t.task,
                             "answer_text": label})
    df = pd.DataFrame(rows)
    df["subset_no"] = df["subset_no"].astype("Int64")
    return df


def rel(cat, target, direction):
    return related_set(cat, resolve_target(target, cat), direction)


def test_target_03_ct_lung_covid(cat):
    # CT-Lung-COVID. Sharing Lung: 04 CT-Lung-Cancer (+modality), 28 X-ray-Lung-COVID (+task), 30.
    assert rel(cat, 3, "fixed_area") == [4, 28]
    # CT subsets are 02 Kidney, 04 Lung-Cancer, 05/06 Brain: none has task COVID.
    with pytest.raises(DesignError, match="fixed_modality: no other subset has task COVID with modality CT"):
        rel(cat, 3, "fixed_modality")
    # COVID subsets: only 28 (X-ray): none with modality CT.
    with pytest.raises(DesignError, match="fixed_task: no other subset has modality CT with task COVID"):
        rel(cat, 3, "fixed_task")
    # CT appears with Brain, Kidney and Lung: not a modality-area pair.
    with pytest.raises(DesignError, match="modality CT is not tied to one area"):
        rel(cat, 3, "modality_area")


def test_target_28_xray_lung_covid(cat):
    # Lung + task COVID: 03 CT-Lung-COVID; Lung + X-ray: 30 X-ray-Lung-Tuberculosis.
    assert rel(cat, "X-ray-Lung-COVID", "fixed_area") == [3, 30]
    with pytest.raises(DesignError, match="task COVID with modality X-ray"):
        rel(cat, 28, "fixed_modality")


def test_target_06_ct_brain_cancer_three_directions(cat):
    # fixed modality CT: Brain from 05 CT-Brain-Hemorrhage, Cancer from 04 CT-Lung-Cancer.
    assert rel(cat, 6, "fixed_modality") == [4, 5]
    # fixed area Brain: CT from 05; Cancer from 22 MRI-Brain-Cancer (lowest of 22, 32).
    assert rel(cat, 6, "fixed_area") == [5, 22]
    # fixed task Cancer: CT from 04 CT-Lung-Cancer; Brain from 22 MRI-Brain-Cancer.
    assert rel(cat, 6, "fixed_task") == [4, 22]


def test_modality_area_fundus_and_skin(cat):
    # FP appears only with Fundus (14-17, 34). Target 17 FP-Fundus-Quality: pair member 14
    # (FP-Fundus-Eye Diseases), task Quality elsewhere: 01 Co-Cervix-Quality.
    assert rel(cat, 17, "modality_area") == [1, 14]
    # Target 16 FP-Fundus-Level: 14 for the pair; Level elsewhere: 11 End-Intestine-Level
    # (34 is FP-Fundus-Level, the target's own triplet, so it is excluded).
    assert rel(cat, 16, "modality_area") == [11, 14]
    # Der appears only with Skin; Melanoma exists only in subset 07: the arm cannot be built.
    with pytest.raises(DesignError, match="no subset outside Der-Skin has task Melanoma"):
        rel(cat, 7, "modality_area")


def test_scaleup_sets(cat):
    t = resolve_target(3, cat)
    # Related to CT-Lung-COVID: CT (02, 04, 05, 06), Lung (04, 28, 30), COVID (28).
    assert scaleup_set(cat, t, "all_related") == [2, 4, 5, 6, 28, 30]
    assert scaleup_set(cat, t, "related_without_modality") == [28, 30]
    assert scaleup_set(cat, t, "related_without_area") == [2, 5, 6]
    assert scaleup_set(cat, t, "related_without_task") == [2, 4, 5, 6, 30]
    everything = scaleup_set(cat, t, "all_data")
    assert 3 not in everything and len(everything) == len(cat.classification_subsets()) - 1
    unrelated = scaleup_set(cat, t, "all_unrelated")
    assert not set(unrelated) & set(scaleup_set(cat, t, "all_related"))
    assert all(not cat.shared_elements(t.triplet, no) for no in unrelated)


def test_build_designs_arms_and_splits(cat, records):
    cfg = DesignsConfig(samples_per_subset=10, scaleup_total=30, limited_k=[0, 5], dev_size=8, seed=0)
    d = build_designs(records, resolve_target(6, cat), cfg, cat)
    arms = d["arms"]
    assert arms["related_fixed_task"]["status"] == "ok"
    assert sorted(arms["related_fixed_task"]["components"]) == ["04", "22"]
    assert arms["related_modality_area"]["status"] == "unavailable"
    # Baseline+ has as many samples as a Related arm, from subsets sharing nothing with CT-Brain-Cancer.
    bp = arms["baseline_plus"]
    assert bp["total"] == arms["related_fixed_area"]["total"] == 20
    assert all(not cat.shared_elements(resolve_target(6, cat).triplet, int(k)) for k in bp["components"])
    # scale-up arms stay under the one total cap
    for a in ("all_related", "all_data", "all_unrelated"):
        assert arms[a]["total"] <= 30
    # dev split comes from the target's train records, disjoint from test and from every arm
    sp = d["splits"]
    assert len(sp["dev"]) == 8 and len(sp["test"]) == 10
    assert not set(sp["dev"]) & set(sp["test"]) and not set(sp["dev"]) & set(sp["train"])
    ind = arms["in_distribution"]
    assert ind["total"] == 32 and not set(ind["record_ids"]) & set(sp["dev"])
    lim = arms["limited"]["variants"]
    assert lim["related_k5"]["k_selected"] == 5 and lim["related_k0"]["total"] == 20
    assert lim["unrelated_k5"]["total"] == 25
    assert not set(lim["related_k5"]["record_ids"]) & set(sp["dev"])
    assert arms["zero_overlap"]["alias_of"] == "baseline_plus"
    # deterministic
    again = build_designs(records, resolve_target(6, cat), cfg, cat)
    assert again["arms"]["baseline_plus"]["sha256"] == bp["sha256"]


def test_cli_writes_index(tmp_path, records):
    rec = tmp_path / "records.parquet"
    records.to_parquet(rec)
    params = tmp_path / "params.yaml"
    params.write_text("designs:\n  samples_per_subset: 10\n  scaleup_total: 40\n  limited_k: [0, 5]\n  dev_size: 6\n")
    out = tmp_path / "designs"
    args = argparse.Namespace(records=str(rec), targets="3,28,CT-Brain-Cancer", out=str(out), params=str(params))
    assert run(args) == 0
    index = json.loads((out / "designs.json").read_text())
    assert sorted(index["targets"]) == ["03", "06", "28"]
    assert index["targets"]["03"]["arms"]["related_fixed_area"]["components"] == {"04": 10, "28": 10}
    assert "fixed_modality: no other subset" in index["targets"]["03"]["arms"]["related_fixed_modality"]["reason"]
    manifest = json.loads((out / "03" / "related_fixed_area.json").read_text())
    assert manifest["total"] == 20 and len(manifest["record_ids"]) == 20


def test_cli_bad_target_and_unknown_param(tmp_path, records, capsys):
    rec = tmp_path / "records.parquet"
    records.to_parquet(rec)
    args = argparse.Namespace(records=str(rec), targets="CT-Nowhere-COVID", out=str(tmp_path / "o"),
                              params=str(tmp_path / "none.yaml"))
    assert run(args) == 2
    assert "cannot read target" in capsys.readouterr().out
    params = tmp_path / "p.yaml"
    params.write_text("designs:\n  sample_per_subset: 10\n")
    args = argparse.Namespace(records=str(rec), targets="3", out=str(tmp_path / "o"), params=str(params))
    assert run(args) == 2
    assert "sample_per_subset" in capsys.readouterr().out

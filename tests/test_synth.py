"""Med-MAT-mini: coverage of the catalogue, public layout, factor structure, determinism, full scale."""

from __future__ import annotations

import hashlib
import io
import json
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from medmat.catalog import load_catalog
from medmat.cli import main
from medmat.data import synth, synth_world
from medmat.data.medmat_format import RECORD_KEYS, find_files, parse_question_choice, read_records

TINY = dict(train_per_subset=8, test_per_subset=8)   # >= one label-balanced group per dataset
FEW = dict(TINY, subsets=[3, 4, 5, 28])              # for tests that need several worlds


def tree_hash(root: Path) -> str:
    h = hashlib.sha256()
    for p in sorted(root.rglob("*")):
        if p.is_file():
            h.update(str(p.relative_to(root)).encode() + b"\0" + p.read_bytes())
    return h.hexdigest()


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("mini") / "data"
    summary = synth_world.generate(root, synth_world.SynthParams(**TINY), progress=False)
    return root, summary


def ori_records(root: Path) -> dict[tuple[int, str], list[dict]]:
    return {(f.number, f.split): read_records(f.path) for f in find_files(root, kinds=("dataset",))}


def test_every_classification_dataset_with_its_triplet(world):
    root, summary = world
    cat = load_catalog()
    expected = {d for s in cat.classification_subsets() for d in cat.subset(s).dataset_nos}
    recs = ori_records(root)
    assert {no for no, _ in recs} == expected and summary["datasets"] == len(expected)
    assert {88, 43, 44} & expected == {43, 44}          # faulty-table datasets kept with the catalogue's subset
    card = json.loads((root / "MEDMAT_MINI.json").read_text())
    for d in expected:
        assert card["datasets"][str(d)]["triplet"] == str(cat.triplet_of_dataset(d))
        assert card["datasets"][str(d)]["subset"] == cat.dataset(d).subset_no


def test_public_layout_and_records(world):
    root, _ = world
    files = find_files(root)
    kinds = Counter((f.kind, f.split) for f in files)
    assert kinds == {("subset", "train"): 37, ("dataset", "train"): 85}   # as published: -train.json only
    assert sorted(f.rel for f in files)[0] == "Aggregated_Subsets/Subset--01-train.json"
    assert any(f.rel == "Original_Medical_Datasets/ori--02-train.json" for f in files)
    for (no, split), recs in ori_records(root).items():
        assert recs, (no, split)
        assert [r["id"] for r in recs] == list(range(1, len(recs) + 1))
        for r in recs:
            assert tuple(r) == RECORD_KEYS and r["data-no"] == str(no)
            _, options = parse_question_choice(r["Question-choice"])
            assert 2 <= len(options) <= 4
            assert options["ABCD".index(r["Answer-choice"])] == r["Answer"] == r["caption"]
            path = root / r["image"]
            assert r["image"].startswith("med-mat/") and path.is_file()
            with Image.open(path) as im:
                assert im.size == (64, 64) and im.mode in ("L", "RGB")


def test_subset_files_repeat_dataset_records(world):
    root, _ = world
    cat = load_catalog()
    ori = ori_records(root)
    for f in find_files(root, kinds=("subset",)):
        # As published: the datasets' records one after the other, each dataset keeping its ids 1..n.
        assert read_records(f.path) == [r for d in sorted(cat.subset(f.number).dataset_nos) for r in ori[(d, "train")]]


def test_every_image_used_once(world):
    root, summary = world
    images = [r["image"] for rs in ori_records(root).values() for r in rs]
    assert len(images) == len(set(images)) == summary["images"]   # a derived split cannot share an image


def test_label_sets_follow_task_kinds():
    cat = load_catalog()
    kinds: dict[str, set[str]] = {}
    for s in cat.classification_subsets():
        labels = synth.subset_labels(s, cat.subset(s).task)
        assert 2 <= len(labels) <= 4 and len(set(labels)) == len(labels)
        kinds.setdefault(cat.subset(s).task, set()).update(labels)
    for a in kinds:
        for b in kinds:
            if a < b:
                assert kinds[a] & kinds[b] <= {"Normal"}, (a, b)
    assert {"COVID-19", "Pneumonia", "Normal"} <= set(synth.subset_labels(3, "COVID")) & set(synth.subset_labels(28, "COVID"))
    assert set(synth.subset_labels(4, "Cancer")) == {"Benign", "Malignant", "Normal"}
    assert "No COVID" in synth.subset_labels(3, "COVID", shared_normal=False)


def test_pattern_tables():
    lbk = {("CT", "Cancer"): {"Malignant", "Normal", "Benign"}, ("CT", "COVID"): {"COVID-19", "Normal"},
           ("X-ray", "COVID"): {"COVID-19", "Pneumonia", "Normal"}}
    default = synth.pattern_table(lbk, 0, entangled=False)
    assert default[("CT", "COVID", "COVID-19")] == default[("X-ray", "COVID", "COVID-19")] is not None
    assert default[("CT", "COVID", "Normal")] is None and default[("X-ray", "COVID", "Normal")] is None
    assert len({default[k] for k in default if k[2] != "Normal"}) == 4
    ent = synth.pattern_table(lbk, 0, entangled=True)
    assert len(set(ent.values())) == len(ent) == 8                      # every (modality, task, label) its own
    assert ent[("CT", "Cancer", "Normal")] != ent[("CT", "COVID", "Normal")]
    assert None not in ent.values()
    # the real world's looks fit in the pattern space
    plans = synth_world.plan_world(synth_world.SynthParams(**TINY))
    ent = synth.pattern_table(synth_world.labels_by_kind(plans), 0, entangled=True)
    assert len(set(ent.values())) == len(ent)


def test_factors_visible_in_pixels():
    rng = lambda k: np.random.default_rng(k)
    n = synth.Nuisance(1.0, 0.0, 0.0001, 1.0, (0.0, 0.0))
    ct = synth.Scene("CT", "Lung", n)
    normal, covid = ct.render(None, rng(0)).astype(float), ct.render((0, 2, 0), rng(0)).astype(float)
    assert np.abs(covid - normal).mean() > 2                             # lesion changes the image
    assert synth.Scene("MRI", "Lung", n).render(None, rng(0)).ndim == 2
    assert synth.Scene("FP", "Fundus", n).render(None, rng(0)).shape == (64, 64, 3)
    lung, brain = ct.render(None, rng(1)), synth.Scene("CT", "Brain", n).render(None, rng(1))
    assert np.abs(lung.astype(float) - brain).mean() > 10                  # area = silhouette


def test_png_encoder_round_trips():
    for arr in (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64).astype(np.uint8),
                np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)):
        data = synth.encode_png(arr)
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(data))), arr)
        assert data == synth.encode_png(arr)


def test_byte_identical_for_a_seed_and_different_otherwise(tmp_path, world):
    root, _ = world
    again = tmp_path / "again"
    synth_world.generate(again, synth_world.SynthParams(**TINY), progress=False)
    assert tree_hash(again) == tree_hash(root)
    other = tmp_path / "seed1"
    synth_world.generate(other, synth_world.SynthParams(seed=1, **FEW), progress=False)
    one = root / "Original_Medical_Datasets" / "ori--05-train.json"
    assert one.read_bytes() != (other / one.relative_to(root)).read_bytes()
    img = read_records(one)[0]["image"]
    assert (root / img).read_bytes() != (other / img).read_bytes()


def test_entangled_world_differs_in_lesions_only(tmp_path, world):
    root, _ = world
    ent = tmp_path / "ent"
    synth_world.generate(ent, synth_world.SynthParams(entangled=True, **TINY), progress=False)
    assert tree_hash(ent) != tree_hash(root)
    card_d = json.loads((root / "MEDMAT_MINI.json").read_text())
    card_e = json.loads((ent / "MEDMAT_MINI.json").read_text())
    assert card_d["datasets"] == card_e["datasets"]                      # same datasets, labels, counts
    assert card_d["patterns"]["CT|Lung|COVID|COVID-19"] == card_d["patterns"]["X-ray|Lung|COVID|COVID-19"]
    assert card_e["patterns"]["CT|Lung|COVID|COVID-19"] != card_e["patterns"]["X-ray|Lung|COVID|COVID-19"]
    assert card_e["patterns"]["CT|Lung|COVID|Normal"] not in (None, card_e["patterns"]["CT|Lung|Cancer|Normal"])
    img = "Original_Medical_Datasets/ori--05-train.json"
    assert (root / img).read_bytes() == (ent / img).read_bytes()         # same QA records
    r = read_records(root / img)[0]["image"]
    assert (root / r).read_bytes() != (ent / r).read_bytes()             # different pixels


def test_null_subsets_draw_every_look_whatever_the_label(tmp_path):
    """The negative control's targets: each image draws its look from the patterns no other triplet
    shows, with the same odds for every label, and NULL_SCALE times the records; the other subsets'
    images are the entangled world's own, byte for byte."""
    few = dict(TINY, subsets=[3, 4, 28], entangled=True)
    plain, null = tmp_path / "plain", tmp_path / "null"
    synth_world.generate(plain, synth_world.SynthParams(**few), progress=False)
    synth_world.generate(null, synth_world.SynthParams(**few, null_subsets=[3]), progress=False)
    card = json.loads((null / "MEDMAT_MINI.json").read_text())
    assert card["null_looks"] and not set(card["null_looks"]) & set(card["patterns"].values())
    assert card["params"]["null_subsets"] == [3]
    sub = "Aggregated_Subsets/Subset--{:02d}-train.json"
    assert len(read_records(null / sub.format(3))) > 3 * len(read_records(plain / sub.format(3)))

    def totals(nulls: list[int] | None) -> tuple[int, int]:
        plans = synth_world.plan_world(synth_world.SynthParams(subsets=[3], entangled=True, null_subsets=nulls))
        return sum(p.n_train for p in plans), sum(p.n_test for p in plans)

    assert totals([3]) == tuple(synth_world.NULL_SCALE * n for n in totals(None))
    for s in (4, 28):
        assert (null / sub.format(s)).read_bytes() == (plain / sub.format(s)).read_bytes()
        for r in read_records(null / sub.format(s)):
            assert (null / r["image"]).read_bytes() == (plain / r["image"]).read_bytes()
    # the draw: every label spreads over the whole pool alike (2,000 images a label, 193 looks: ~10 each)
    patterns = synth.pattern_table({("CT", "Lung", "COVID"): {"COVID-19", "Normal"}}, 0, entangled=True)
    pool = synth.null_looks(patterns)
    assert patterns[("CT", "Lung", "COVID", "Normal")] not in pool and len(pool) == len(synth.ALL_PATTERNS) - 2
    counts = {lab: Counter(synth.null_look(pool, 0, 8, lab, k) for k in range(2000)) for lab in ("COVID-19", "Normal")}
    for c in counts.values():
        assert len(c) > 0.95 * len(pool) and max(c.values()) < 3 * 2000 / len(pool)
    assert counts["COVID-19"] != counts["Normal"]  # drawn, not copied
    with pytest.raises(ValueError, match="entangled world only"):
        synth_world.SynthParams(null_subsets=[3])


def test_the_control_world_nulls_the_study_targets(tmp_path):
    (tmp_path / "params.yaml").write_text(json.dumps({"experiment": {"targets": ["03", "28"]}}))
    assert synth_world.world_params(tmp_path / "params.yaml", entangled=True).null_subsets == [3, 28]
    assert synth_world.world_params(tmp_path / "params.yaml").null_subsets is None


def test_no_shared_normal(tmp_path):
    out = tmp_path / "w"
    synth_world.generate(out, synth_world.SynthParams(shared_normal=False, **FEW), progress=False)
    answers = {r["Answer"] for f in find_files(out, kinds=("dataset",)) for r in read_records(f.path)}
    assert "Normal" not in answers and {"No COVID", "No Cancer"} <= answers


def test_full_scale_metadata_count(tmp_path):
    out = tmp_path / "full"
    s = synth_world.generate(out, synth_world.SynthParams(scale="full", full_records=5000, **FEW), progress=False)
    assert s["full_records"] == 5000
    ori = [r for f in find_files(out, kinds=("dataset",)) for r in read_records(f.path)]
    sub = [r for f in find_files(out, kinds=("subset",)) for r in read_records(f.path)]
    assert len(ori) == len(sub) == 5000
    images = {r["image"] for r in ori}
    assert len(images) <= s["images"] and all((out / i).is_file() for i in images)
    for f in find_files(out):
        recs = read_records(f.path)
        for d in {r["data-no"] for r in recs}:   # each dataset its own ids 1..n, in subset files too
            ids = [r["id"] for r in recs if r["data-no"] == d]
            assert ids == list(range(1, len(ids) + 1))
        assert all(parse_question_choice(r["Question-choice"]) for r in recs[:3])


def test_cli(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  seed: 0\n  train_per_subset: 8\n  test_per_subset: 8\n  subsets: [3, 28]\n")
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--params", str(params)]) == 0
    assert "10 datasets, 2 subsets" in capsys.readouterr().out
    assert main(["synth", "--out", str(out), "--params", str(params)]) == 1    # refuses to overwrite
    params.write_text("synth:\n  sed: 1\n")
    assert main(["synth", "--out", str(tmp_path / "x"), "--params", str(params)]) == 1
    assert not (tmp_path / "x").exists()


def test_marker_says_what_the_world_is(world):
    root, _ = world
    card = json.loads((root / "MEDMAT_MINI.json").read_text())
    assert (card["generator"], card["seed"], card["entangled"], card["shape"]) == ("medmat synth", 0, False, "release")
    plans = synth_world.plan_world(synth_world.SynthParams(**TINY))
    assert card["test_fraction"] == synth_world.test_fraction(plans)


def test_default_world_derives_test_sets_as_large_as_before():
    # The derived share is the one the world was built with, so each subset's derived test set is about
    # test_per_subset records (210), as the legacy shape wrote them (measured on the full default world:
    # 208-210 per subset).
    params = synth_world.SynthParams()
    plans = synth_world.plan_world(params)
    frac = synth_world.test_fraction(plans)
    per_subset: Counter = Counter()
    for p in plans:
        per_subset[p.subset_no] += p.n_train + p.n_test
    for s, n in per_subset.items():
        labels = len(synth.subset_labels(s, load_catalog().subset(s).task))
        derived = labels * max(1, round(frac * n / labels))
        assert 190 <= derived <= 230, (s, derived)


def test_release_and_legacy_shapes_ingest_alike(tmp_path):
    from medmat.data.ingest import IngestParams, ingest

    params = dict(train_per_subset=12, test_per_subset=6, subsets=[3, 5])
    rel, leg = tmp_path / "release", tmp_path / "legacy"
    n = synth_world.generate(rel, synth_world.SynthParams(**params), progress=False)["records"]
    assert synth_world.generate(leg, synth_world.SynthParams(shape="legacy", **params), progress=False)["records"] == n
    assert {f.split for f in find_files(rel)} == {"train"} and {f.split for f in find_files(leg)} == {"train", "test"}
    for side in ("datasets", "subsets"):
        a, pa_, sa = ingest(rel, IngestParams(read=side))
        b, pb, sb = ingest(leg, IngestParams(read=side))
        assert len(a) == len(b) == sa.records == n               # every record once, whichever side
        assert a.record_id.is_unique and b.record_id.is_unique
        assert not [p for p in pa_ + pb if p["severity"] == "critical"]
        assert sa.world == sb.world == "mini"
        test = a[a.split == "test"]
        assert set(test.subset_no) == {3, 5}
        for _, grp in test.groupby("subset_no"):                      # label-balanced per subset
            assert grp.answer_text.value_counts().nunique() == 1
    assert (b[b.split == "test"].source_file.str.endswith("-test.json")).all()


def test_cli_legacy_shape(tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("synth:\n  train_per_subset: 8\n  test_per_subset: 8\n  subsets: [5]\n")
    out = tmp_path / "data"
    assert main(["synth", "--out", str(out), "--params", str(params), "--legacy-shape"]) == 0
    assert "legacy shape" in capsys.readouterr().out
    assert {(f.kind, f.split) for f in find_files(out)} == {(k, s) for k in ("dataset", "subset")
                                                          for s in ("train", "test")}


def test_pipeline_entry_points_mark_the_world(tmp_path):
    from medmat.data.ingest import ingest_world
    from medmat.data.records import read_records, world_of

    raw = {"synth": {"train_per_subset": 8, "test_per_subset": 4, "subsets": [5]}, "ingest": {"seed": 0}}
    (tmp_path / "params.yaml").write_text(json.dumps(raw))  # JSON is YAML
    synth_world.generate(tmp_path / "data", synth_world.world_params(tmp_path / "params.yaml", entangled=True),
                         progress=False)
    assert json.loads((tmp_path / "data" / "MEDMAT_MINI.json").read_text())["entangled"] is True
    ingest_world(tmp_path / "data", tmp_path / "records.parquet", raw)
    assert world_of(tmp_path / "records.parquet") == "mini-entangled"
    assert (read_records(tmp_path / "records.parquet").split == "test").sum() > 0

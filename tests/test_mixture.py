"""Mixture resolution: determinism, caps, label balance, content hashes, manifest IO."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from medmat.mixture import (
    MixtureError,
    allocate,
    ids_sha256,
    load_manifest,
    resolve_mixture,
    save_manifest,
    select_manifest,
)


def _records() -> pd.DataFrame:
    rows = []
    # subset 4: labels 60/30/10 (unbalanced); subset 28: 50/50; subset 3: test split only.
    for label, n in (("Benign", 60), ("Malignant", 30), ("Normal", 10)):
        rows += [dict(record_id=f"ori10-train-{label}-{i}", subset_no=4, split="train", answer_text=label) for i in range(n)]
    for label in ("COVID-19", "Normal"):
        rows += [dict(record_id=f"ori70-train-{label}-{i}", subset_no=28, split="train", answer_text=label) for i in range(50)]
    rows += [dict(record_id=f"ori5-test-{i}", subset_no=3, split="test", answer_text="Normal") for i in range(20)]
    rows.append(dict(record_id="ori99-train-0", subset_no=pd.NA, split="train", answer_text="X"))
    df = pd.DataFrame(rows)
    df["subset_no"] = df["subset_no"].astype("Int64")
    return df


def test_deterministic_and_independent_of_row_order():
    df = _records()
    a, ma = resolve_mixture(df, {"components": {"04": 40, "28": 20}, "seed": 3})
    b, mb = resolve_mixture(df.sample(frac=1, random_state=1), {"components": {"28": 20, "04": 40}}, seed=3)
    assert ma == mb and a["record_id"].tolist() == b["record_id"].tolist()
    _, mc = resolve_mixture(df, {"04": 40, "28": 20}, seed=4)
    assert mc["components"]["04"]["sha256"] != ma["components"]["04"]["sha256"]  # the seed matters
    # adding a component leaves the others' selection unchanged
    _, md = resolve_mixture(df, {"04": 40}, seed=3)
    assert md["components"]["04"] == ma["components"]["04"]


def test_label_balance_where_possible_and_caps():
    df = _records()
    sel, man = resolve_mixture(df, {4: 45, "28": 1000}, seed=0, cap_per_subset=80)
    c4 = man["components"]["04"]
    # 45 over labels with 60/30/10 available: Normal gives all 10, the other two split the rest.
    assert c4["labels"] == {"Benign": 18, "Malignant": 17, "Normal": 10}
    assert c4["requested"] == 45 and c4["selected"] == 45 and c4["available"] == 100
    c28 = man["components"]["28"]
    assert c28["selected"] == 80 and c28["labels"] == {"COVID-19": 40, "Normal": 40}  # capped at 80
    assert man["total"] == len(sel) == 125
    assert set(sel["split"]) == {"train"}
    assert man["sha256"] == ids_sha256(sel["record_id"])
    assert c4["sha256"] == ids_sha256(sel.loc[sel["subset_no"] == 4, "record_id"])


def test_unbalanced_selection_is_plain_random_sample():
    sel, man = resolve_mixture(_records(), {"04": 50}, seed=0, balance_labels=False)
    assert man["components"]["04"]["selected"] == 50 and sel["record_id"].is_unique


def test_errors_name_the_component():
    df = _records()
    with pytest.raises(MixtureError, match="'03'.*split 'train'"):
        resolve_mixture(df, {"03": 10})
    with pytest.raises(MixtureError, match="'04'.*non-negative integer"):
        resolve_mixture(df, {"04": -1})
    with pytest.raises(MixtureError, match="not a subset number"):
        resolve_mixture(df, {"lung": 5})
    with pytest.raises(MixtureError, match="lacks column"):
        resolve_mixture(df.drop(columns="answer_text"), {"04": 5})


def test_manifest_round_trip_and_selection(tmp_path):
    df = _records()
    sel, man = resolve_mixture(df, {"components": {"04": 20, "28": 10}, "seed": 1})
    path = save_manifest(tmp_path / "arm" / "manifest.json", man)
    assert not [p for p in path.parent.iterdir() if p.name != "manifest.json"]  # no temp file left
    loaded = load_manifest(path)
    assert loaded == json.loads(json.dumps(man))
    again = select_manifest(df, loaded)
    # the same records in the same order: a fresh resolution (a search trial) and a unit reading the
    # manifest train on one sequence
    assert again["record_id"].tolist() == sel["record_id"].tolist() == loaded["record_ids"]
    # a bare spec (components + seed) resolves to the same records
    assert sorted(select_manifest(df, {"components": {"04": 20, "28": 10}, "seed": 1})["record_id"]) == sorted(sel["record_id"])
    # tampering and missing records are caught, naming the file
    bad = dict(loaded, record_ids=loaded["record_ids"][:-1])
    with pytest.raises(MixtureError, match="sha256"):
        select_manifest(df, bad, where="m.json")
    with pytest.raises(MixtureError, match="not in the records table"):
        select_manifest(df[df["subset_no"] != 28], loaded, where="m.json")
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(MixtureError, match="broken.json"):
        load_manifest(tmp_path / "broken.json")
    with pytest.raises(MixtureError, match="components"):
        save_manifest(tmp_path / "x.json", {"seed": 0}) and load_manifest(tmp_path / "x.json")


def test_allocate_shares_then_moves_shortfalls():
    # proportional to the requests, largest remainder to the lower key on ties
    assert allocate({"a": 1, "b": 1, "c": 1}, {"a": 99, "b": 99, "c": 99}, 10) == {"a": 4, "b": 3, "c": 3}
    assert allocate({"a": 300, "b": 100}, {"a": 999, "b": 999}, 100) == {"a": 75, "b": 25}
    # a component short of records passes its share to the others, in proportion to their requests
    assert allocate({"a": 1, "b": 1, "c": 2}, {"a": 5, "b": 99, "c": 99}, 65) == {"a": 5, "b": 20, "c": 40}
    # not enough in all: everything there is (the caller reports the shortfall)
    assert allocate({"a": 1, "b": 1}, {"a": 3, "b": 4}, 20) == {"a": 3, "b": 4}
    # a component requested at 0 is not a member; all at 0 = equal shares
    assert allocate({"a": 0, "b": 5}, {"a": 99, "b": 3}, 10) == {"a": 0, "b": 3}
    assert allocate({"a": 0, "b": 0}, {"a": 99, "b": 99}, 10) == {"a": 5, "b": 5}


def test_exact_total_redistributes_and_reports_shortfall():
    df = _records()  # subset 04: 100 train records, 28: 100
    sel, man = resolve_mixture(df, {"04": 50, "28": 50}, seed=0, cap_per_subset=80, exact_total=150)
    assert man["total"] == len(sel) == 150 and man["matched"] and man["shortfall"] == 0
    assert {k: v["selected"] for k, v in man["components"].items()} == {"04": 75, "28": 75}
    # the cap holds: 28 may give at most 30, 04 gives the rest
    _, man = resolve_mixture(df, {"04": 50, "28": 50}, seed=0, cap_per_subset=None,
                             exact_total=130, exclude=[f"ori70-train-COVID-19-{i}" for i in range(50)] +
                             [f"ori70-train-Normal-{i}" for i in range(20)])
    c = man["components"]
    assert (c["28"]["excluded"], c["28"]["available"], c["28"]["selected"], c["04"]["selected"]) == (70, 30, 30, 100)
    assert man["excluded"] == 70 and man["matched"] and man["total"] == 130
    assert not any(r.startswith("ori70-train-COVID") for r in man["record_ids"])
    # more than there is: all of it, and the manifest says by how much it falls short
    _, man = resolve_mixture(df, {"components": {"04": 1, "28": 1}, "exact_total": 250, "seed": 0})
    assert (man["total"], man["matched"], man["shortfall"], man["exact_total"]) == (200, False, 50, 250)
    # the manifest re-resolves to the same records (its exact_total travels with it)
    again = select_manifest(df, {k: v for k, v in man.items() if k not in ("record_ids", "sha256")})
    assert sorted(again["record_id"]) == man["record_ids"]
    with pytest.raises(MixtureError, match="exact_total"):
        resolve_mixture(df, {"04": 5}, exact_total=-1)

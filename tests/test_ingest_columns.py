"""Ingest's two ways of reading a file give the same table: column by column (files without faults,
fast) and record by record (files with any fault, each named). And the raw key count that lets the
JSON reader trust orjson's parse is exact about keys set apart from their colon."""

from __future__ import annotations

import json
import shutil

import pytest

from medmat.data.ingest import ingest_to_parquet, read_problems
from medmat.data.ingest_core import Ingest
from medmat.data.json_records import BadRecord, _key_count, load_records

from fixtures import release_trees as trees

ORI = "Original_Medical_Datasets/ori--{:02d}-train.json"


def _faulty_tree(root):
    """The release's shape (subset files repeat the datasets' records) with a fault of every kind."""
    recs = trees.build(root, "release")
    d3 = recs[3]
    d3[0]["caption"] = d3[1]["Answer"] if d3[1]["Answer"] != d3[0]["Answer"] else "Normal"   # contradicts
    trees.write(root, ORI.format(3), d3)
    shutil.rmtree(root / "med-mat" / "ds 4 (set)")                    # a partial download
    trees.write(root, ORI.format(6), recs[6] + [{**recs[33][0], "id": 100}])   # a record of 33 filed under 6
    d33 = [dict(r) for r in recs[33]]
    d33[2]["id"] = d33[1]["id"]                                        # an id given twice
    trees.write(root, ORI.format(33), d33)
    d44 = [dict(r) for r in recs[44]]
    d44[1]["Question-choice"] = "no options here"
    trees.write(root, ORI.format(44), d44)
    d2 = trees.dataset_records(root, 2, labels=("Cyst", "Stone"), n=6)
    d2[1]["caption"] = 7                                               # wrong type
    d2[2]["data-no"] = "999"                                           # no such dataset
    d2[3]["image"] = "med-mat/evil\x1b[2Jname.png"                     # control characters
    trees.write(root, ORI.format(2), d2[:4] + [["not", "a", "record"]] + d2[4:])
    return {"columns": {ORI.format(3), ORI.format(4), ORI.format(6)},
            "record_by_record": {ORI.format(2), ORI.format(33), ORI.format(44)}}


@pytest.mark.parametrize("shape", ["release", "faults"])
def test_column_and_record_paths_give_identical_tables(tmp_path, monkeypatch, shape):
    root = tmp_path / "data"
    expect = _faulty_tree(root) if shape == "faults" else (trees.build(root, "release") and None)
    taken: dict[str, bool] = {}
    columns = Ingest._columns

    def spy(self, sf, file_no, records):
        out = columns(self, sf, file_no, records)
        taken[sf.rel] = out is not None
        return out

    monkeypatch.setattr(Ingest, "_columns", spy)
    fast = tmp_path / "a" / "records.parquet"
    ingest_to_parquet(root, fast, progress=False)
    monkeypatch.setattr(Ingest, "_columns", lambda self, sf, file_no, records: None)
    slow = tmp_path / "b" / "records.parquet"
    ingest_to_parquet(root, slow, progress=False)

    assert fast.read_bytes() == slow.read_bytes()     # rows, splits, hashes and problems alike
    if expect is None:
        assert taken and all(taken.values())          # every file of a clean tree read column by column
        assert read_problems(fast) == []
        return
    assert {f for f, ok in taken.items() if ok} >= expect["columns"]
    assert not {f for f, ok in taken.items() if ok} & expect["record_by_record"]
    checks = {p["check"] for p in read_problems(fast)}
    assert checks >= {"caption_contradicts_answer", "images_missing", "data_no_mismatch", "duplicate_id",
                      "question_choice", "wrong_type", "unknown_data_no", "record_type", "path_control_character"}


@pytest.mark.parametrize("separators", [(", ", ": "), (",", ":"), (", ", " : "), (",\n", "\n\t:\r\n ")])
def test_keys_apart_from_their_colon_are_counted(tmp_path, separators):
    recs = [{"id": i, "caption": f'say \\" : {i}', "image": "a.png", "data-no": "2"} for i in range(5)]
    raw = json.dumps(recs, separators=separators).encode()
    assert _key_count(raw) >= sum(map(len, recs))
    path = tmp_path / "ori--02-train.json"
    path.write_bytes(raw)
    assert load_records(path) == recs
    # The same key twice, set apart from its colon by whitespace, is never read as "last value wins".
    dup = raw[:-2] + b', "id"' + separators[1].encode() + b"9}]"
    path.write_bytes(dup)
    out = load_records(path)
    assert out[:4] == recs[:4] and isinstance(out[4], BadRecord) and out[4].check == "duplicate_key"


def test_key_count_is_exact():
    assert _key_count(b'[{"a": 1, "b" :"x", "c"\n:\t[1, {"d": 2}]}]') == 4
    assert _key_count(b'["a:", "\\" :"]') == 1          # an escaped quote before a colon counts: never fewer
    assert _key_count(b'"') == 0 and _key_count(b"") == 0
    raw = json.dumps([{"a": 1, "b": 'x \\" : y'}, {"c": [{"d": "e"}]}], separators=(",", " \n: ")).encode()
    assert {_key_count(raw, step) for step in (1, 2, 3, 5, 8, 1 << 20)} == {5}   # the same across slices

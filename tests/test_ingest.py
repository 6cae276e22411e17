"""Ingest: the sample record end to end, bad input as problem entries, duplicates, derived splits."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medmat.cli import main
from medmat.data.images import sha256_file
from medmat.data.ingest import IngestParams, ingest, ingest_to_parquet, load_records_table, read_problems
from medmat.data.records import COLUMNS, DATA_ROOT_KEY, read_records
from medmat.data.medmat_format import make_record, write_records
from conftest import write_jpeg


def _write(root: Path, rel: str, records) -> Path:
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=4), encoding="utf-8")
    return path


def _no_params(tmp_path: Path) -> list[str]:
    """Keep CLI tests independent of the repository's params.yaml (absent file = defaults)."""
    return ["--params", str(tmp_path / "absent-params.yaml")]


def _write_noise(path: Path, seed: int) -> None:
    """A JPEG of random pixels: distinct content per seed (flat colours can encode to equal bytes)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pixels = np.random.default_rng(seed).integers(0, 256, (16, 16, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG")


def _records(root: Path, data_no: int, n: int, labels=("Normal", "Cyst", "Tumor"), folder=None, start=1):
    """n good records of dataset `data_no`, each with its own real image."""
    folder = folder or f"med-mat/ds{data_no}"
    out = []
    for i in range(n):
        label = labels[i % len(labels)]
        image = f"{folder}/{label}/{start + i}.jpg"
        _write_noise(root / image, seed=data_no * 100_000 + start + i)
        options = list(labels)
        out.append(make_record(id=start + i, caption=label, image=image, question="What is shown?",
                               options=options, answer_index=options.index(label), data_no=data_no))
    return out


def test_sample_record_ingests(sample_world, sample_record, tmp_path, capsys):
    out = tmp_path / "work" / "records.parquet"
    assert main(["ingest", "--data", str(sample_world), "--out", str(out), *_no_params(tmp_path)]) == 0
    assert "ingest: 1 records" in capsys.readouterr().out
    df = read_records(out)
    assert list(df.columns) == [c for c, _ in COLUMNS] + ["image_path"]
    assert "image_path" not in pq.read_schema(out).names      # no absolute path in the file
    assert len(df) == 1
    row = df.iloc[0]
    assert (row.modality, row.area, row.task) == ("CT", "Kidney", "Kidney Diseases")
    assert (row.dataset_no, row.subset_no) == (2, 2)
    assert row.record_id == "ori02-train-1"
    assert row.source_file == "Original_Medical_Datasets/ori--02-train.json" and row.source_index == 0
    assert list(row.options) == ["Stone", "Cyst", "Normal", "Tumor"]
    assert (row.answer_letter, row.answer_text, row.caption) == ("B", "Cyst", "Cyst")
    assert row.question == sample_record["Question"]
    assert row.question_choice == sample_record["Question-choice"]
    assert row.image == sample_record["image"]
    assert Path(row.image_path) == (sample_world / sample_record["image"]).resolve()
    assert row.image_sha256 == sha256_file(row.image_path)
    assert row.split == "train"  # a single record cannot give a test split
    assert df.attrs["data_root"] == str(sample_world.resolve())
    assert pq.read_schema(out).metadata[DATA_ROOT_KEY].decode() == "../data"   # relative to the table
    assert read_problems(out) == []
    assert not out.with_name("records.problems.json").exists()   # the problems live in the table


def test_record_ids_are_stable(sample_world, tmp_path):
    a, _, _ = ingest(sample_world)
    b, _, _ = ingest(sample_world)
    assert a["record_id"].tolist() == b["record_id"].tolist()


def _bad_world(root: Path, sample_record: dict) -> None:
    write_jpeg(root / sample_record["image"])
    _write(root, "Original_Medical_Datasets/ori--02-train.json", [sample_record])
    (root / "Original_Medical_Datasets" / "ori--03-train.json").write_text('[{"id": 1, "image": ', encoding="utf-8")
    (root / "Original_Medical_Datasets" / "ori--04-train.json").write_bytes(
        json.dumps([sample_record]).replace("Cyst", "Cyst\udcff").encode("utf-8", "surrogateescape"))
    (root / "Original_Medical_Datasets" / "ori--06-train.json").write_text('{"not": "a list"}', encoding="utf-8")
    good = copy.deepcopy(sample_record)
    good.update({"id": 10, "data-no": "5"})
    missing = {k: v for k, v in good.items() if k != "image"} | {"id": 11}
    wrong_type = good | {"id": 12, "image": 7}
    unknown = good | {"id": 13, "data-no": "777"}
    escape = good | {"id": 14, "image": "../../etc/passwd"}
    absolute = good | {"id": 15, "image": "/etc/passwd"}
    bad_qc = good | {"id": 16, "Question-choice": "What?\nA: x\nB: y"}
    not_object = ["just a string"]
    _write(root, "Original_Medical_Datasets/ori--05-train.json",
           [good, missing, wrong_type, unknown, escape, absolute, bad_qc] + not_object)


EXPECTED_BAD = {
    # (check, file, record_id, index)
    ("truncated", "Original_Medical_Datasets/ori--03-train.json", 1, 0),
    ("encoding", "Original_Medical_Datasets/ori--04-train.json", 1, 0),
    ("file_structure", "Original_Medical_Datasets/ori--06-train.json", None, None),
    ("missing_field", "Original_Medical_Datasets/ori--05-train.json", 11, 1),
    ("wrong_type", "Original_Medical_Datasets/ori--05-train.json", 12, 2),
    ("unknown_data_no", "Original_Medical_Datasets/ori--05-train.json", 13, 3),
    ("path_escape", "Original_Medical_Datasets/ori--05-train.json", 14, 4),
    ("path_escape", "Original_Medical_Datasets/ori--05-train.json", 15, 5),
    ("question_choice", "Original_Medical_Datasets/ori--05-train.json", 16, 6),
    ("record_type", "Original_Medical_Datasets/ori--05-train.json", None, 7),
}


def test_bad_input_becomes_problem_entries(tmp_path, sample_record, capsys):
    root = tmp_path / "data"
    _bad_world(root, sample_record)
    out = tmp_path / "records.parquet"
    problems_path = tmp_path / "problems.json"
    code = main(["ingest", "--data", str(root), "--out", str(out), "--problems", str(problems_path),
                 "--read", "datasets", *_no_params(tmp_path)])
    assert code == 0
    problems = read_problems(problems_path)
    critical = {(p["check"], p["file"], p["record_id"], p["index"]) for p in problems if p["severity"] == "critical"}
    assert critical == EXPECTED_BAD
    assert read_problems(out) == problems            # the export is the table's own copy
    for p in problems:
        assert p["message"] and p["file"]
    by_check = {p["check"]: p["message"] for p in problems}
    assert "777" in by_check["unknown_data_no"]
    assert "'image'" in by_check["missing_field"] and "'image'" in by_check["wrong_type"]
    assert "truncated" in by_check["truncated"]
    # Good records of every file still reach the table: the sample (ori--02) and the good one of ori--05.
    df = load_records_table(out)
    assert sorted(df["record_id"]) == ["ori02-train-1", "ori05-train-10"]
    assert df.set_index("record_id").loc["ori05-train-10", "modality"] == "CT"
    # Record 10 of ori--05 says data-no 5: right file. The summary says what happened.
    summary = json.loads(problems_path.read_text())["summary"]
    assert summary["records"] == 2 and summary["records_rejected"] == 9 and summary["files_failed"] == 1
    assert "problems: 10 critical" in capsys.readouterr().out


def test_nothing_readable_exits_nonzero(tmp_path):
    root = tmp_path / "data"
    (root / "Original_Medical_Datasets").mkdir(parents=True)
    (root / "Original_Medical_Datasets" / "ori--02-train.json").write_text("[", encoding="utf-8")
    out = tmp_path / "records.parquet"
    assert main(["ingest", "--data", str(root), "--out", str(out), *_no_params(tmp_path)]) == 1
    assert pq.read_metadata(out).num_rows == 0        # an empty table, with the problems that explain it
    assert [p["check"] for p in read_problems(out)] == ["truncated"]
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["ingest", "--data", str(empty), "--out", str(out), *_no_params(tmp_path)]) == 1
    assert read_problems(out)[0]["check"] == "no_files"
    assert main(["ingest", "--data", str(tmp_path / "nowhere"), "--out", str(out), *_no_params(tmp_path)]) == 1


def test_symlink_escape_is_a_problem(tmp_path, sample_record):
    root = tmp_path / "data"
    outside = tmp_path / "outside"
    write_jpeg(outside / "Cyst- (561).jpg")
    link_dir = root / Path(sample_record["image"]).parent
    link_dir.parent.mkdir(parents=True)
    link_dir.symlink_to(outside)
    _write(root, "Original_Medical_Datasets/ori--02-train.json", [sample_record])
    df, problems, summary = ingest(root)
    assert len(df) == 0 and summary.records == 0
    assert problems[0]["check"] == "path_escape" and problems[0]["record_id"] == 1
    assert "outside the data root" in problems[0]["message"]


def test_subset_files_counted_once(tmp_path):
    root = tmp_path / "data"
    ds3 = _records(root, 3, 6)
    ds4 = _records(root, 4, 4, start=100)
    _write(root, "Original_Medical_Datasets/ori--03-train.json", ds3)
    # Subset 3 aggregates datasets 3, 4 and 6; dataset 4 has no per-dataset file here.
    renumbered = [r | {"id": i + 1} for i, r in enumerate(ds3 + ds4)]
    _write(root, "Aggregated_Subsets/Subset--03-train.json", renumbered)

    df, problems, summary = ingest(root)
    assert summary.duplicates_skipped == 6
    assert len(df) == 10 and df["record_id"].is_unique
    assert (df["dataset_no"] == 3).sum() == 6 and df[df.dataset_no == 3].record_id.str.startswith("ori03-").all()
    assert df[df.dataset_no == 4].record_id.str.startswith("sub03-d04-").all()  # only the subset file has them
    assert not [p for p in problems if p["severity"] == "critical"]

    df2, _, summary2 = ingest(root, IngestParams(read="subsets"))
    assert summary2.duplicates_skipped == 6 and len(df2) == 10
    assert df2.record_id.str.startswith("sub03-").all()


def test_derived_split_only_without_test_file(tmp_path):
    root = tmp_path / "data"
    _write(root, "Original_Medical_Datasets/ori--02-train.json", _records(root, 2, 60))
    _write(root, "Original_Medical_Datasets/ori--05-train.json", _records(root, 5, 30, labels=("A", "B")))
    _write(root, "Original_Medical_Datasets/ori--05-test.json", _records(root, 5, 4, labels=("A", "B"), start=500))
    df, _, summary = ingest(root)
    d2 = df[df.dataset_no == 2]
    assert set(d2.split) == {"train", "test"}
    assert d2[d2.split == "test"].answer_text.value_counts().tolist() == [2, 2, 2]  # balanced, ~10%
    assert not set(d2[d2.split == "test"].image) & set(d2[d2.split == "train"].image)
    d5 = df[df.dataset_no == 5]
    assert (d5.split == d5.source_file.str.extract(r"-(train|test)\.json")[0]).all()
    assert summary.derived_split_groups == 1
    again, _, _ = ingest(root)
    assert again.split.tolist() == df.split.tolist()


def test_images_hashed_once_per_path(tmp_path, sample_record):
    root = tmp_path / "data"
    write_jpeg(root / sample_record["image"])
    many = [sample_record | {"id": i} for i in range(1, 51)]
    _write(root, "Original_Medical_Datasets/ori--02-train.json", many)
    df, _, summary = ingest(root)
    assert len(df) == 50 and summary.unique_images == 1
    assert df.image_sha256.nunique() == 1 and df.image_sha256.iloc[0] == sha256_file(root / sample_record["image"])


def test_file_in_wrong_place_is_a_warning(tmp_path, sample_record):
    root = tmp_path / "data"
    write_jpeg(root / sample_record["image"])
    _write(root, "Original_Medical_Datasets/ori--07-train.json", [sample_record])  # data-no 2 in file 07
    df, problems, _ = ingest(root)
    assert len(df) == 1 and df.dataset_no.iloc[0] == 2
    assert [(p["check"], p["severity"], p["file"]) for p in problems] == [
        ("data_no_mismatch", "warning", "Original_Medical_Datasets/ori--07-train.json")]
    assert "1 record(s) of dataset 2" in problems[0]["message"]
    assert df.record_id.iloc[0] == "ori07-train-1"


def test_params_section_is_typed(tmp_path, sample_world):
    params = tmp_path / "params.yaml"
    params.write_text("ingest:\n  read: datasets\n  sedd: 1\n", encoding="utf-8")
    assert main(["ingest", "--data", str(sample_world), "--out", str(tmp_path / "r.parquet"),
                 "--params", str(params)]) == 2
    with pytest.raises(ValueError):
        IngestParams(read="both")


def test_ingest_to_parquet_streams_all_files(tmp_path):
    root = tmp_path / "data"
    _write(root, "Original_Medical_Datasets/ori--02-train.json", _records(root, 2, 5))
    _write(root, "Original_Medical_Datasets/ori--05-train.json", _records(root, 5, 5))
    out = tmp_path / "r.parquet"
    _, summary = ingest_to_parquet(root, out)
    assert summary.records == 10 and summary.files_read == 2
    assert pq.read_metadata(out).num_rows == 10
    assert load_records_table(out)["subset_no"].dtype.name == "Int64"


def test_derived_split_consistent_across_datasets_of_a_subset(tmp_path):
    # Datasets 71 and 72 (both subset 8) share images, as ISIC 2017 and 2018 do: same content, own paths.
    root = tmp_path / "data"
    labels = ("Melanoma", "Nevus")
    recs71 = _records(root, 71, 60, labels=labels)
    recs72 = _records(root, 72, 40, labels=labels, start=1000)  # its own images, and copies of 71's
    for r in recs71[::3]:
        copy_rel = r["image"].replace("med-mat/ds71", "med-mat/ds72")
        (root / copy_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / copy_rel).write_bytes((root / r["image"]).read_bytes())
        recs72.append(r | {"image": copy_rel, "data-no": "72"})
    _write(root, "Original_Medical_Datasets/ori--71-train.json", recs71)
    _write(root, "Original_Medical_Datasets/ori--72-train.json", recs72)
    df, _, summary = ingest(root)
    assert summary.derived_split_groups == 1 and (df.split == "test").sum() > 0   # one subset (8)
    train = set(df[df.split == "train"].image_sha256)
    test = set(df[df.split == "test"].image_sha256)
    assert not train & test


def test_other_side_test_file_is_honoured(tmp_path):
    # The per-dataset side has only a train file, the subset side ships the test split: keep it.
    root = tmp_path / "data"
    recs = _records(root, 2, 30)
    _write(root, "Original_Medical_Datasets/ori--02-train.json", recs)
    _write(root, "Aggregated_Subsets/Subset--02-train.json", recs[:25])
    _write(root, "Aggregated_Subsets/Subset--02-test.json", recs[25:])
    df, _, summary = ingest(root)
    assert len(df) == 30 and summary.duplicates_skipped == 30
    assert df.set_index("record_id").split.to_dict() == {
        f"ori02-train-{i}": ("test" if i > 25 else "train") for i in range(1, 31)}

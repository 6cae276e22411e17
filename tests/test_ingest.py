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


# ---- the release as it is published (tests/fixtures/release_trees.py) ------------------------------
from fixtures import release_trees as trees  # noqa: E402


def _cli_ingest(root: Path, out: Path, tmp_path: Path, *extra: str) -> int:
    return main(["ingest", "--data", str(root), "--out", str(out), *_no_params(tmp_path), *extra])


@pytest.mark.parametrize("layout", trees.LAYOUTS)
@pytest.mark.parametrize("side", ["datasets", "subsets"])
def test_every_layout_counts_each_record_once(tmp_path, layout, side, capsys):
    root = tmp_path / "data"
    recs = trees.build(root, layout)
    out = tmp_path / "records.parquet"
    assert _cli_ingest(root, out, tmp_path, "--read", side) == 0
    df = read_records(out)
    expected = {(d, r["image"]) for d, rs in recs.items() for r in rs}
    assert len(df) == len(expected) and set(zip(df.dataset_no, df.image)) == expected
    assert df.record_id.is_unique
    assert not [p for p in read_problems(out) if p["severity"] == "critical"]
    n_files = len(trees.SUBSET_FILES) + (0 if layout == "subsets_only" else len(trees.DATASETS))
    assert f"found {n_files} Med-MAT JSON files" in capsys.readouterr().out


def test_subset_files_concatenating_datasets_get_distinct_ids(tmp_path):
    root = tmp_path / "data"
    trees.build(root, "subsets_only")
    df, problems, summary = ingest(root, IngestParams(read="subsets"))
    # Each dataset restarts at id 1 inside Subset--03: the dataset number keeps the ids apart.
    assert {"sub03-d03-train-1", "sub03-d04-train-1", "sub03-d06-train-1"} <= set(df.record_id)
    # Dataset 44 sits in the files of subsets 18 and 22: counted once, in the subset of the file read first.
    d44 = df[df.dataset_no == 44]
    assert len(d44) == 4 and set(d44.subset_no) == {18} and summary.duplicates_skipped == 4
    warn = [p for p in problems if p["check"] == "subset_mismatch"]
    assert len(warn) == 1 and warn[0]["severity"] == "warning" and warn[0]["file"].endswith("Subset--18-train.json")
    assert "4 record(s) of dataset 44" in warn[0]["message"] and "subset 22" in warn[0]["message"]
    by_ds, _, _ = ingest(root.parent / "data", IngestParams(read="datasets"))   # no ori files: same records
    assert len(by_ds) == len(df)


def test_derived_test_split_is_balanced_per_subset(tmp_path):
    # Subset 03 from three datasets, each with its own labels: balance is the subset's, not each file's.
    root = tmp_path / "data"
    for d, labels in ((3, ("COVID-19",)), (4, ("Normal",)), (6, ("Pneumonia",))):
        trees.write(root, f"Original_Medical_Datasets/ori--{d:02d}-train.json",
                    trees.dataset_records(root, d, labels=labels, n=40))
    # An image of dataset 3 copied (same bytes, other path) into dataset 4: one side of the split only.
    ds3 = json.loads((root / "Original_Medical_Datasets/ori--03-train.json").read_text())
    ds4 = json.loads((root / "Original_Medical_Datasets/ori--04-train.json").read_text())
    for r in ds3[:10]:
        copy_rel = r["image"].replace("ds 3", "ds 4 copy")
        (root / copy_rel).parent.mkdir(parents=True, exist_ok=True)
        (root / copy_rel).write_bytes((root / r["image"]).read_bytes())
        ds4.append(r | {"image": copy_rel, "data-no": "4", "id": len(ds4) + 1})
    trees.write(root, "Original_Medical_Datasets/ori--04-train.json", ds4)
    df, _, _ = ingest(root, IngestParams(seed=0, test_fraction=0.1))
    test = df[df.split == "test"]
    assert test.answer_text.value_counts().to_dict() == {"COVID-19": 4, "Normal": 4, "Pneumonia": 4}
    assert not set(test.image_sha256) & set(df[df.split == "train"].image_sha256)
    again, _, _ = ingest(root, IngestParams(seed=0, test_fraction=0.1))
    assert again.split.tolist() == df.split.tolist()
    other, _, _ = ingest(root, IngestParams(seed=1, test_fraction=0.1))
    assert other.split.tolist() != df.split.tolist()


def test_partial_download_is_one_warning_per_dataset(tmp_path, capsys):
    root = tmp_path / "data"
    recs = trees.build(root, "release")
    import shutil
    shutil.rmtree(root / "med-mat" / "ds 4 (set)")                 # dataset 4 needs registration
    out = tmp_path / "records.parquet"
    assert _cli_ingest(root, out, tmp_path) == 0
    problems = read_problems(out)
    assert [(p["check"], p["severity"]) for p in problems] == [("images_missing", "warning")]
    assert "dataset 4 (" in problems[0]["message"] and "4 record(s)" in problems[0]["message"]
    df = read_records(out)
    assert len(df) == sum(len(r) for d, r in recs.items() if d != 4) and 4 not in set(df.dataset_no)
    report = tmp_path / "validation.json"
    assert main(["validate", "--data", str(root), "--records", str(out), "--report", str(report),
                 "--params", str(tmp_path / "absent.yaml")]) == 0
    # The severity stays the user's choice: a study that needs every dataset can make it fatal.
    strict = tmp_path / "strict.yaml"
    strict.write_text("validate:\n  severity: {ingest.images_missing: critical}\n", encoding="utf-8")
    assert main(["validate", "--data", str(root), "--records", str(out), "--report", str(report),
                 "--params", str(strict)]) == 1


def test_discovery_says_what_it_ignored(tmp_path, capsys):
    import os
    root = tmp_path / "data"
    trees.build(root, "release")
    (root / "README.md").write_text("# Med-MAT")
    (root / "dataset_info.json").write_text("{}")
    (root / "Original_Medical_Datasets" / "ori--09-train.json").mkdir()
    os.mkfifo(root / "Aggregated_Subsets" / "Subset--05-train.json")
    (root / "Aggregated_Subsets" / "Subset--07-train.json").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 1\n")
    out = tmp_path / "records.parquet"
    assert _cli_ingest(root, out, tmp_path) == 0                        # and did not block on the FIFO
    text = capsys.readouterr().out
    assert "not a JSON file: README.md" in text and "dataset_info.json" in text
    assert "git lfs pull" in text and "FIFO" in text and "a directory named like a release file" in text
    found = {(p["check"], p["file"]) for p in read_problems(out)}
    assert found == {("lfs_pointer", "Aggregated_Subsets/Subset--07-train.json"),
                     ("not_a_file", "Aggregated_Subsets/Subset--05-train.json"),
                     ("not_a_file", "Original_Medical_Datasets/ori--09-train.json")}


def test_input_that_fights_back_never_costs_the_good_records(tmp_path, capsys):
    root = tmp_path / "data"
    good = trees.dataset_records(root, 2, labels=("Cyst", "Stone"), n=6)
    deep = "[" * 5000 + "]" * 5000
    body = ",\n".join([json.dumps(good[0]), deep, json.dumps(good[1])[:-1] + ', "caption": "Stone"}',
                       json.dumps(good[2]), json.dumps(good[3])[:40]])
    rel2 = "Original_Medical_Datasets/ori--02-train.json"
    (root / rel2).parent.mkdir(parents=True, exist_ok=True)
    (root / rel2).write_text("[\n" + body, encoding="utf-8")          # truncated in record 4
    d5 = trees.dataset_records(root, 5, labels=("Benign", "Malignant"), n=8)
    d5[1]["caption"] = "Malignant" if d5[1]["Answer"] == "Benign" else "Benign"   # contradicts its answer
    d5[2]["image"] = "med-mat/evil\x1b[2Jname.png"                                # control characters
    d5[3]["image"] = "med-mat"                                                     # a directory
    trees.write(root, "Original_Medical_Datasets/ori--05-train.json", d5)
    extra = trees.dataset_records(root, 5, labels=("Benign", "Malignant", "Cyst"), n=3, start=100)
    trees.write(root, "Original_Medical_Datasets/ori--05-test.json", [r for r in extra if r["Answer"] == "Cyst"])
    out = tmp_path / "records.parquet"
    assert _cli_ingest(root, out, tmp_path) == 0
    captured = capsys.readouterr()
    assert "Traceback" not in captured.out + captured.err
    got = {(p["check"], p["file"], p["record_id"]) for p in read_problems(out)}
    assert got >= {("too_deep", rel2, None), ("duplicate_key", rel2, 2), ("truncated", rel2, 4),
                   ("caption_contradicts_answer", "Original_Medical_Datasets/ori--05-train.json", 2),
                   ("path_control_character", "Original_Medical_Datasets/ori--05-train.json", 3),
                   ("image_not_a_file", "Original_Medical_Datasets/ori--05-train.json", 4)}
    assert "test_label_not_in_train" in {p["check"] for p in read_problems(out)}
    ids = set(read_records(out).record_id)
    assert {"ori02-train-1", "ori02-train-3", "ori05-train-1", "ori05-train-2", "ori05-train-8"} <= ids
    assert not ids & {"ori02-train-2", "ori02-train-4", "ori05-train-3", "ori05-train-4"}
    report = tmp_path / "validation.json"
    assert main(["validate", "--data", str(root), "--records", str(out), "--report", str(report),
                 "--params", str(tmp_path / "absent.yaml")]) == 1
    checks = {c["check"]: c for c in json.loads(report.read_text())["checks"]}
    assert not checks["ingest.duplicate_key"]["ok"] and checks["ingest.duplicate_key"]["severity"] == "critical"
    assert checks["ingest.caption_contradicts_answer"]["severity"] == "warning"


def test_second_ingest_of_one_output_is_refused(tmp_path, capsys):
    import fcntl
    import os
    root = tmp_path / "data"
    trees.build(root, "release")
    out = tmp_path / "records.parquet"
    lock = tmp_path / ".records.parquet.lock"
    with open(lock, "w") as fh:
        fh.write("pid 4242 on elsewhere, since 2026-01-01 00:00:00\n")
        fh.flush()
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert _cli_ingest(root, out, tmp_path) == 3
        err = capsys.readouterr().err
        assert "being written by another ingest (pid 4242 on elsewhere" in err
    assert not out.exists()
    assert _cli_ingest(root, out, tmp_path) == 0                       # the lock went with its holder
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".records")] == [lock.name]
    assert os.path.getsize(out) > 0


def test_killed_ingest_leaves_table_and_problems_of_one_run(tmp_path):
    """SIGKILL at random points, alternating a clean tree and one with a truncated file: whatever is left
    is one run's table with that run's problems, and the next run clears the dead run's temp files."""
    import random
    import signal
    import subprocess
    import sys
    import time

    from medmat.data.records import data_root_of, read_summary

    good, bad = tmp_path / "good", tmp_path / "bad"
    trees.build(good, "release")
    trees.build(bad, "release")
    (bad / "Original_Medical_Datasets" / "ori--03-train.json").write_text('[{"id": 1, "ima', encoding="utf-8")
    out = tmp_path / "work" / "records.parquet"
    rng = random.Random(0)
    cmd = [sys.executable, "-m", "medmat.cli", "ingest", "--out", str(out), *_no_params(tmp_path)]
    t0 = time.perf_counter()
    subprocess.run([*cmd, "--data", str(good)], check=True, capture_output=True)
    full = time.perf_counter() - t0
    outcomes = set()
    for i in range(6):
        root = bad if i % 2 == 0 else good
        proc = subprocess.Popen([*cmd, "--data", str(root)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(0.4, 1.1) * full)
        proc.send_signal(signal.SIGKILL)
        outcomes.add(proc.wait())
        # Whatever is there is one run's table with that run's problems: the bad tree's run, and only
        # it, reports the truncated file.
        summary, problems = read_summary(out), read_problems(out)
        assert summary["records"] == pq.read_metadata(out).num_rows
        assert sum(summary["problems"].values()) == len(problems)
        truncated = any(p["check"] == "truncated" for p in problems)
        assert truncated == (data_root_of(out) == bad.resolve())
        assert all(p.suffix in (".parquet", ".lock", ".tmp", ".stage") for p in out.parent.iterdir())
    assert -signal.SIGKILL in outcomes
    assert subprocess.run([*cmd, "--data", str(bad)], capture_output=True).returncode == 0
    assert sorted(p.name for p in out.parent.iterdir()) == [".records.parquet.lock", "records.parquet"]
    report = tmp_path / "validation.json"
    assert main(["validate", "--data", str(bad), "--records", str(out), "--report", str(report),
                 "--params", str(tmp_path / "absent.yaml")]) == 1        # the truncated file is reported


def test_same_tree_in_two_checkouts_gives_identical_bytes(tmp_path):
    import shutil
    first = tmp_path / "clone-a" / "data"
    trees.build(first, "release")
    second = tmp_path / "elsewhere" / "clone-b" / "data"
    shutil.copytree(first, second)
    for root in (first, second):
        assert _cli_ingest(root, root.parent / "work" / "records.parquet", tmp_path) == 0
    a, b = (r.parent / "work" / "records.parquet" for r in (first, second))
    assert a.read_bytes() == b.read_bytes()
    assert str(tmp_path).encode() not in a.read_bytes()
    df = read_records(b)
    assert df.image_path.str.startswith(str(second.resolve())).all()
    assert all(Path(p).is_file() for p in df.image_path)
    few = read_records(b, columns=["record_id", "image_path"])
    assert list(few.columns) == ["record_id", "image_path"] and few.image_path.tolist() == df.image_path.tolist()


def test_links_into_dvc_cache_are_accepted_others_escape(tmp_path):
    import os
    repo = tmp_path / "repo"
    root = repo / "data"
    recs = trees.dataset_records(root, 2, labels=("Cyst", "Stone"), n=4)
    (repo / ".dvc" / "cache").mkdir(parents=True)
    for i, r in enumerate(recs[:3]):          # symlink, symlink, hardlink into the cache
        img = root / r["image"]
        cached = repo / ".dvc" / "cache" / "files" / "md5" / f"{i:02d}" / "abc"
        cached.parent.mkdir(parents=True)
        os.replace(img, cached)
        (os.link if i == 2 else os.symlink)(cached, img)
    outside = tmp_path / "outside.png"
    os.replace(root / recs[3]["image"], outside)
    os.symlink(outside, root / recs[3]["image"])
    trees.write(root, "Original_Medical_Datasets/ori--02-train.json", recs)
    df, problems, _ = ingest(root)
    assert sorted(df.record_id) == ["ori02-train-1", "ori02-train-2", "ori02-train-3"]
    assert [(p["check"], p["record_id"]) for p in problems] == [("path_escape", 4)]

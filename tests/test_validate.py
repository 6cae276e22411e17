"""medmat validate: every broken rule and every kind of bad input fails with a report naming file and record.

Each test builds a small world in the public layout (real PNGs, real ingest), breaks one thing, runs
`medmat ingest` then `medmat validate` through the real CLI, and reads the JSON report.
"""

from __future__ import annotations

import json
import os
import shutil

import pytest
from validate_world import (  # noqa: F401 - clean_world and world are fixtures
    ORI2_TRAIN, ORI3_TEST, PER_LABEL, SAMPLE, WORLD, _png, _write, assert_names, build_world, clean_world,
    failing, ingest, pipeline, read, set_cell, tamper, validate, world,
)

from medmat.data.medmat_format import format_question_choice, relative_path
from medmat.validate import CHECKS, ValidateParams


# ---- clean input -----------------------------------------------------------------------------------
def test_clean_world_validates(world, capsys):
    code, report = pipeline(world)
    assert code == 0 and report["passed"], failing(report)
    assert report["records"] == sum(len(v) * sum(PER_LABEL.values()) for v in WORLD.values())
    out = capsys.readouterr().out
    assert "ok   image_readable" in out and "validate: PASSED" in out
    balance = {b["test_set"]: b["counts"] for b in report["test_label_balance"]}
    assert balance["subset 02"] == {"Cyst": 2, "Normal": 2, "Stone": 2, "Tumor": 2}


def test_public_sample_record_validates(tmp_path):
    root = tmp_path / "data"
    rec = json.loads(SAMPLE.read_text(encoding="utf-8"))
    _png(root / rec["image"], 1)
    (root / "Original_Medical_Datasets").mkdir(parents=True)
    (root / relative_path("dataset", 2, "train")).write_text(json.dumps([rec]), encoding="utf-8")
    code, report = pipeline(root)
    assert code == 0, failing(report)
    assert report["records"] == 1


# ---- broken rules (point 7) --------------------------------------------------------------------------
@pytest.mark.parametrize("column,value,check", [
    ("modality", "Xray", "modality_vocabulary"),
    ("area", "Kidneys", "area_vocabulary"),
    ("task", "Kidney Stuff", "task_vocabulary"),
    ("area", "Lung", "triplet_matches_dataset"),       # canonical, but not dataset 2's area
    ("subset_no", 3, "triplet_matches_subset"),        # record claims subset 3 (CT-Lung-COVID)
    ("area", "Liver", "dataset_single_triplet"),       # dataset 2 now has two triplets
])
def test_table_rule_broken(world, column, value, check):
    records = ingest(world)

    tamper(records, lambda df: set_cell(df, "ori02-train-5", column, value))
    code, report = validate(world)
    assert code == 1
    hit = assert_names(report, check, ORI2_TRAIN, "ori02-train-5")
    assert str(value) in hit["message"] or check == "dataset_single_triplet"


def _break_record(world, fn, dataset=2, split="train", index=4):
    recs = read(world, dataset, split)
    fn(recs[index])
    _write(world, dataset, split, recs)
    return f"ori{dataset:02d}-{split}-{recs[index]['id']}"


def test_answer_letter_not_an_option(world):
    rid = _break_record(world, lambda r: r.update({"Answer-choice": "Q"}))
    code, report = pipeline(world)
    assert code == 1
    assert "'Q'" in assert_names(report, "answer_letter_in_options", ORI2_TRAIN, rid)["message"]


def test_answer_differs_from_option(world):
    def edit(r):
        r["Answer-choice"] = "ABCD"[("ABCD".index(r["Answer-choice"]) + 1) % 4]
    rid = _break_record(world, edit)
    code, report = pipeline(world)
    assert code == 1
    assert_names(report, "answer_matches_option", ORI2_TRAIN, rid)


def test_too_few_options(world):
    def edit(r):
        r["Question-choice"] = format_question_choice("Which condition?", [r["Answer"]])
        r["Answer-choice"] = "A"
    rid = _break_record(world, edit)
    code, report = pipeline(world)
    assert code == 1
    assert "1 options" in assert_names(report, "option_count", ORI2_TRAIN, rid)["message"]


def test_repeated_option(world):
    def edit(r):
        r["Question-choice"] = format_question_choice("Which condition?", [r["Answer"], r["Answer"], "Normal"])
        r["Answer-choice"] = "A"
    rid = _break_record(world, edit, index=0)   # label Cyst
    code, report = pipeline(world)
    assert code == 1
    assert_names(report, "options_distinct", ORI2_TRAIN, rid)


def test_answer_outside_label_set(world):
    def edit(r):
        r["Answer"] = r["caption"] = "Cyts"      # a typo no other record offers
        r["Question-choice"] = format_question_choice("Which condition?", ["Cyts", "Normal", "Stone"])
        r["Answer-choice"] = "A"
    rid = _break_record(world, edit)
    code, report = pipeline(world)
    assert code == 1
    assert "'Cyts'" in assert_names(report, "answer_in_label_set", ORI2_TRAIN, rid)["message"]


def test_duplicate_record_id(world):
    # Ingest makes ids unique (and warns about a file's repeated ids); a table edited afterwards may not.
    records = ingest(world)
    tamper(records, lambda df: set_cell(df, "ori02-train-4", "record_id", "ori02-train-3"))
    code, report = validate(world)
    assert code == 1
    assert_names(report, "record_id_unique", ORI2_TRAIN, "ori02-train-3")
    assert failing(report)["record_id_unique"]["failed"] == 2


def test_image_path_escapes_in_table(world):
    records = ingest(world)
    tamper(records, lambda df: set_cell(df, "ori02-train-5", "image", "../outside.png"))
    code, report = validate(world)
    assert code == 1
    assert "'..'" in assert_names(report, "image_path_confined", ORI2_TRAIN, "ori02-train-5")["message"]


def test_image_link_escapes(world, tmp_path):
    outside = tmp_path / "elsewhere"
    _png(outside / "x.png", 999)
    os.symlink(outside, world / "med-mat" / "link")
    records = ingest(world)
    tamper(records, lambda df: set_cell(df, "ori02-train-5", "image", "med-mat/link/x.png"))
    code, report = validate(world)
    assert code == 1
    assert "link" in assert_names(report, "image_path_confined", ORI2_TRAIN, "ori02-train-5")["message"]


def test_path_escape_in_json_reported_from_ingest(world):
    rid = _break_record(world, lambda r: r.update({"image": "/etc/passwd"}))
    code, report = pipeline(world)
    assert code == 1
    assert_names(report, "ingest.path_escape", ORI2_TRAIN, int(rid.rsplit("-", 1)[1]))


def test_image_removed_after_ingest(world):
    # Ingest leaves out records whose images are absent; one that vanishes later is in the table.
    ingest(world)
    (world / read(world, 2, "train")[4]["image"]).unlink()
    code, report = validate(world)
    assert code == 1
    assert "absent" in assert_names(report, "image_present", ORI2_TRAIN, "ori02-train-5")["message"]


def test_train_test_leakage(world):
    # Ingest keeps one image on one side of a subset; a table edited afterwards may not.
    records = ingest(world)
    train, test = read(world, 3, "train"), read(world, 3, "test")
    tamper(records, lambda df: set_cell(df, f"ori03-test-{test[0]['id']}", "image_sha256",
                                        df.loc[df["record_id"] == f"ori03-train-{train[0]['id']}", "image_sha256"].iat[0]))
    code, report = validate(world)
    assert code == 1
    hit = assert_names(report, "train_test_leakage", ORI3_TEST, f"ori03-test-{test[0]['id']}")
    assert "subset 03" in hit["message"]


def _unbalance(world):
    recs = read(world, 3, "test")
    _write(world, 3, "test", [r for r in recs if r["Answer"] != "Normal"])   # subset 03: Normal 2 of 4


def test_unbalanced_test_set_is_a_warning(world):
    _unbalance(world)
    code, report = pipeline(world)
    assert code == 0
    bad = failing(report)
    assert bad["test_label_balance"]["severity"] == "warning"
    assert any(ORI3_TEST in f["file"] for f in bad["test_label_balance"]["failures"])


def test_severity_override_changes_exit_code(world):
    _unbalance(world)
    code, report = pipeline(world, params={"severity": {"test_label_balance": "critical"}})
    assert code == 1 and not report["passed"]
    # ... and the other way: a critical check demoted to a warning no longer fails the stage.
    shutil.rmtree(world)
    build_world(world)
    ingest(world)
    (world / read(world, 2, "train")[4]["image"]).unlink()
    code, _ = validate(world, params={"severity": {"image_present": "warning"}})
    assert code == 0


# ---- bad input (point 8) -----------------------------------------------------------------------------
def _good_records_still_there(report, lost_file_records=0, lost=0):
    total = sum(len(v) * sum(PER_LABEL.values()) for v in WORLD.values())
    assert report["records"] == total - lost_file_records - lost


def test_truncated_json(world):
    # Ingest keeps the records before the cut (medmat.data.json_records); validate fails on the rest.
    path = world / ORI2_TRAIN
    path.write_text(path.read_text(encoding="utf-8")[:-40], encoding="utf-8")
    code, report = pipeline(world)
    assert code == 1
    bad = failing(report)
    hits = [f for c, v in bad.items() if c.startswith("ingest.") for f in v["failures"] if f["file"] == ORI2_TRAIN]
    assert hits and all(f["message"] for f in hits), sorted(bad)
    _good_records_still_there(report, lost=1)


def test_non_utf8(world):
    path = world / ORI2_TRAIN
    path.write_bytes(path.read_bytes().replace(b'"Cyst"', b'"Cyst\xe9"', 1))
    code, report = pipeline(world)
    assert code == 1
    assert "UTF-8" in assert_names(report, "ingest.encoding", ORI2_TRAIN, 1)["message"]
    _good_records_still_there(report, lost=1)


def test_wrong_type(world):
    rid = _break_record(world, lambda r: r.update({"data-no": [2]}))
    code, report = pipeline(world)
    assert code == 1
    assert "data-no" in assert_names(report, "ingest.wrong_type", ORI2_TRAIN, int(rid.rsplit("-", 1)[1]))["message"]
    _good_records_still_there(report, lost=1)


def test_missing_field(world):
    rid = _break_record(world, lambda r: r.pop("Answer-choice"))
    code, report = pipeline(world)
    assert code == 1
    assert "Answer-choice" in assert_names(report, "ingest.missing_field", ORI2_TRAIN,
                                           int(rid.rsplit("-", 1)[1]))["message"]
    _good_records_still_there(report, lost=1)


def test_unknown_data_no(world):
    rid = _break_record(world, lambda r: r.update({"data-no": "999"}))
    code, report = pipeline(world)
    assert code == 1
    assert "999" in assert_names(report, "ingest.unknown_data_no", ORI2_TRAIN, int(rid.rsplit("-", 1)[1]))["message"]
    _good_records_still_there(report, lost=1)


def test_zero_byte_image(world):
    (world / read(world, 2, "train")[4]["image"]).write_bytes(b"")
    code, report = pipeline(world)
    assert code == 1
    assert "empty" in assert_names(report, "image_readable", ORI2_TRAIN, "ori02-train-5")["message"]


def test_truncated_image(world):
    path = world / read(world, 2, "train")[4]["image"]
    path.write_bytes(path.read_bytes()[:60])
    code, report = pipeline(world)
    assert code == 1
    assert_names(report, "image_readable", ORI2_TRAIN, "ori02-train-5")


# ---- params and report -------------------------------------------------------------------------------
def test_params_refuse_unknown_check_and_severity():
    with pytest.raises(ValueError, match="unknown check"):
        ValidateParams(severity={"no_such_check": "warning"})
    with pytest.raises(ValueError, match="critical"):
        ValidateParams(severity={"option_count": "fatal"})
    assert ValidateParams().severity_of("test_label_balance") == "warning"
    assert all(sev in ("critical", "warning") for sev, _ in CHECKS.values())


def test_listing_is_capped_but_count_exact(world):
    records = ingest(world)
    tamper(records, lambda df: df.__setitem__("modality", "Xray"))
    code, report = validate(world, params={"max_listed": 5})
    assert code == 1
    check = failing(report)["modality_vocabulary"]
    assert check["failed"] == report["records"] and check["listed"] == 5


def test_unreadable_records_table_is_a_clear_failure(world, capsys):
    bogus = world.parent / "work" / "records.parquet"
    bogus.parent.mkdir(parents=True)
    bogus.write_bytes(b"not parquet")
    code, report = validate(world, records=bogus)
    assert code == 1
    assert_names(report, "ingest.records_file", str(bogus), None)


def test_label_absent_from_test_set_is_reported(world):
    for dataset in (3, 4):
        _write(world, dataset, "test", [r for r in read(world, dataset, "test") if r["Answer"] != "Normal"])
    code, report = pipeline(world)
    assert code == 0   # a warning by default
    sub3 = next(b for b in report["test_label_balance"] if b["test_set"] == "subset 03")
    assert sub3["counts"]["Normal"] == 0 and sub3["largest_to_smallest"] is None
    assert "'Normal': 0" in failing(report)["test_label_balance"]["failures"][0]["message"]


def test_missing_image_folder_is_one_warning_and_validate_passes(world):
    # A partial download: dataset 4's images were never fetched (its source needs registration).
    shutil.rmtree(world / "med-mat" / "d4")
    code, report = pipeline(world)
    assert code == 0 and report["passed"], failing(report)
    bad = failing(report)
    assert set(bad) == {"ingest.images_missing"}, sorted(bad)
    (hit,) = bad["ingest.images_missing"]["failures"]          # one finding for the dataset, not 10
    assert bad["ingest.images_missing"]["severity"] == "warning" and "4" in hit["message"]
    assert report["records"] == sum(len(v) * sum(PER_LABEL.values()) for d, v in WORLD.items() if d != 4)
    # ... and a user who wants a hard gate makes it critical.
    code, _ = validate(world, params={"severity": {"ingest.images_missing": "critical"}})
    assert code == 1

"""The public on-disk format: file discovery, record round-trip, option parsing, derived splits."""

from __future__ import annotations

import json
import random
import textwrap
from collections import Counter
from pathlib import Path

import pytest

from medmat.data.medmat_format import (
    INSTRUCTION, FormatError, default_file_mode, derive_split, dumps_records, file_name, find_files, format_question_choice,
    make_record, parse_question_choice, read_records, relative_path, write_records,
)

SAMPLE_RECORD_PATH = Path(__file__).parent / "fixtures" / "medmat_sample_record.json"


def test_sample_record_round_trip(sample_record):
    question, options = parse_question_choice(sample_record["Question-choice"])
    assert question == sample_record["Question"]
    assert options == ["Stone", "Cyst", "Normal", "Tumor"]
    assert format_question_choice(question, options) == sample_record["Question-choice"]
    rebuilt = make_record(id=1, caption="Cyst", image=sample_record["image"], question=question,
                          options=options, answer_index=1, data_no=2)
    assert rebuilt == sample_record
    assert list(rebuilt) == list(sample_record)  # same key order as the release


def test_written_file_matches_release_formatting(tmp_path, sample_record):
    fixture_text = SAMPLE_RECORD_PATH.read_text(encoding="utf-8")
    # A file is a list of such records: the record's text, indented one level, inside [ ].
    expected = "[\n" + textwrap.indent(fixture_text.rstrip("\n"), "    ") + "\n]\n"
    assert dumps_records([sample_record]) == expected
    out = write_records(tmp_path / "Original_Medical_Datasets" / file_name("dataset", 2, "train"), [sample_record])
    assert out.read_text(encoding="utf-8") == expected
    assert read_records(out) == [sample_record]
    assert [p.name for p in out.parent.iterdir()] == ["ori--02-train.json"]  # no temp file left
    assert out.stat().st_mode & 0o777 == default_file_mode()  # not mkstemp's 0600


def test_non_ascii_kept_verbatim(tmp_path, sample_record):
    sample_record["caption"] = sample_record["Answer"] = "Kyste rénal"
    out = write_records(tmp_path / "x.json", [sample_record])
    assert "Kyste rénal" in out.read_text(encoding="utf-8")


def test_file_names():
    assert file_name("dataset", 2, "train") == "ori--02-train.json"
    assert file_name("subset", 3, "test") == "Subset--03-test.json"
    assert relative_path("dataset", 104, "test") == "Original_Medical_Datasets/ori--104-test.json"
    with pytest.raises(ValueError):
        file_name("dataset", 2, "dev")


def test_find_files_case_insensitive(tmp_path):
    (tmp_path / "original_medical_datasets").mkdir()
    (tmp_path / "AGGREGATED_SUBSETS").mkdir()
    for rel in ["original_medical_datasets/ORI--02-Train.json", "original_medical_datasets/ori--2-test.json",
                "original_medical_datasets/notes.json", "AGGREGATED_SUBSETS/subset--03-TRAIN.json",
                "AGGREGATED_SUBSETS/Subset--03-dev.json", "ori--05-train.json"]:
        (tmp_path / rel).write_text("[]")
    found = [(f.kind, f.number, f.split, f.rel) for f in find_files(tmp_path)]
    assert found == [  # matched by name anywhere under the root, not by folder
        ("dataset", 2, "train", "original_medical_datasets/ORI--02-Train.json"),
        ("dataset", 2, "test", "original_medical_datasets/ori--2-test.json"),
        ("dataset", 5, "train", "ori--05-train.json"),
        ("subset", 3, "train", "AGGREGATED_SUBSETS/subset--03-TRAIN.json"),
    ]
    assert find_files(tmp_path, kinds=("subset",))[0].prefix == "sub"


def test_parse_multiline_question_and_two_options():
    text = "Line one of the question.\nA: is not an option here\nLine three?\nA: Yes\nB: No\n" + INSTRUCTION
    question, options = parse_question_choice(text)
    assert question == "Line one of the question.\nA: is not an option here\nLine three?"
    assert options == ["Yes", "No"]
    assert format_question_choice(question, options) == text


@pytest.mark.parametrize("text, message", [
    ("Q?\nA: x\nB: y", "instruction line"),
    ("Q?\n" + INSTRUCTION, "instruction line"),
    ("Q?\nfoo\n" + INSTRUCTION, "no options"),
    ("Q?\nB: x\nA: y\n" + INSTRUCTION, "lettered in order"),
    ("Q?\nA: x\nC: y\n" + INSTRUCTION, "lettered 'AB'"),
    ("A: x\nB: y\n" + INSTRUCTION, "no options|no question"),
    (42, "must be a string"),
])
def test_parse_rejects_malformed(text, message):
    with pytest.raises(ValueError, match=message):
        parse_question_choice(text)


def test_format_rejects_bad_options():
    with pytest.raises(ValueError):
        format_question_choice("Q?", ["a", "b", "c", "d", "e"])
    with pytest.raises(ValueError):
        format_question_choice("Q?", ["a\nb", "c"])


@pytest.mark.parametrize("content, check", [
    (b"[{\"id\": 1,", "truncated"),
    (b"[\"caf\xe9\"]", "encoding"),
    (b"{\"id\": 1}", "file_structure"),
    (b"[{\"id\": 1, \"id\": 2}]", "duplicate_key"),
    (b"[" + b"[" * 5000 + b"]" * 5000 + b"]", "too_deep"),
    (b"version https://git-lfs.github.com/spec/v1\noid sha256:ab\nsize 12\n", "lfs_pointer"),
    (b"", "json"),
])
def test_read_records_errors_name_the_file(tmp_path, content, check):
    path = tmp_path / "ori--07-train.json"
    path.write_bytes(content)
    with pytest.raises(FormatError) as err:
        read_records(path, display="Original_Medical_Datasets/ori--07-train.json")
    assert err.value.check == check
    assert "Original_Medical_Datasets/ori--07-train.json" in str(err.value)


def _world(n=300, labels="abcd", seed=0):
    rng = random.Random(seed)
    labs = [rng.choice(labels) for _ in range(n)]
    # Images used twice (two questions per image) and two files with identical content.
    keys = [(f"img/{i // 2}.png", f"sha{i // 2 if i // 2 != 7 else 8}") for i in range(n)]
    return labs, keys


def test_derived_split_is_deterministic_and_order_free():
    labels, keys = _world()
    a = derive_split(labels, keys, seed=3)
    assert a == derive_split(labels, keys, seed=3)
    perm = list(range(len(labels)))
    random.Random(1).shuffle(perm)
    b = derive_split([labels[i] for i in perm], [keys[i] for i in perm], seed=3)
    assert [b[perm.index(i)] for i in range(len(labels))] == a  # file order does not matter
    assert derive_split(labels, keys, seed=4) != a


def test_derived_split_never_shares_an_image():
    labels, keys = _world()
    split = derive_split(labels, keys, seed=0)
    for position in (0, 1):  # by path, and by content
        train = {k[position] for k, s in zip(keys, split) if s == "train"}
        test = {k[position] for k, s in zip(keys, split) if s == "test"}
        assert not train & test
    assert Counter(split)["test"] > 0


def test_derived_split_is_label_balanced_and_about_a_tenth():
    labels = ["common"] * 700 + ["mid"] * 250 + ["rare"] * 50
    keys = [(f"img{i}",) for i in range(len(labels))]
    split = derive_split(labels, keys, seed=0, test_fraction=0.1)
    test = Counter(lab for lab, s in zip(labels, split) if s == "test")
    assert test == {"common": 33, "mid": 33, "rare": 25}  # quota 33 each; rare capped at half of 50
    assert 80 <= sum(test.values()) <= 110


def test_derived_split_keeps_single_examples_in_train():
    assert derive_split(["a", "b"], [("x",), ("y",)], seed=0) == ["train", "train"]
    assert derive_split([], [], seed=0) == []


def test_derived_split_follows_forced_images():
    labels = ["a", "b"] * 50
    keys = [(f"img{i}",) for i in range(100)]
    forced = [None] * 100
    forced[0], forced[1], forced[2] = "test", "train", "test"
    keys[3] = ("img2",)  # shares an image with a record forced to test
    split = derive_split(labels, keys, seed=0, forced=forced)
    assert split[0] == "test" and split[1] == "train" and split[2] == split[3] == "test"
    assert derive_split(labels, keys, seed=0, forced=forced) == split


def test_records_without_image_keys_are_separate_groups():
    split = derive_split(["a"] * 40, [("",)] * 40, seed=0)
    assert Counter(split) == {"train": 36, "test": 4}


# ---- reading files that fight back (medmat.data.json_records) ---------------------------------------
def _rec(i: int, **extra) -> str:
    body = {"id": i, "caption": "Cyst", "image": f"med-mat/x/{i}.png", "Answer": "Cyst", **extra}
    return json.dumps(body)


def test_good_records_survive_bad_neighbours(tmp_path):
    from medmat.data.json_records import BadRecord, load_records

    deep = "[" * 3000 + "]" * 3000
    dup = '{"id": 3, "caption": "a", "caption": "b"}'
    spaced_dup = '{"id": 4, "image" : "x", "image":"y"}'       # whitespace before a colon: exact path
    text = "[\n" + ",\n".join([_rec(1), deep, dup, spaced_dup, '{"id": 5, "caption": }', _rec(6),
                               '{"id": 7, "image": "cut']) + "\n"
    path = tmp_path / "ori--02-train.json"
    path.write_text(text, encoding="utf-8")
    out = load_records(path, "ori--02-train.json")
    assert [r["id"] for r in out if isinstance(r, dict)] == [1, 6]
    bad = {i: (r.check, r.record_id) for i, r in enumerate(out) if isinstance(r, BadRecord)}
    assert bad == {1: ("too_deep", None), 2: ("duplicate_key", 3), 3: ("duplicate_key", 4), 4: ("json", 5),
                   6: ("truncated", 7)}
    assert "'caption'" in out[2].message and "line 6" in out[4].message


def test_fast_path_is_exact_about_duplicates(tmp_path):
    from medmat.data.json_records import BadRecord, load_records

    path = tmp_path / "f.json"
    # A key given twice where a string value also holds '":' - the counts must not cancel out.
    path.write_text(json.dumps([{"id": 1, "caption": 'say "a": b'}])[:-1] + ', {"id": 2, "id": 3}]')
    out = load_records(path)
    assert isinstance(out[0], dict) and isinstance(out[1], BadRecord) and out[1].check == "duplicate_key"
    path.write_text(json.dumps([{"id": 1, "nested": {"a": 1}}, {"id": 2}]))
    assert load_records(path) == [{"id": 1, "nested": {"a": 1}}, {"id": 2}]


def test_fifo_is_never_opened(tmp_path):
    import os

    from medmat.data.json_records import load_records

    fifo = tmp_path / "ori--02-train.json"
    os.mkfifo(fifo)
    with pytest.raises(FormatError) as err:   # would block forever if it were opened
        load_records(fifo)
    assert err.value.check == "not_a_file"

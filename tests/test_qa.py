"""QA construction: the paper's rules for turning image-label pairs into single-choice records."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
from PIL import Image

from medmat.cli import main
from medmat.data import qa
from medmat.data.medmat_format import RECORD_KEYS, parse_question_choice, read_records

SIX = ["Normal", "Cyst", "Tumor", "Stone", "Bleed", "Scar"]


def pairs_for(labels, n_per_label, split=None):
    return [qa.Pair(f"med-mat/x/{lab}/{i}.png", lab, split) for lab in labels for i in range(n_per_label)]


def templates():
    return qa.make_templates("CT", "Kidney", "Kidney Diseases")


def test_templates_six_distinct_and_name_the_triplet():
    t = templates()
    assert len(t) == 6 and len(set(t)) == 6
    assert t[0] == "Review this kidney CT scan and determine the possible condition it represents."
    assert all("CT" in s and "kidney" in s for s in t)
    assert qa.make_templates("X-ray", "Lung", "COVID") != qa.make_templates("CT", "Lung", "COVID")


@pytest.mark.parametrize("labels", [SIX[:2], SIX[:3], SIX[:4], SIX])
def test_options_distractors_and_answers(labels):
    recs = qa.build_records(pairs_for(labels, 12), labels, templates(), 2, seed=0)
    k = min(4, len(labels))
    for r in recs:
        assert tuple(r) == RECORD_KEYS
        question, options = parse_question_choice(r["Question-choice"])
        assert question == r["Question"] and question in templates()
        assert len(options) == k and len(set(options)) == k          # <= 4 distinct options
        assert set(options) <= set(labels)                             # distractors from the subset's labels
        assert options["ABCD".index(r["Answer-choice"])] == r["Answer"] == r["caption"]
        assert r["data-no"] == "2"
    assert [r["id"] for r in recs] == list(range(1, len(recs) + 1))


@pytest.mark.parametrize("n_labels", [2, 3, 4, 6])
def test_answer_letters_balanced(n_labels):
    labels = SIX[:n_labels]
    recs = qa.build_records(pairs_for(labels, 25), labels, templates(), 2, seed=3)
    letters = Counter(r["Answer-choice"] for r in recs)
    assert set(letters) == set("ABCD"[: min(4, n_labels)])
    assert max(letters.values()) - min(letters.values()) <= 1
    # and not tied to the label: every label is answered under more than one letter
    per_label = {lab: {r["Answer-choice"] for r in recs if r["Answer"] == lab} for lab in labels}
    assert all(len(v) > 1 for v in per_label.values())


def test_distractors_vary_with_more_than_four_labels():
    recs = qa.build_records(pairs_for(SIX, 30), SIX, templates(), 2, seed=0)
    seen = set()
    for r in recs:
        seen |= set(parse_question_choice(r["Question-choice"])[1])
    assert seen == set(SIX)
    assert len({r["Question"] for r in recs}) == 6                  # all six instructions used


def test_deterministic_for_a_seed():
    p = pairs_for(SIX[:4], 10)
    a = qa.build_records(p, SIX[:4], templates(), 2, seed=7)
    assert a == qa.build_records(p, SIX[:4], templates(), 2, seed=7)
    assert a != qa.build_records(p, SIX[:4], templates(), 2, seed=8)


def test_train_cap_and_label_balance():
    # unbalanced input: 500 Normal, 40 Cyst, 300 Tumor
    p = pairs_for(["Normal"], 500) + pairs_for(["Cyst"], 40) + pairs_for(["Tumor"], 300)
    sel = qa.balanced_select(p, 300, seed=0)
    c = Counter(x.label for x in sel)
    assert len(sel) == 300
    # exact expectation: round-robin, Cyst runs out at 40 and leaves its share to the others
    assert c["Cyst"] == 40 and c["Normal"] == c["Tumor"] == 130
    assert len({x.image for x in sel}) == 300
    assert qa.balanced_select(p, 300, seed=0) == sel
    assert qa.balanced_select(p, None, seed=0).__len__() == len(p)


def test_default_cap_is_3000_per_subset():
    p = pairs_for(["Normal", "Cyst"], 2000)
    out = qa.build_dataset_qa([qa.Pair(x.image, x.label, "train") for x in p] + pairs_for(["Normal", "Cyst"], 5, "test"),
                              ["Normal", "Cyst"], templates(), 2, seed=0)
    assert qa.DEFAULT_TRAIN_CAP == 3000
    assert len(out["train"]) == 3000
    assert Counter(r["Answer"] for r in out["train"]) == {"Normal": 1500, "Cyst": 1500}


def test_test_set_label_balanced():
    p = pairs_for(["Normal"], 50, "test") + pairs_for(["Cyst"], 9, "test") + pairs_for(["Tumor"], 20, "test")
    t = qa.balanced_test(p, seed=0)
    assert Counter(x.label for x in t) == {"Normal": 9, "Cyst": 9, "Tumor": 9}


def test_split_nine_to_one_without_shared_images():
    p = pairs_for(["Normal", "Cyst"], 50)
    p.append(qa.Pair(p[0].image, "Normal"))                          # the same image twice
    train, test = qa.split_pairs(p, seed=0)
    assert len({x.image for x in test}) == 10                       # 10% of the distinct images
    assert not {x.image for x in train} & {x.image for x in test}
    assert Counter(x.label for x in set(test)) == {"Normal": 5, "Cyst": 5}
    own = pairs_for(["Normal"], 3, "train") + pairs_for(["Cyst"], 2, "test")
    assert [len(s) for s in qa.split_pairs(own, seed=0)] == [3, 2]


def test_bad_input_is_a_clear_error():
    with pytest.raises(qa.QAError, match="not in the subset's label set"):
        qa.build_records(pairs_for(["Alien"], 1), SIX[:3], templates(), 2, seed=0)
    with pytest.raises(qa.QAError, match=">= 2 labels"):
        qa.build_records(pairs_for(["Normal"], 1), ["Normal"], templates(), 2, seed=0)


def _png(path, value):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((8, 8), value, np.uint8)).save(path)


def test_cli_folder_per_class(tmp_path):
    src = tmp_path / "raw"
    for lab in ("Normal", "Cyst", "Tumor", "Stone"):
        for i in range(10):
            _png(src / lab / f"img{i}.png", i * 10)
    out = tmp_path / "root"
    assert main(["build-qa", "--pairs", str(src), "--subset", "2", "--dataset", "2", "--out", str(out)]) == 0
    train = read_records(out / "Original_Medical_Datasets" / "ori--02-train.json")
    test = read_records(out / "Original_Medical_Datasets" / "ori--02-test.json")
    assert len(train) == 36 and len(test) == 4
    for r in train + test:
        assert (out / r["image"]).is_file() and r["image"].startswith("med-mat/002_CT_Kindney_Dataset/")
        assert "CT scan" in r["Question"] and "kidney" in r["Question"]
    assert not {r["image"] for r in train} & {r["image"] for r in test}


def test_cli_csv_with_own_split_and_cap(tmp_path):
    rows = ["image,label,split"]
    for i in range(20):
        _png(tmp_path / "imgs" / f"{i}.png", i)
        rows.append(f"imgs/{i}.png,{'COVID-19' if i % 2 else 'Normal'},{'test' if i < 4 else 'train'}")
    (tmp_path / "pairs.csv").write_text("\n".join(rows) + "\n")
    out = tmp_path / "root"
    rc = main(["build-qa", "--pairs", str(tmp_path / "pairs.csv"), "--subset", "3", "--dataset", "4",
               "--out", str(out), "--train-cap", "6", "--labels", "COVID-19,Pneumonia,Normal"])
    assert rc == 0
    train = json.loads((out / "Original_Medical_Datasets" / "ori--04-train.json").read_text())
    assert len(train) == 6 and Counter(r["Answer"] for r in train) == {"COVID-19": 3, "Normal": 3}
    assert all(len(parse_question_choice(r["Question-choice"])[1]) == 3 for r in train)


def test_cli_bad_csv_and_wrong_subset(tmp_path, caplog):
    (tmp_path / "bad.csv").write_text("file,class\nx.png,A\n")
    out = tmp_path / "root"
    assert main(["build-qa", "--pairs", str(tmp_path / "bad.csv"), "--subset", "2", "--dataset", "2", "--out", str(out)]) == 1
    assert "bad.csv" in caplog.text and "image,label" in caplog.text
    (tmp_path / "missing.csv").write_text("image,label\nnope.png,A\n")
    assert main(["build-qa", "--pairs", str(tmp_path / "missing.csv"), "--subset", "2", "--dataset", "2", "--out", str(out)]) == 1
    assert "line 2" in caplog.text
    assert main(["build-qa", "--pairs", str(tmp_path), "--subset", "3", "--dataset", "2", "--out", str(out)]) == 1
    assert "belongs to subset 2" in caplog.text

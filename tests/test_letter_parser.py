"""The `generate` scorer's letter parser on real-looking model answers, readable and not."""

import pytest

from medmat.scoring import parse_letter

KIDNEY = ["Stone", "Cyst", "Normal", "Tumor"]
LUNG = ["COVID-19", "Normal", "Viral Pneumonia", "Bacterial Pneumonia"]
NESTED = ["Cancer", "Lung Cancer", "Normal"]

CASES = [
    # bare letters and delimiters
    ("B", KIDNEY, "B"),
    ("b", KIDNEY, "B"),
    ("B:", KIDNEY, "B"),
    ("(B)", KIDNEY, "B"),
    ("B.", KIDNEY, "B"),
    ("B)", KIDNEY, "B"),
    ("[C]", KIDNEY, "C"),
    ("  D  \n", KIDNEY, "D"),
    ("**B**", KIDNEY, "B"),
    ("'C'", KIDNEY, "C"),
    ("B: Cyst", KIDNEY, "B"),
    ("(B) Cyst", KIDNEY, "B"),
    ("C. Normal", KIDNEY, "C"),
    ("D) Tumor.", KIDNEY, "D"),
    ("a", KIDNEY, "A"),
    ("A", KIDNEY, "A"),
    ("B\nThe cyst is round and well defined.", KIDNEY, "B"),
    # answer phrases
    ("The answer is B", KIDNEY, "B"),
    ("The answer is B.", KIDNEY, "B"),
    ("Answer: B", KIDNEY, "B"),
    ("answer: b", KIDNEY, "B"),
    ("Answer:(C)", KIDNEY, "C"),
    ("The correct answer is (D) Tumor.", KIDNEY, "D"),
    ("The correct option is C", KIDNEY, "C"),
    ("Option A", KIDNEY, "A"),
    ("answer is d.", KIDNEY, "D"),
    ("The answer is: C. Normal", KIDNEY, "C"),
    ("It is B.", KIDNEY, "B"),
    ("I would choose: C", KIDNEY, "C"),
    ("B because the lesion is round", KIDNEY, "B"),
    # option text instead of its letter
    ("Cyst", KIDNEY, "B"),
    ("cyst.", KIDNEY, "B"),
    ("  TUMOR ", KIDNEY, "D"),
    ("The image shows a cyst.", KIDNEY, "B"),
    ("The answer is a cyst", KIDNEY, "B"),  # lower-case "a" followed by a word is the article
    ("A cyst", KIDNEY, "B"),
    ("Normal kidney", KIDNEY, "C"),
    ("covid-19", LUNG, "A"),
    ("This chest X-ray suggests viral pneumonia.", LUNG, "C"),
    ("Lung Cancer", NESTED, "B"),  # the longer option, not also "Cancer"
    ("cancer", NESTED, "A"),
    # unreadable: counted wrong and unparseable
    ("", KIDNEY, None),
    ("   ", KIDNEY, None),
    (None, KIDNEY, None),
    ("E", KIDNEY, None),  # no option E
    ("Answer: E", KIDNEY, None),
    ("I cannot tell from this image.", KIDNEY, None),
    ("B or C", KIDNEY, None),
    ("A or B", KIDNEY, None),
    ("Stone or Cyst", KIDNEY, None),
    ("Abnormal", KIDNEY, None),  # "normal" only as part of a word
    ("Pneumonia", LUNG, None),  # contained in two options
    ("none of the above", KIDNEY, None),
    ("The kidney", KIDNEY, None),
    ("12345", KIDNEY, None),
]


@pytest.mark.parametrize("text, options, expected", CASES, ids=[repr(c[0])[:40] for c in CASES])
def test_parse_letter(text, options, expected):
    assert parse_letter(text, options) == expected


def test_letter_beyond_two_options_is_unparseable():
    # Binary tasks (Normal / Cancer) have only A and B.
    assert parse_letter("C", ["Normal", "Cancer"]) is None
    assert parse_letter("The answer is C", ["Normal", "Cancer"]) is None
    assert parse_letter("b", ["Normal", "Cancer"]) == "B"

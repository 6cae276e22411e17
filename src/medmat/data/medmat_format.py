"""The public Med-MAT on-disk format: find, read and write its JSON files; derive missing test splits.

Layout under a data root, as published (the release has only `-train.json` files; test splits are
derived by ingest):

    Original_Medical_Datasets/ori--NN-train.json     one file per dataset (NN = data-no)
    Aggregated_Subsets/Subset--NN-train.json         one file per subset: its datasets' records, each
                                                     dataset with its own ids 1..n
    med-mat/...                                      images, paths relative to the root

Other spellings the release has used are found too (medmat.data.discovery): `Ori--NN`, `Subset-NN`,
files at the root or in a misspelled folder.

Each file is a JSON list of records exactly like `tests/fixtures/medmat_sample_record.json`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter, defaultdict
from collections.abc import Hashable, Iterable, Sequence
from pathlib import Path

from medmat.data.discovery import discover
from medmat.data.json_records import load_records_strict
from medmat.data.release_files import FILE_PATTERNS, SPLITS, FormatError, SourceFile  # noqa: F401 (re-exported)
from medmat.io import atomic_write_text, default_file_mode  # noqa: F401  (re-exported for ingest)
from medmat.names import LETTERS as ALL_LETTERS

ORIGINAL_DIR = "Original_Medical_Datasets"
SUBSET_DIR = "Aggregated_Subsets"
INSTRUCTION = "Answer with the option's letter from the given choices directly."
MAX_OPTIONS = 4  # Med-MAT records have at most four options (A-D)
LETTERS = ALL_LETTERS[:MAX_OPTIONS]
# Key order of a public record (json.dump keeps dict order, so written files match the release).
RECORD_KEYS = ("id", "caption", "image", "Question", "Answer", "Question-choice", "Answer-choice", "data-no")
# The paper's 9:1 split where a dataset has no split of its own.
DEFAULT_TEST_FRACTION = 0.1

_DIR_OF = {"dataset": ORIGINAL_DIR, "subset": SUBSET_DIR}


def file_name(kind: str, number: int, split: str) -> str:
    """`file_name("dataset", 2, "train")` -> 'ori--02-train.json' (the release pads to two digits)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if kind == "dataset":
        return f"ori--{int(number):02d}-{split}.json"
    if kind == "subset":
        return f"Subset--{int(number):02d}-{split}.json"
    raise ValueError(f"kind must be 'dataset' or 'subset', got {kind!r}")


def relative_path(kind: str, number: int, split: str) -> str:
    """Where a file lives under the data root, e.g. 'Original_Medical_Datasets/ori--02-train.json'."""
    return f"{_DIR_OF[kind]}/{file_name(kind, number, split)}"


def find_files(data_root: str | os.PathLike, kinds: Iterable[str] = ("dataset", "subset")) -> list[SourceFile]:
    """The release's JSON files under `data_root`, sorted by (kind, number, split): every layout the
    release has used, matched by file name anywhere under the root (medmat.data.discovery)."""
    return [f for f in discover(data_root).files if f.kind in tuple(kinds)]


def read_records(path: str | os.PathLike, display: str | None = None) -> list[dict]:
    """The records of one JSON file. Raises FormatError (naming the file, and the record where one is
    at fault) for unreadable bytes, non-UTF-8 text, malformed JSON, a top level that is not a list, a
    duplicated key or nesting too deep. Ingest reads files tolerantly (medmat.data.json_records)."""
    return load_records_strict(path, display)


def format_question_choice(question: str, options: Sequence[str]) -> str:
    """The `Question-choice` prompt: question, options 'A: ...' one per line, the instruction line."""
    if not 1 <= len(options) <= MAX_OPTIONS:
        raise ValueError(f"1..{MAX_OPTIONS} options expected, got {len(options)}")
    for opt in options:
        if "\n" in str(opt):
            raise ValueError(f"option {opt!r} contains a line break")
    lines = [question.rstrip("\n")]
    lines += [f"{LETTERS[i]}: {opt}" for i, opt in enumerate(options)]
    lines.append(INSTRUCTION)
    return "\n".join(lines)


def parse_question_choice(text: str) -> tuple[str, list[str]]:
    """(question, options) of a `Question-choice` prompt; inverse of format_question_choice.

    Read from the end: the last line is the instruction, the lines before it are options ending
    with 'A: ...' (so a question that itself spans lines, or mentions 'A:', parses right).
    Raises ValueError with a message saying what is wrong.
    """
    if not isinstance(text, str):
        raise ValueError(f"Question-choice must be a string, got {type(text).__name__}")
    lines = text.rstrip("\n").split("\n")
    if len(lines) < 3 or lines[-1].strip() != INSTRUCTION:
        raise ValueError(f"Question-choice must end with the instruction line {INSTRUCTION!r}")
    options: list[str] = []
    i = len(lines) - 2
    while i >= 1:
        line = lines[i]
        if len(line) >= 2 and line[1] == ":" and line[0] in LETTERS:
            options.append(line[2:].strip())
            i -= 1
            if line[0] == "A":
                break
        else:
            break
    options.reverse()
    n = len(options)
    if n == 0 or lines[i + 1][0] != "A":
        raise ValueError("Question-choice has no options 'A: ...' before the instruction line")
    got = "".join(lines[j][0] for j in range(i + 1, i + 1 + n))
    if got != LETTERS[:n]:
        raise ValueError(f"options must be lettered {LETTERS[:n]!r} in order, got {got!r}")
    above = lines[i]
    if len(above) >= 2 and above[1] == ":" and above[0] in LETTERS:
        # 'B: x' right above 'A: y' is a shuffled option list, not the end of a question.
        raise ValueError(f"options must be lettered in order A..D; found {above[:2]!r} before 'A:'")
    question = "\n".join(lines[: i + 1]).strip()
    if not question:
        raise ValueError("Question-choice has no question before its options")
    return question, options


def make_record(*, id: int, caption: str, image: str, question: str, options: Sequence[str],
                answer_index: int, data_no: int | str) -> dict:
    """A record in the release's exact key order. The free-text `Answer` is the option's text."""
    if not 0 <= answer_index < len(options):
        raise ValueError(f"answer_index {answer_index} outside {len(options)} options")
    return {
        "id": id,
        "caption": caption,
        "image": image,
        "Question": question,
        "Answer": options[answer_index],
        "Question-choice": format_question_choice(question, options),
        "Answer-choice": LETTERS[answer_index],
        "data-no": str(int(data_no)),
    }


def dumps_records(records: Sequence[dict]) -> str:
    """The JSON text of a file, formatted like the release (indent 4, UTF-8 kept, final newline)."""
    return json.dumps(list(records), indent=4, ensure_ascii=False) + "\n"


def write_records(path: str | os.PathLike, records: Sequence[dict]) -> Path:
    """Write one file atomically (medmat.io): readers never see half a file."""
    return atomic_write_text(path, dumps_records(records))


def derive_split(labels: Sequence[str], image_keys: Sequence[Sequence[Hashable]], *, seed: int = 0,
                 test_fraction: float = DEFAULT_TEST_FRACTION,
                 forced: Sequence[str | None] | None = None) -> list[str]:
    """'train'/'test' for each record of a release file that has no test file of its own.

    - Deterministic: groups are ordered by a hash of (seed, group key), not by file order.
    - No image in both splits: records sharing any image key (its path, its content hash, ...) form
      one group (union-find) and a group goes to one split whole.
    - Label-balanced test set, as the paper's: each label gets the same quota
      (test_fraction x records / labels), capped at half the label's records so that train keeps
      examples of every label; a rare label therefore gets fewer test records, never more.
    - `forced` (optional, per record): a split the record's image already has elsewhere (e.g. in
      another dataset of the same subset). Its whole group follows it, so an image shared across
      files is not split either; a group forced both ways stays in train.
    """
    n = len(labels)
    if len(image_keys) != n:
        raise ValueError("labels and image_keys must have the same length")
    if n == 0:
        return []
    # Union-find over the distinct key tuples (few: images repeat across records), not the records.
    image_keys = [k if type(k) is tuple else tuple(k) for k in image_keys]
    # A record with no usable key is its own group (not one group of all key-less records).
    image_keys = [k if any(x is not None and x != "" for x in k) else (("\x00record", i),)
                  for i, k in enumerate(image_keys)]
    tuples = list(dict.fromkeys(image_keys))
    parent = list(range(len(tuples)))

    def find(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    owner: dict[Hashable, int] = {}
    for t, keys in enumerate(tuples):
        for key in keys:
            if key is None or key == "":
                continue
            o = owner.setdefault(key, t)
            if o != t:
                a, b = find(o), find(t)
                if a != b:
                    parent[max(a, b)] = min(a, b)
    root_of_tuple = {tup: find(t) for t, tup in enumerate(tuples)}
    group = [root_of_tuple[k] for k in image_keys]

    # Each group is named by its smallest key, so its place in the draw ignores file order.
    name: dict[int, str] = {}
    for tup, g in root_of_tuple.items():
        text = min((repr(k) for k in tup if k is not None and k != ""), default=None)
        if text is None:  # a record without any image key is a group of its own
            continue
        if g not in name or text < name[g]:
            name[g] = text
    need: dict[int, Counter] = defaultdict(Counter)
    for (g, lab), c in Counter(zip(group, labels)).items():
        need[g][lab] = c
    per_label = Counter(labels)
    quota = max(1, round(test_fraction * n / len(per_label)))
    cap = {lab: min(quota, c // 2) for lab, c in per_label.items()}
    order = sorted(need, key=lambda g: hashlib.sha256(f"{seed}\x00{name.get(g, g)}".encode()).hexdigest())
    taken: Counter = Counter()
    test_groups = set()
    if forced is not None:
        if len(forced) != n:
            raise ValueError("forced must have one entry per record")
        pinned: dict[int, set] = defaultdict(set)
        for g, f in zip(group, forced):
            if f is not None:
                pinned[g].add(f)
        for g, fs in pinned.items():
            if fs == {"test"}:
                test_groups.add(g)
                taken.update(need[g])
        order = [g for g in order if g not in pinned]
    for g in order:
        if all(taken[lab] + c <= cap[lab] for lab, c in need[g].items()):
            taken.update(need[g])
            test_groups.add(g)
    return ["test" if g in test_groups else "train" for g in group]

"""Derived test splits of the records table, per subset over all its files.

The release ships only `-train.json` files, so test splits are derived, per SUBSET across all its
datasets and files (medmat_format.derive_split: seeded, label-balanced, never one image - by path or
content - on both sides). Records of a file's own split, or of a test split the other side ships, keep
it (`forced`). Ingest spills each file's rows to its stage as they are read and keeps only a `Part` of
light columns per file here; the splits are derived once every file has been read.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from itertools import compress
from typing import Callable

import numpy as np

from medmat.data.medmat_format import derive_split


@dataclass
class Part:
    """Light columns of one file's rows in the table."""

    offset: int                  # row of the table where the file's rows start
    rel: str                     # the file, relative to the data root
    group: int | list[int]       # subset of the rows (-dataset for one without a subset): one for all, or per row
    label: list[str]
    key: list[tuple[str, str]]   # (image path, content hash)
    forced: list[str | None]     # split a row must keep, else None (derived)
    table_id: list[str]


def derive_splits(parts: list[Part], n_rows: int, seed: int, test_fraction: float,
                  warn: Callable[..., None]) -> tuple[np.ndarray, int]:
    """(test flag of every row of the table, number of groups with derived rows). `warn(check, file,
    message, table_id)` reports a label of a subset that has test records but none in training."""
    by_group: dict[int, list[tuple[Part, list[int] | None]]] = {}
    for part in parts:   # a part's rows are all of one group, but for misfiled records
        if type(part.group) is int:
            by_group.setdefault(part.group, []).append((part, None))
            continue
        at: dict[int, list[int]] = {}
        for i, g in enumerate(part.group):
            at.setdefault(g, []).append(i)
        for g, rows in at.items():
            by_group.setdefault(g, []).append((part, rows))
    is_test = np.zeros(n_rows, bool)
    derived_groups = 0
    for g, pieces in sorted(by_group.items()):
        labels: list[str] = []
        keys: list[tuple] = []
        forced: list[str | None] = []
        for part, rows in pieces:    # the group's rows in table order
            for out, col in ((labels, part.label), (keys, part.key), (forced, part.forced)):
                out += col if rows is None else [col[i] for i in rows]
        derived = derive_split(labels, keys, seed=seed, test_fraction=test_fraction, forced=forced)
        derived_groups += None in forced
        test = np.fromiter(map("test".__eq__, derived), bool, len(derived))
        done = 0
        for part, rows in pieces:
            k = len(part.label) if rows is None else len(rows)
            where = slice(part.offset, part.offset + k) if rows is None else part.offset + np.array(rows)
            is_test[where] = test[done:done + k]
            done += k
        _labels_missing_in_train(g, pieces, labels, test, warn)
    return is_test, derived_groups


def _labels_missing_in_train(group: int, pieces: list, labels: list[str], test: np.ndarray, warn) -> None:
    missing = set(compress(labels, test)) - set(compress(labels, ~test))
    if not missing:
        return
    first: dict[str, tuple[str, str]] = {}
    count: Counter = Counter()
    where = [(part, i) for part, rows in pieces for i in (range(len(part.label)) if rows is None else rows)]
    for (part, i), lab, t in zip(where, labels, test.tolist()):
        if t and lab in missing:
            first.setdefault(lab, (part.rel, part.table_id[i]))
            count[lab] += 1
    what = f"subset {group:02d}" if group > 0 else f"dataset {-group} (no subset)"
    for lab, (rel, table_id) in sorted(first.items()):
        warn("test_label_not_in_train", rel, f"{what}: label {lab!r} has {count[lab]} test record(s) but none "
             "in training", table_id)

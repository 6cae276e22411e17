"""The names and kinds of the release's JSON files, and the error for a file or record out of format.

A base module (no imports of its siblings) shared by medmat_format, discovery and json_records.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

SPLITS = ("train", "test")

# File names the release has used: `ori--NN`, `Ori--NN`, `Subset--NN`, `Subset-NN` (one hyphen).
FILE_PATTERNS = {
    "dataset": re.compile(r"^ori-{1,2}(\d+)-(train|test)\.json$", re.IGNORECASE),
    "subset": re.compile(r"^subset-{1,2}(\d+)-(train|test)\.json$", re.IGNORECASE),
}


class FormatError(ValueError):
    """A file or record that does not follow the public format; names the file and record."""

    def __init__(self, message: str, file: str | os.PathLike | None = None, index: int | None = None,
                 record_id: object = None, check: str = "format"):
        # `check` names the kind of fault (encoding, json, file_structure, ...) for problem reports.
        self.file, self.index, self.record_id, self.reason, self.check = file, index, record_id, message, check
        where = []
        if file is not None:
            where.append(str(file))
        if index is not None:
            where.append(f"record #{index}" + (f" (id {record_id!r})" if record_id is not None else ""))
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


@dataclass(frozen=True)
class SourceFile:
    """One JSON file of the release: which side (dataset/subset), its number and split."""

    path: Path       # absolute
    rel: str         # relative to the data root, '/'-separated
    kind: str        # "dataset" (ori--NN) or "subset" (Subset--NN)
    number: int
    split: str       # "train" or "test"

    @property
    def prefix(self) -> str:
        """Record-id prefix: 'ori' for per-dataset files, 'sub' for subset files."""
        return "ori" if self.kind == "dataset" else "sub"

    def id_prefix(self, dataset_no: int) -> str:
        """Table id prefix of a record of `dataset_no` in this file: `ori02-train-` in a dataset file,
        `sub03-d04-train-` in a subset file (its datasets each restart their ids at 1)."""
        if self.kind == "dataset":
            return f"ori{self.number:02d}-{self.split}-"
        return f"sub{self.number:02d}-d{dataset_no:02d}-{self.split}-"

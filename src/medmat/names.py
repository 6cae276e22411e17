"""The names every stage shares: answer letters and subset/target numbers, spelled one way.

A subset is named by its zero-padded number ("04") everywhere a name is written down: mixture
components, designs folders (`work/designs/03/`), run directories, MLflow tags and metric names
(`test_s04_accuracy`), predictions. A target is a subset number when it has one, else its triplet
("CT-Lung-COVID"), as the designs name its folder.

This module imports nothing from medmat, so every module can use it.
"""

from __future__ import annotations

import math
from typing import Any

# Option letters in order: option i of a record is LETTERS[i]. Med-MAT records have at most four
# options (medmat.data.medmat_format.MAX_OPTIONS); scorers and parsers accept any count up to 26.
LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _missing(value: Any) -> bool:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return True
    try:  # pandas NA / NaT and numpy NaN without importing pandas here
        return bool(value != value)
    except (TypeError, ValueError):  # pd.NA's comparison refuses bool()
        return True


def subset_key(value: Any, missing: str | None = None) -> str:
    """A subset number as its name: 4, "4", "04", 4.0, numpy int -> "04".

    A missing value (None, NaN, pandas NA) gives `missing` when one is given (evaluation groups
    records without a subset under "NA"), else ValueError; anything else that is not a whole number
    is a ValueError naming the value.
    """
    if _missing(value):
        if missing is not None:
            return missing
        raise ValueError(f"no subset number (got {value!r})")
    if isinstance(value, float):
        if not value.is_integer():
            raise ValueError(f"{value!r} is not a subset number")
        value = int(value)
    text = str(value).strip()
    if not text.isdigit():
        raise ValueError(f"{value!r} is not a subset number")
    return f"{int(text):02d}"


def norm_target(value: Any) -> str:
    """A target as the designs and run directories name it: 3, "3", "03" -> "03"; a triplet
    ("CT-Lung-COVID") stays as written."""
    text = str(value).strip()
    if isinstance(value, int) or text.isdigit():
        return subset_key(text)
    if not text:
        raise ValueError("empty target")
    return text

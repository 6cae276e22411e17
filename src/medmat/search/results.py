"""What a finished study leaves behind: best_mixture.json, history.csv, and the benchmark's trial counts."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from optuna.trial import TrialState

from medmat.io import atomic_write_json, atomic_write_text
from medmat.search.space import SOURCE, WARM, SearchError, mixture_of
from medmat.search.storage import FINISHED

HISTORY_FIELDS = ["trial", "value", "state", "source", "total", "mixture"]


def history_rows(study) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rows.append({
            "trial": t.number,
            "value": "" if t.value is None else t.value,
            "state": t.state.name,
            "source": t.user_attrs.get(SOURCE, ""),
            "total": sum(mixture_of(t).values()),
            "mixture": json.dumps(mixture_of(t), sort_keys=True),
        })
    return rows


def write_outputs(study, out_dir: Path, target: str, seed: int, extra: Mapping[str, Any] | None = None) -> dict:
    """best_mixture.json (a mixture manifest spec: retrain it like any arm) + history.csv.

    `extra` may carry the best mixture's resolved selection (record_ids, sha256, total, exact_total):
    then `medmat.mixture.select_manifest` retrains on exactly the records the trial trained on."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise SearchError(f"study {study.study_name}: no completed trial, no best mixture")
    best = study.best_trial
    manifest = {
        "components": mixture_of(best),
        "seed": int(seed),
        "arm": "search_best",
        "target": target,
        "study": study.study_name,
        "trial": best.number,
        "dev_accuracy": best.value,
        "source": best.user_attrs.get(SOURCE, ""),
        "n_trials": sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED),
        **dict(extra or {}),
    }
    atomic_write_json(Path(out_dir) / "best_mixture.json", manifest, indent=1)
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=HISTORY_FIELDS)
    writer.writeheader()
    writer.writerows(history_rows(study))
    atomic_write_text(Path(out_dir) / "history.csv", buf.getvalue())
    return manifest


def trials_to_reach(values: Sequence[float | None], threshold: float) -> int | None:
    """1-based number of trials (in order) until one reaches (>=) `threshold`; None if none does."""
    for i, v in enumerate(values, 1):
        if v is not None and v >= threshold - 1e-12:
            return i
    return None


def trials_to_beat(trials: Sequence[Any], threshold: float) -> int | None:
    """1-based position (in trial order) of the first trial that is NOT a warm-start trial and strictly
    exceeds `threshold`; None if none does. Warm-start trials count in the position (they cost a
    training each) but can never be the answer: when the threshold is the best warm-start arm, a
    warm-start trial beating it would only be measurement noise of the arm against itself."""
    for i, t in enumerate(sorted(trials, key=lambda t: t.number), 1):
        if WARM in t.user_attrs:
            continue
        if t.state == TrialState.COMPLETE and t.value is not None and t.value > threshold + 1e-12:
            return i
    return None

"""Scoring: multiple-choice accuracy with Wilson 95% intervals, per subset, with confusion matrices.

Two scorers, as in the Med-MAT paper's setting:
- `likelihood`: the option the model scores highest (`backend.score_options`), exact ties broken at
  random per record (`tie_break`); never unparseable.
- `generate`: greedy text (`backend.generate`), then `parse_letter` reads the answer letter from it;
  text it cannot read counts wrong and is counted as unparseable (reported, never hidden).

    result = evaluate_backend(backend, test_df, scorer="likelihood", seed=0)   # -> EvalResult
    write_outputs(result, RUN_DIR, extra)   # metrics.json, predictions.jsonl, confusion.json (+ PNGs)

Statistics live in medmat.stats, the confusion-matrix pictures in medmat.eval_plots; the `medmat
evaluate` CLI (medmat.evaluate) and the pipeline call these functions.
"""

from __future__ import annotations

import dataclasses
import json
import random
import re
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_text
from medmat.names import LETTERS, subset_key
from medmat.stats import wilson_ci

SCORERS = ("likelihood", "generate")


@dataclasses.dataclass
class EvalConfig:
    """`evaluate:` section of params.yaml."""

    scorer: str = "likelihood"
    batch_size: int = 64
    metric_prefix: str = "test"  # MLflow metric names: <prefix>_accuracy, <prefix>_s04_accuracy, ...

    def __post_init__(self) -> None:
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if int(self.batch_size) < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if not re.fullmatch(r"[A-Za-z0-9_]+", self.metric_prefix):
            raise ValueError(f"metric_prefix must be letters, digits or _, got {self.metric_prefix!r}")


# -------------------------------------------------------------------------------- letter parser

_EDGE = " \t\r\n\"'`*_.,;:!?()[]{}<>"
# "The answer is B", "Answer: (b)", "correct option is C.", "choice D"
_KEYWORD = re.compile(
    r"\b(?:answer|option|choice)s?\b(?:\s+(?:is|would\s+be|should\s+be|=))?\s*[:=]?\s*"
    r"(?:option\s+|letter\s+|choice\s+)?[\(\[]?([A-Za-z])(?:[\)\]]|(?![A-Za-z]))",
    re.IGNORECASE,
)
# "B", "B:", "(B)", "B.", "B) Cyst", "[c]" at the start
_LEADING = re.compile(r"^[\(\[]?([A-Za-z])(?:[\)\]:.]|\s*$)")


def _norm(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip(_EDGE).strip().lower()


def parse_letter(text: str | None, options: Sequence[str]) -> str | None:
    """The answer letter in a model's free-text `text`, or None when it cannot be read unambiguously.

    Reads "B", "B:", "(B)", "B.", "b", "The answer is B", "Answer: B", "**B**", and an option's text in
    place of its letter (exact, or the only option contained in the text as whole words). A letter
    outside the options (E with four options) or several candidates is None.
    """
    if text is None:
        return None
    valid = LETTERS[: len(options)]
    stripped = str(text).strip().strip(_EDGE).strip()
    if not stripped:
        return None

    def ok(letter: str) -> str | None:
        letter = letter.upper()
        return letter if letter in valid else None

    # 1. a bare letter, any case, with surrounding punctuation/whitespace: "B", " (b). "
    if len(stripped) == 1 and stripped.isalpha():
        return ok(stripped)
    lead = str(text).strip().lstrip("*_`\"'")
    # 2. a letter with a delimiter at the start: "B:", "(B) Cyst", "C. Tumor"
    m = _LEADING.match(lead)
    if m:
        return ok(m.group(1))
    # 3. an explicit "answer is X" phrase; lower-case only when nothing word-like follows ("answer is a
    #    cyst" must not read as A)
    for m in _KEYWORD.finditer(str(text)):
        letter, rest = m.group(1), str(text)[m.end(1) :]
        if letter.isupper() or re.match(r"\s*(?:[\).:\]]|$)", rest):
            return ok(letter)
    # "It is B.", "I would choose: C" — a lone capital letter closing the answer after "is"/":"
    m = re.search(r"(?:\bis|:)\s*[\(\[]?([A-Z])[\)\]]?[.!]?\s*$", str(text).strip())
    if m:
        return ok(m.group(1))
    # 4. an option's text in place of its letter
    norm = _norm(str(text))
    texts = [_norm(o) for o in options]
    exact = [i for i, t in enumerate(texts) if t and t == norm]
    if len(exact) == 1:
        return valid[exact[0]]
    found = [i for i, t in enumerate(texts) if t and re.search(rf"(?<!\w){re.escape(t)}(?!\w)", norm)]
    # "Lung Cancer" also contains option "Cancer": keep only the longest of nested matches.
    found = [i for i in found if not any(j != i and texts[i] in texts[j] for j in found)]
    if len(found) == 1:
        return valid[found[0]]
    # 5. a leading capital letter then words ("B because the lesion ..."), when no other option letter
    #    stands alone in the text and it is not the article "A ..."
    m = re.match(r"^([A-Z])\s+(\S+)", lead)
    if m and m.group(1) in valid:
        others = set(re.findall(r"(?<![A-Za-z])([A-Z])(?![A-Za-z])", lead[1:])) & set(valid)
        if not others and not (m.group(1) == "A" and m.group(2)[:1].islower()):
            return m.group(1)
    return None


# ---------------------------------------------------------------------------------- evaluation


@dataclasses.dataclass
class EvalResult:
    accuracy: float
    ci95: tuple[float, float]
    n: int
    per_subset: dict[str, dict[str, Any]]
    predictions: list[dict[str, Any]]
    confusion: dict[str, dict[str, Any]]  # subset -> {"labels": [...], "matrix": [[...]] (true × predicted)}
    unparseable: int
    scorer: str = "likelihood"

    def summary(self) -> dict[str, Any]:
        """metrics.json content: everything but the predictions and matrices."""
        return {
            "accuracy": self.accuracy,
            "ci95": list(self.ci95),
            "n": self.n,
            "correct": sum(1 for p in self.predictions if p["correct"]),
            "unparseable": self.unparseable,
            "scorer": self.scorer,
            "per_subset": self.per_subset,
        }

    def mlflow_metrics(self, prefix: str = "test") -> dict[str, float]:
        out = {
            f"{prefix}_accuracy": self.accuracy,
            f"{prefix}_accuracy_ci95_low": self.ci95[0],
            f"{prefix}_accuracy_ci95_high": self.ci95[1],
            f"{prefix}_n": float(self.n),
            f"{prefix}_unparseable": float(self.unparseable),
        }
        for sub, s in self.per_subset.items():
            out[f"{prefix}_s{sub}_accuracy"] = s["accuracy"]
            out[f"{prefix}_s{sub}_accuracy_ci95_low"] = s["ci95"][0]
            out[f"{prefix}_s{sub}_accuracy_ci95_high"] = s["ci95"][1]
            out[f"{prefix}_s{sub}_n"] = float(s["n"])
        return out


def _clean_row(rec: dict[str, Any]) -> dict[str, Any]:
    """A records-table row as plain Python (parquet lists come back as numpy arrays, NA as pd.NA)."""
    out = dict(rec)
    opts = out.get("options")
    out["options"] = [str(o) for o in (list(opts) if opts is not None else [])]
    sub = out.get("subset_no")
    try:
        import pandas as pd

        if sub is not None and pd.isna(sub):
            out["subset_no"] = None
    except (TypeError, ValueError):
        pass
    return out


def tie_break(scores: Sequence[float], record_id: Any, seed: int = 0) -> int:
    """Index of the best score; exact ties go to a random one of the tied options, drawn from an RNG
    keyed on (seed, record id) — reproducible for a seed, never the first position (with balanced
    answer letters a positional tie-break scores exactly 1/k and looks like a measurement)."""
    import hashlib

    top = max(scores)
    tied = [i for i, s in enumerate(scores) if s >= top - 1e-9]
    if len(tied) == 1:
        return tied[0]
    key = hashlib.sha256(f"{int(seed)}|{record_id}".encode()).digest()
    return tied[random.Random(int.from_bytes(key[:8], "big")).randrange(len(tied))]


def predict_letters(
    backend, rows: list[dict[str, Any]], scorer: str = "likelihood", seed: int = 0
) -> tuple[list[str | None], list[str]]:
    """Predicted letters (None = unparseable) and the raw model outputs for one batch of rows.

    `seed` keys the random tie-break between equally scored options (see `tie_break`)."""
    import torch

    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")
    model = getattr(backend, "model", None)
    was_training = bool(getattr(model, "training", False))
    if model is not None and hasattr(model, "eval"):
        model.eval()
    try:
        with torch.no_grad():
            if scorer == "likelihood":
                scores = backend.score_options(rows)
                letters: list[str | None] = []
                raw: list[str] = []
                for row, sc in zip(rows, scores, strict=True):
                    sc = [float(s) for s in sc]
                    if len(sc) != len(row["options"]):
                        raise ValueError(
                            f"record {row.get('record_id')}: backend scored {len(sc)} options, "
                            f"record has {len(row['options'])}"
                        )
                    best = tie_break(sc, row.get("record_id"), seed)
                    letters.append(LETTERS[best])
                    raw.append(json.dumps([round(s, 4) for s in sc]))
                return letters, raw
            texts = [str(t) for t in backend.generate(rows)]
            if len(texts) != len(rows):
                raise ValueError(f"backend generated {len(texts)} answers for {len(rows)} rows")
            return [parse_letter(t, r["options"]) for t, r in zip(texts, rows)], texts
    finally:
        if model is not None and was_training and hasattr(model, "train"):
            model.train()


def evaluate_backend(
    backend, df, scorer: str = "likelihood", batch_size: int = 64, progress: bool | None = None,
    seed: int = 0,
) -> EvalResult:
    """Score `backend` on the records in `df` (records-table rows); accuracy, CIs, confusion."""
    from tqdm.auto import tqdm

    if scorer not in SCORERS:
        raise ValueError(f"unknown scorer {scorer!r}; choose one of {SCORERS}")
    if len(df) == 0:
        raise ValueError("no records to evaluate (empty selection)")
    rows = [_clean_row(r) for r in df.to_dict("records")]
    for r in rows:
        if not r["options"] or r.get("answer_letter") not in LETTERS[: len(r["options"])]:
            raise ValueError(
                f"record {r.get('record_id')}: answer letter {r.get('answer_letter')!r} "
                f"does not name one of its {len(r['options'])} options"
            )
    disable = (not sys.stderr.isatty()) if progress is None else not progress
    predictions: list[dict[str, Any]] = []
    with tqdm(total=len(rows), desc=f"evaluate ({scorer})", unit="rec", disable=disable) as bar:
        for start in range(0, len(rows), batch_size):
            batch = rows[start : start + batch_size]
            letters, raw = predict_letters(backend, batch, scorer=scorer, seed=seed)
            for row, letter, out in zip(batch, letters, raw):
                opts = row["options"]
                predictions.append(
                    {
                        "record_id": str(row.get("record_id")),
                        "subset_no": subset_key(row.get("subset_no"), missing="NA"),
                        "answer_letter": row["answer_letter"],
                        "predicted_letter": letter,
                        "answer_text": opts[LETTERS.index(row["answer_letter"])],
                        "predicted_text": opts[LETTERS.index(letter)] if letter else None,
                        "raw_output": out,
                        "correct": letter == row["answer_letter"],
                    }
                )
            bar.update(len(batch))
    return summarise(predictions, scorer=scorer)


def summarise(predictions: list[dict[str, Any]], scorer: str = "likelihood") -> EvalResult:
    """EvalResult from prediction dicts (also used to re-score a saved predictions.jsonl)."""
    n = len(predictions)
    correct = sum(1 for p in predictions if p["correct"])
    unparseable = sum(1 for p in predictions if p["predicted_letter"] is None)
    per_subset: dict[str, dict[str, Any]] = {}
    confusion: dict[str, dict[str, Any]] = {}
    for sub in sorted({p["subset_no"] for p in predictions}):
        ps = [p for p in predictions if p["subset_no"] == sub]
        k = sum(1 for p in ps if p["correct"])
        per_subset[sub] = {
            "accuracy": k / len(ps),
            "ci95": list(wilson_ci(k, len(ps))),
            "n": len(ps),
            "correct": k,
            "unparseable": sum(1 for p in ps if p["predicted_letter"] is None),
        }
        confusion[sub] = confusion_matrix(ps)
    return EvalResult(
        accuracy=correct / n if n else 0.0,
        ci95=wilson_ci(correct, n),
        n=n,
        per_subset=per_subset,
        predictions=predictions,
        confusion=confusion,
        unparseable=unparseable,
        scorer=scorer,
    )


UNPARSEABLE = "(unparseable)"


def confusion_matrix(preds: list[dict[str, Any]]) -> dict[str, Any]:
    """Counts true label × predicted label, by option *text* (letters are shuffled per record, the
    labels are what a clinician reads); an extra "(unparseable)" column when any answer was unreadable."""
    labels = sorted({p["answer_text"] for p in preds} | {p["predicted_text"] for p in preds if p["predicted_text"]})
    cols = labels + ([UNPARSEABLE] if any(p["predicted_text"] is None for p in preds) else [])
    index_r = {lab: i for i, lab in enumerate(labels)}
    index_c = {lab: i for i, lab in enumerate(cols)}
    matrix = [[0] * len(cols) for _ in labels]
    for p in preds:
        matrix[index_r[p["answer_text"]]][index_c[p["predicted_text"] or UNPARSEABLE]] += 1
    return {"labels": labels, "columns": cols, "matrix": matrix}


# ------------------------------------------------------------------------------------------- outputs


def write_outputs(result: EvalResult, out_dir: Path, extra: dict[str, Any] | None = None,
                  plots: bool = True) -> list[Path]:
    """metrics.json, predictions.jsonl, confusion.json and, with `plots`, confusion_<subset>.png (all
    atomic). The pipeline skips the PNGs (seconds of matplotlib per run; the report draws its own)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**result.summary(), **(extra or {})}
    written = [out_dir / "metrics.json", out_dir / "predictions.jsonl", out_dir / "confusion.json"]
    atomic_write_text(written[0], json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    atomic_write_text(written[1], "".join(json.dumps(p, sort_keys=True) + "\n" for p in result.predictions))
    atomic_write_text(written[2], json.dumps(result.confusion, indent=1, sort_keys=True) + "\n")
    if plots:
        from medmat.eval_plots import write_confusion_pngs

        written += write_confusion_pngs(result, out_dir)
    return written

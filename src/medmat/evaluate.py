"""Evaluation: multiple-choice accuracy with Wilson 95% intervals, per subset, with confusion matrices.

Two scorers, as in the Med-MAT paper's setting:
- `likelihood`: the option the model scores highest (`backend.score_options`); never unparseable.
- `generate`: greedy text (`backend.generate`), then `parse_letter` reads the answer letter from it;
  text it cannot read counts wrong and is counted as unparseable (reported, never hidden).

The untrained model scored the same way is the paper's Baseline (`medmat evaluate --model untrained`).
Results go to RUN_DIR (metrics.json, predictions.jsonl, confusion_<subset>.png) and into the training's
MLflow run (metrics per subset and these files as artifacts).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import random
import re
import sys
from collections.abc import Sequence
from io import BytesIO
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_bytes, atomic_write_text
from medmat.stats import wilson_ci  # the study's statistics live in medmat.stats

log = logging.getLogger(__name__)

LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"
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


def subset_key(value: Any) -> str:
    """Zero-padded subset number ("04"), as in mixture manifests; "NA" for records without a subset."""
    try:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "NA"
        return f"{int(value):02d}"
    except (TypeError, ValueError):
        return "NA"


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
                        "subset_no": subset_key(row.get("subset_no")),
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


# ------------------------------------------------------------------------------------- outputs


def _atomic_write_text(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def plot_confusion(conf: dict[str, Any], title: str, path: Path) -> None:
    """Confusion matrix PNG with labelled axes and counts in the cells."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, cols = conf["labels"], conf["columns"]
    size = max(3.5, 0.9 * len(cols) + 2.0)
    fig, ax = plt.subplots(figsize=(size, max(3.0, 0.8 * len(rows) + 1.8)))
    try:
        mat = conf["matrix"]
        ax.imshow(mat, cmap="Blues", aspect="auto")
        top = max((max(r) for r in mat), default=0) or 1
        for i, r in enumerate(mat):
            for j, v in enumerate(r):
                ax.text(j, i, str(v), ha="center", va="center", color="white" if v > top / 2 else "black")
        ax.set_xticks(range(len(cols)), cols, rotation=30, ha="right")
        ax.set_yticks(range(len(rows)), rows)
        ax.set_xlabel("predicted label")
        ax.set_ylabel("true label")
        ax.set_title(title, fontsize=10)
        fig.tight_layout()
        buf = BytesIO()
        fig.savefig(buf, format="png", dpi=100)
        atomic_write_bytes(path, buf.getvalue())
    finally:
        plt.close(fig)


def write_outputs(result: EvalResult, out_dir: Path, extra: dict[str, Any] | None = None) -> list[Path]:
    """metrics.json, predictions.jsonl, confusion.json and confusion_<subset>.png (all atomic)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = {**result.summary(), **(extra or {})}
    written = [out_dir / "metrics.json", out_dir / "predictions.jsonl", out_dir / "confusion.json"]
    _atomic_write_text(written[0], json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    _atomic_write_text(written[1], "".join(json.dumps(p, sort_keys=True) + "\n" for p in result.predictions))
    _atomic_write_text(written[2], json.dumps(result.confusion, indent=1, sort_keys=True) + "\n")
    for sub, conf in result.confusion.items():
        s = result.per_subset[sub]
        title = (
            f"subset {sub}{_triplet_suffix(sub)}\naccuracy {s['accuracy']:.3f} "
            f"[{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}], n={s['n']} ({result.scorer})"
        )
        path = out_dir / f"confusion_{sub}.png"
        plot_confusion(conf, title, path)
        written.append(path)
    return written


def _triplet_suffix(sub: str) -> str:
    try:
        from medmat.catalog import load_catalog

        return f" ({load_catalog().triplet_of_subset(int(sub))})"
    except Exception:  # catalogue missing or subset unknown: the number alone still identifies it
        return ""


def _target_label(subset_no: int) -> str:
    try:
        from medmat.catalog import load_catalog

        return str(load_catalog().triplet_of_subset(int(subset_no)))
    except Exception:
        return f"subset{int(subset_no):02d}"


# ------------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a saved model dir (RUN_DIR/model), or 'untrained' for the paper's Baseline")
    parser.add_argument("--records", required=True, help="records table (records.parquet from `medmat ingest`)")
    sel = parser.add_mutually_exclusive_group(required=True)
    sel.add_argument("--target", type=int, help="evaluate on this subset number's records")
    sel.add_argument("--manifest", help="evaluate on the records listed in this mixture manifest")
    parser.add_argument("--split", default="test", help="split of the target's records (default: test)")
    parser.add_argument("--out", required=True, help="output dir (metrics.json, predictions.jsonl, PNGs)")
    parser.add_argument("--scorer", choices=SCORERS, help="override evaluate.scorer")
    parser.add_argument("--batch-size", type=int, help="override evaluate.batch_size")
    parser.add_argument("--metric-prefix", help="override evaluate.metric_prefix (e.g. dev)")
    parser.add_argument("--params", default="params.yaml", help="params file (evaluate, tracking sections)")
    parser.add_argument("--backend-params", help="params file with the model: section for --model untrained "
                        "(default: --params)")
    parser.add_argument("--seed", type=int, help="seed of the untrained model (default: base.seed)")
    parser.add_argument("--run-id", help="MLflow run to log into (default: RUN_DIR/mlflow_run_id)")
    parser.add_argument("--arm", help="arm tag for a new run (default: baseline for --model untrained)")
    parser.add_argument("--target-tag", help="target tag for a new run (default: from --target)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-log-model", action="store_true",
                        help="with --model untrained: do not save OUT/model and log it to the run (by default the "
                             "untrained model is logged like a trained one, so the registry can treat every arm alike)")


def select_records(records_path: str, target: int | None, split: str, manifest: str | None):
    """(records selected for evaluation, data root of the table, the whole table)."""
    import pandas as pd
    import pyarrow.parquet as pq

    path = Path(records_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: records table not found (run `medmat ingest` first)")
    df = pd.read_parquet(path)
    meta = pq.read_schema(path).metadata or {}
    data_root = (meta.get(b"medmat.data_root") or b"").decode() or None
    for col in ("record_id", "subset_no", "split", "options", "answer_letter"):
        if col not in df.columns:
            raise ValueError(f"{path}: records table lacks column {col!r}")
    if manifest:
        from medmat.mixture import load_manifest, select_manifest

        # A resolved manifest (record_ids, checked against its hash) or a bare spec resolved afresh.
        sel = select_manifest(df, load_manifest(manifest), where=str(manifest))
    else:
        sub = pd.to_numeric(df["subset_no"], errors="coerce")
        sel = df[(sub == int(target)) & (df["split"] == split)].reset_index(drop=True)
        if sel.empty:
            splits = sorted(df.loc[sub == int(target), "split"].unique().tolist())
            raise ValueError(
                f"{path}: no records of subset {int(target):02d} in split {split!r} (splits present: {splits})"
            )
    return sel, data_root, df


def _seed_everything(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def run(args: argparse.Namespace) -> int:
    from medmat import config
    from medmat import tracking

    # torch logs FakeTensor cache statistics at INFO on exit; the CLI's INFO root logger would print them.
    logging.getLogger("torch").setLevel(logging.WARNING)

    try:
        cfg = config.load_section(EvalConfig, "evaluate", args.params) if Path(args.params).exists() else EvalConfig()
        tcfg = (config.load_section(tracking.TrackingConfig, "tracking", args.params)
                if Path(args.params).exists() else tracking.TrackingConfig())
        scorer = args.scorer or cfg.scorer
        batch_size = args.batch_size or cfg.batch_size
        prefix = args.metric_prefix or cfg.metric_prefix
        df, data_root, table = select_records(args.records, args.target, args.split, args.manifest)
        backend, backend_name, seed = _backend_for(args, data_root, table)
    except (ValueError, FileNotFoundError, config.ConfigError) as exc:
        log.error("%s", exc)
        return 2

    untrained = args.model == "untrained"
    try:
        result = evaluate_backend(backend, df, scorer=scorer, batch_size=batch_size)
    except ValueError as exc:  # a bad record or unreadable image: the message names the record
        log.error("%s: %s", args.records, exc)
        return 2
    out = Path(args.out)
    extra = {
        "model": args.model,
        "records": str(args.records),
        "selection": {"target": args.target, "split": args.split} if args.manifest is None
        else {"manifest": str(args.manifest)},
        "metric_prefix": prefix,
    }
    if untrained:
        extra["seed"] = seed
    files = write_outputs(result, out, extra)
    log.info("accuracy %.4f [%.4f, %.4f] on %d records (%d unparseable) -> %s",
             result.accuracy, *result.ci95, result.n, result.unparseable, out)

    if args.no_track:
        return 0
    run_id = args.run_id or (None if untrained else tracking.read_run_id(Path(args.model).parent))
    try:
        if run_id:
            ctx = tracking.tracked_run(tcfg, run_id=run_id)
        else:
            target = args.target_tag or (_target_label(args.target) if args.target is not None else None)
            arm = args.arm or ("baseline" if untrained else None)
            tags = tracking.run_tags(target=target, arm=arm, backend=backend_name, seed=seed,
                                     extra={"stage": "evaluate"})
            name = f"{arm or 'eval'}-{target or 'manifest'}" + (f"-seed{seed}" if seed is not None else "")
            ctx = tracking.tracked_run(tcfg, run_name=name, tags=tags,
                                       params={"evaluate": {"scorer": scorer, "model": args.model}})
        with ctx as mlrun:
            import mlflow

            tracking.log_metrics(result.mlflow_metrics(prefix))
            for f in files:
                mlflow.log_artifact(str(f), artifact_path=f"evaluation/{prefix}")
            if not run_id:
                tracking.write_run_id(out, mlrun.info.run_id)
            if untrained and not args.no_log_model:
                # The untrained model exists only in memory: save it so the run holds a loadable model.
                backend.save(out / "model")
                tracking.log_model(out / "model")
    except Exception as exc:  # the metrics are on disk; say clearly that only tracking failed
        log.error("evaluation written to %s, but logging to MLflow run %s failed: %s", out, run_id or "(new)", exc)
        return 3
    return 0


def _backend_for(args: argparse.Namespace, data_root: str | None, table):
    """(backend, backend name, seed or None) for --model DIR or --model untrained."""
    from medmat import config, models

    if args.model != "untrained":
        path = Path(args.model)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found (expected RUN_DIR/model from `medmat train`)")
        backend = models.load(path)
        return backend, _backend_name(backend, path), None
    params_file = args.backend_params or args.params
    params = config.load_params(params_file)
    seed = args.seed if args.seed is not None else int((params.get("base") or {}).get("seed", 0))
    model_cfg = config.from_dict(models.ModelConfig, params.get("model"), where=f"{params_file}: section 'model'")
    _seed_everything(seed)
    backend = models.build(model_cfg, data_root)
    if hasattr(backend, "prepare_training"):
        # Built exactly as training would build it (the tiny backend's vocabulary comes from the
        # training records), then not trained: the untrained model of the same architecture.
        train = table[table["split"] == "train"]
        backend.prepare_training(train if len(train) else table)
    return backend, str(getattr(model_cfg, "backend", "unknown")), seed


def _backend_name(backend, path: Path) -> str:
    name = getattr(backend, "name", None) or getattr(backend, "backend", None)
    if isinstance(name, str):
        return name
    return type(backend).__name__

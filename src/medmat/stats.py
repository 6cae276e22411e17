"""Statistics behind every number the study prints: intervals, paired gaps, equivalence, degeneracy.

One home for the procedures, so the pipeline's cell metrics, the report's tables and the tests use
the same definitions:

- `wilson_ci`: a binomial proportion (one run's accuracy on n questions).
- `t_interval`: a Student-t interval of a mean over a few values (seeds).
- `paired_bootstrap_gap` / `mean_gap_bootstrap`: the gap between two arms with a 95% interval that
  carries BOTH sources of variance in a CG comparison — which training seed ran, and which test
  questions were drawn — by a two-stage (hierarchical) bootstrap; see `paired_bootstrap_gap`.
- `equivalence`: the negative control's test (an interval inside +-margin points).
- `degenerate` / `degenerate_cell`: predictions that measure the procedure, not the data (one letter
  for most questions; every seed exactly at chance with zero variance).
- `guessed_share`: how many answers the seeded tie-break decided (options the model cannot tell apart).

Accuracies and gaps in the bootstrap functions are in percentage points; `wilson_ci` and `t_interval`
work in whatever unit they are given.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

import numpy as np

Z95 = 1.959963984540054  # two-sided 95% normal quantile
DEGENERATE_LETTER_SHARE = 0.8  # one letter for >= 80% of the questions: the model answers by position
# One answer (label text) for >= 90% of a label-balanced test's questions: the answer hardly depends on the
# image, and the accuracy is about 1/k whatever the model saw (e.g. "Normal", the one label it knows).
DEGENERATE_LABEL_SHARE = 0.9


# ------------------------------------------------------------------------------------ intervals
def wilson_ci(correct: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (better than normal ± at small n or p near 0/1)."""
    if n <= 0:
        return (0.0, 1.0)
    if not 0 <= correct <= n:
        raise ValueError(f"correct={correct} outside 0..n={n}")
    p = correct / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    # At k = 0 or k = n the bound is exactly 0 or 1; floating point would give 0.9999999999999999.
    lo = 0.0 if correct == 0 else max(0.0, centre - half)
    hi = 1.0 if correct == n else min(1.0, centre + half)
    return (lo, hi)


def t_interval(values: Sequence[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds (3 seeds -> t(2) = 4.30).

    NaN bounds with one value (no spread to estimate); NaN everything with none."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = float(sum(values)) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    from scipy import stats

    sd = math.sqrt(sum((float(v) - mean) ** 2 for v in values) / (n - 1))
    half = float(stats.t.ppf(0.5 + level / 2, n - 1)) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def clip_pct(lo: float, hi: float) -> tuple[float, float]:
    """An accuracy interval in percent kept inside [0, 100] (NaN stays NaN: no interval)."""
    if math.isnan(lo) or math.isnan(hi):
        return (lo, hi)
    return (min(100.0, max(0.0, lo)), min(100.0, max(0.0, hi)))


# ------------------------------------------------------------------------------ paired bootstrap
Outcomes = Mapping[Any, Mapping[str, bool]]  # seed -> {record_id: correct}


def _matrix(a: Outcomes, b: Outcomes | None) -> tuple[np.ndarray, list, list[str]]:
    """(seeds x questions) of a - b (or of a alone) over the seeds and questions both arms have."""
    seeds = sorted(set(a) & set(b), key=str) if b is not None else sorted(a, key=str)
    if not seeds:
        raise ValueError("no seed in common between the two arms")
    qs = set.intersection(*(set(a[s]) for s in seeds))
    if b is not None:
        qs &= set.intersection(*(set(b[s]) for s in seeds))
    questions = sorted(qs)
    if not questions:
        raise ValueError("no test question in common between the arms' seeds")
    m = np.array([[float(bool(a[s][q])) for q in questions] for s in seeds])
    if b is not None:
        m -= np.array([[float(bool(b[s][q])) for q in questions] for s in seeds])
    return m, seeds, questions


def _two_stage(mats: list[np.ndarray], groups: list[Any], n_boot: int, seed: int) -> np.ndarray:
    """Bootstrap replicates (percent) of the mean over `mats` (each seeds x questions).

    Each replicate draws seed positions with replacement once, shared by every matrix with that many
    seeds (the same training seed trains all arms of a seed, and the Baseline+ arm is shared by a
    target's rows), and question positions with replacement once per `groups` key (rows of one
    target share its test questions); each matrix's replicate is the mean of its resampled cells."""
    rng = np.random.default_rng(seed)
    seed_draw: dict[int, np.ndarray] = {}
    q_draw: dict[tuple[Any, int], np.ndarray] = {}
    for m, g in zip(mats, groups):
        s, q = m.shape
        if s not in seed_draw:
            seed_draw[s] = rng.integers(0, s, size=(n_boot, s))
        if (g, q) not in q_draw:
            q_draw[(g, q)] = rng.integers(0, q, size=(n_boot, q))
    total = np.zeros(n_boot)
    for m, g in zip(mats, groups):
        s_idx, q_idx = seed_draw[m.shape[0]], q_draw[(g, m.shape[1])]
        # mean over resampled seeds of the mean over resampled questions: per-seed question sums by
        # counting how often each question was drawn (B x Q counts @ Q x S), memory O(B*(Q+S))
        counts = np.zeros((n_boot, m.shape[1]))
        np.add.at(counts, (np.arange(n_boot)[:, None], q_idx), 1.0)
        per_seed = counts @ m.T / m.shape[1]  # B x S: each seed's mean over the drawn questions
        total += np.take_along_axis(per_seed, s_idx, axis=1).mean(axis=1)
    return 100.0 * total / len(mats)


def _summary(point: float, reps: np.ndarray, **extra: Any) -> dict[str, Any]:
    lo, hi = (float(x) for x in np.percentile(reps, [2.5, 97.5]))
    return {"gap": float(point), "lo": lo, "hi": hi, "significant": bool(lo > 0 or hi < 0), **extra}


def paired_bootstrap_gap(a: Outcomes, b: Outcomes, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Gap a - b in accuracy points with a 95% percentile interval from a paired two-stage bootstrap.

    `a` and `b` map training seed -> {record_id: correct} on the same test questions. Scheme: each of
    `n_boot` replicates resamples the seeds with replacement AND the test questions with replacement
    (one question draw shared by both arms and all seeds), and takes the mean over the drawn
    (seed, question) cells of correct_a - correct_b. Pairing is by seed (same seed = same untrained
    start) and by question. Seed-to-seed variance (a collapsing seed) and question sampling both widen
    the interval; with 3 seeds the seed stage is coarse, so read it as approximate.
    Returns {"gap", "lo", "hi", "significant" (interval excludes 0), "n_seeds", "n_questions", "method"}.
    """
    m, seeds, questions = _matrix(a, b)
    reps = _two_stage([m], [0], n_boot, seed)
    return _summary(100.0 * m.mean(), reps, n_seeds=len(seeds), n_questions=len(questions),
                    method="paired two-stage bootstrap (seeds, then questions), percentile 95%")


def accuracy_interval(a: Outcomes, n_boot: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Mean accuracy (%) over seeds with the same two-stage bootstrap interval (inside [0, 100] by
    construction). Returns {"acc", "lo", "hi", "sd_seeds" (sd of the per-seed accuracies, points)}."""
    m, seeds, questions = _matrix(a, None)
    reps = _two_stage([m], [0], n_boot, seed)
    lo, hi = clip_pct(*(float(x) for x in np.percentile(reps, [2.5, 97.5])))
    per_seed = 100.0 * m.mean(axis=1)
    sd = float(np.std(per_seed, ddof=1)) if len(per_seed) > 1 else math.nan
    return {"acc": float(100.0 * m.mean()), "lo": lo, "hi": hi, "sd_seeds": sd,
            "per_seed": {str(s): float(v) for s, v in zip(seeds, per_seed)}, "n_questions": len(questions)}


def mean_gap_bootstrap(pairs: Sequence[tuple[Outcomes, Outcomes]], groups: Sequence[Any] | None = None,
                       n_boot: int = 2000, seed: int = 0,
                       clusters: Sequence[Mapping[str, Any]] | None = None) -> dict[str, Any]:
    """Mean over rows of the gap a - b (points), with a 95% interval from the same two-stage bootstrap.

    One replicate resamples seeds once for all rows and questions once per `groups` key (give the
    target: rows of one target share test questions and their Baseline+ arm, so their gaps move
    together), then averages the rows' resampled gaps. Used for the headline and the control.
    `clusters` (one record_id -> key mapping per pair, e.g. each question's true label) resamples the
    clusters instead of single questions: a cluster bootstrap for questions that are not independent
    draws. The point estimate is the plain mean either way."""
    if not pairs:
        raise ValueError("no rows to average")
    groups = list(groups) if groups is not None else list(range(len(pairs)))
    full = [_matrix(a, b) for a, b in pairs]
    mats = [m for m, _, _ in full]
    if clusters is not None:
        mats = [_cluster_means(m, questions, key) for (m, _, questions), key in zip(full, clusters)]
    reps = _two_stage(mats, groups, n_boot, seed)
    point = float(np.mean([100.0 * m.mean() for m, _, _ in full]))
    method = "two-stage bootstrap (seeds shared by all rows, {} per target), percentile 95%".format(
        "question clusters" if clusters is not None else "questions")
    return _summary(point, reps, rows=len(mats), method=method)


def _cluster_means(m: np.ndarray, questions: list[str], key: Mapping[str, Any]) -> np.ndarray:
    """(seeds x clusters): each cluster's mean over its questions' columns (unknown ids form one cluster)."""
    cols: dict[str, list[int]] = {}
    for i, q in enumerate(questions):
        cols.setdefault(str(key.get(q, "?")), []).append(i)
    return np.stack([m[:, c].mean(axis=1) for _, c in sorted(cols.items())], axis=1)


def equivalence(lo: float, hi: float, margin: float = 5.0) -> bool:
    """TOST-style equivalence: True when the whole 95% interval [lo, hi] lies inside (-margin, +margin).

    (Two one-sided tests at 5% each need only the 90% interval inside the band; requiring the 95%
    interval is the stricter reading.) An interval that is NaN or wider than the band never passes:
    "no gain" must be shown, not inferred from a wide interval covering 0."""
    if math.isnan(lo) or math.isnan(hi):
        return False
    return bool(-margin < lo and hi < margin)


# ---------------------------------------------------------------------------------- degeneracy
def _by_seed(predictions: Mapping[Any, Iterable[Mapping]] | Iterable[Mapping]) -> dict[Any, list[Mapping]]:
    if isinstance(predictions, Mapping):
        return {s: list(p) for s, p in predictions.items()}
    return {0: list(predictions)}


def degenerate(predictions: Mapping[Any, Iterable[Mapping]] | Iterable[Mapping], n_options: int | None = None,
               max_letter_share: float = DEGENERATE_LETTER_SHARE,
               max_label_share: float = DEGENERATE_LABEL_SHARE) -> str | None:
    """Why these predictions measure the procedure rather than the data, or None.

    `predictions`: one run's prediction dicts ({"predicted_letter", "predicted_text", "correct", ...})
    or seed -> those. Degenerate when (1) some seed gives one letter for >= `max_letter_share` of its
    questions (answers by position), (2) some seed gives one answer text for >= `max_label_share` of
    them (answers one label whatever the image), or (3) two or more seeds all score exactly
    1/`n_options` (zero variance at chance: the signature of a positional tie-break on a
    letter-balanced test)."""
    runs = _by_seed(predictions)
    letter_seeds, label_seeds = [], []
    for s, preds in sorted(runs.items(), key=lambda kv: str(kv[0])):
        if not preds:
            continue
        letter, count = Counter(p.get("predicted_letter") for p in preds).most_common(1)[0]
        if count / len(preds) >= max_letter_share:
            letter_seeds.append(f"seed {s}: {letter} for {100 * count / len(preds):.0f}%")
            continue
        label, count = Counter(p.get("predicted_text") for p in preds).most_common(1)[0]
        if label is not None and count / len(preds) >= max_label_share:
            label_seeds.append(f"seed {s}: {label!r} for {100 * count / len(preds):.0f}%")
    n = max((len(p) for p in runs.values()), default=0)
    if letter_seeds:
        return (f"one letter (answers by position) in {len(letter_seeds)} of {len(runs)} seeds "
                f"({', '.join(letter_seeds)} of {n} questions)")
    if label_seeds:
        return (f"one answer whatever the image in {len(label_seeds)} of {len(runs)} seeds "
                f"({', '.join(label_seeds)} of {n} questions)")
    accs = [sum(bool(p.get("correct")) for p in preds) / len(preds) for preds in runs.values() if preds]
    return _at_chance(accs, n_options)


def _at_chance(accs: Sequence[float], n_options: int | None) -> str | None:
    if len(accs) < 2 or max(accs) - min(accs) > 1e-12:
        return None
    ks = [n_options] if n_options else range(2, 9)
    for k in ks:
        if abs(accs[0] - 1.0 / k) < 1e-9:
            return f"all {len(accs)} seeds score exactly 1/{k} = {100 / k:.1f}% (zero variance at chance)"
    return None


def guessed_share(predictions: Mapping[Any, Iterable[Mapping]] | Iterable[Mapping]) -> float | None:
    """Share of answers (0..1, over all seeds) that the seeded tie-break decided: the best score in
    `raw_output` (the likelihood scorer's option scores, as written to 4 decimals) is held by two or
    more options. None when no prediction carries option scores (the generate scorer)."""
    import json

    scored = tied = 0
    for preds in _by_seed(predictions).values():
        for p in preds:
            try:
                scores = json.loads(p.get("raw_output") or "")
            except (TypeError, ValueError):
                continue
            if not isinstance(scores, list) or len(scores) < 2:
                continue
            scored += 1
            tied += scores.count(max(scores)) > 1
    return tied / scored if scored else None


def degenerate_cell(cell_metrics: Sequence[Mapping], predictions: Mapping[Any, Iterable[Mapping]] | None = None,
                    n_options: int | None = None) -> str | None:
    """`degenerate` for one cell from its seeds' metrics.json (and their predictions when given).

    Without predictions only the zero-variance-at-chance test can run (k from `n_options`, or any
    k in 2..8 when unknown)."""
    if predictions:
        reason = degenerate(predictions, n_options)
        if reason:
            return reason
    return _at_chance([float(m["accuracy"]) for m in cell_metrics if "accuracy" in m], n_options)

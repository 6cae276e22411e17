"""The report's numbers: cells, Table 3 rows, the headline, the control's equivalence test, caveats.

Every accuracy is the mean over training seeds of the target's test accuracy (%), with a 95% interval
from a two-stage bootstrap over seeds and test questions (medmat.stats), so it stays inside [0, 100].
Every gap (Trained - Baseline+, Trained - Baseline) is paired by seed and question. Caveats are
computed from these numbers, never written as fixed text.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from typing import Any

from medmat import stats
from medmat.report.runs import Arm

DIRECTION_NAMES = {"fixed_modality": "Fixed modality", "fixed_area": "Fixed area", "fixed_task": "Fixed task",
                   "modality_area": "Modality-area", "three_element": "Three-element"}


def cell(arm: Arm | None, n_boot: int, seed: int) -> dict[str, Any] | None:
    """{"acc", "lo", "hi", "sd_seeds", "per_seed", "n_seeds", "degenerate": reason | None,
    "guessed": share of answers the tie-break decided | None}."""
    if arm is None:
        return None
    out = stats.accuracy_interval(arm.outcomes, n_boot=n_boot, seed=seed)
    out["n_seeds"] = len(arm.outcomes)
    out["degenerate"] = stats.degenerate(arm.predictions, arm.n_options)
    out["guessed"] = stats.guessed_share(arm.predictions)
    return out


def _gap(a: Arm | None, b: Arm | None, n_boot: int, seed: int) -> dict[str, Any] | None:
    if a is None or b is None:
        return None
    try:
        return stats.paired_bootstrap_gap(a.outcomes, b.outcomes, n_boot=n_boot, seed=seed)
    except ValueError:  # no common seed or question: nothing to pair
        return None


def table3(world: dict[str, dict[str, Any]], n_boot: int, seed: int) -> list[dict[str, Any]]:
    """One row per combination run: direction, Related subsets, the paper's numbers, ours, the gaps.

    `improves` is the paper's convention (Trained beats both Baseline and Baseline+, by the means);
    `significant` asks more: the paired interval of Trained - Baseline+ lies above 0."""
    rows = []
    for target, t in sorted(world.items()):
        arms, index = t["arms"], t["index"]
        base = arms.get("baseline")
        for combo in index.get("combinations", []):
            rel, bp = arms.get(f"{combo['id']}/related"), arms.get(f"{combo['id']}/baseline_plus")
            if rel is None:
                continue
            row = {"target": target, "triplet": index.get("triplet", ""), "id": combo["id"],
                   "direction": combo.get("direction", ""), "related": combo.get("related", []),
                   "members": combo.get("members", {}), "paper": combo.get("paper"),
                   "matched": combo.get("matched", True), "shortfall": combo.get("shortfall", 0),
                   "target_labels": combo.get("target_labels", []), "labels_seen": combo.get("labels_seen", {}),
                   "ceiling": name_ceilings(combo, rel.n_options),
                   "baseline": cell(base, n_boot, seed), "baseline_plus": cell(bp, n_boot, seed),
                   "trained": cell(rel, n_boot, seed),
                   "gap": _gap(rel, bp, n_boot, seed), "gap_baseline": _gap(rel, base, n_boot, seed),
                   "_pair": (rel, bp)}
            g, gb = row["gap"], row["gap_baseline"]
            row["improves"] = bool(g and gb and g["gap"] > 0 and gb["gap"] > 0)
            row["significant"] = bool(g and g["lo"] > 0)
            row["degenerate"] = [f"{name}: {c['degenerate']}" for name, c in
                                 (("Baseline", row["baseline"]), ("Baseline+", row["baseline_plus"]),
                                  ("Trained", row["trained"])) if c and c["degenerate"]]
            rows.append(row)
    return rows


def name_ceiling(named: int, labels: int, options: int) -> float:
    """Accuracy (%) on a label-balanced test of a model that reads every label its training answers
    named and guesses uniformly among the options it never met. A question asking for a named label is
    right; one asking for an unnamed label is right with 1/(1 + U), U the unnamed labels among its
    options-1 distractors, drawn uniformly from the other labels (as medmat.data.qa draws them), so U is
    hypergeometric. Med-MAT-mini draws each label name's look apart from every other's, so in
    expectation no model trained on these answers scores more: an unnamed label's look carries
    nothing it learned. (A model that knows the words before training, as an MLLM on real Med-MAT
    does, is not bound by it.)"""
    from scipy.stats import hypergeom

    if named >= labels:
        return 100.0
    drawn, others, unnamed_others = min(options, labels) - 1, labels - 1, labels - named - 1
    p_right = sum(hypergeom.pmf(u, others, unnamed_others, drawn) / (1 + u) for u in range(drawn + 1))
    return float(100.0 * (named + (labels - named) * p_right) / labels)


def name_ceilings(combo: dict[str, Any], n_options: int | None) -> dict[str, float] | None:
    """The name ceiling of the Related and the Baseline+ arm of one combination (None when its design
    predates `labels_seen` or the questions are unknown)."""
    labels, seen = combo.get("target_labels", []), combo.get("labels_seen")
    if not labels or not seen or not n_options:
        return None
    return {arm: name_ceiling(len(seen.get(arm, [])), len(labels), n_options) for arm in ("related", "baseline_plus")}


def headroom_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows where the names alone give the Related data an edge: its name ceiling above Baseline+'s.
    Read from the designs before any training, so choosing these rows looks at no result. Elsewhere a
    gain can only come from how a name's look carries across contexts (a "Normal" learned on another
    modality reads less well), not from what the data name."""
    return [r for r in rows if r["ceiling"] and r["ceiling"]["related"] > r["ceiling"]["baseline_plus"] + 1e-9]


def headline(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, Any]:
    """Mean gap Trained - Baseline+ over rows (two-stage bootstrap, questions resampled per target),
    the paper's count of improving rows, and how many rows are significant."""
    usable = [r for r in rows if r["gap"]]
    out: dict[str, Any] = {"rows": len(usable), "improves": sum(r["improves"] for r in usable),
                           "significant": sum(r["significant"] for r in usable)}
    if not usable:
        return {**out, "gap": math.nan, "lo": math.nan, "hi": math.nan}
    pairs = [(r["_pair"][0].outcomes, r["_pair"][1].outcomes) for r in usable]
    m = stats.mean_gap_bootstrap(pairs, groups=[r["target"] for r in usable], n_boot=n_boot, seed=seed)
    return {**out, "gap": m["gap"], "lo": m["lo"], "hi": m["hi"], "method": m["method"]}


def label_clusters(rows: list[dict[str, Any]], n_boot: int, seed: int) -> dict[str, float]:
    """The mean gap's 95% interval when each target's LABELS are resampled as clusters instead of its
    single questions (seeds as before): a model learns, or misreads, a label's look as a whole, so the
    questions of one label are not independent draws. Labels are balanced: the point is unchanged."""
    usable = [r for r in rows if r["gap"]]
    if not usable:
        return {"lo": math.nan, "hi": math.nan}
    pairs = [(r["_pair"][0].outcomes, r["_pair"][1].outcomes) for r in usable]
    m = stats.mean_gap_bootstrap(pairs, groups=[r["target"] for r in usable], n_boot=n_boot, seed=seed,
                                 clusters=[_label_of(r["_pair"][0]) for r in usable])
    return {"lo": m["lo"], "hi": m["hi"]}


def positive_claim(h: dict[str, Any]) -> bool:
    """CG helps: most rows significant (not only a positive mean) and the mean gap's interval above 0."""
    return bool(h["rows"] and h["significant"] > h["rows"] / 2 and h["lo"] > 0)


def control_verdict(h: dict[str, Any], margin: float) -> bool:
    """The negative control passes only an equivalence test: its mean gap's 95% interval inside
    +-margin points (a wide interval covering 0 shows nothing)."""
    return bool(h["rows"]) and stats.equivalence(h["lo"], h["hi"], margin)


def caveats(rows: list[dict[str, Any]], crows: list[dict[str, Any]], cells: dict[str, dict], h: dict, hc: dict,
            margin: float, replicated: dict[str, Any] | None = None) -> list[str]:
    """Caveats that follow from the numbers above them (each names the numbers it rests on);
    `replicated`: the control-worlds stage's pooled numbers when it ran."""
    out = []
    chance = {r["target"]: 100.0 / k for r in rows if (k := r["_pair"][0].n_options)}
    above = [r for r in rows if r["baseline_plus"] and r["target"] in chance
             and r["baseline_plus"]["lo"] > chance[r["target"]]]
    if above:
        names = ", ".join(f"{r['target']} ({r['baseline_plus']['acc']:.1f}% vs chance {chance[r['target']]:.1f}%)"
                          for r in {r["target"]: r for r in above}.values())
        out.append(f"Baseline+ is above chance (its interval excludes 1/k) for {names}: Unrelated data still "
                   "teaches something here (e.g. a label name shared across tasks such as \"Normal\"), so "
                   "the Related gap understates what Related data add over nothing.")
    wide = [r for r in rows if r["trained"] and not math.isnan(r["trained"]["sd_seeds"])
            and r["trained"]["sd_seeds"] > 5]
    if wide:
        out.append("Seed-to-seed sd of Trained above 5 points in " + ", ".join(
            f"{r['target']} {r['id']} ({r['trained']['sd_seeds']:.1f}{_seeds_differ_on(r['_pair'][0])})" for r in wide)
            + ": these rows' gaps rest on unstable training; read their intervals, not their means.")
    out += _unseen_labels(rows)
    over = [r for r in rows if r["ceiling"] and r["trained"] and r["trained"]["lo"] > r["ceiling"]["related"]]
    if over:
        out.append("Trained's interval lies above its name ceiling in " + ", ".join(
            f"{r['target']} {r['id']} ({r['trained']['acc']:.1f} [{r['trained']['lo']:.1f}, {r['trained']['hi']:.1f}] "
            f"against {r['ceiling']['related']:.1f})" for r in over) + ": it reads labels no training answer "
            "named. On Med-MAT-mini, where each name's look is drawn apart from the others', that points to "
            "target images in the training data or to looks shared between names; a model that knows the "
            "label words before training (an MLLM on real data) is not bound by the ceiling.")
    guessing = {r["target"]: r for r in rows if _seen(r, "baseline_plus") == 0 and r["baseline"] and r["baseline_plus"]
                and r["baseline_plus"]["per_seed"] == r["baseline"]["per_seed"]}
    if guessing:
        out.append("Baseline+ names none of the target's labels and scores exactly as the untrained Baseline in "
                   + ", ".join(f"{t} ({r['baseline_plus']['acc']:.1f}%)" for t, r in guessing.items())
                   + ": every option is a name it never met, so it guesses each answer with the Baseline's "
                   "own seeded draws (the tie-break is keyed by seed and question, not by arm).")
    flat = [r for r in rows if r["baseline_plus"] and r["baseline_plus"]["degenerate"]]
    if flat:
        out.append(f"Baseline+ is degenerate in {len(flat)} of {len(rows)} rows (reasons in the next caveat): in those "
                   "rows the gap is Trained over a baseline whose accuracy measures the procedure (one answer or "
                   "one letter whatever the image, or exactly chance), not over a model that reads the image.")
        unnamed = [r for r in flat if (n := _seen(r, "baseline_plus")) is not None and n < len(r["target_labels"])]
        if len(unnamed) == len(flat):
            most = max(_seen(r, "baseline_plus") for r in flat)
            out.append(f"In every one of those rows Baseline+'s training answers name at most {most} of the target's "
                       "labels (column \"labels seen\"): Unrelated subsets share no task with the target, only a "
                       "label such as \"Normal\" crosses tasks. The tiny model learns a label's name only from "
                       "training answers (only its vision tower is pretrained) and guesses among names it never "
                       "met (they are tied), so one name it knows can win whatever the image; the paper's "
                       "Baseline+ is a pretrained LLM that knows the label words.")
    scaleup = [f"{name.split('/', 1)[1].replace('/', ' ', 1)}: {c['degenerate']}" for name, c in cells.items()
               if ("/scaleup/" in name or "/limited/" in name or name.endswith("/search_best"))
               and c and c.get("degenerate")]
    listed = [f"{world}: " + " | ".join(entries) for world, entries in
              (("main world", _degenerate_cells(rows) + scaleup),
               ("control world (its targets' images say nothing of the label: one answer to all is one way to be at "
                "chance, and the control's gap stays unbiased)", _degenerate_cells(crows)))
              if entries]
    if listed:
        out.append("Degenerate cells (their accuracy measures the procedure, not the model) - " + "; ".join(listed) + ".")
    unmatched = [r for r in rows if not r["matched"]]
    if unmatched:
        out.append("Baseline+ could not match its Related total in " + ", ".join(
            f"{r['target']} {r['id']} (short by {r['shortfall']})" for r in unmatched) + ".")
    if h["rows"] and not positive_claim(h):
        out.append(f"The positive claim is NOT supported: {h['significant']} of {h['rows']} rows significant "
                   f"and mean gap interval [{h['lo']:+.1f}, {h['hi']:+.1f}].")
    if hc["rows"] and not control_verdict(hc, margin):
        out.append(f"The negative control does NOT pass: its mean gap interval [{hc['lo']:+.1f}, {hc['hi']:+.1f}] "
                   f"is not inside +-{margin:g} points, so the procedure may make a gap where no data can teach "
                   "the target." + (
                       f" Over {replicated['worlds']} entangled worlds it "
                       f"{'passes' if replicated['equivalent'] else 'does not pass either'} "
                       f"([{replicated['lo']:+.1f}, {replicated['hi']:+.1f}], headline)." if replicated else
                       " `dvc exp run -S experiment.control_worlds=60` replicates the control over entangled "
                       "worlds (other training data), the world as the unit."))
    below = [r for r in crows if r["trained"] and r["target"] in chance and r["trained"]["hi"] < chance[r["target"]]]
    if below:
        out.append("In the control world Trained falls BELOW chance in " + ", ".join(
            f"{r['target']} {r['id']} ({r['trained']['acc']:.1f}%)" for r in below) + ": a target's looks there say "
            "nothing of its labels, so any model's expected accuracy is exactly chance. A 95% interval misses "
            f"chance from below in 1 of 40 cells by chance alone (here {len(below)} of {len(crows)}); more would "
            "point to a model answering on something other than the image (an answer letter, the question's "
            "wording).")
    seeds = sorted({c["n_seeds"] for c in cells.values() if c})
    if seeds and max(seeds) < 5:
        out.append(f"Only {max(seeds)} training seeds per cell: the bootstrap's seed stage draws from "
                   f"{max(seeds)} values, so intervals are approximate.")
    return out


def mean_dev(arm: Arm | None) -> float | None:
    """Mean dev accuracy (0..1) over an arm's seeds, from their metrics.json; None without any."""
    devs = [m["dev_accuracy"] for m in (arm.metrics.values() if arm else ()) if m.get("dev_accuracy") is not None]
    return sum(devs) / len(devs) if devs else None


def search_caveats(search: dict[str, dict[str, Any]], best_arms: dict[str, Arm], margin: float = 5.0) -> list[str]:
    """Targets whose best trial's dev accuracy the retrained seeds fall short of by more than `margin`
    points: the maximum over noisy one-training trials is optimistic (winner's curse)."""
    short = []
    for t, s in sorted(search.items()):
        trial, again = (s.get("best") or {}).get("dev_accuracy"), mean_dev(best_arms.get(t))
        if trial is not None and again is not None and 100 * (trial - again) > margin:
            short.append(f"{t} ({100 * trial:.1f} against {100 * again:.1f} over {len(best_arms[t].metrics)} seeds)")
    if not short:
        return []
    return ["The search's best trial is not reproduced when its mixture is retrained in " + ", ".join(short)
            + ": a trial is one training, so the best of the study's trials carries the luckiest training noise "
            "(winner's curse). Read the retrained dev and test accuracies; the registry compares candidates by "
            "their mean dev accuracy over seeds, not by the trial's."]


def _seen(row: dict[str, Any], arm: str) -> int | None:
    """How many of the row's target labels `arm`'s training answers name (None: designs predate it)."""
    seen = row.get("labels_seen", {}).get(arm)
    return None if seen is None or not row.get("target_labels") else len(seen)


def unseen_label_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Rows whose Related arm's training answers leave some of the target's labels unnamed."""
    return [r for r in rows if (n := _seen(r, "related")) is not None and n < len(r["target_labels"])]


def _unseen_labels(rows: list[dict[str, Any]]) -> list[str]:
    """Rows whose Related arm never trained on some of the target's labels, with Trained's accuracy in
    them beside the rows whose training answers name every label."""
    known = [r for r in rows if r["trained"] and _seen(r, "related") is not None]
    partial = unseen_label_rows(known)
    full = [r for r in known if _seen(r, "related") == len(r["target_labels"])]
    if not partial:
        return []
    line = (f"In {len(partial)} of {len(rows)} rows the Related arm's training answers name only some of the "
            "target's labels (column \"labels seen\"): the tiny model learns a name only from training answers")
    if full:
        def mean_acc(rs: list[dict[str, Any]]) -> float:
            return statistics.mean(r["trained"]["acc"] for r in rs)

        line += (f"; Trained averages {mean_acc(partial):.1f}% in those rows and {mean_acc(full):.1f}% in the other "
                 f"{len(full)}, whose training answers name every label")
    return [line + "."]


def _degenerate_cells(rows: list[dict[str, Any]]) -> list[str]:
    """One entry per degenerate cell of a world's Table-3 rows: a cell shared by several rows (a target's
    Baseline, its Baseline+ when the rows draw one Unrelated pool at one total) is named once, with its
    row count."""
    rows_of: dict[tuple[str, str], list[str]] = {}
    for r in rows:
        for d in r["degenerate"]:
            rows_of.setdefault((r["target"], d), []).append(r["id"])
    return [f"{target} " + (f"{ids[0]} {d}" if len(ids) == 1 else f"{d.replace(':', f' (of {len(ids)} rows):', 1)}")
            for (target, d), ids in rows_of.items()]


def _seeds_differ_on(arm: Arm) -> str:
    """Where an unstable arm's seeds part: the true label whose count of right answers varies most
    across seeds, those counts, and what the seeds answered instead."""
    right: dict[str, list[int]] = {}
    wrong: dict[str, Counter] = {}
    seeds = sorted(arm.predictions)
    for i, seed in enumerate(seeds):
        for p in arm.predictions[seed]:
            label = str(p.get("answer_text"))
            right.setdefault(label, [0] * len(seeds))[i] += bool(p.get("correct"))
            if not p.get("correct"):
                wrong.setdefault(label, Counter())[str(p.get("predicted_text"))] += 1
    if not right:
        return ""
    label = max(sorted(right), key=lambda lab: max(right[lab]) - min(right[lab]))
    n = sum(1 for p in arm.predictions[seeds[0]] if str(p.get("answer_text")) == label)
    instead = f', otherwise mostly "{wrong[label].most_common(1)[0][0]}"' if wrong.get(label) else ""
    return f': seeds right on {", ".join(map(str, right[label]))} of {n} "{label}"{instead}'


def _label_of(arm: Arm) -> dict[str, str]:
    """record id -> the label its question asks for (the true answer's text), over the arm's seeds."""
    return {str(p["record_id"]): str(p.get("answer_text")) for ps in arm.predictions.values() for p in ps}

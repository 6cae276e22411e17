"""report.md: the headline, Table 3 beside the paper, the negative control, Figure 4, limited data, the
search and caveats computed from the numbers above them."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path
from typing import Any

from medmat import stats
from medmat.io import atomic_write_json, atomic_write_text
from medmat.report import analysis, plots
from medmat.report.analysis import DIRECTION_NAMES
from medmat.report.runs import load_search, read_arm, read_world

SCALEUP_ORDER = [("baseline", "Baseline"), ("scaleup/all_unrelated", "All Unrelated"),
                 ("scaleup/all_related", "All Related"), ("scaleup/related_without_modality", "Related w/o Modality"),
                 ("scaleup/related_without_area", "Related w/o Area"), ("scaleup/related_without_task", "Related w/o Task"),
                 ("scaleup/all_data", "All Data"), ("in_distribution", "In-distribution (upper bound)")]
# The Med-MAT paper, Figure 4 (LLaVA-1.5-7B on real Med-MAT), in SCALEUP_ORDER without in-distribution.
PAPER_SCALEUP = {"03": [47, 51, 73, 62, 58, 48, 76], "28": [30, 33, 46, 38, 37, 36, 42]}


@dataclasses.dataclass
class ReportConfig:
    """params.yaml `report:` section (presentation only: changing it retrains nothing)."""

    title: str = "MedMAT-CG: compositional generalisation study"
    min_gain: float = 15.0        # points the mean gap should reach (printed beside the claim, not a test)
    control_band: float = 5.0     # equivalence margin of the negative control (points)
    n_boot: int = 2000            # bootstrap replicates per interval
    bootstrap_seed: int = 0
    dpi: int = 110
    figure_width: float = 7.5


def _acc(c: dict | None) -> str:
    if not c:
        return "n/a"
    flag = " ⚠" if c.get("degenerate") else ""
    return f"{c['acc']:.1f} [{c['lo']:.1f}, {c['hi']:.1f}]{flag}"


def _gap(g: dict | None) -> str:
    return "n/a" if not g else f"{g['gap']:+.1f} [{g['lo']:+.1f}, {g['hi']:+.1f}]"


def _sd(c: dict | None) -> str:
    return "n/a" if not c or math.isnan(c["sd_seeds"]) else f"{c['sd_seeds']:.1f}"


def _guessed(row: dict) -> str:
    shares = [(row[arm] or {}).get("guessed") for arm in ("trained", "baseline_plus")]
    return "-" if all(g is None for g in shares) else " / ".join("-" if g is None else f"{100 * g:.0f}" for g in shares)


def _labels_seen(row: dict) -> str:
    k, seen = len(row["target_labels"]), row["labels_seen"]
    if not k or not seen:
        return "-"
    return " / ".join(f"{len(seen.get(arm, []))}/{k}" for arm in ("related", "baseline_plus"))


def _ceiling(row: dict) -> str:
    c = row["ceiling"]
    return "-" if not c else f"{c['related']:.1f} / {c['baseline_plus']:.1f}"


def _paper(p: dict | None, key: str) -> str:
    return "-" if not p else f"{p[key]:g}"


def _claim_line(h: dict[str, Any], cfg: ReportConfig) -> str:
    if not h["rows"]:
        return "no comparable rows"
    verdict = "**supported**" if analysis.positive_claim(h) else "**NOT supported**"
    return (f"mean gap Trained - Baseline+ over {h['rows']} rows = {h['gap']:+.1f} points "
            f"(95% interval [{h['lo']:+.1f}, {h['hi']:+.1f}], two-stage bootstrap over seeds and test questions); "
            f"Trained beats both Baseline and Baseline+ (the paper's convention) in {h['improves']} of {h['rows']} rows; "
            f"gap interval above 0 in {h['significant']} of {h['rows']} rows. CG claim (most rows significant and the "
            f"mean's interval above 0): {verdict}. Mean gap {'≥' if h['gap'] >= cfg.min_gain else '<'} "
            f"{cfg.min_gain:g} points.")


def _replicated_control(path: str | None) -> dict[str, Any] | None:
    """The control-worlds stage's pooled numbers (medmat.control_worlds.headline), or None when it did
    not run (experiment.control_worlds 0, or no such file)."""
    if not path or not Path(path).is_file():
        return None
    pooled = json.loads(Path(path).read_text(encoding="utf-8"))
    return pooled if pooled.get("worlds", 0) >= 2 else None


def build_report(runs_dir: str, control_runs_dir: str | None, designs_dir: str, control_designs_dir: str | None,
                 search_dir: str | None, out_dir: str, cfg: ReportConfig,
                 summary_path: str | None = None, best_runs_dir: str | None = None,
                 control_worlds_path: str | None = None) -> dict[str, Any]:
    nb, bs = cfg.n_boot, cfg.bootstrap_seed
    main = read_world(runs_dir, designs_dir)
    # the search's best mixture, retrained with the study's seeds: a main-world arm like any other
    best_arms = {t: a for t in main if best_runs_dir and (a := read_arm(best_runs_dir, t, "search_best"))}
    for target, best in best_arms.items():
        main[target]["arms"]["search_best"] = best
    ctrl = read_world(control_runs_dir, control_designs_dir or designs_dir) if control_runs_dir else {}
    search = load_search(search_dir)
    out = Path(out_dir)
    (out / "plots").mkdir(parents=True, exist_ok=True)
    rows, crows = analysis.table3(main, nb, bs), analysis.table3(ctrl, nb, bs)
    h, hc = analysis.headline(rows, nb, bs), analysis.headline(crows, nb, bs)
    hh = analysis.headline(analysis.headroom_rows(rows), nb, bs)
    control_ok = analysis.control_verdict(hc, cfg.control_band)
    replicated = _replicated_control(control_worlds_path)

    figures: list[str] = []
    plots.write_csv(out / "plots" / "table3.csv", plots.table3_data(rows, "main") + plots.table3_data(crows, "entangled"),
                    plots.TABLE3_FIELDS)
    if rows:
        plots.plot_table3(rows, crows, out / "table3.png", cfg.dpi, cfg.figure_width, cfg.control_band)
        figures.append("table3.png")
    if plots.plot_ceiling(rows, out / "ceiling.png", cfg.dpi, cfg.figure_width):
        figures.append("ceiling.png")

    # Figure 4: every scale-up arm a target ran, with its paper number
    scale: dict[str, list[tuple[str, dict]]] = {}
    scale_rows = []
    for t, w in sorted(main.items()):
        if not any(a.startswith("scaleup/") for a in w["arms"]):
            continue
        for i, (arm, name) in enumerate(SCALEUP_ORDER):
            c = analysis.cell(w["arms"].get(arm), nb, bs)
            if c:
                scale.setdefault(t, []).append((name, c))
                paper = PAPER_SCALEUP.get(t, [])
                scale_rows.append({"arm": name, "target": t, "accuracy": c["acc"], "lo": c["lo"], "hi": c["hi"],
                                   "paper": paper[i] if i < len(paper) else ""})
    plots.write_csv(out / "plots" / "scaleup.csv", scale_rows, ["arm", "target", "accuracy", "lo", "hi", "paper"])
    if scale:
        plots.plot_bars(scale, out / "scaleup.png", cfg.dpi, cfg.figure_width, "scale-up")
        figures.append("scaleup.png")

    # limited target data: limited/<companion>_k<k>
    curves: dict[str, dict[str, list[tuple[int, dict]]]] = {}
    lim_rows = []
    for t, w in sorted(main.items()):
        for arm, a in w["arms"].items():
            if not arm.startswith("limited/"):
                continue
            comp, _, k = arm.removeprefix("limited/").rpartition("_k")
            c = analysis.cell(a, nb, bs)
            curves.setdefault(t, {}).setdefault(comp, []).append((int(k), c))
            lim_rows.append({"target": t, "companion": comp, "k": int(k), "accuracy": c["acc"], "lo": c["lo"],
                             "hi": c["hi"]})
    for comps in curves.values():
        for pts in comps.values():
            pts.sort(key=lambda x: x[0])
    lim_rows.sort(key=lambda r: (r["target"], r["companion"], r["k"]))
    plots.write_csv(out / "plots" / "limited.csv", lim_rows, ["target", "companion", "k", "accuracy", "lo", "hi"])
    if curves:
        plots.plot_limited(curves, out / "limited.png", cfg.dpi, cfg.figure_width)
        figures.append("limited.png")
    best_cells = {t: analysis.cell(a, nb, bs) for t, a in best_arms.items()}
    points = plots.search_points(search)
    plots.write_csv(out / "plots" / "search.csv", points, ["target", "trial", "dev_accuracy", "best_so_far", "source"])
    if plots.plot_search(points, out / "search_history.png", cfg.dpi, cfg.figure_width):
        figures.append("search_history.png")

    # every cell the report marks, once per world and arm (a target's Baseline serves all its rows; Figure 4
    # and the limited-data curves are main-world cells), so the caveats, the summary and `dvc metrics`
    # count the same cells
    all_cells = {f"{world}/{r['target']}/" + ("baseline" if k == "baseline" else f"{r['id']}/{k}"): r[k]
                 for world, world_rows in (("main", rows), ("control", crows)) for r in world_rows
                 for k in ("baseline", "baseline_plus", "trained")}
    all_cells.update({f"main/{t}/" + ("baseline" if name == "Baseline" else f"scaleup/{name}"): c
                      for t, cells in scale.items() for name, c in cells})
    all_cells.update({f"main/{t}/limited/{comp}_k{k}": c for t, comps in curves.items()
                      for comp, pts in comps.items() for k, c in pts})
    all_cells.update({f"main/{t}/search_best": c for t, c in best_cells.items()})
    caveats = analysis.caveats(rows, crows, all_cells, h, hc, cfg.control_band, replicated)
    caveats += analysis.search_caveats(search, best_arms)

    L: list[str] = [f"# {cfg.title}", "",
                    "Generated by `medmat report` from the runs' predictions. Accuracies are percentages on each "
                    "target's label-balanced **test** split: the mean over training seeds with a 95% interval from "
                    "a two-stage bootstrap (seeds resampled, then test questions; inside [0, 100] by construction). "
                    "Gaps are paired by seed and question. ⚠ marks a degenerate cell (see Caveats).", "",
                    "## Headline", "", f"- **Main world**: {_claim_line(h, cfg)}"]
    if any(r["ceiling"] for r in rows):
        L.append("- **Main world, rows where the names give the Related data an edge** (its name ceiling above "
                 "Baseline+'s, from the designs alone; column \"name ceiling\"): "
                 + (_claim_line(hh, cfg) if hh["rows"] else "none of the rows."))
    if crows:
        L.append(f"- **Negative control (entangled world, its targets null)**: mean gap {hc['gap']:+.1f} points over "
                 f"{hc['rows']} rows, "
                 f"95% interval [{hc['lo']:+.1f}, {hc['hi']:+.1f}]; equivalence test (interval inside "
                 f"±{cfg.control_band:g} points): **{'passed' if control_ok else 'NOT passed'}**.")
    else:
        L.append("- Negative control: no entangled-world runs found (experiment.control false?).")
    if replicated:
        rb = replicated["vs_baseline"]
        L.append(f"- **Negative control over {replicated['worlds']} entangled worlds** (stage control-worlds: "
                 f"{replicated['seeds_per_world']} seed each, the world as the unit, t-interval over world means): "
                 f"mean gap {replicated['mean_gap']:+.1f} points [{replicated['lo']:+.1f}, {replicated['hi']:+.1f}], "
                 f"sd between worlds {replicated['sd_between_worlds']:.1f}; equivalence test (inside "
                 f"±{replicated['band']:g} points): **{'passed' if replicated['equivalent'] else 'NOT passed'}**. "
                 f"Against the untrained Baseline: {rb['mean_gap']:+.1f} [{rb['lo']:+.1f}, {rb['hi']:+.1f}].")
    if h["rows"]:
        mc = analysis.label_clusters(rows, cfg.n_boot, cfg.bootstrap_seed)
        # Not for the control: its targets' images draw their looks one by one, whatever the label, so a
        # label's questions are independent there, and a model that ignores the image would swing a whole label.
        L.append("- Sensitivity, each target's labels resampled as clusters instead of its single questions (a look "
                 f"is learned or misread as a whole): main world [{mc['lo']:+.1f}, {mc['hi']:+.1f}].")
    L += ["", "## Table 3: the paper's rows beside ours", "",
          "One row per combination run. Paper = LLaVA-1.5-7B on real Med-MAT (the Med-MAT paper, Table 3); ours = "
          "this platform's model on this world. Gap = Trained - Baseline+ (paired two-stage bootstrap interval); "
          "✓ = Trained beats both Baseline and Baseline+ (the paper's convention); * = the gap's interval excludes 0.", "",
          "T sd = Trained's seed-to-seed sd (points); labels seen = how many of the target's labels the Related / "
          "Baseline+ arm's training answers name (the tiny model learns a name only from training answers); "
          "guessed = % of the Trained / Baseline+ answers the seeded tie-break decided (two or more options "
          "scored the same best: names the model never met are tied); name ceiling = the accuracy of a model "
          "that reads every label the arm's training answers name and guesses among the rest, from the "
          "designs alone (`analysis.name_ceiling`).", "",
          "| target | direction | Related | paper row | paper B / B+ / T | Baseline | Baseline+ | Trained | T sd | "
          "labels seen (T / B+) | name ceiling % (T / B+) | guessed % (T / B+) | gap (pts) | |",
          "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        p = r["paper"]
        rel = ", ".join(f"{k} {v}" for k, v in r["members"].items()) or ", ".join(r["related"])
        L.append(f"| {r['target']} {r['triplet']} | {DIRECTION_NAMES.get(r['direction'], r['direction'])} | {rel} | "
                 f"{p['row'] if p else '-'} | {_paper(p, 'baseline')} / {_paper(p, 'baseline_plus')} / "
                 f"{_paper(p, 'trained')} | {_acc(r['baseline'])} | {_acc(r['baseline_plus'])} | {_acc(r['trained'])} | "
                 f"{_sd(r['trained'])} | {_labels_seen(r)} | {_ceiling(r)} | {_guessed(r)} | "
                 f"{_gap(r['gap'])}{'*' if r['significant'] else ''} | {'✓' if r['improves'] else '✗'} |")
    if not rows:
        L.append("| (no Related runs found) | | | | | | | | | | | | | |")
    dropped = [f"- {t}: {d.get('id', '?')}: {d.get('reason', '')}" for t, w in sorted(main.items())
               for d in w["index"].get("dropped", [])]
    if dropped:
        L += ["", "Designs that could not be built:", ""] + dropped
    if crows:
        L += ["", "## Negative control: the entangled world", "",
              "Med-MAT-mini generated with `--entangled`: every (modality, area, task, label) of the other subsets "
              "has its own lesion look, and every image of a target draws its look at random from the lesion "
              "patterns no other subset shows, whatever its label. No data can teach a target here, and on its "
              "label-balanced test any model scores chance in expectation, so Trained and Baseline+ must match: "
              "a gap would come from the procedure, not from the data. It passes only if the mean gap's interval "
              "lies inside the equivalence band.", "",
              "| target | combination | Baseline+ | Trained | gap (pts) | main-world gap (pts) |", "|---|---|---|---|---|---|"]
        main_gap = {(r["target"], r["id"]): r["gap"] for r in rows}
        for r in crows:
            L.append(f"| {r['target']} | {r['id']} | {_acc(r['baseline_plus'])} | {_acc(r['trained'])} | "
                     f"{_gap(r['gap'])} | {_gap(main_gap.get((r['target'], r['id'])))} |")
    if "table3.png" in figures:
        L += ["", "![Table 3 gaps with intervals; x = the paper's gap](table3.png)"]
    if "ceiling.png" in figures:
        L += ["", "![Trained and Baseline+ against their name ceilings](ceiling.png)"]
    if scale:
        ts = sorted(scale)
        L += ["", "## Figure 4: scale-up (one total for every arm)", "",
              "| arm | " + " | ".join(f"{t} (ours) | {t} (paper)" for t in ts) + " |", "|---|" + "---|---|" * len(ts)]
        for i, (arm, name) in enumerate(SCALEUP_ORDER):
            cols = []
            for t in ts:
                c = dict(scale[t]).get(name)
                paper = PAPER_SCALEUP.get(t, [])
                cols += [_acc(c), str(paper[i]) if i < len(paper) else "-"]
            L.append(f"| {name} | " + " | ".join(cols) + " |")
        L += ["", "![Scale-up bars](scaleup.png)"]
    if curves:
        L += ["", "## Limited target data", "",
              "k of the target's own training records (never its dev or test records) added to the Related "
              "companions or to the Unrelated (Baseline+) companions.", "",
              "| target | k | with Related | with Unrelated |", "|---|---|---|---|"]
        for t, comps in sorted(curves.items()):
            for k in sorted({k for pts in comps.values() for k, _ in pts}):
                get = lambda comp: _acc(dict(comps.get(comp, [])).get(k))  # noqa: E731
                L.append(f"| {t} | {k} | {get('related')} | {get('unrelated')} |")
        L += ["", "![Limited-data curves](limited.png)"]
    L += ["", "## Mixture search (Optuna)", "",
          "The objective is accuracy on a **dev split of the target's own training records**, disjoint from every "
          "test split above. The best mixture is retrained with the study's seeds and tested like any arm.", ""]
    if search:
        L += ["Best dev acc is the best trial's (one training); retrained, the same mixture's dev accuracy "
              "averaged over the study's seeds.", "",
              "| target | trials | best dev acc | retrained dev acc | best mixture | its test acc |",
              "|---|---|---|---|---|---|"]
        for t, s in sorted(search.items()):
            best = s.get("best") or {}
            mix = ", ".join(f"{k}: {v}" for k, v in (best.get("components") or {}).items())
            dev = best.get("dev_accuracy")
            again = analysis.mean_dev(best_arms.get(t))
            L.append(f"| {t} | {best.get('n_trials', len(s['history']))} | "
                     f"{'-' if dev is None else f'{100 * dev:.1f}'} | {'-' if again is None else f'{100 * again:.1f}'}"
                     f" | {mix} | {_acc(best_cells.get(t))} |")
        if "search_history.png" in figures:
            L += ["", "![Search history](search_history.png)"]
    else:
        L.append("No search outputs found.")
    L += ["", "## Caveats (computed from the numbers above)", ""]
    L += [f"- {c}" for c in caveats] or ["- none triggered."]
    atomic_write_text(out / "report.md", "\n".join(L) + "\n")

    def rnd(x: float) -> float | None:
        return None if x is None or (isinstance(x, float) and math.isnan(x)) else round(float(x), 2)

    summary = {
        "main_rows": h["rows"], "main_improves": h["improves"], "main_significant": h["significant"],
        "main_mean_gap_pts": rnd(h["gap"]), "main_gap_ci95_pts": [rnd(h["lo"]), rnd(h["hi"])],
        "main_claim_supported": analysis.positive_claim(h),
        "headroom_rows": hh["rows"], "headroom_significant": hh["significant"],
        "headroom_mean_gap_pts": rnd(hh["gap"]), "headroom_gap_ci95_pts": [rnd(hh["lo"]), rnd(hh["hi"])],
        "headroom_claim_supported": analysis.positive_claim(hh),
        "control_rows": hc["rows"], "control_mean_gap_pts": rnd(hc["gap"]),
        "control_gap_ci95_pts": [rnd(hc["lo"]), rnd(hc["hi"])], "control_equivalent": control_ok,
        "degenerate_cells": sum(bool(c and c["degenerate"]) for k, c in all_cells.items() if k.startswith("main/")),
        "control_degenerate_cells": sum(bool(c and c["degenerate"]) for k, c in all_cells.items()
                                        if k.startswith("control/")),
        "control_worlds": replicated["worlds"] if replicated else 0,
        **({"control_worlds_mean_gap_pts": replicated["mean_gap"],
            "control_worlds_ci95_pts": [replicated["lo"], replicated["hi"]],
            "control_worlds_equivalent": replicated["equivalent"]} if replicated else {}),
        "main_rows_with_unseen_labels": len(analysis.unseen_label_rows(rows)),
        "max_trained_seed_sd": rnd(max((r["trained"]["sd_seeds"] for r in rows if r["trained"]
                                        and not math.isnan(r["trained"]["sd_seeds"])), default=math.nan)),
        "figures": figures,
    }
    if summary_path:
        atomic_write_json(summary_path, summary)
    atomic_write_json(out / "plots" / "summary.json", summary)
    return summary

"""The report's figures (PNG) and the data behind them (CSV, for `dvc plots show/diff`).

Data files (reports/plots/), one row per bar or point:
- table3.csv: row, target, combination, direction, world, baseline, baseline_plus, trained, trained_sd,
  labels, labels_seen_related, labels_seen_baseline_plus, name_ceiling_related,
  name_ceiling_baseline_plus, ours_gap, gap_lo, gap_hi, significant, paper_baseline, paper_baseline_plus,
  paper_trained, paper_gap
- scaleup.csv: arm, target, accuracy, lo, hi, paper
- limited.csv: target, companion, k, accuracy, lo, hi
- search.csv: target, trial, dev_accuracy, best_so_far, source
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter
from io import BytesIO
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_bytes, atomic_write_text
from medmat.report.analysis import DIRECTION_NAMES


def _plt():
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on CI or a server
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path, dpi: int) -> None:
    buf = BytesIO()
    fig.savefig(buf, format="png", dpi=dpi, bbox_inches="tight")
    atomic_write_bytes(path, buf.getvalue())


def write_csv(path: Path, rows: list[dict[str, Any]], fields: list[str]) -> None:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else round(v, 2) if isinstance(v, float) else v)
                    for k, v in r.items() if k in fields})
    atomic_write_text(path, buf.getvalue())


def _err(c: dict[str, Any]) -> tuple[float, float]:
    """Error bar lengths; the bootstrap interval is already inside [0, 100]."""
    return max(c["acc"] - c["lo"], 0.0), max(c["hi"] - c["acc"], 0.0)


TABLE3_FIELDS = ["row", "target", "combination", "direction", "world", "baseline", "baseline_plus", "trained",
                 "trained_sd", "labels", "labels_seen_related", "labels_seen_baseline_plus", "name_ceiling_related",
                 "name_ceiling_baseline_plus", "ours_gap", "gap_lo", "gap_hi", "significant", "paper_baseline",
                 "paper_baseline_plus", "paper_trained", "paper_gap"]


def table3_data(rows: list[dict], world: str) -> list[dict[str, Any]]:
    out = []
    for r in rows:
        p, g = r["paper"] or {}, r["gap"] or {}
        acc = {k: (r[k]["acc"] if r[k] else math.nan) for k in ("baseline", "baseline_plus", "trained")}
        label = f"{r['target']} {r['id']}" + ("" if world == "main" else f" ({world})")
        out.append({"row": label, "target": r["target"], "combination": r["id"],
                    "direction": r["direction"], "world": world, **acc,
                    "trained_sd": r["trained"]["sd_seeds"] if r["trained"] else math.nan,
                    "labels": len(r["target_labels"]),
                    **{f"labels_seen_{arm}": len(r["labels_seen"].get(arm, [])) for arm in ("related", "baseline_plus")},
                    **{f"name_ceiling_{arm}": (r["ceiling"] or {}).get(arm, math.nan) for arm in ("related", "baseline_plus")},
                    "ours_gap": g.get("gap", math.nan), "gap_lo": g.get("lo", math.nan), "gap_hi": g.get("hi", math.nan),
                    "significant": r["significant"], "paper_baseline": p.get("baseline", ""),
                    "paper_baseline_plus": p.get("baseline_plus", ""), "paper_trained": p.get("trained", ""),
                    "paper_gap": (p["trained"] - p["baseline_plus"]) if p else ""})
    return out


def plot_table3(rows: list[dict], crows: list[dict], path: Path, dpi: int, width: float, margin: float) -> None:
    """Gap Trained - Baseline+ per row with its paired interval: the main world with the paper's gap
    beside it (x), the control world with its equivalence band (shaded)."""
    plt = _plt()
    panels = [("main world", rows)] + ([("entangled world (negative control)", crows)] if crows else [])
    height = max(2.5, 0.35 * max(len(rs) for _, rs in panels) + 1.2)
    fig, axes = plt.subplots(1, len(panels), figsize=(width * (1 + 0.6 * (len(panels) - 1)), height), squeeze=False)
    for ax, (title, rs) in zip(axes[0], panels):
        ys = list(range(len(rs)))[::-1]
        for y, r in zip(ys, rs):
            g = r["gap"]
            if g:
                ax.errorbar(g["gap"], y, xerr=[[g["gap"] - g["lo"]], [g["hi"] - g["gap"]]], fmt="o",
                            color="#d4702a" if r["significant"] else "#999999", capsize=3)
            if r["paper"] and rs is rows:
                ax.plot(r["paper"]["trained"] - r["paper"]["baseline_plus"], y, marker="x", color="black")
        if rs is crows:
            ax.axvspan(-margin, margin, color="#cccccc", alpha=0.5, label=f"equivalence band ±{margin:g}")
            ax.legend(fontsize=7)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(ys, [f"{r['target']} {DIRECTION_NAMES.get(r['direction'], r['direction'])} "
                           f"({'+'.join(r['related'])})" for r in rs], fontsize=7)
        ax.set_xlabel("Trained - Baseline+ (points)" + ("; x = paper" if rs is rows else ""))
        ax.set_title(title, fontsize=9)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_ceiling(rows: list[dict], path: Path, dpi: int, width: float) -> bool:
    """Each row's Trained (orange) and Baseline+ (grey) accuracy, with its interval, against the arm's name
    ceiling (analysis.name_ceiling): on the diagonal an arm reads every label its training named and
    guesses the rest; above it, it reads labels no training answer named. False when no row has one."""
    pts = [(r, arm, side, colour) for r in rows if r["ceiling"]
           for arm, side, colour in (("trained", "related", "#d4702a"), ("baseline_plus", "baseline_plus", "#999999"))
           if r[arm]]
    if not pts:
        return False
    plt = _plt()
    fig, ax = plt.subplots(figsize=(width * 0.6, width * 0.5))
    ax.plot([0, 100], [0, 100], color="black", lw=0.8, label="name ceiling")
    at = Counter((arm, round(r["ceiling"][side], 1)) for r, arm, side, _ in pts)
    seen: Counter = Counter()
    for r, arm, side, colour in pts:
        x, c = r["ceiling"][side], r[arm]
        key = (arm, round(x, 1))
        offset = seen[key] - (at[key] - 1) / 2  # rows at one ceiling side by side, centred on it
        seen[key] += 1
        ax.errorbar(x + 0.9 * offset, c["acc"],
                    yerr=[[c["acc"] - c["lo"]], [c["hi"] - c["acc"]]], fmt="o", ms=4, color=colour, capsize=2,
                    label={"trained": "Trained (Related arm)", "baseline_plus": "Baseline+"}[arm])
    handles, labels = ax.get_legend_handles_labels()
    unique = dict(zip(labels, handles))
    ax.legend(unique.values(), unique.keys(), fontsize=7)
    ax.set_xlim(0, 108)
    ax.set_ylim(0, 105)
    ax.set_xlabel("name ceiling of the arm (%)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("accuracy against what the training answers name", fontsize=9)
    _save(fig, path, dpi)
    plt.close(fig)
    return True


def plot_bars(groups: dict[str, list[tuple[str, dict]]], path: Path, dpi: int, width: float, title: str) -> None:
    """One panel per target: accuracy bars with their intervals."""
    plt = _plt()
    fig, axes = plt.subplots(1, len(groups), figsize=(width * max(1, len(groups)) / 1.6, 3.6), squeeze=False)
    for ax, (target, bars) in zip(axes[0], groups.items()):
        errs = list(zip(*[_err(c) for _, c in bars]))
        ax.bar(range(len(bars)), [c["acc"] for _, c in bars], yerr=errs, capsize=3,
               color=["#999999" if n in ("Baseline", "All Unrelated") else "#d4702a" for n, _ in bars])
        ax.set_xticks(range(len(bars)), [n for n, _ in bars], rotation=40, ha="right", fontsize=7)
        ax.set_ylim(0, 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{title}: {target}", fontsize=9)
    _save(fig, path, dpi)
    plt.close(fig)


def plot_limited(curves: dict[str, dict[str, list[tuple[int, dict]]]], path: Path, dpi: int, width: float) -> None:
    plt = _plt()
    fig, axes = plt.subplots(1, len(curves), figsize=(width * 0.6 * len(curves), 3.4), squeeze=False)
    for ax, (target, comps) in zip(axes[0], curves.items()):
        for comp, colour in (("related", "#d4702a"), ("unrelated", "#6a9fd4")):
            pts = comps.get(comp) or []
            if not pts:
                continue
            ks = [k for k, _ in pts]
            ax.plot(ks, [c["acc"] for _, c in pts], marker="o", color=colour, label=f"{comp} companions")
            ax.fill_between(ks, [c["lo"] for _, c in pts], [c["hi"] for _, c in pts], color=colour, alpha=0.2)
        ax.set_xlabel("target training samples k")
        ax.set_ylabel("test accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"limited target data: {target}", fontsize=9)
        ax.legend(fontsize=7)
    _save(fig, path, dpi)
    plt.close(fig)


def search_points(search: dict[str, dict]) -> list[dict[str, Any]]:
    out = []
    for t, s in sorted(search.items()):
        best = -math.inf
        for r in s["history"]:
            if r.get("value") in ("", None):
                continue
            v = 100.0 * float(r["value"])
            best = max(best, v)
            out.append({"target": t, "trial": int(r["trial"]), "dev_accuracy": v, "best_so_far": best,
                        "source": r.get("source", "")})
    return out


def plot_search(points: list[dict[str, Any]], path: Path, dpi: int, width: float) -> list[str]:
    targets = sorted({p["target"] for p in points})
    if not targets:
        return []
    plt = _plt()
    fig, axes = plt.subplots(1, len(targets), figsize=(width * 0.5 * len(targets), 3.2), squeeze=False)
    for ax, t in zip(axes[0], targets):
        ps = [p for p in points if p["target"] == t]
        warm = [p for p in ps if p["source"].startswith("warm")]
        other = [p for p in ps if not p["source"].startswith("warm")]
        ax.scatter([p["trial"] for p in warm], [p["dev_accuracy"] for p in warm], marker="s", color="#d4702a",
                   label="warm start (Related arms)", zorder=3)
        ax.scatter([p["trial"] for p in other], [p["dev_accuracy"] for p in other], color="#6a9fd4",
                   label="sampled", zorder=3)
        ax.step([p["trial"] for p in ps], [p["best_so_far"] for p in ps], where="post", color="black", lw=1,
                label="best so far")
        ax.set_xlabel("trial")
        ax.set_ylabel("dev accuracy (%)")
        ax.set_ylim(0, 100)
        ax.set_title(f"mixture search: {t}", fontsize=9)
        ax.legend(fontsize=6)
    _save(fig, path, dpi)
    plt.close(fig)
    return targets

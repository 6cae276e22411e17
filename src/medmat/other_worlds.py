"""The study on worlds other than params.yaml's: does the claim hold, and do the seeds agree, where
nothing was tuned?

The model and its recipe were tuned on params.yaml's world (its synth seed, its targets). A result
that holds only there says more about the tuning than about compositional generalisation. This runs
the same study on Med-MAT-mini worlds of other synth seeds with other targets: each world generated,
ingested and designed as the main world is (medmat.control.build_world, not entangled), its Table-3
rows run through the study's own units (medmat.pipeline.run_study: MLflow runs, resume, shared
units), and judged by the report's own numbers (medmat.report.analysis: the two-stage bootstrap over
seeds and test questions, rows significant, the positive claim, degenerate cells). Per row it prints
Trained's accuracy on every seed beside their sd: where seeds part, their accuracies show how. The
claim is judged twice: over every row, and over the rows where the names give the Related data an edge
(its name ceiling above Baseline+'s, medmat.report.analysis.name_ceiling: read from the designs, before
any training). A world whose targets' Related data name no more labels than their Unrelated data cannot
show a gain from names, whatever the model.

    python -m medmat.other_worlds --world 2:04,05,10 --world 4:08,26,32 [--seeds 3] [--out work/other-worlds]

A world is `SYNTH_SEED:TARGET,TARGET,...`. Run it from the repository after `dvc repro pretrain`
(every arm starts from the main study's vision tower, `model.tiny.vision_init`, as in the study). Its
runs go to the MLflow experiment `<tracking.experiment>-other-worlds`; each world (its images, table,
designs, runs) to <out>/w<seed>-<targets>/, the verdicts to <out>/summary.json. Interrupted, it
resumes: a world whose table and designs exist is not regenerated, and finished units are not retrained.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import Any

import yaml

from medmat.config import ConfigError
from medmat.io import atomic_write_json, atomic_write_text
from medmat.names import norm_target

log = logging.getLogger("medmat.other_worlds")

SEED_SD_LIMIT = 5.0  # points: the seed-to-seed sd of Trained the study aims to stay within (README "Seeds")


def parse_world(spec: str) -> tuple[int, list[str]]:
    """`2:04,05,10` -> (2, ["04", "05", "10"])."""
    seed, sep, targets = spec.partition(":")
    try:
        if not sep or not targets.strip():
            raise ValueError
        return int(seed), [norm_target(t.strip()) for t in targets.split(",") if t.strip()]
    except (ValueError, TypeError):
        raise ConfigError(f"--world {spec!r}: expected SYNTH_SEED:TARGET,TARGET,... (e.g. 2:04,05,10)") from None


def other_world_params(params: str, synth_seed: int, targets: list[str], seeds: int) -> dict[str, Any]:
    """The study's whole params file (a dict, written beside the world) for another world: its synth
    seed (never entangled), its targets with Table 3's rows only (no scale-up, limited-data or control
    arms), `seeds` training seeds, and runs logged to an experiment of their own."""
    raw = yaml.safe_load(Path(params).read_text(encoding="utf-8"))
    raw["synth"] = {**raw.get("synth", {}), "seed": synth_seed, "entangled": False}
    raw["experiment"] = {**raw["experiment"], "targets": targets, "seeds": list(range(seeds)),
                         "scaleup_targets": [], "limited_targets": [], "control": False, "control_worlds": 0}
    tracking = raw.get("tracking", {})
    raw["tracking"] = {**tracking, "experiment": f"{tracking.get('experiment', 'medmat-cg')}-other-worlds"}
    return raw


def row_summary(row: dict[str, Any]) -> dict[str, Any]:
    """What one Table-3 row says, from medmat.report.analysis.table3's row."""
    g, t = row["gap"], row["trained"]
    return {"gap": round(g["gap"], 2), "lo": round(g["lo"], 2), "hi": round(g["hi"], 2),
            "significant": row["significant"], "improves": row["improves"], "trained": round(t["acc"], 2),
            "trained_sd": round(t["sd_seeds"], 2) if t["sd_seeds"] == t["sd_seeds"] else None,
            "trained_per_seed": {s: round(v, 1) for s, v in t["per_seed"].items()}, "degenerate": row["degenerate"],
            "name_ceiling": {a: round(v, 1) for a, v in row["ceiling"].items()} if row["ceiling"] else None}


def verdict(h: dict[str, Any]) -> dict[str, Any]:
    """A headline (medmat.report.analysis.headline) as the summary keeps it: no interval without rows."""
    from medmat.report.analysis import positive_claim

    span = {k: round(h[k], 2) for k in ("gap", "lo", "hi")} if h["rows"] else dict.fromkeys(("gap", "lo", "hi"))
    return {"n_rows": h["rows"], "mean_gap": span["gap"], "lo": span["lo"], "hi": span["hi"],
            "significant": h["significant"], "improves": h["improves"], "claim": positive_claim(h)}


def judge(runs: Path, designs: Path, n_boot: int, boot_seed: int) -> dict[str, Any]:
    """The report's verdict on one world's runs: its headline, and per row the gap and Trained's seeds."""
    from medmat.report.analysis import headline, headroom_rows, table3
    from medmat.report.runs import read_world

    rows = [r for r in table3(read_world(runs, designs), n_boot, boot_seed) if r["gap"]]
    if not rows:
        raise ConfigError(f"{designs}: this world builds no Table-3 row for its targets")
    per_row = {f"{r['target']}/{r['id']}": row_summary(r) for r in rows}
    sds = {k: r["trained_sd"] for k, r in per_row.items() if r["trained_sd"] is not None}
    return {"rows": per_row, **verdict(headline(rows, n_boot, boot_seed)),
            "headroom": verdict(headline(headroom_rows(rows), n_boot, boot_seed)),
            "max_trained_sd": max(sds.values()) if sds else None,
            "rows_over_sd_limit": sorted(k for k, sd in sds.items() if sd > SEED_SD_LIMIT),
            "degenerate_rows": sorted(k for k, r in per_row.items() if r["degenerate"])}


def run_world(root: Path, params: dict[str, Any], n_boot: int, boot_seed: int) -> dict[str, Any]:
    """Generate, ingest and design one world under `root` (unless done), run its Table-3 units, judge them."""
    from medmat.control import build_world
    from medmat.pipeline import run_study

    root.mkdir(parents=True, exist_ok=True)
    params_path, data = root / "params.yaml", root / "data"
    atomic_write_text(params_path, yaml.safe_dump(params, sort_keys=False))
    if not ((data / "records.parquet").exists() and (data / "designs").exists()):
        data.mkdir(exist_ok=True)
        build_world(data, str(params_path), root / "world", entangled=False)
    run_study(world="main", params=str(params_path), records=str(data / "records.parquet"),
              designs_dir=str(data / "designs"), runs_root=str(root / "runs"), metrics_root=str(root / "metrics"))
    return {"synth_seed": params["synth"]["seed"], "targets": params["experiment"]["targets"],
            **judge(root / "runs", data / "designs", n_boot, boot_seed)}


def check(worlds: list[tuple[int, list[str]]], seeds: int = 3, out: str = "work/other-worlds",
          params: str = "params.yaml") -> dict[str, Any]:
    """Run every world; write and return the summary (<out>/summary.json)."""
    from medmat.config import load_section
    from medmat.report.build import ReportConfig

    report = load_section(ReportConfig, "report", params)
    per_world = []
    for synth_seed, targets in worlds:
        root = Path(out) / f"w{synth_seed}-{'-'.join(targets)}"
        per_world.append(run_world(root, other_world_params(params, synth_seed, targets, seeds), report.n_boot,
                                   report.bootstrap_seed))
    summary = {"seeds": seeds, "seed_sd_limit": SEED_SD_LIMIT, "worlds": per_world}
    atomic_write_json(Path(out) / "summary.json", summary)
    return summary


def print_world(w: dict[str, Any]) -> None:
    verdict = "supported" if w["claim"] else "NOT supported"
    print(f"\nworld synth seed {w['synth_seed']}, targets {' '.join(w['targets'])}: mean gap Trained - Baseline+ "
          f"{w['mean_gap']:+.1f} [{w['lo']:+.1f}, {w['hi']:+.1f}] over {w['n_rows']} rows; interval above 0 in "
          f"{w['significant']}, Trained beats both baselines in {w['improves']}: claim {verdict}; largest Trained "
          f"seed sd {w['max_trained_sd']}, above {SEED_SD_LIMIT:g} in {len(w['rows_over_sd_limit'])} rows; "
          f"rows with a degenerate cell: {len(w['degenerate_rows'])}")
    e = w["headroom"]
    print(f"  rows where the names give the Related data an edge (name ceiling above Baseline+'s): {e['n_rows']}"
          + (f"; mean gap {e['mean_gap']:+.1f} [{e['lo']:+.1f}, {e['hi']:+.1f}], interval above 0 in "
             f"{e['significant']}: claim {'supported' if e['claim'] else 'NOT supported'}" if e["n_rows"] else ""))
    print(f"  {'row':<30} {'Trained':>7} {'sd':>5}  {'per seed':<24} {'ceiling T / B+':<15} gap")
    for key, r in w["rows"].items():
        seeds = " ".join(f"{v:.1f}" for v in r["trained_per_seed"].values())
        flags = ("*" if r["significant"] else " ") + (" ⚠" if r["degenerate"] else "")
        sd = "-" if r["trained_sd"] is None else f"{r['trained_sd']:.1f}"
        c = r["name_ceiling"]
        ceiling = f"{c['related']:.1f} / {c['baseline_plus']:.1f}" if c else "-"
        print(f"  {key:<30} {r['trained']:>7.1f} {sd:>5}  {seeds:<24} {ceiling:<15} {r['gap']:+.1f} "
              f"[{r['lo']:+.1f}, {r['hi']:+.1f}]{flags}")


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m medmat.other_worlds", description=__doc__.splitlines()[0])
    parser.add_argument("--world", action="append", required=True, metavar="SYNTH_SEED:TARGETS",
                        help="a world and its targets, e.g. 2:04,05,10 (repeat for more worlds)")
    parser.add_argument("--seeds", type=int, default=3, help="training seeds per cell (0..N-1)")
    parser.add_argument("--out", default="work/other-worlds")
    parser.add_argument("--params", default="params.yaml")
    args = parser.parse_args(argv)
    if args.seeds < 2:
        parser.error("--seeds must be at least 2 (the seed-to-seed sd is the point)")
    try:
        s = check([parse_world(w) for w in args.world], args.seeds, args.out, args.params)
    except (ConfigError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    for w in s["worlds"]:
        print_world(w)
    print(f"\n* = the gap's interval excludes 0; ⚠ = a degenerate cell in the row -> {args.out}/summary.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The negative control replicated over entangled worlds (stage control-worlds; opt-in by params).

The control stage's one world conditions on one draw of the training subsets' looks. Its targets are
null (medmat.control), so any trained model's expected gap there is zero and one world's interval
carries the test; replicating over worlds checks that across training sets too. Here the world is the
unit of replication. World i is Med-MAT-mini --entangled with synth seed
`synth.seed + i` (world 0 is the control stage's own world), generated, ingested and designed exactly
like the control stage (medmat.control), and its Table-3 cells run through the study's own units
(medmat.pipeline.run_study: MLflow runs, resume, shared units) with `--seeds` training seeds. Each
world's mean Trained - Baseline+ gap over its rows is one value; the claim is the Student-t interval of
their mean, and it passes only inside the report's equivalence band (`report.control_band`). The same
is printed against the untrained Baseline (the paper's Baseline), which no training can put below chance.

    python -m medmat.control_worlds [--worlds N] [--seeds 1] [--out work/control-worlds] [--keep-images]

`dvc repro` runs it as stage control-worlds with N = `experiment.control_worlds` (0: off, the stage
only records that it did not run), and the report prints its verdict beside the one world's:
`dvc exp run -S experiment.control_worlds=60`. Its headline numbers go to
work/metrics/control_worlds.json (`dvc metrics show`), the per-world detail to <out>/summary.json.
Interrupted, it resumes: a world whose table and designs exist is not regenerated, and finished units
are not retrained. A world's 21k images are removed once its units are done, unless --keep-images; they
are drawn again, byte-identical, only when one of its units still has to train.
"""

from __future__ import annotations

import argparse
import logging
import shutil
import statistics
import sys
from pathlib import Path
from typing import Any

import yaml

from medmat.config import ConfigError
from medmat.io import atomic_write_json, atomic_write_text

log = logging.getLogger("medmat.control_worlds")


def shifted_params(params: str, seed_offset: int, seeds: int) -> dict[str, Any]:
    """The study's whole params file (a dict, written beside the world) with the synth seed moved by
    `seed_offset` and `seeds` training seeds; medmat.data.synth_world.world_params reads its `synth:`."""
    raw = yaml.safe_load(Path(params).read_text(encoding="utf-8"))
    raw["synth"] = {**raw.get("synth", {}), "seed": int(raw.get("synth", {}).get("seed", 0)) + seed_offset}
    raw["experiment"] = {**raw["experiment"], "seeds": list(range(seeds)), "control": True}
    return raw


def run_world(root: Path, params: dict[str, Any], keep_images: bool) -> dict[str, Any]:
    """Generate, ingest and design one entangled world under `root`, run its cells; its rows' gaps."""
    from medmat.control import control_data
    from medmat.pipeline import run_study

    root.mkdir(parents=True, exist_ok=True)
    params_path, out, images = root / "params.yaml", root / "control", root / "world"
    atomic_write_text(params_path, yaml.safe_dump(params, sort_keys=False))
    if not ((out / "records.parquet").exists() and (out / "designs").exists()):
        control_data(out=str(out), params=str(params_path), world=str(images))
    cells = run_study(world="control", params=str(params_path), records=str(out / "records.parquet"),
                      designs_dir=str(out / "designs"), runs_root=str(root / "runs"),
                      metrics_root=str(root / "metrics"))
    if not keep_images:
        shutil.rmtree(images, ignore_errors=True)
    rows, vs_baseline = {}, {}  # "<target>/<combination>": Trained - Baseline+, Trained - Baseline (points)
    for target, arms in sorted(cells.items()):
        for arm, cell in sorted(arms.items()):
            combination, _, kind = arm.rpartition("/")
            if kind == "related":
                rows[f"{target}/{combination}"] = round(cell["acc"] - arms[f"{combination}/baseline_plus"]["acc"], 2)
                vs_baseline[f"{target}/{combination}"] = round(cell["acc"] - arms["baseline"]["acc"], 2)
    if not rows:
        raise ConfigError(f"{root}: this world builds no Table-3 row for experiment.targets")
    return {"synth_seed": params["synth"]["seed"], "rows": rows, "rows_vs_baseline": vs_baseline,
            "mean_gap": round(statistics.mean(rows.values()), 2),
            "mean_gap_vs_baseline": round(statistics.mean(vs_baseline.values()), 2)}


def pooled(values: list[float], band: float) -> dict[str, Any]:
    """Mean over worlds, its Student-t 95% interval, the spread between worlds, and the equivalence test."""
    from medmat.stats import equivalence, t_interval

    mean, lo, hi = t_interval(values)
    return {"mean_gap": round(mean, 2), "lo": None if lo != lo else round(lo, 2), "hi": None if hi != hi else round(hi, 2),
            "sd_between_worlds": round(statistics.stdev(values), 2) if len(values) > 1 else None,
            "equivalent": equivalence(lo, hi, band)}


def per_target(per_world: list[dict[str, Any]], key: str, band: float) -> dict[str, dict[str, Any]]:
    """Each target's gap (the mean of its rows in a world, from `key`: "rows" or "rows_vs_baseline"),
    pooled over worlds like the whole gap. A target's rows share its looks, so the target, not the row,
    is a world's independent draw; its spread between worlds says how many targets one world would need
    for its own interval to fit the band."""
    by_target: dict[str, list[float]] = {}
    for w in per_world:
        gaps_by_target: dict[str, list[float]] = {}
        for row, gap in w[key].items():  # rows are "<target>/<combination>"
            gaps_by_target.setdefault(row.split("/", 1)[0], []).append(gap)
        for target, gaps in sorted(gaps_by_target.items()):
            by_target.setdefault(target, []).append(statistics.mean(gaps))
    return {t: pooled(v, band) for t, v in by_target.items() if len(v) > 1}


METRICS = "work/metrics/control_worlds.json"


def headline(summary: dict[str, Any]) -> dict[str, Any]:
    """The summary without its per-world and per-target detail: the stage's DVC metrics, read by the report."""
    return {k: v for k, v in summary.items() if k not in ("per_world", "per_target", "per_target_vs_baseline")}


def replicate(worlds: int, seeds: int = 1, out: str = "work/control-worlds", params: str = "params.yaml",
              keep_images: bool = False) -> dict[str, Any]:
    """Run `worlds` entangled worlds; write and return the pooled equivalence test (summary.json)."""
    from medmat.config import load_section
    from medmat.report.build import ReportConfig

    band = load_section(ReportConfig, "report", params).control_band
    per_world = []
    for i in range(worlds):
        per_world.append(run_world(Path(out) / f"w{i}", shifted_params(params, i, seeds), keep_images))
        log.info("world %d of %d (synth seed %d): mean gap %+.1f over %d rows", i + 1, worlds,
                 per_world[-1]["synth_seed"], per_world[-1]["mean_gap"], len(per_world[-1]["rows"]))
    # The claim is against Baseline+, as in the report; against the untrained Baseline too, because
    # a Baseline+ that answers one label can sit below chance in a world (0-3 % on 28 in 4 of 20).
    summary = {"worlds": worlds, "seeds_per_world": seeds, "band": band,
               **pooled([w["mean_gap"] for w in per_world], band),
               "vs_baseline": pooled([w["mean_gap_vs_baseline"] for w in per_world], band),
               "per_target": per_target(per_world, "rows", band),
               "per_target_vs_baseline": per_target(per_world, "rows_vs_baseline", band), "per_world": per_world}
    atomic_write_json(Path(out) / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m medmat.control_worlds", description=__doc__.splitlines()[0])
    parser.add_argument("--worlds", type=int, default=None, help="entangled worlds (synth seeds synth.seed + "
                        "0..N-1); default: experiment.control_worlds (0: nothing runs)")
    parser.add_argument("--seeds", type=int, default=1, help="training seeds per world")
    parser.add_argument("--out", default="work/control-worlds")
    parser.add_argument("--metrics", default=METRICS, help="the pooled numbers without per-world detail")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--keep-images", action="store_true", help="keep each world's images after its units")
    args = parser.parse_args(argv)
    try:
        worlds = args.worlds
        if worlds is None:
            from medmat.config import load_section
            from medmat.experiment import ExperimentConfig

            worlds = load_section(ExperimentConfig, "experiment", args.params).control_worlds
        if worlds == 0 and args.worlds is None:
            # The stage's outputs exist but say nothing ran; the report then judges the one control world.
            Path(args.out).mkdir(parents=True, exist_ok=True)
            atomic_write_json(Path(args.metrics), {"worlds": 0, "note": "experiment.control_worlds is 0: off"})
            print("experiment.control_worlds is 0: the negative control is not replicated "
                  "(`dvc exp run -S experiment.control_worlds=60` runs it)")
            return 0
        if worlds < 2 or args.seeds < 1:
            parser.error("--worlds must be at least 2 (the spread between worlds is the point) and --seeds at least 1")
        s = replicate(worlds, args.seeds, args.out, args.params, args.keep_images)
        atomic_write_json(Path(args.metrics), headline(s))
    except (ConfigError, FileNotFoundError) as exc:
        log.error("%s", exc)
        return 2
    verdict, b = ("passed" if s["equivalent"] else "NOT passed"), s["vs_baseline"]
    print(f"negative control over {s['worlds']} entangled worlds ({s['seeds_per_world']} seed each): mean gap "
          f"{s['mean_gap']:+.1f} points [{s['lo']:+.1f}, {s['hi']:+.1f}] (t over worlds; sd between worlds "
          f"{s['sd_between_worlds']:.1f}); equivalence (inside ±{s['band']:g}): {verdict}\n"
          f"against the untrained Baseline instead: {b['mean_gap']:+.1f} [{b['lo']:+.1f}, {b['hi']:+.1f}] "
          f"({'inside' if b['equivalent'] else 'not inside'} ±{s['band']:g}) -> {args.out}/summary.json")
    for target, t in s["per_target"].items():
        tb = s["per_target_vs_baseline"][target]
        print(f"  target {target}: mean gap {t['mean_gap']:+.1f} [{t['lo']:+.1f}, {t['hi']:+.1f}], "
              f"sd between worlds {t['sd_between_worlds']:.1f}; against the Baseline {tb['mean_gap']:+.1f} "
              f"[{tb['lo']:+.1f}, {tb['hi']:+.1f}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())

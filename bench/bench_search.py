"""Mixture search (TPE + warm start from the MAT designs) against random search, same trial budget.

    python bench/bench_search.py [--world DIR] [--target 6] [--trials 8] [--seeds 0,1,2] [--max-steps 120]

On Med-MAT-mini with the tiny CPU VLM: for each seed, run both searches for `--trials` trials on the
target's dev split and count the trials needed to reach (>=) and to beat (>) the dev accuracy of the
best Related arm of the designs; also the best dev accuracy found within the budget. Trials run the
real objective (resolve_mixture -> train_model -> dev accuracy) through medmat.search's worker on a real
SQLite study; a mixture trained once is cached (training is deterministic for a fixed seed), so the
warm-start trials shared by every TPE seed cost one training each.

`--world DIR` reuses a folder holding data/ + work/records.parquet + work/designs (as `make demo`
leaves); without it a fresh Med-MAT-mini is generated in a temporary folder (~1 min).
Prints a table and the machine it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from medmat import search  # noqa: E402
from medmat.config import from_dict, load_params  # noqa: E402


def build_world(root: Path, params: Path, target: str) -> None:
    medmat = [sys.executable, "-m", "medmat.cli"]
    steps = [
        ["synth", "--out", str(root / "data"), "--params", str(params)],
        ["ingest", "--data", str(root / "data"), "--out", str(root / "work/records.parquet"), "--params", str(params)],
        ["designs", "--records", str(root / "work/records.parquet"), "--targets", target,
         "--out", str(root / "work/designs"), "--params", str(params)],
    ]
    for step in steps:
        subprocess.run(medmat + step, check=True, stdout=subprocess.DEVNULL)


def machine() -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return (f"{cpu}; {os.cpu_count()} cores; Python {platform.python_version()}; torch {torch.__version__} "
            f"({torch.get_num_threads()} threads); optuna {search.optuna.__version__}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--target", default="6")
    ap.add_argument("--trials", type=int, default=8)
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--max-steps", type=int, default=120, help="training steps per trial (params: train.max_steps)")
    ap.add_argument("--json", type=Path, default=None, help="also write the figures here")
    args = ap.parse_args(argv)
    seeds = [int(s) for s in args.seeds.split(",")]

    from medmat.models import ModelConfig
    from medmat.train import TrainConfig, train_model
    from medmat.mixture import resolve_mixture

    t_start = time.perf_counter()
    tmp = tempfile.TemporaryDirectory(prefix="bench-search-")
    world = args.world or Path(tmp.name)
    if args.world is None:
        build_world(world, args.params.resolve(), args.target)
    cfg = from_dict(search.SearchConfig, (load_params(args.params).get("search") or {}))
    problem = search.build_problem(world / "work/records.parquet", world / "work/designs", args.target, cfg)
    params = load_params(args.params)
    train_cfg = from_dict(TrainConfig, {**(params.get("train") or {}), "max_steps": args.max_steps,
                                        "progress": False})
    model_cfg = from_dict(ModelConfig, params.get("model"))

    cache: dict[str, float] = {}
    train_s: list[float] = []

    def dev_accuracy(mixture: dict[str, int], trial=None) -> float:
        key = json.dumps(mixture, sort_keys=True)
        if key not in cache:
            t0 = time.perf_counter()
            train_df, _ = resolve_mixture(problem.records, {"components": mixture, "seed": 0})
            res = train_model(train_cfg, model_cfg, train_df, problem.dev_df, data_root=problem.data_root)
            cache[key] = float(res.final_dev_accuracy)
            train_s.append(time.perf_counter() - t0)
        return cache[key]

    related = {a: m for a, m in problem.warm.items() if a.startswith("related_")}
    if not related:
        print(f"target {problem.target}: no Related arm in the designs; nothing to compare against")
        return 1
    related_acc = {a: dev_accuracy(m) for a, m in related.items()}
    best_arm = max(related_acc, key=related_acc.get)
    threshold = related_acc[best_arm]

    db = Path(tmp.name) / "bench-optuna.db"
    storage = f"sqlite:///{db}"
    rows = []
    methods = [("tpe+warm", "tpe", True), ("random", "random", False)]
    for seed in seeds:
        for label, sampler, warm in methods:
            name = f"bench-{label}-{seed}"
            study = search.open_study(name, storage, sampler, seed, pruner_startup_trials=10_000)
            if warm:
                search.enqueue_warm_start(study, problem.space, problem.warm)
            search.run_worker(study, problem.space, dev_accuracy, args.trials, search.lock_path(storage, name),
                              progress=False)
            values = [t.value for t in sorted(study.trials, key=lambda t: t.number)]
            beat = [v if v is not None and v > threshold + 1e-12 else None for v in values]
            rows.append({
                "method": label, "seed": seed,
                "reach": search.trials_to_reach(values, threshold),
                "beat": search.trials_to_reach(beat, threshold + 1e-9),
                "best": max(v for v in values if v is not None),
            })
    wall = time.perf_counter() - t_start

    def fmt(v):
        return "-" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))

    print(f"target {problem.target} ({problem.triplet}); dev split {len(problem.dev_df)} records; "
          f"{len(problem.space.limits)} candidate subsets; budget {problem.space.budget} samples; "
          f"{args.trials} trials per search; train {args.max_steps} steps x batch {train_cfg.batch_size}")
    print("Related arms' dev accuracy: " + ", ".join(f"{a} {v:.3f}" for a, v in sorted(related_acc.items()))
          + f"  -> threshold {threshold:.3f} ({best_arm})")
    print(f"\n| method | seed | trials to reach Related | trials to beat Related | best dev acc in {args.trials} |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {r['seed']} | {fmt(r['reach'])} | {fmt(r['beat'])} | {fmt(r['best'])} |")
    print("\n| method | reached (of seeds) | mean trials to reach (reached only) | beat (of seeds) | mean best |")
    print("|---|---|---|---|---|")
    summary = {}
    for label, _, _ in methods:
        rs = [r for r in rows if r["method"] == label]
        reached = [r["reach"] for r in rs if r["reach"] is not None]
        beats = [r["beat"] for r in rs if r["beat"] is not None]
        summary[label] = {"reached": len(reached), "mean_reach": statistics.mean(reached) if reached else None,
                          "beat": len(beats), "mean_best": statistics.mean(r["best"] for r in rs)}
        s = summary[label]
        print(f"| {label} | {s['reached']}/{len(rs)} | {fmt(s['mean_reach'])} | {s['beat']}/{len(rs)} | "
              f"{s['mean_best']:.3f} |")
    print(f"\n{len(cache)} distinct trainings ({statistics.mean(train_s):.1f} s each), wall {wall:.0f} s")
    print("machine: " + machine())
    if args.json:
        args.json.write_text(json.dumps({"rows": rows, "summary": summary, "threshold": threshold,
                                         "related": related_acc, "wall_s": wall}, indent=1))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

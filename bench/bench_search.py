"""Mixture search, honestly: TPE and random search, each with and without the designs' warm start.

    python bench/bench_search.py [--quick] [--world DIR] [--targets 03,28,06] [--seeds 0,1,2,3,4]
                                 [--extra 6] [--max-steps 150] [--jobs 2] [--json out.json]

For every (target, seed) unit, four searches of N = k + `--extra` trials each (k = the target's number
of warm-start arms: every arm gets the same number of trainings) run the real objective
(medmat.search.resolve at exactly the budget -> medmat.train.train_model -> dev accuracy) through
medmat.search's worker on a real Optuna SQLite storage:

    tpe+warm     TPE, the designs' Related arms and All Related enqueued first (what `medmat search` does)
    tpe          TPE from scratch
    random+warm  random search after the same warm start
    random       random search from scratch

The seed drives both the sampler and training (so a mixture's dev accuracy carries its training noise,
and the bar below is re-measured per seed). Within a unit a mixture is trained once (cached), so the
warm-start trials shared by the two warm arms cost one training each.

The bar is the BEST WARM-START ARM's dev accuracy (the best of the designs' mixtures, at the budget,
this seed). Reported per arm, over the seeds x targets units, with 95% bootstrap intervals (units
resampled within each target):
  - beat: the share of units where the search found a mixture STRICTLY above the bar within the
    trials; a warm-start trial is never the answer (it is the bar's own arm), but it counts in the
    trial position, since it cost a training;
  - trials to beat: mean position of that trial, a unit that never beat it counted as trials + 1
    (censored), and the median over the units that beat it;
  - best dev after N: the best dev accuracy the search holds after its N trials (warm trials
    included: they are part of what it tried), and its gap to the bar;
  - paired differences of best dev between arms on the same units.

Without `--world`, a fresh Med-MAT-mini (synth -> ingest -> designs) is built in a temporary folder
(~2 min). `--world DIR` reuses a folder holding work/records.parquet + work/designs (as `make demo`
leaves). Prints the machine (and its load: the numbers are wall-clock on a possibly shared machine).
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

import numpy as np  # noqa: E402

import optuna  # noqa: E402

from medmat import search  # noqa: E402
from medmat.config import from_dict, load_params  # noqa: E402

ARMS = (("tpe+warm", "tpe", True), ("tpe", "tpe", False), ("random+warm", "random", True), ("random", "random", False))
PAIRS = (("tpe+warm", "random+warm"), ("tpe", "random"), ("tpe+warm", "tpe"), ("random+warm", "random"))
QUICK = {"extra": 3, "max_steps": 100}

# set in the parent before the worker processes fork
_STATE: dict = {}


def build_world(root: Path, params: Path, targets: list[str]) -> None:
    medmat = [sys.executable, "-m", "medmat.cli"]
    steps = [
        ["synth", "--out", str(root / "data"), "--params", str(params)],
        ["ingest", "--data", str(root / "data"), "--out", str(root / "work/records.parquet"), "--params", str(params)],
        ["designs", "--records", str(root / "work/records.parquet"), "--targets", ",".join(targets),
         "--out", str(root / "work/designs"), "--params", str(params)],
    ]
    for step in steps:
        subprocess.run(medmat + step, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


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
            f"(1 thread per job); optuna {optuna.__version__}")


def run_unit(job: tuple[str, int]) -> dict:
    """The four searches of one (target, seed); returns their trial values in order."""
    import dataclasses

    import torch

    from medmat.train import train_model

    torch.set_num_threads(1)
    target, seed = job
    problem, train_cfg, model_cfg, tmp = _STATE["problems"][target], _STATE["train"], _STATE["model"], _STATE["tmp"]
    trials = len(problem.warm) + _STATE["extra"]
    train_cfg = dataclasses.replace(train_cfg, seed=seed)
    cache: dict[str, float] = {}
    train_s: list[float] = []

    def dev_accuracy(mixture: dict[str, int], trial=None) -> float:
        key = json.dumps(mixture, sort_keys=True)
        if key not in cache:
            t0 = time.perf_counter()
            train_df, _ = search.resolve(problem, mixture, seed=0)
            res = train_model(train_cfg, model_cfg, train_df, problem.dev_df, data_root=problem.data_root,
                              log_model=False)
            cache[key] = float(res.final_dev_accuracy)
            train_s.append(time.perf_counter() - t0)
        return cache[key]

    # the bar: the best warm-start arm, at the budget, trained with this seed
    warm_values = {}
    for arm, design in problem.warm.items():
        mixture = problem.space.apply_budget(design)
        if problem.space.at_budget(mixture):
            warm_values[arm] = dev_accuracy(mixture)
    bar = max(warm_values.values())
    storage = f"sqlite:///{tmp}/bench-{target}-{seed}.db"
    out = {"target": target, "seed": seed, "bar": bar, "bar_arm": max(warm_values, key=warm_values.get),
           "k_warm": len(problem.warm), "trials": trials, "arms": {}}
    for label, sampler, warm in ARMS:
        name = f"{label}-{target}-{seed}"
        study = search.open_study(name, storage, sampler, seed, pruner_startup_trials=10_000)
        if warm:
            search.enqueue_warm_start(study, problem.space, problem.warm)
        search.run_worker(study, problem.space, dev_accuracy, trials, search.lock_path(storage, name), progress=False)
        done = sorted(study.get_trials(deepcopy=False), key=lambda t: t.number)
        values = [t.value for t in done if t.value is not None]
        out["arms"][label] = {
            "values": [t.value for t in done], "warm": [search.WARM in t.user_attrs for t in done],
            "beat": search.trials_to_beat(done, bar), "best": max(values) if values else None,
        }
    out["trainings"], out["train_s"] = len(cache), sum(train_s)
    return out


def bootstrap(units: list[dict], stat, n_boot: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """(point, lo, hi): percentile bootstrap of stat(units), resampling units within each target."""
    rng = np.random.default_rng(seed)
    by_target: dict[str, list[dict]] = {}
    for u in units:
        by_target.setdefault(u["target"], []).append(u)
    reps = []
    for _ in range(n_boot):
        sample = []
        for group in by_target.values():
            sample += [group[i] for i in rng.integers(0, len(group), len(group))]
        reps.append(stat(sample))
    lo, hi = np.percentile(reps, [2.5, 97.5])
    return stat(units), float(lo), float(hi)


def summarise(units: list[dict]) -> dict:
    summary = {}
    for label, _, _ in ARMS:
        def beat_rate(us, label=label):
            return float(np.mean([u["arms"][label]["beat"] is not None for u in us]))

        def censored(us, label=label):
            return float(np.mean([u["arms"][label]["beat"] or u["trials"] + 1 for u in us]))

        def best(us, label=label):
            return float(np.mean([u["arms"][label]["best"] for u in us]))

        def gap(us, label=label):
            return float(np.mean([u["arms"][label]["best"] - u["bar"] for u in us]))

        beaten = [u["arms"][label]["beat"] for u in units if u["arms"][label]["beat"] is not None]
        summary[label] = {"beat_rate": bootstrap(units, beat_rate), "trials_to_beat": bootstrap(units, censored),
                          "median_trials_beaten": statistics.median(beaten) if beaten else None,
                          "best_dev": bootstrap(units, best), "gap_to_bar": bootstrap(units, gap)}
    summary["pairs"] = {
        f"{a} - {b}": bootstrap(units, lambda us, a=a, b=b: float(np.mean(
            [u["arms"][a]["best"] - u["arms"][b]["best"] for u in us]))) for a, b in PAIRS}
    return summary


def report(units: list[dict], summary: dict, args, problems: dict, wall: float, loads: tuple) -> None:
    def ci(t, pct=True):
        f = 100.0 if pct else 1.0
        return f"{t[0] * f:.1f} [{t[1] * f:.1f}, {t[2] * f:.1f}]"

    print(f"\n{len(units)} units = {len(problems)} targets x {len(args.seeds)} seeds; N = warm-start arms + "
          f"{args.extra} trials per search; train {args.max_steps} steps x batch {_STATE['train'].batch_size}; "
          "every mixture at exactly its budget")
    for t, p in problems.items():
        print(f"  target {t} ({p.triplet}): N = {len(p.warm) + args.extra}, budget {p.space.budget} samples, "
              f"{len(p.space.limits)} candidate subsets, {len(p.warm)} warm-start arms, dev split {len(p.dev_df)} records")
    print("\nBar per unit = best warm-start arm's dev accuracy (%):")
    for u in units:
        print(f"  {u['target']} seed {u['seed']}: {100 * u['bar']:.1f} ({u['bar_arm']})  " + "  ".join(
            f"{a}: best {100 * u['arms'][a]['best']:.1f}, beat@{u['arms'][a]['beat'] or '-'}" for a, _, _ in ARMS))
    print("\n| arm | beat the bar within N (% of units) | trials to beat (mean, unbeaten = N + 1) | "
          "median trials (beaten only) | best dev after N (%) | best - bar (points) |")
    print("|---|---|---|---|---|---|")
    for label, _, _ in ARMS:
        s = summary[label]
        med = "-" if s["median_trials_beaten"] is None else f"{s['median_trials_beaten']:g}"
        print(f"| {label} | {ci(s['beat_rate'])} | {ci(s['trials_to_beat'], pct=False)} | {med} | "
              f"{ci(s['best_dev'])} | {ci(s['gap_to_bar'])} |")
    print("\nPaired difference of best dev after N (points, same units):")
    for name, t in summary["pairs"].items():
        print(f"  {name}: {ci(t)}")
    print("(95% percentile bootstrap over units, resampled within target; 2000 resamples)")
    trainings = sum(u["trainings"] for u in units)
    train_s = sum(u["train_s"] for u in units)
    print(f"\n{trainings} trainings ({train_s / max(trainings, 1):.1f} s each), {args.jobs} job(s), wall {wall:.0f} s; "
          f"load average {loads[0]:.1f} at start, {loads[1]:.1f} at end")
    print("machine: " + machine())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=Path, default=None)
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--targets", default="03,28,06")
    ap.add_argument("--seeds", default="0,1,2,3,4")
    ap.add_argument("--extra", type=int, default=6, help="trials per search beyond the number of warm-start arms")
    ap.add_argument("--max-steps", type=int, default=150, help="training steps per trial (train.max_steps)")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--jobs", type=int, default=2, help="units run in parallel processes (1 torch thread each)")
    ap.add_argument("--quick", action="store_true", help=f"fewer trials and steps: {QUICK}")
    ap.add_argument("--json", type=Path, default=None, help="also write every unit and the summary here")
    args = ap.parse_args(argv)
    if args.quick:
        args.extra, args.max_steps = QUICK["extra"], QUICK["max_steps"]
    args.targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    if len(args.targets) < 1 or len(args.seeds) < 2:
        ap.error("need at least one target and two seeds (intervals)")

    from medmat.models import ModelConfig
    from medmat.train import TrainConfig

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    t_start, load0 = time.perf_counter(), os.getloadavg()[0]
    tmp = tempfile.TemporaryDirectory(prefix="bench-search-")
    world = args.world or Path(tmp.name)
    if args.world is None:
        build_world(world, args.params.resolve(), args.targets)
    params = load_params(args.params)
    cfg = from_dict(search.SearchConfig, params.get("search") or {})
    problems = {}
    for t in args.targets:
        p = search.build_problem(world / "work/records.parquet", world / "work/designs", t, cfg)
        if not p.warm:
            print(f"target {t}: no warm-start arm in the designs; left out")
            continue
        problems[p.target] = p
    _STATE.update(problems=problems, extra=args.extra, tmp=tmp.name,
                  train=from_dict(TrainConfig, {**(params.get("train") or {}), "max_steps": args.max_steps,
                                                "batch_size": args.batch_size, "eval_every": 0, "warmup_steps": 5,
                                                "checkpoint_every": 0, "progress": False}),
                  model=from_dict(ModelConfig, params.get("model")))
    jobs = [(t, s) for t in problems for s in args.seeds]
    if args.jobs > 1:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        # fork before torch is imported here: the workers inherit the problems without pickling them
        with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("fork")) as pool:
            units = list(pool.map(run_unit, jobs))
    else:
        units = [run_unit(j) for j in jobs]
    wall = time.perf_counter() - t_start
    summary = summarise(units)
    report(units, summary, args, problems, wall, (load0, os.getloadavg()[0]))
    if args.json:
        args.json.write_text(json.dumps({"units": units, "summary": summary, "extra": args.extra,
                                         "max_steps": args.max_steps, "wall_s": wall, "machine": machine()},
                                        indent=1, default=str))
    tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())

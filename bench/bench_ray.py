"""Scaling of the study's units: the in-process executor with 1 worker vs Ray with 2 workers, side by side.

    python bench/bench_ray.py                  # 48 units of 150 steps (the study's scale), ~5 min on 2 cores
    python bench/bench_ray.py --units 8 --json bench-ray.json   # a short run: Ray's fixed cost dominates
    python bench/bench_ray.py --smoke          # 2 short units: checks the script only

The same units (a tiny Med-MAT-mini world built in a temporary folder, the tiny CPU model, one torch
thread per unit) run twice, each into its own run folders:
  1. `local`: medmat.unit.run_units(specs, workers=1), one after another in this process (the
     baseline T_local);
  2. `ray`:   medmat.ray_executor.run_units_ray on a local Ray with 2 CPUs, one CPU per unit;
  3. `pool`:  the local executor with 2 worker processes, as the study stage runs it (imports once,
     then forks), run first while torch is not yet imported (skip with --no-pool). Its time
     includes that one import; the in-process run's does not (torch is imported by then).
Ray's wall time is the whole call: starting Ray, its worker processes importing torch and medmat,
the units, and shutting Ray down. Parallel efficiency = T_local / (2 x T_ray); 1.0 is perfect.
Predictions are compared unit by unit: the two executors must give the same answers.

The machine matters: on a shared 2-core box other processes take CPU time from both runs. The
load average and a ceiling measured without medmat (the same pure-Python loop run by one process,
then by two at once) are printed before and after, with the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

import yaml

# Loopback only (read when ray is imported): Ray would otherwise advertise this machine's address.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")


def build_world(root: Path, steps: int, units: int, image_size: int) -> list:
    """Med-MAT-mini (3 subsets), ingested; two Related-style mixtures of target 03; `units` run specs."""
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.records import read_records
    from medmat.data.synth_world import SynthParams, generate
    from medmat.mixture import resolve_mixture, save_manifest
    from medmat.runspec import RunSpec, load_study_params

    generate(root / "data", SynthParams(train_per_subset=120, test_per_subset=40, image_size=32,
                                        subsets=[3, 4, 28]), progress=False)
    ingest_to_parquet(root / "data", root / "work" / "records.parquet", progress=False)
    params = {
        "model": {"backend": "tiny", "tiny": {"image_size": image_size}},
        "train": {"max_steps": steps, "batch_size": 64, "lr": 0.003, "warmup_steps": 10, "eval_every": 0,
                  "checkpoint_every": 0, "progress": False, "num_threads": 1},
        "evaluate": {"batch_size": 64},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns/art")},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    study = load_study_params(root / "params.yaml")
    table = read_records(root / "work" / "records.parquet")
    mixtures = {"related": {"04": 120, "28": 120}, "related_04": {"04": 120}}
    for name, comp in mixtures.items():
        save_manifest(root / "work" / f"{name}.json", resolve_mixture(table, {"components": comp}, seed=0)[1])
    save_manifest(root / "work" / "dev.json", resolve_mixture(table, {"components": {"03": 20}}, seed=0)[1])
    names = list(mixtures)

    def specs(runs_root: str) -> list:
        return [RunSpec(target="03", triplet="CT-Lung-COVID", subset_no=3, arm=f"bench/{names[i % 2]}",
                        seed=i // 2, records="work/records.parquet", params=study,
                        run_dir=f"{runs_root}/03/bench/{names[i % 2]}/seed{i // 2}",
                        manifest=f"work/{names[i % 2]}.json", dev_manifest="work/dev.json")
                for i in range(units)]

    return specs


def machine() -> dict:
    import ray
    import torch

    return {"python": platform.python_version(), "torch": torch.__version__, "ray": ray.__version__,
            "cpu_count": os.cpu_count(), "cpu": platform.processor() or platform.machine(),
            "loadavg_1m_before": round(os.getloadavg()[0], 2)}


def machine_ceiling(seconds_of_work: float = 2.0) -> float:
    """What two processes get on this machine right now: the same pure-Python loop run by 1 process,
    then by 2 at once; the ratio of wall times (1.0 = two free cores). No medmat, no Ray, no torch."""
    import subprocess

    code = "import time; t = time.perf_counter(); s = 0\nfor i in range(N): s += i * i\n"
    n = 10_000_000
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code.replace("N", str(n))], check=True)
    one = time.perf_counter() - t0
    n = int(n * seconds_of_work / max(one, 1e-3))  # about `seconds_of_work` of CPU each
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code.replace("N", str(n))], check=True)
    one = time.perf_counter() - t0
    t0 = time.perf_counter()
    procs = [subprocess.Popen([sys.executable, "-c", code.replace("N", str(n))]) for _ in range(2)]
    for p in procs:
        p.wait()
    return one / (time.perf_counter() - t0)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # The demo's study stage trains ~90 units of 150 steps (2-4 s each); 48 such units are a study-sized
    # workload, on which Ray's fixed cost (start, one import per worker, shutdown: ~8-14 s) is amortised
    # as it is in the study.
    ap.add_argument("--units", type=int, default=48, help="trained units (seeds x 2 mixtures)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per unit")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="2 units of 5 steps: checks the script runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary world (printed)")
    ap.add_argument("--no-pool", action="store_true",
                    help="skip the third run (the local process pool with 2 workers, a reference for the machine)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.units, args.steps, args.image_size = 2, 5, 16

    from medmat.ray_executor import run_units_ray
    from medmat.unit import run_units

    info = {}
    root = Path(tempfile.mkdtemp(prefix="medmat-bench-ray-"))
    cwd = os.getcwd()
    try:
        os.chdir(root)
        specs = build_world(root, args.steps, args.units, args.image_size)
        t_pool = None
        if not args.no_pool:
            # First, while torch is not imported yet: the pool then forks after importing the stack
            # once, as the study stage does (with torch already imported it would have to spawn).
            t0 = time.perf_counter()
            run_units(specs("runs_pool"), workers=2)
            t_pool = time.perf_counter() - t0
        import torch

        torch.set_num_threads(1)  # the in-process executor gets one thread, as each Ray worker does
        info.update(machine())
        info["two_process_efficiency_before"] = round(machine_ceiling(0.5 if args.smoke else 2.0), 3)
        t0 = time.perf_counter()
        local = run_units(specs("runs_local"), workers=1)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_ray = run_units_ray(specs("runs_ray"), num_cpus_per_unit=1,
                               init_kwargs={"num_cpus": 2, "object_store_memory": 80 << 20})
        t_ray = time.perf_counter() - t0
        for spec, r in zip(specs("runs_local"), local):
            r["train_wall_s"] = json.loads((root / spec.run_dir / "train_metrics.json").read_text())["wall_s"]
        same = all((root / a.run_dir / "predictions.jsonl").read_bytes() == (root / b.run_dir / "predictions.jsonl").read_bytes()
                   for a, b in zip(specs("runs_local"), specs("runs_ray")))
        nodes = sorted({r["ray_node_id"][:8] for r in on_ray})
        pids = sorted({r["ray_worker_pid"] for r in on_ray})
    finally:
        os.chdir(cwd)
        if args.keep:
            print(f"world kept at {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    info["loadavg_1m_after"] = round(os.getloadavg()[0], 2)
    info["two_process_efficiency_after"] = round(machine_ceiling(0.5 if args.smoke else 2.0), 3)
    efficiency = t_local / (2 * t_ray)
    ceiling = (info["two_process_efficiency_before"] + info["two_process_efficiency_after"]) / 2
    # Training time per unit, from each run folder's train_metrics.json (metrics.json carries no timing).
    unit_s = [r["train_wall_s"] for r in local]
    report = {
        "benchmark": "bench_ray", "units": args.units, "steps": args.steps, "machine": info,
        "local_1_worker_s": round(t_local, 2), "ray_2_workers_s": round(t_ray, 2),
        "speedup": round(t_local / t_ray, 3), "parallel_efficiency": round(efficiency, 3),
        "parallel_efficiency_over_machine_ceiling": round(efficiency / ceiling, 3),
        "local_pool_2_workers_s": round(t_pool, 2) if t_pool else None,
        "pool_parallel_efficiency": round(t_local / (2 * t_pool), 3) if t_pool else None,
        "mean_unit_train_s_local": round(sum(unit_s) / len(unit_s), 2), "ray_worker_processes": len(pids),
        "ray_nodes": nodes, "same_predictions": same,
        "accuracy": [round(r["accuracy"], 4) for r in local],
    }
    print(json.dumps(report, indent=1))
    print(f"\n{args.units} units x {args.steps} steps on {info['cpu_count']} CPUs "
          f"(load {info['loadavg_1m_before']} -> {info['loadavg_1m_after']}; a pure-Python loop in 2 "
          f"processes ran at efficiency {info['two_process_efficiency_before']:.2f} before, "
          f"{info['two_process_efficiency_after']:.2f} after: the machine's ceiling at that time)")
    print(f"  local, 1 worker : {t_local:7.1f} s")
    print(f"  ray,  2 workers : {t_ray:7.1f} s   speedup x{t_local / t_ray:.2f}, parallel efficiency {efficiency:.2f} "
          f"({efficiency / ceiling:.2f} of the machine's ceiling {ceiling:.2f})")
    if t_pool:
        print(f"  pool, 2 workers : {t_pool:7.1f} s   speedup x{t_local / t_pool:.2f}, parallel efficiency "
              f"{t_local / (2 * t_pool):.2f}  (the local process pool: what 2 processes get here now)")
    print(f"  same predictions: {same}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        os.replace(tmp, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

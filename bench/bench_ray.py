"""Scaling of the study's units: the in-process executor with 1 worker vs Ray with 2 workers, side by side.

    python bench/bench_ray.py                  # 8 trained units (4 seeds x 2 mixtures), ~3-4 min on 2 cores
    python bench/bench_ray.py --units 12 --steps 200 --json bench-ray.json
    python bench/bench_ray.py --smoke          # 2 short units: checks the script only

The same units (a tiny Med-MAT-mini world built in a temporary folder, the tiny CPU model, one torch
thread per unit) run twice, each into its own run folders:
  1. `local`: medmat.unit.run_units(specs, workers=1), one after another in this process;
  2. `ray`:   medmat.ray_executor.run_units_ray on a local Ray with 2 CPUs, one CPU per unit.
Ray's wall time is the whole call: starting Ray, its worker processes importing torch and medmat,
the units, and shutting Ray down. Parallel efficiency = T_local / (2 x T_ray); 1.0 is perfect.
Predictions are compared unit by unit: the two executors must give the same answers.

The machine matters: on a shared 2-core box other processes take CPU time from both runs; the
load average before and after is printed with the figures.
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
    from medmat.data.synth import SynthParams, generate
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=8, help="trained units (seeds x 2 mixtures)")
    ap.add_argument("--steps", type=int, default=150, help="training steps per unit")
    ap.add_argument("--image-size", type=int, default=32)
    ap.add_argument("--smoke", action="store_true", help="2 units of 5 steps: checks the script runs")
    ap.add_argument("--json", default=None, help="also write the results here")
    ap.add_argument("--keep", action="store_true", help="keep the temporary world (printed)")
    args = ap.parse_args(argv)
    if args.smoke:
        args.units, args.steps, args.image_size = 2, 5, 16

    import torch

    torch.set_num_threads(1)  # the in-process executor gets one thread, as each Ray worker does
    from medmat.ray_executor import run_units_ray
    from medmat.unit import run_units

    info = machine()
    root = Path(tempfile.mkdtemp(prefix="medmat-bench-ray-"))
    cwd = os.getcwd()
    try:
        os.chdir(root)
        specs = build_world(root, args.steps, args.units, args.image_size)
        t0 = time.perf_counter()
        local = run_units(specs("runs_local"), workers=1)
        t_local = time.perf_counter() - t0
        t0 = time.perf_counter()
        on_ray = run_units_ray(specs("runs_ray"), num_cpus_per_unit=1,
                               init_kwargs={"num_cpus": 2, "object_store_memory": 80 << 20})
        t_ray = time.perf_counter() - t0
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
    efficiency = t_local / (2 * t_ray)
    unit_s = [r["wall_s"] for r in local]
    report = {
        "benchmark": "bench_ray", "units": args.units, "steps": args.steps, "machine": info,
        "local_1_worker_s": round(t_local, 2), "ray_2_workers_s": round(t_ray, 2),
        "speedup": round(t_local / t_ray, 3), "parallel_efficiency": round(efficiency, 3),
        "mean_unit_s_local": round(sum(unit_s) / len(unit_s), 2), "ray_worker_processes": len(pids),
        "ray_nodes": nodes, "same_predictions": same,
        "accuracy": [round(r["accuracy"], 4) for r in local],
    }
    print(json.dumps(report, indent=1))
    print(f"\n{args.units} units x {args.steps} steps on {info['cpu_count']} CPUs "
          f"(load {info['loadavg_1m_before']} -> {info['loadavg_1m_after']})")
    print(f"  local, 1 worker : {t_local:7.1f} s")
    print(f"  ray,  2 workers : {t_ray:7.1f} s   speedup x{t_local / t_ray:.2f}, parallel efficiency {efficiency:.2f}")
    print(f"  same predictions: {same}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        os.replace(tmp, args.json)
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())

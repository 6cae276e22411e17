"""Benchmark: tiny-VLM training samples/s through the platform's `train_model` (MLflow tracking,
checkpoints, records -> batches plumbing, all on) beside the same model in a bare PyTorch loop over the
same data; the platform's overhead in percent (target < 15%) and each mode's peak memory.

    python bench/bench_train.py [--records work/records.parquet] [--steps 400] [--repeats 2]

Without --records it generates a small Med-MAT-mini in a temp folder. Each measurement runs in its
own subprocess (peak RSS per mode, no shared caches), modes alternate so that load from other work on
the machine hits both alike, and the median of the repeats is reported. The bare loop gets its images
decoded and its words encoded before the clock starts; the platform decodes lazily inside its loop, so
that cost counts as platform overhead.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SUBSETS = {"03": 300, "28": 300, "22": 300, "04": 300}


def machine() -> dict:
    import torch

    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "load_avg_1m": round(os.getloadavg()[0], 2),
    }


def _data(records: str):
    import pandas as pd

    from medmat.mixture import resolve_mixture

    from medmat.data.records import read_records

    df = read_records(records)
    train, _ = resolve_mixture(df, SUBSETS, seed=0)
    return train


def _tracking(store: str):
    from medmat.tracking import TrackingConfig

    return TrackingConfig(tracking_uri=f"sqlite:///{store}/mlflow.db", artifact_root=f"{store}/art", experiment="bench")


def run_platform(records: str, steps: int, workdir: str, store: str) -> dict:
    from medmat.models import ModelConfig
    from medmat.train import TrainConfig, train_model

    train = _data(records)
    cfg = TrainConfig(max_steps=steps, batch_size=64, eval_every=0, checkpoint_every=100, keep_checkpoints=1,
                      log_every=20, progress=False, num_threads=1)
    tracking = _tracking(store)
    import mlflow  # noqa: F401  (imported before the clock, like torch: a one-off per process)

    import medmat.tracking  # noqa: F401

    t0 = time.perf_counter()
    res = train_model(cfg, ModelConfig(), train, out_dir=Path(workdir) / "run", tracking=tracking)
    total = time.perf_counter() - t0
    return {"loop_samples_per_s": res.samples_per_s, "loop_s": res.wall_s, "end_to_end_s": total,
            "final_loss": res.final_train_loss, "n_train": len(train)}


def run_bare(records: str, steps: int, workdir: str, store: str) -> dict:
    """The same TinyVLM, optimiser and schedule, fed from pre-built tensors: nothing but the maths."""
    import math

    import torch
    from torch.nn import functional as F

    from medmat.models.tiny import TinyBackend, TinyConfig

    torch.set_num_threads(1)
    torch.manual_seed(0)
    train = _data(records)
    t0 = time.perf_counter()
    backend = TinyBackend(TinyConfig())
    backend.prepare_training(train)
    full = backend.collate(train.to_dict("records"))  # every image decoded and every word encoded, once
    n, bs = len(train), 64
    # Fixed-width id matrices padded with PAD (EmbeddingBag leaves padding_idx out of the mean), so a
    # batch is pure tensor indexing: no Python per row, the least a loop over this data can do.
    encs = [backend._encode(r) for r in train.to_dict("records")]
    k = full["o_mask"].shape[1]
    lq = max(len(q) for q, _, _ in encs)
    lo = max(len(o) for _, opts, _ in encs for o in opts)
    Q = torch.zeros(n, lq, dtype=torch.long)
    O = torch.zeros(n, k, lo, dtype=torch.long)
    for i, (q, opts, _) in enumerate(encs):
        Q[i, : len(q)] = q
        for c, o in enumerate(opts):
            O[i, c, : len(o)] = o
    model = backend.model
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": rest, "weight_decay": 0.0}], lr=3e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: (s + 1) / 20 if s < 20 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * (s - 20) / (steps - 20))))
    model.train()
    t1 = time.perf_counter()
    g = torch.Generator().manual_seed(0)
    perm, j, loss = torch.randperm(n, generator=g), 0, None
    for _ in range(steps):
        if (j + 1) * bs > n:
            perm, j = torch.randperm(n, generator=g), 0
        idx = perm[j * bs:(j + 1) * bs]
        j += 1
        scores = model(full["images"][idx], Q[idx], None, O[idx].view(-1, lo), None, full["o_mask"][idx])
        loss = F.cross_entropy(scores, full["labels"][idx])
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
    loop = time.perf_counter() - t1
    return {"loop_samples_per_s": steps * bs / loop, "loop_s": loop, "end_to_end_s": time.perf_counter() - t0,
            "final_loss": float(loss), "n_train": n}


def child(mode: str, records: str, steps: int, store: str) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{mode}-") as work:
        out = (run_platform if mode == "platform" else run_bare)(records, steps, work, store)
    out["peak_rss_mb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    print("RESULT " + json.dumps(out))


def _make_world(root: Path) -> str:
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.synth_world import SynthParams, generate

    generate(root / "data", SynthParams(train_per_subset=300, test_per_subset=40), progress=False)
    ingest_to_parquet(root / "data", root / "records.parquet")
    return str(root / "records.parquet")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", help="records.parquet (default: generate a small Med-MAT-mini)")
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--child", choices=["platform", "bare"], help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    args = ap.parse_args()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true"}
    env.pop("MLFLOW_TRACKING_URI", None)
    if args.child:
        child(args.child, args.records, args.steps, args.store)
        return 0
    with tempfile.TemporaryDirectory(prefix="bench-train-") as tmp:
        records = args.records or _make_world(Path(tmp))
        # One MLflow store for all runs, created up front, as in a pipeline (creating a fresh sqlite
        # store runs its schema migrations: seconds, once, not per run).
        from medmat.tracking import setup

        store = str(Path(tmp) / "mlruns")
        setup(_tracking(store))
        results: dict[str, list[dict]] = {"bare": [], "platform": []}
        for _ in range(args.repeats):
            for mode in ("bare", "platform"):
                out = subprocess.run([sys.executable, __file__, "--child", mode, "--records", records,
                                      "--steps", str(args.steps), "--store", store], env=env, capture_output=True, text=True)
                line = next((ln for ln in out.stdout.splitlines() if ln.startswith("RESULT ")), None)
                if out.returncode != 0 or line is None:
                    print(out.stderr[-3000:], file=sys.stderr)
                    return 1
                results[mode].append(json.loads(line[7:]))
    med = {m: {k: statistics.median(r[k] for r in rs) for k in rs[0]} for m, rs in results.items()}
    info = machine()
    print(f"machine: {info}")
    print(f"tiny VLM, {med['bare']['n_train']:.0f} training records, {args.steps} steps x batch 64, "
          f"1 torch thread, median of {args.repeats}")
    print(f"{'mode':<10}{'loop samples/s':>16}{'loop s':>9}{'end-to-end s':>14}{'peak RSS MB':>13}")
    for m in ("bare", "platform"):
        r = med[m]
        print(f"{m:<10}{r['loop_samples_per_s']:>16.0f}{r['loop_s']:>9.2f}{r['end_to_end_s']:>14.2f}{r['peak_rss_mb']:>13.0f}")
    overhead = 100 * (1 - med["platform"]["loop_samples_per_s"] / med["bare"]["loop_samples_per_s"])
    e2e = 100 * (med["platform"]["end_to_end_s"] / med["bare"]["end_to_end_s"] - 1)
    print(f"platform overhead in the training loop: {overhead:.1f}% (target < 15%)")
    print(f"end to end (MLflow run + model logging, image decode, final save; imports excluded): +{e2e:.1f}%")
    print("per-run detail: " + json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Benchmark: evaluation throughput of the tiny CPU VLM (both scorers), peak memory, and MLflow's
per-run logging overhead (many short runs are the normal case: arms x seeds x search trials).

    .venv/bin/python bench/bench_evaluate.py [--records 1200] [--runs 8] [--threads 1] [--json out.json]

Prints the figures and the machine they were measured on. Everything is written to a temporary
directory (a fresh sqlite store); nothing touches the repository's mlruns/.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402
from PIL import Image  # noqa: E402

LABELS = {4: ["Cyst", "Stone", "Normal", "Tumor"], 28: ["COVID-19", "Normal"]}


def machine() -> dict:
    import mlflow

    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "load_avg_1m": round(os.getloadavg()[0], 2),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "mlflow": mlflow.__version__,
    }


def make_records(root: Path, n: int, seed: int = 0) -> pd.DataFrame:
    """n Med-MAT-shaped records over 64x64 PNGs (a shape per label on noise; options shuffled)."""
    rng = np.random.default_rng(seed)
    (root / "img").mkdir(parents=True, exist_ok=True)
    yy, xx = np.mgrid[:64, :64]
    rows = []
    for i in range(n):
        sub = 4 if i % 3 else 28
        labels = LABELS[sub]
        label = labels[i % len(labels)]
        k = labels.index(label)
        img = rng.integers(0, 60, (64, 64)) + 120 * (((yy - 32) ** 2 + (xx - 32) ** 2) < (6 + 5 * k) ** 2)
        path = root / "img" / f"{i}.png"
        Image.fromarray(np.clip(img, 0, 255).astype(np.uint8)).convert("RGB").save(path)
        opts = list(labels)
        rng.shuffle(opts)
        q = "Which condition does this image show?"
        rows.append({
            "record_id": f"b{i}", "subset_no": sub, "split": "test", "image": f"img/{i}.png",
            "image_path": str(path), "question": q,
            "question_choice": "\n".join([q] + [f"{'ABCD'[j]}: {o}" for j, o in enumerate(opts)]
                                         + ["Answer with the option's letter from the given choices directly."]),
            "options": opts, "answer_letter": "ABCD"[opts.index(label)], "answer_text": label,
        })
    return pd.DataFrame(rows)


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def bench_eval(df: pd.DataFrame, root: Path, batch_size: int) -> dict:
    from medmat import models
    from medmat.scoring import evaluate_backend

    torch.manual_seed(0)
    backend = models.build({"backend": "tiny"}, root)
    backend.prepare_training(df)
    out = {"records": len(df), "batch_size": batch_size}
    # Cold: decodes and resizes every PNG (the backend caches decoded images for the run).
    t = time.perf_counter()
    evaluate_backend(backend, df, scorer="likelihood", batch_size=batch_size, progress=False)
    out["likelihood_cold_samples_per_s"] = round(len(df) / (time.perf_counter() - t), 1)
    for scorer in ("likelihood", "generate"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            evaluate_backend(backend, df, scorer=scorer, batch_size=batch_size, progress=False)
            times.append(time.perf_counter() - t)
        out[f"{scorer}_warm_samples_per_s"] = round(len(df) / statistics.median(times), 1)
    return out, backend


def bench_tracking(tmp: Path, backend, runs: int, n_metrics: int) -> dict:
    import mlflow

    from medmat import served_model, tracking

    cfg = tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp}/mlruns/mlflow.db",
                                  artifact_root=str(tmp / "mlruns" / "artifacts"), experiment="bench")
    t = time.perf_counter()
    tracking.setup(cfg)
    out = {"store_create_s": round(time.perf_counter() - t, 2), "metrics_per_run": n_metrics}
    backend.save(tmp / "model")
    manifest = {"components": {"04": {"requested": 100, "selected": 100, "sha256": "a" * 64}}, "seed": 0,
                "total": 100, "sha256": "b" * 64, "record_ids": [f"r{i}" for i in range(100)]}
    params = {"train": {"lr": 1e-3, "batch_size": 32, "epochs": 2}, "model": {"backend": "tiny"}}
    tags = tracking.run_tags(target="CT-Lung-COVID", arm="related", backend="tiny", seed=0)

    def one(model: str) -> float:
        t0 = time.perf_counter()
        with tracking.tracked_run(cfg, run_name="bench", tags=tags, params=params):
            for step in range(10):  # a training curve: loss + dev accuracy every eval
                tracking.log_metrics({"train_loss": 1.0 / (step + 1), "dev_accuracy": step / 10}, step=step)
            tracking.log_metrics({f"test_s{i:02d}_accuracy": 0.5 for i in range(n_metrics)})
            tracking.log_mixture(manifest, "untracked")
            if model == "example":
                served_model.log_model(tmp / "model", input_example=True)
            elif model == "plain":
                served_model.log_model(tmp / "model")
        return time.perf_counter() - t0

    one("example")  # first pyfunc log pays one-off imports and torch warm-up
    for variant in ("none", "plain", "example"):
        times = [one(variant) for _ in range(runs)]
        out[f"per_run_s_model_{variant}"] = round(statistics.median(times), 3)
    out["runs_per_variant"] = runs
    out["note"] = ("model_none: params+tags+10-step curve+metrics+mixture input; model_plain: + pyfunc log_model "
                   "without input example; model_example: + input example, which MLflow validates by loading "
                   "the model and predicting (default for tiny, off for hf)")
    n = len(mlflow.MlflowClient(cfg.tracking_uri).search_runs([tracking.setup(cfg)], max_results=1000))
    out["runs_logged"] = n
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=1200)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--runs", type=int, default=8, help="MLflow runs per variant")
    ap.add_argument("--metrics", type=int, default=20, help="extra metrics per run")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch intra-op threads (default: torch's own; 1 avoids oversubscription on a shared box)")
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    result = {"machine": machine()}
    with tempfile.TemporaryDirectory(prefix="medmat-bench-eval-") as tmp:
        tmp = Path(tmp)
        t = time.perf_counter()
        df = make_records(tmp / "data", args.records)
        result["world_build_s"] = round(time.perf_counter() - t, 2)
        result["evaluate"], backend = bench_eval(df, tmp / "data", args.batch_size)
        result["evaluate"]["peak_rss_mb_after_eval"] = round(peak_rss_mb(), 1)
        result["tracking"] = bench_tracking(tmp, backend, args.runs, args.metrics)
    result["peak_rss_mb"] = round(peak_rss_mb(), 1)
    result["machine"]["load_avg_1m_end"] = round(os.getloadavg()[0], 2)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

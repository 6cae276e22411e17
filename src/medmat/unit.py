"""Run one unit of the study from its RunSpec: train (unless Baseline), evaluate on the target's dev and
test splits, log to MLflow, and leave `metrics.json` + `predictions.jsonl` in the run folder.

Units are idempotent: `unit.json` in the run folder records the spec's fingerprint once the unit has
finished, and a unit whose folder holds the same fingerprint returns its metrics without running (a
killed `dvc repro` keeps every finished seed). A unit killed mid-training resumes from its last
checkpoint (medmat.train); checkpoints are removed once the unit has finished, since only an
unfinished unit can use them.

Several units run side by side in worker processes (`run_units`): the parent reads the records table
and imports torch/MLflow once, then forks, so a worker pays neither.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_json
from medmat.runspec import RunSpec

log = logging.getLogger("medmat.unit")

UNIT_FILE = "unit.json"

# records table path -> (DataFrame, data root); filled in the parent before forking.
_TABLES: dict[str, tuple[Any, str]] = {}


def records_table(path: str) -> tuple[Any, str]:
    """(records DataFrame with image_path, absolute data root), read once per process."""
    if path not in _TABLES:
        from medmat.data.records import data_root_of, read_records

        _TABLES[path] = (read_records(path), str(data_root_of(path)))
    return _TABLES[path]


def finished(spec: RunSpec) -> dict[str, Any] | None:
    """The unit's metrics if it already finished with this very fingerprint."""
    run_dir = Path(spec.run_dir)
    try:
        done = json.loads((run_dir / UNIT_FILE).read_text(encoding="utf-8"))
        if done.get("fingerprint") == spec.fingerprint():
            return json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    return None


def run_unit(spec: RunSpec) -> dict[str, Any]:
    """Train + evaluate one unit; returns metrics.json's content."""
    cached = finished(spec)
    if cached is not None:
        return cached
    from medmat import tracking
    from medmat.scoring import evaluate_backend, write_outputs
    from medmat.mixture import load_manifest, select_manifest
    from medmat.models import build_untrained
    from medmat.models import load as load_backend

    t0 = time.time()
    table, data_root = records_table(spec.records)
    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    target_rows = table["subset_no"].astype("Int64") == spec.subset_no
    test_df = table[target_rows & (table["split"] == "test")].reset_index(drop=True)
    dev_df = (select_manifest(table, load_manifest(spec.dev_manifest), where=spec.dev_manifest)
              if spec.dev_manifest else None)
    p = spec.params
    track = p.tracking
    run_id = tracking.read_run_id(run_dir)
    if spec.manifest is None:  # Baseline: the untrained model of the same architecture
        backend = build_untrained(p.model, table, seed=spec.seed, data_root=data_root)
        with tracking.tracked_run(track, run_name=spec.run_name(), tags=spec.tags(), run_id=run_id,
                                  parent_run_id=None if run_id else spec.parent_run_id) as run:
            run_id = run.info.run_id
        tracking.write_run_id(run_dir, run_id)
    elif (processes := training_processes(p.train)) > 1:  # accelerate launch: N train, this one evaluates
        launch_training(spec, processes)
        backend, run_id = load_backend(run_dir / "model", data_root=data_root), tracking.read_run_id(run_dir)
    else:
        result = train_unit(spec)
        backend, run_id = result.backend, result.run_id
    test = evaluate_backend(backend, test_df, scorer=p.evaluate.scorer, batch_size=p.evaluate.batch_size,
                            progress=False, seed=spec.seed)
    dev = (evaluate_backend(backend, dev_df, scorer=p.evaluate.scorer, batch_size=p.evaluate.batch_size,
                            progress=False, seed=spec.seed) if dev_df is not None and len(dev_df) else None)
    extra = {
        "seed": spec.seed, "target": spec.target, "triplet": spec.triplet, "arm": spec.arm,
        "combination": spec.combination, "world": spec.world, "backend": p.model.backend,
        "data_version": spec.data_version, "candidate": spec.candidate,
        "trained_on_target": spec.trained_on_target,
        "dev_accuracy": dev.accuracy if dev else None, "dev_n": dev.n if dev else 0,
        "manifest": spec.manifest,  # no timings here: this file is a DVC output (same data, same bytes)
    }
    write_outputs(test, run_dir, extra, plots=False)
    metrics = test.mlflow_metrics(p.evaluate.metric_prefix)
    if dev is not None:
        metrics["dev_accuracy_final"] = dev.accuracy
    tracking.log_metrics(metrics, run_id=run_id, cfg=track)
    shutil.rmtree(run_dir / "checkpoints", ignore_errors=True)
    atomic_write_json(run_dir / UNIT_FILE, {"fingerprint": spec.fingerprint(), "cell": spec.cell})
    out = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    log.info("%s seed %d: test %.3f dev %s (%.1f s)", spec.cell, spec.seed, out["accuracy"],
             "-" if dev is None else f"{dev.accuracy:.3f}", time.time() - t0)
    return out


def train_unit(spec: RunSpec):
    """Train the unit's model on its mixture into its run folder (every process of a launch runs this)."""
    from medmat.mixture import load_manifest, select_manifest
    from medmat.train import train_model

    table, data_root = records_table(spec.records)
    manifest = load_manifest(spec.manifest)
    train_df = select_manifest(table, manifest, where=spec.manifest)
    p = spec.params
    return train_model(dataclasses.replace(p.train, seed=spec.seed), p.model, train_df, out_dir=Path(spec.run_dir),
                       tracking=p.tracking, run_name=spec.run_name(), tags=spec.tags(),
                       parent_run_id=spec.parent_run_id, data_root=data_root, manifest=manifest,
                       log_model=spec.candidate)


def training_processes(train_cfg) -> int:
    """train.processes, with 0 = one per GPU this process may use (a Ray task sees only its own)."""
    if train_cfg.processes:
        return train_cfg.processes
    import torch

    return max(1, torch.cuda.device_count())


def launch_training(spec: RunSpec, processes: int) -> None:
    """Train the unit under `accelerate launch` with `processes` processes; they write model/,
    train_metrics.json and the MLflow run into the run folder, as an in-process run does (and resume
    from its checkpoints the same way). The spec travels as a pickle beside the checkpoints."""
    import pickle
    import socket
    import subprocess
    import tempfile

    run_dir = Path(spec.run_dir)
    with socket.socket() as sock:  # a free rendezvous port: two launched units may share a machine
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fd, spec_file = tempfile.mkstemp(prefix=".launch-", suffix=".pkl", dir=run_dir)
    try:
        with os.fdopen(fd, "wb") as fh:
            pickle.dump(spec, fh)
        # --multi_gpu: one GPU a process; on a machine without CUDA torchrun starts them over gloo.
        # Precision is the model's to decide (medmat.train), not the launcher's.
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
               "--num_machines", "1", "--main_process_port", str(port), "--mixed_precision", "no",
               "--dynamo_backend", "no", "-m", "medmat.unit", spec_file]
        log.info("%s seed %d: training with %d processes (accelerate launch)", spec.cell, spec.seed, processes)
        done = subprocess.run(cmd)
        if done.returncode != 0:
            raise RuntimeError(f"{spec.cell} seed {spec.seed}: `accelerate launch` of its training exited with "
                               f"{done.returncode} (its processes' output is above)")
    finally:
        os.unlink(spec_file)


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # one core per worker process (evaluation too, not only training)
    return run_unit(spec)


def run_units(specs: list[RunSpec], workers: int) -> list[dict[str, Any]]:
    """run_unit over `specs`, `workers` processes at a time; results in spec order.

    Finished units are answered from their folders without starting a worker. The rest are forked
    after the parent has read the records tables and imported the heavy stack (a fresh process costs
    3-5 s of imports on 2 cores, as much as a tiny training run)."""
    results: list[dict[str, Any] | None] = [finished(s) for s in specs]
    todo = [i for i, r in enumerate(results) if r is None]
    if todo:
        log.info("%d units to run (%d already finished)", len(todo), len(specs) - len(todo))
    if workers <= 1 or len(todo) <= 1:
        for i in todo:
            results[i] = run_unit(specs[i])
        return results  # type: ignore[return-value]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    for i in todo:
        records_table(specs[i].records)
    if "torch" in sys.modules:
        ctx = multiprocessing.get_context("spawn")  # torch's thread pools do not survive fork
    else:
        # Everything a unit imports, once, before forking: each of these costs seconds per process on
        # 2 cores (torch._dynamo is pulled in by the optimiser, MLflow's SQL store by the first client).
        import mlflow  # noqa: F401
        import torch  # noqa: F401
        import torch._dynamo  # noqa: F401
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore  # noqa: F401

        import medmat.scoring  # noqa: F401
        import medmat.served_model  # noqa: F401
        import medmat.train  # noqa: F401

        ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(todo)), mp_context=ctx) as pool:
        for i, out in zip(todo, pool.map(_run_in_worker, [specs[i] for i in todo])):
            results[i] = out
    return results  # type: ignore[return-value]


def main(argv: list[str] | None = None) -> int:
    """`python -m medmat.unit SPEC.pkl`: one process of a launched training (see launch_training)."""
    import pickle

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    (spec_file,) = sys.argv[1:] if argv is None else argv
    with open(spec_file, "rb") as fh:
        spec = pickle.load(fh)
    train_unit(spec)
    return 0


if __name__ == "__main__":
    sys.exit(main())

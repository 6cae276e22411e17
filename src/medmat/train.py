"""Training: one model on one mixture, tracked in MLflow, checkpointed, resumable, `accelerate`-ready.

    medmat train --records work/records.parquet --manifest RUN_DIR/manifest.json --out RUN_DIR \
        [--params params.yaml] [--dev-manifest FILE] [--target 03 --arm related-fixed_area --seed 0] \
        [--max-steps 400 --lr 3e-3 ...]
    accelerate launch --multi_gpu --num_processes 2 -m medmat.cli train ...   # several processes
    (a study's unit launches itself so with `train.processes: N`. Without CUDA, `--multi_gpu` still
    starts the processes through torchrun, over gloo; `--cpu` alone would start a single process.)

Determinism and resumption: the order of the training data is a pure function of (seed, epoch,
micro-batch), so a run restarted from a checkpoint (model, optimiser, scheduler and RNG states, saved
through `Accelerator.save_state` into a temp folder, fsynced, then renamed into place) replays exactly
the steps an uninterrupted run would have taken and ends with the same weights and metrics (CPU, fixed
seed, same thread count).

`batch_size` is the global micro-batch (shared out over the processes); an optimiser step takes
`grad_accum` micro-batches, so the effective batch is batch_size x grad_accum whatever the process count.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from medmat.config import ConfigError
from medmat.checkpoints import STATE_FILE, checkpoints, replace_dir
from medmat.io import atomic_write_json
from medmat.models import start_weights_sha256
from medmat.schedule import TrainOrder, lr_lambda

log = logging.getLogger(__name__)


@dataclasses.dataclass
class TrainConfig:
    """params.yaml `train:` section."""

    epochs: float = 1.0  # used when max_steps is 0
    max_steps: int = 0  # > 0: train exactly this many optimiser steps
    lr: float = 3e-3
    batch_size: int = 64  # global micro-batch, shared out over processes
    grad_accum: int = 1  # micro-batches per optimiser step
    warmup_steps: int = 20
    weight_decay: float = 0.01
    max_grad_norm: float = 1.0  # 0: no clipping
    min_lr_ratio: float = 0.1  # cosine decay ends at lr x this
    seed: int = 0
    eval_every: int = 100  # dev evaluation every N steps (and at the end); 0: only at the end
    eval_batch_size: int = 256
    checkpoint_every: int = 100  # 0: no checkpoints
    keep_checkpoints: int = 2
    log_every: int = 20  # train loss to MLflow every N steps
    # torch threads per process. 1 by default: many short runs share the machine (search workers, DVC
    # stages), and with 2 threads on a busy 2-core box OpenMP spinning made a step ~10x slower.
    # 0: the machine's cores / local processes.
    num_threads: int = 1
    # Processes a unit's training uses (medmat.unit.launch_training): 1 = the unit's own; N = `accelerate
    # launch` of N; 0 = one per GPU the unit was given (e.g. a Ray task's num_gpus), 1 without GPUs.
    processes: int = 1
    progress: bool = True  # tqdm bar (only on a terminal, only on the main process)

    def __post_init__(self):
        if self.processes < 0:
            raise ValueError(f"processes must be >= 0 (0 = one per visible GPU), got {self.processes}")
        for name in ("batch_size", "grad_accum", "eval_batch_size", "keep_checkpoints", "log_every"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"{name} must be >= 1")
        if self.max_steps < 0 or self.epochs < 0 or (self.max_steps == 0 and self.epochs <= 0):
            raise ValueError("need max_steps > 0 or epochs > 0")
        if self.lr <= 0:
            raise ValueError("lr must be > 0")


@dataclasses.dataclass
class TrainResult:
    backend: Any
    steps: int
    dev_history: list  # [(step, dev_accuracy), ...]
    final_dev_accuracy: float | None
    final_train_loss: float | None
    run_id: str | None = None
    resumed_from: int | None = None  # step of the checkpoint this invocation started from
    samples_per_s: float = 0.0
    wall_s: float = 0.0
    n_train: int = 0
    num_processes: int = 1

    def metrics(self) -> dict[str, Any]:
        """What train_metrics.json holds."""
        return {
            "steps": self.steps,
            "final_train_loss": self.final_train_loss,
            "final_dev_accuracy": self.final_dev_accuracy,
            "dev_history": [list(x) for x in self.dev_history],
            "n_train": self.n_train,
            "num_processes": self.num_processes,
            "run_id": self.run_id,
            "resumed_from": self.resumed_from,
            "samples_per_s": round(self.samples_per_s, 1),
            "wall_s": round(self.wall_s, 2),
        }


# ------------------------------------------------------------------------------------ small helpers


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    atomic_write_json(path, data, indent=1)


def _to_device(batch: Any, device) -> Any:
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    return batch.to(device) if hasattr(batch, "to") else batch  # tensors, HF BatchFeature


def _rows(df) -> list[dict]:
    return df.to_dict("records") if hasattr(df, "to_dict") else list(df)


def fingerprint(train_cfg: TrainConfig, model_cfg, record_ids: list[str]) -> str:
    """What a checkpoint must match to be resumed: the training maths, the model and the data."""
    keep = dataclasses.asdict(train_cfg)
    for k in ("eval_every", "eval_batch_size", "checkpoint_every", "keep_checkpoints", "log_every", "progress"):
        keep.pop(k)
    start = start_weights_sha256(model_cfg)
    blob = json.dumps([keep, dataclasses.asdict(model_cfg), start, sorted(map(str, record_ids))], sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def dev_accuracy(backend, dev_rows: list[dict], batch_size: int = 256, seed: int = 0) -> float:
    """Accuracy of the likelihood scorer on the dev rows (ties broken as in evaluation, by seed)."""
    import pandas as pd

    from medmat.scoring import evaluate_backend

    res = evaluate_backend(backend, pd.DataFrame(dev_rows), scorer="likelihood", batch_size=batch_size,
                           progress=False, seed=seed)
    return float(res.accuracy)


# ------------------------------------------------------------------------------------------- core


def train_model(
    train_cfg: TrainConfig,
    model_cfg,
    train_df,
    dev_df=None,
    out_dir: str | os.PathLike | None = None,
    on_eval: Callable[[int, float], None] | None = None,
    tracking=None,
    run_name: str | None = None,
    tags: dict | None = None,
    data_root: str | os.PathLike | None = None,
    manifest: dict | None = None,
    params: dict | None = None,
    parent_run_id: str | None = None,
    log_model: bool = True,
) -> TrainResult:
    """Train a backend on `train_df` (records-table rows).

    - `on_eval(step, dev_accuracy)` is called at every dev evaluation; an exception there (e.g.
      optuna.TrialPruned) stops training and propagates (the MLflow run records how it ended).
    - `out_dir`: checkpoints, the final model (`model/`), `train_metrics.json`, `mlflow_run_id`;
      a complete checkpoint there is resumed from. None: nothing is written (quick in-memory runs).
    - `tracking`: a medmat.tracking.TrackingConfig to log to MLflow, or None; `parent_run_id` nests
      the run under a cell's run; `log_model` logs the final model (only where the registry can use it).
    """
    import torch
    from accelerate import Accelerator

    from medmat.models import build, model_config

    model_cfg = model_config(model_cfg)
    # accelerate narrates every checkpoint file at INFO; one line per checkpoint is ours to write.
    for name in ("accelerate.accelerator", "accelerate.checkpointing"):
        logging.getLogger(name).setLevel(logging.WARNING)
    # The scheduler steps once per optimiser step whatever the process count (accelerate's default
    # steps it num_processes times), so one and two processes follow the same schedule.
    # Mixed precision is the model's to decide (fp32 master weights + bf16 autocast on a GPU, see
    # medmat.models.hf.resolve_mixed_precision); it overrides `accelerate launch --mixed_precision`.
    precision = "no"
    if model_cfg.backend == "hf":
        from medmat.models.hf import mixed_precision_of

        precision = mixed_precision_of(model_cfg.hf)
    from accelerate.state import AcceleratorState

    # accelerate keeps one precision per process and refuses another; a process that trains several
    # models (tests, units run in-process) starts a fresh state for a new one (the process group stays).
    if AcceleratorState._shared_state.get("_mixed_precision", precision) != precision:
        AcceleratorState._reset_state()
    accel = Accelerator(step_scheduler_with_optimizer=False, cpu=not torch.cuda.is_available(),
                        mixed_precision=precision)
    main = accel.is_main_process
    if accel.device.type == "cpu":
        threads = train_cfg.num_threads or max(1, (os.cpu_count() or 1) // max(1, accel.num_processes))
        torch.set_num_threads(threads)

    train_rows = _rows(train_df)
    dev_rows = _rows(dev_df) if dev_df is not None and len(dev_df) else []
    if not train_rows:
        raise ValueError("no training records (empty mixture?)")
    record_ids = [str(r.get("record_id", i)) for i, r in enumerate(train_rows)]
    fp = fingerprint(train_cfg, model_cfg, record_ids)

    order = TrainOrder(len(train_rows), train_cfg.batch_size, train_cfg.seed)
    if order.bs % accel.num_processes:
        raise ValueError(f"batch_size {order.bs} is not divisible by {accel.num_processes} processes")
    total = train_cfg.max_steps or max(1, math.ceil(train_cfg.epochs * order.per_epoch / train_cfg.grad_accum))

    # Seed everything before the model is built: its initial weights are part of the run.
    random.seed(train_cfg.seed)
    np.random.seed(train_cfg.seed)
    torch.manual_seed(train_cfg.seed)
    backend = build(model_cfg, data_root)
    if hasattr(backend, "prepare_training"):
        backend.prepare_training(train_df)
    model = backend.model
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    optimizer = torch.optim.AdamW(
        [{"params": decay, "weight_decay": train_cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
        lr=train_cfg.lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(train_cfg.warmup_steps, total, train_cfg.min_lr_ratio))
    model, optimizer, scheduler = accel.prepare(model, optimizer, scheduler)
    backend.model = model  # the backend's loss() now runs through the (possibly DDP-wrapped) module

    # ---- resume from the last complete checkpoint ---------------------------------------------------
    out = Path(out_dir) if out_dir is not None else None
    start, dev_history, last_loss, resumed_from, run_id = 0, [], None, None, None
    ckpts = checkpoints(out) if out is not None else []
    if ckpts:
        state = json.loads((ckpts[-1] / STATE_FILE).read_text(encoding="utf-8"))
        if state.get("fingerprint") != fp:
            raise ConfigError(
                f"{ckpts[-1]}: checkpoint was written by a different training setup (params or records "
                "changed); remove the run folder or restore the params to resume"
            )
        accel.load_state(str(ckpts[-1]))
        start = resumed_from = int(state["step"])
        dev_history = [tuple(x) for x in state["dev_history"]]
        last_loss = state.get("last_loss")
        log.info("resuming from %s (step %d of %d)", ckpts[-1], start, total)
    if out is not None and tracking is not None:
        from medmat.tracking import read_run_id

        run_id = read_run_id(out)

    # ---- tracking (main process only) ------------------------------------------------------------
    tracker = None
    if tracking is not None and main:
        from medmat import tracking as trk

        tracker = trk
        if tags is None:
            tags = trk.run_tags(backend=model_cfg.backend, seed=train_cfg.seed)
        all_params = {"train": train_cfg, "model": model_cfg, "n_train": len(train_rows),
                      "num_processes": accel.num_processes, **(params or {})}
        run_ctx = trk.tracked_run(tracking, run_name=run_name or (out.name if out else None), tags=tags,
                                  params=all_params, run_id=run_id, parent_run_id=None if run_id else parent_run_id)
    else:
        run_ctx = contextlib.nullcontext(None)

    with run_ctx as run:
        if run is not None:
            run_id = run.info.run_id
            if out is not None:
                tracker.write_run_id(out, run_id)
            if manifest is not None and resumed_from is None:
                tracker.log_mixture(manifest, tracker.data_version())

        def evaluate_now(step: int) -> None:
            if not dev_rows:
                return
            backend.model = accel.unwrap_model(model)  # score through the plain module (HF generate etc.)
            try:
                with torch.random.fork_rng(devices=[]):  # evaluation must not shift the training RNG
                    acc = dev_accuracy(backend, dev_rows, train_cfg.eval_batch_size, seed=train_cfg.seed)
            finally:
                backend.model = model
                model.train()
            dev_history.append((step, acc))
            if tracker is not None:
                tracker.log_metrics({"dev_accuracy": acc}, step=step)
            if on_eval is not None:
                on_eval(step, acc)

        def save_checkpoint(step: int) -> None:
            root = out / "checkpoints"
            tmp = root / f".tmp-step-{step}"
            if main:
                shutil.rmtree(tmp, ignore_errors=True)  # a leftover of a run killed mid-save
                root.mkdir(parents=True, exist_ok=True)
            accel.wait_for_everyone()
            accel.save_state(str(tmp))
            accel.wait_for_everyone()  # every process has written its RNG state
            if main:
                write_json_atomic(tmp / STATE_FILE, {"step": step, "dev_history": dev_history,
                                                     "last_loss": last_loss, "fingerprint": fp,
                                                     "run_id": run_id})
                replace_dir(tmp, root / f"step-{step}")
                log.debug("checkpoint %s", root / f"step-{step}")
                for old in checkpoints(out)[: -train_cfg.keep_checkpoints]:
                    shutil.rmtree(old, ignore_errors=True)
            accel.wait_for_everyone()

        # Train-loss points are sent to MLflow in batches (one sqlite write costs ~50 ms on a busy
        # 2-core box; one per point was a few % of a tiny run), flushed before every eval and checkpoint
        # so a resumed run never re-sends or loses points before its checkpoint.
        pending: list[tuple[int, dict]] = []

        def flush() -> None:
            from mlflow import MlflowClient
            from mlflow.entities import Metric

            now = int(time.time() * 1000)
            batch = [Metric(k, float(v), now, s) for s, vals in pending for k, v in vals.items() if math.isfinite(v)]
            MlflowClient().log_batch(run_id, metrics=batch)
            pending.clear()

        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=start, desc="train", unit="step", dynamic_ncols=True,
                   disable=not (train_cfg.progress and main and sys.stderr.isatty()))
        model.train()
        t0, samples = time.perf_counter(), 0
        world, rank, ga = accel.num_processes, accel.process_index, train_cfg.grad_accum
        for step in range(start, total):
            step_loss = 0.0
            for micro in range(ga):
                idx = order.batch(step * ga + micro)[rank::world]
                batch = _to_device(backend.collate([train_rows[i] for i in idx]), accel.device)
                sync = micro == ga - 1
                with contextlib.nullcontext() if sync else accel.no_sync(model):
                    loss = backend.loss(batch)
                    if not torch.isfinite(loss):
                        raise FloatingPointError(f"training loss is {loss.item()} at step {step + 1} (diverged; "
                                                 f"lower lr={train_cfg.lr}?)")
                    accel.backward(loss / ga)
                step_loss += loss.item() / ga
                samples += len(idx) * world
            if train_cfg.max_grad_norm > 0:
                accel.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            last_loss = step_loss
            done = step + 1
            bar.update(1)
            if tracker is not None and (done % train_cfg.log_every == 0 or done == total):
                pending.append((done, {"train_loss": step_loss, "lr": scheduler.get_last_lr()[0]}))
            is_eval = (train_cfg.eval_every and done % train_cfg.eval_every == 0) or done == total
            is_ckpt = out is not None and train_cfg.checkpoint_every and done % train_cfg.checkpoint_every == 0
            if pending and (is_eval or is_ckpt or len(pending) >= 10):
                flush()
            if is_eval:
                evaluate_now(done)
            if is_ckpt:
                save_checkpoint(done)
        bar.close()
        wall = time.perf_counter() - t0

        backend.model = accel.unwrap_model(model)
        backend.model.eval()
        result = TrainResult(
            backend=backend, steps=total, dev_history=dev_history,
            final_dev_accuracy=dev_history[-1][1] if dev_history else None, final_train_loss=last_loss,
            run_id=run_id, resumed_from=resumed_from, samples_per_s=samples / wall if wall > 0 else 0.0,
            wall_s=wall, n_train=len(train_rows), num_processes=accel.num_processes,
        )
        if out is not None and main:
            tmp = out / ".model.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            backend.save(tmp)
            replace_dir(tmp, out / "model")
            write_json_atomic(out / "train_metrics.json", result.metrics())
            if tracker is not None:
                tracker.log_metrics({"train_samples_per_s": result.samples_per_s, "train_wall_s": wall})
                if log_model:
                    from medmat.served_model import log_model as log_served_model

                    log_served_model(out / "model")
        accel.wait_for_everyone()
    return result

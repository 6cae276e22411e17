"""`medmat train`: train one model on one mixture from the command line (the core is medmat.train).

    medmat train --records work/records.parquet --manifest RUN_DIR/manifest.json --out RUN_DIR \
        [--params params.yaml] [--dev-manifest FILE] [--target 03 --arm related --seed 0] [--max-steps 400 ...]
    accelerate launch --multi_gpu --num_processes 2 -m medmat.cli train ...   # several processes
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from medmat.config import ConfigError, from_dict, load_params
from medmat.train import TrainConfig, train_model

log = logging.getLogger("medmat.train")


_OVERRIDES = {  # CLI flag -> TrainConfig field
    "max_steps": int, "epochs": float, "lr": float, "batch_size": int, "grad_accum": int,
    "warmup_steps": int, "eval_every": int, "checkpoint_every": int, "num_threads": int,
}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", required=True, help="records table (records.parquet from `medmat ingest`)")
    parser.add_argument("--manifest", required=True, help="mixture manifest (or bare spec) selecting the training records")
    parser.add_argument("--out", required=True, help="run folder: checkpoints/, model/, train_metrics.json, mlflow_run_id")
    parser.add_argument("--params", default="params.yaml", help="parameter file (sections model, train, tracking)")
    parser.add_argument("--dev-manifest", help="manifest selecting the dev records (evaluated every eval_every steps)")
    parser.add_argument("--target", help="target subset/triplet (MLflow tag)")
    parser.add_argument("--arm", help="experiment arm (MLflow tag)")
    parser.add_argument("--seed", type=int, help="override train.seed")
    parser.add_argument("--no-tracking", action="store_true", help="do not log to MLflow")
    for name, typ in _OVERRIDES.items():
        parser.add_argument("--" + name.replace("_", "-"), type=typ, help=f"override train.{name}")


def _read_records(path: Path):
    """(records table with image paths, its data root)."""
    from medmat.data.records import data_root_of, read_records

    if not path.is_file():
        raise FileNotFoundError(f"{path}: records table not found (run `medmat ingest` first)")
    return read_records(path), str(data_root_of(path))


def run(args: argparse.Namespace) -> int:
    from medmat.mixture import MixtureError, load_manifest, select_manifest
    from medmat.models import ModelConfig

    try:
        params = load_params(args.params)
        train_values = dict(params.get("train") or {})
        for name in _OVERRIDES:
            if getattr(args, name, None) is not None:
                train_values[name] = getattr(args, name)
        if args.seed is not None:
            train_values["seed"] = args.seed
        train_cfg = from_dict(TrainConfig, train_values, where=f"{args.params}: section 'train'")
        model_cfg = from_dict(ModelConfig, params.get("model"), where=f"{args.params}: section 'model'")
        tracking = None
        if not args.no_tracking:
            from medmat.tracking import TrackingConfig, run_tags

            tracking = from_dict(TrackingConfig, params.get("tracking"), where=f"{args.params}: section 'tracking'")
        records, data_root = _read_records(Path(args.records))
        manifest = load_manifest(args.manifest)
        train_df = select_manifest(records, manifest, where=args.manifest)
        dev_df = None
        if args.dev_manifest:
            dev_df = select_manifest(records, load_manifest(args.dev_manifest), where=args.dev_manifest)
    except (ConfigError, MixtureError, FileNotFoundError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    tags = None
    if tracking is not None:
        tags = run_tags(target=args.target, arm=args.arm, backend=model_cfg.backend, seed=train_cfg.seed)
    name = "/".join(str(x) for x in (args.target, args.arm, f"seed{train_cfg.seed}") if x is not None)
    result = train_model(
        train_cfg, model_cfg, train_df, dev_df=dev_df, out_dir=args.out, tracking=tracking,
        run_name=name, tags=tags, data_root=data_root, manifest=manifest,
        params={"manifest_sha256": manifest.get("sha256", "")},
    )
    if int(os.environ.get("RANK", "0")) == 0:  # one line, not one per process
        log.info("trained %d steps on %d records: dev accuracy %s, %.0f samples/s -> %s",
                 result.steps, result.n_train, result.final_dev_accuracy, result.samples_per_s, args.out)
    return 0

"""`medmat evaluate`: score a saved (or the untrained) model on a target's test records.

The scoring itself is medmat.scoring (accuracy, intervals, confusion, predictions; pictures in
medmat.eval_plots); this module is the command line around it. The untrained model scored the same way
is the paper's Baseline (`medmat evaluate --model untrained`). Results go to RUN_DIR (metrics.json,
predictions.jsonl, confusion_<subset>.png) and into the training's MLflow run (metrics per subset and
these files as artifacts).
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

from medmat.scoring import SCORERS, EvalConfig, evaluate_backend, write_outputs

log = logging.getLogger(__name__)


def _target_label(subset_no: int) -> str:
    """The subset's triplet for the run's tags ("subset04" for a number the catalogue lacks)."""
    from medmat.catalog import load_catalog
    from medmat.names import subset_key

    try:
        return str(load_catalog().triplet_of_subset(int(subset_no)))
    except (KeyError, LookupError, ValueError):
        return f"subset{subset_key(subset_no)}"


# ------------------------------------------------------------------------------------------ CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True,
                        help="a saved model dir (RUN_DIR/model), or 'untrained' for the paper's Baseline")
    parser.add_argument("--records", required=True, help="records table (records.parquet from `medmat ingest`)")
    sel = parser.add_mutually_exclusive_group(required=True)
    sel.add_argument("--target", type=int, help="evaluate on this subset number's records")
    sel.add_argument("--manifest", help="evaluate on the records listed in this mixture manifest")
    parser.add_argument("--split", default="test", help="split of the target's records (default: test)")
    parser.add_argument("--out", required=True, help="output dir (metrics.json, predictions.jsonl, PNGs)")
    parser.add_argument("--scorer", choices=SCORERS, help="override evaluate.scorer")
    parser.add_argument("--batch-size", type=int, help="override evaluate.batch_size")
    parser.add_argument("--metric-prefix", help="override evaluate.metric_prefix (e.g. dev)")
    parser.add_argument("--params", default="params.yaml", help="params file (evaluate, tracking sections)")
    parser.add_argument("--backend-params", help="params file with the model: section for --model untrained "
                        "(default: --params)")
    parser.add_argument("--seed", type=int, help="seed of the untrained model (default: base.seed)")
    parser.add_argument("--run-id", help="MLflow run to log into (default: RUN_DIR/mlflow_run_id)")
    parser.add_argument("--arm", help="arm tag for a new run (default: baseline for --model untrained)")
    parser.add_argument("--target-tag", help="target tag for a new run (default: from --target)")
    parser.add_argument("--no-track", action="store_true", help="do not log to MLflow")
    parser.add_argument("--no-log-model", action="store_true",
                        help="with --model untrained: do not save OUT/model and log it to the run (by default the "
                             "untrained model is logged like a trained one, so the registry can treat every arm alike)")


def select_records(records_path: str, target: int | None, split: str, manifest: str | None):
    """(records selected for evaluation, data root of the table, the whole table)."""
    import pandas as pd

    from medmat.data.records import data_root_of, read_records

    path = Path(records_path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: records table not found (run `medmat ingest` first)")
    df = read_records(path)
    for col in ("record_id", "subset_no", "split", "options", "answer_letter"):
        if col not in df.columns:
            raise ValueError(f"{path}: records table lacks column {col!r}")
    if manifest:
        from medmat.mixture import load_manifest, select_manifest

        # A resolved manifest (record_ids, checked against its hash) or a bare spec resolved afresh.
        sel = select_manifest(df, load_manifest(manifest), where=str(manifest))
    else:
        sub = pd.to_numeric(df["subset_no"], errors="coerce")
        sel = df[(sub == int(target)) & (df["split"] == split)].reset_index(drop=True)
        if sel.empty:
            splits = sorted(df.loc[sub == int(target), "split"].unique().tolist())
            raise ValueError(
                f"{path}: no records of subset {int(target):02d} in split {split!r} (splits present: {splits})"
            )
    return sel, str(data_root_of(path)), df


def run(args: argparse.Namespace) -> int:
    from medmat import config
    from medmat import tracking

    # torch logs FakeTensor cache statistics at INFO on exit; the CLI's INFO root logger would print them.
    logging.getLogger("torch").setLevel(logging.WARNING)

    try:
        cfg = config.load_section(EvalConfig, "evaluate", args.params) if Path(args.params).exists() else EvalConfig()
        tcfg = (config.load_section(tracking.TrackingConfig, "tracking", args.params)
                if Path(args.params).exists() else tracking.TrackingConfig())
        scorer = args.scorer or cfg.scorer
        batch_size = args.batch_size or cfg.batch_size
        prefix = args.metric_prefix or cfg.metric_prefix
        df, data_root, table = select_records(args.records, args.target, args.split, args.manifest)
        backend, backend_name, seed = _backend_for(args, data_root, table)
    except (ValueError, FileNotFoundError, config.ConfigError) as exc:
        log.error("%s", exc)
        return 2

    untrained = args.model == "untrained"
    try:
        result = evaluate_backend(backend, df, scorer=scorer, batch_size=batch_size)
    except ValueError as exc:  # a bad record or unreadable image: the message names the record
        log.error("%s: %s", args.records, exc)
        return 2
    out = Path(args.out)
    extra = {
        "model": args.model,
        "records": str(args.records),
        "selection": {"target": args.target, "split": args.split} if args.manifest is None
        else {"manifest": str(args.manifest)},
        "metric_prefix": prefix,
    }
    if untrained:
        extra["seed"] = seed
    files = write_outputs(result, out, extra)
    log.info("accuracy %.4f [%.4f, %.4f] on %d records (%d unparseable) -> %s",
             result.accuracy, *result.ci95, result.n, result.unparseable, out)

    if args.no_track:
        return 0
    run_id = args.run_id or (None if untrained else tracking.read_run_id(Path(args.model).parent))
    try:
        if run_id:
            ctx = tracking.tracked_run(tcfg, run_id=run_id)
        else:
            target = args.target_tag or (_target_label(args.target) if args.target is not None else None)
            arm = args.arm or ("baseline" if untrained else None)
            tags = tracking.run_tags(target=target, arm=arm, backend=backend_name, seed=seed,
                                     extra={"stage": "evaluate"})
            name = f"{arm or 'eval'}-{target or 'manifest'}" + (f"-seed{seed}" if seed is not None else "")
            ctx = tracking.tracked_run(tcfg, run_name=name, tags=tags,
                                       params={"evaluate": {"scorer": scorer, "model": args.model}})
        with ctx as mlrun:
            import mlflow

            tracking.log_metrics(result.mlflow_metrics(prefix))
            for f in files:
                mlflow.log_artifact(str(f), artifact_path=f"evaluation/{prefix}")
            if not run_id:
                tracking.write_run_id(out, mlrun.info.run_id)
            if untrained and not args.no_log_model:
                # The untrained model exists only in memory: save it so the run holds a loadable model.
                backend.save(out / "model")
                from medmat.served_model import log_model

                log_model(out / "model")
    except Exception as exc:  # the metrics are on disk; say clearly that only tracking failed
        log.error("evaluation written to %s, but logging to MLflow run %s failed: %s", out, run_id or "(new)", exc)
        return 3
    return 0


def _backend_for(args: argparse.Namespace, data_root: str | None, table):
    """(backend, backend name, seed or None) for --model DIR or --model untrained."""
    from medmat import config, models

    if args.model != "untrained":
        path = Path(args.model)
        if not path.is_dir():
            raise FileNotFoundError(f"{path}: model directory not found (expected RUN_DIR/model from `medmat train`)")
        backend = models.load(path)
        return backend, _backend_name(backend, path), None
    params_file = args.backend_params or args.params
    params = config.load_params(params_file)
    seed = args.seed if args.seed is not None else int((params.get("base") or {}).get("seed", 0))
    model_cfg = config.from_dict(models.ModelConfig, params.get("model"), where=f"{params_file}: section 'model'")
    backend = models.build_untrained(model_cfg, table, seed=seed, data_root=data_root)
    return backend, str(getattr(model_cfg, "backend", "unknown")), seed


def _backend_name(backend, path: Path) -> str:
    name = getattr(backend, "name", None) or getattr(backend, "backend", None)
    if isinstance(name, str):
        return name
    return type(backend).__name__

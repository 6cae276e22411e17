"""`medmat search`: one Optuna study per (world, target), resumed by name, with an MLflow parent run.

    medmat search --target 3 --records work/records.parquet --designs work/designs --out work/search/03

Study names are readable: `medmat-mini-03-CT-Lung-COVID` (prefix, world, target, triplet). The study
remembers the fingerprint of its objective (training/model/scorer settings, budget, dev split,
candidate records); when the default name is taken by a study with another fingerprint, the search
uses `<name>-<6 hex of the fingerprint>` instead of mixing incomparable values. An explicit
`--study-name` whose study has another fingerprint is refused.

Worker 0 (this process) recovers killed trials, enqueues the warm start, starts `workers - 1` more
processes on the same study, runs trials itself, and writes `best_mixture.json` and `history.csv`.
Every trial is an MLflow run nested under the study's parent run.
"""

from __future__ import annotations

import argparse
import logging
import re
import subprocess
import sys
from pathlib import Path

from medmat.search.objective import (SearchConfig, TargetProblem, build_problem, objective_fingerprint, resolve,
                                     train_objective)
from medmat.search.results import write_outputs
from medmat.search.space import SearchError
from medmat.search.storage import counts, enqueue_warm_start, lock_path, open_storage, open_study, recover_stale, \
    run_worker, study_lock

log = logging.getLogger("medmat.search")

FINGERPRINT = "objective_fingerprint"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--target", required=True, help="subset number (e.g. 3) or triplet (CT-Lung-COVID)")
    parser.add_argument("--records", type=Path, required=True, help="records table (records.parquet)")
    parser.add_argument("--designs", type=Path, required=True, help="designs folder (medmat designs output)")
    parser.add_argument("--dev", type=Path, default=None, help="dev split JSON (default: from --designs)")
    parser.add_argument("--out", type=Path, required=True, help="output folder: best_mixture.json, history.csv")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--trials", type=int, default=None, help="finished trials wanted (search.n_trials)")
    parser.add_argument("--workers", type=int, default=None, help="processes sharing the study (search.workers)")
    parser.add_argument("--storage", default=None, help="Optuna storage URL (search.storage)")
    parser.add_argument("--study-name", default=None, help="study to create or resume (default: readable, per "
                        "world and target)")
    parser.add_argument("--sampler", choices=["tpe", "random"], default=None)
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (search.seed)")
    parser.add_argument("--no-warm-start", action="store_true", help="do not enqueue the designs' mixtures")
    # Internal: a worker process started by the main one.
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)


def config_from_args(args: argparse.Namespace) -> SearchConfig:
    from medmat.config import from_dict, load_params

    section = dict((load_params(args.params).get("search") or {}) if args.params.exists() else {})
    for name, val in (("n_trials", args.trials), ("workers", args.workers), ("storage", args.storage),
                      ("sampler", args.sampler), ("seed", args.seed)):
        if val is not None:
            section[name] = val
    if args.no_warm_start:
        section["warm_start"] = False
    return from_dict(SearchConfig, section, where=f"{args.params}: section 'search'")


def default_study_name(prefix: str, problem: TargetProblem) -> str:
    """`medmat-mini-03-CT-Lung-COVID`: readable in optuna-dashboard, distinct per world and target."""
    raw = f"{prefix}-{problem.world}-{problem.target}-{problem.triplet}"
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", raw)


def stored_fingerprint(storage: str, name: str) -> tuple[bool, str | None]:
    """(the study exists, its objective fingerprint if it has one)."""
    with study_lock(lock_path(storage, name)):  # a fresh SQLite file: its schema is created once
        st = open_storage(storage)
    try:
        study_id = st.get_study_id_from_name(name)
    except KeyError:
        return False, None
    return True, st.get_study_user_attrs(study_id).get(FINGERPRINT)


def choose_study_name(storage: str, base: str, fp: str) -> str:
    """`base` when it is free or holds this objective; else `base-<fp[:6]>` (another objective's
    values must not mix with these)."""
    for name in (base, f"{base}-{fp[:6]}"):
        exists, have = stored_fingerprint(storage, name)
        if not exists or have in (None, fp):
            return name
    raise SearchError(f"studies {base} and {base}-{fp[:6]} in {storage} both hold other objectives; "
                      "give --study-name")


def _parent_run(track_cfg, name: str, problem: TargetProblem, cfg: SearchConfig) -> str:
    """The study's parent MLflow run (found by key, so a resumed search nests under the same one)."""
    import mlflow

    from medmat import tracking

    tags = tracking.run_tags(target=problem.triplet, arm="search",
                             extra={"study": name, "kind": "search", "world": problem.world})
    run_id = tracking.parent_run(track_cfg, f"search {name}", key=f"search:{name}", tags=tags)
    client = mlflow.MlflowClient()
    have = client.get_run(run_id).data.params
    flat = tracking.flatten_params({"n_trials": cfg.n_trials, "sampler": cfg.sampler, "seed": cfg.seed,
                                    "warm_start": cfg.warm_start, "step": cfg.step, "budget": problem.space.budget,
                                    "max_per_subset": cfg.max_per_subset})
    new = [mlflow.entities.Param(k, v) for k, v in flat.items() if k not in have]  # a resume keeps the first
    if new:
        client.log_batch(run_id, params=new)
    return run_id


def _worker_command(args: argparse.Namespace, cfg: SearchConfig, name: str, parent: str, k: int) -> list[str]:
    return [sys.executable, "-m", "medmat.cli", "search", "--target", args.target, "--records", str(args.records),
            "--designs", str(args.designs), "--out", str(args.out), "--params", str(args.params),
            "--trials", str(cfg.n_trials), "--storage", cfg.storage, "--study-name", name, "--sampler", cfg.sampler,
            "--seed", str(cfg.seed), "--workers", "1", "--parent-run-id", parent, "--worker-index", str(k)] \
        + (["--dev", str(args.dev)] if args.dev else [])


def run(args: argparse.Namespace) -> int:
    from medmat import tracking
    from medmat.config import ConfigError, from_dict, load_params

    try:
        cfg = config_from_args(args)
        problem = build_problem(args.records, args.designs, args.target, cfg, dev_path=args.dev)
        params = load_params(args.params) if args.params.exists() else {}
        track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{args.params}: tracking")
        fp = objective_fingerprint(problem, cfg, params)
        name = args.study_name or choose_study_name(cfg.storage, default_study_name(cfg.study_prefix, problem), fp)
    except (SearchError, ConfigError, ValueError, LookupError) as exc:
        log.error("%s", exc)
        return 2
    worker = args.worker_index
    study = open_study(name, cfg.storage, cfg.sampler, cfg.seed + worker, cfg.pruner_startup_trials,
                       cfg.pruner_warmup_steps)
    have = study.user_attrs.get(FINGERPRINT)
    if have is None and worker == 0:
        study.set_user_attr(FINGERPRINT, fp)
    elif have is not None and have != fp:
        log.error("study %s in %s was run with other training/data settings (objective fingerprint %s, now "
                  "%s): its values are not comparable; give another --study-name or delete the study",
                  name, cfg.storage, have[:8], fp[:8])
        return 2
    lock = lock_path(cfg.storage, name)
    parent = args.parent_run_id
    procs: list[subprocess.Popen] = []
    if worker == 0:
        with study_lock(lock):
            recover_stale(study)
            if cfg.warm_start:
                added = enqueue_warm_start(study, problem.space, problem.warm)
                if added:
                    log.info("warm start: enqueued %s", ", ".join(added))
        for attr, value in (("target", problem.target), ("triplet", problem.triplet), ("world", problem.world),
                            ("budget", problem.space.budget)):
            study.set_user_attr(attr, value)
        parent = _parent_run(track_cfg, name, problem, cfg)
        procs = [subprocess.Popen(_worker_command(args, cfg, name, parent, k)) for k in range(1, cfg.workers)]
    evaluate = train_objective(problem, cfg, args.params, parent, mixture_seed=cfg.seed)
    rc = 0
    try:
        run_worker(study, problem.space, evaluate, cfg.n_trials, lock)
    finally:
        for p in procs:
            rc = max(rc, p.wait())
    if worker != 0:
        return rc
    return max(rc, _finish(study, args, cfg, problem, name, parent))


def _finish(study, args: argparse.Namespace, cfg: SearchConfig, problem: TargetProblem, name: str, parent: str) -> int:
    """best_mixture.json (with the exact records the best trial trained on) + history.csv + MLflow summary."""
    from medmat.search.space import mixture_of

    c = counts(study)
    try:
        best = study.best_trial
    except ValueError:
        log.error("study %s: no completed trial, no best mixture", name)
        return 1
    _, selection = resolve(problem, mixture_of(best), cfg.seed)
    extra = {"triplet": problem.triplet, "world": problem.world, "storage": cfg.storage,
             "exact_total": problem.space.budget, "total": selection["total"], "sha256": selection["sha256"],
             "record_ids": selection["record_ids"], "leakage_dropped": problem.leakage_dropped}
    manifest = write_outputs(study, args.out, problem.target, cfg.seed, extra=extra)
    try:
        import mlflow

        from medmat import tracking

        tracking.log_metrics({"best_dev_accuracy": manifest["dev_accuracy"]}, run_id=parent)
        client = mlflow.MlflowClient()
        client.log_dict(parent, {k: v for k, v in manifest.items() if k != "record_ids"}, "best_mixture.json")
        client.log_artifact(parent, str(args.out / "history.csv"))
    except Exception as exc:  # the outputs are written; a tracking hiccup must not fail the stage
        log.warning("could not log the search summary to MLflow: %s", exc)
    log.info("study %s: %d complete, %d pruned, %d failed; best trial %d dev accuracy %.4f -> %s",
             name, c["COMPLETE"], c["PRUNED"], c["FAIL"], manifest["trial"], manifest["dev_accuracy"],
             args.out / "best_mixture.json")
    return 0

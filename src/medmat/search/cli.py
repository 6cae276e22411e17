"""`medmat search`: one Optuna study per (world, target), resumed by name, with an MLflow parent run.

    medmat search --target 3 --records work/records.parquet --designs work/designs --out work/search/03
    medmat search --target all --records work/records.parquet --designs work/designs --out-root work/search

`--target all` (or several `--target`) searches every target of `experiment.targets`, side by side in
`experiment.workers // search.workers` processes, each into `<out-root>/<target>` (the `search` stage).
Each study keeps its own single order of trials, so running targets side by side changes no result;
one at a time, one core of two stood idle for the whole search.

Study names are readable: `medmat-mini-03-CT-Lung-COVID` (prefix, world, target, triplet). The study
remembers the fingerprint of its objective (training/model/scorer settings, budget, dev split,
candidate records); when the default name is taken by a study with another fingerprint, the search
uses `<name>-<6 hex of the fingerprint>` instead of mixing incomparable values. An explicit
`--study-name` whose study has another fingerprint is refused.

Worker 0 (this process) recovers killed trials, enqueues the warm start, starts `workers - 1` more
workers on the same study (processes here, or Ray tasks with `experiment.executor: ray`), runs trials
itself, and writes `best_mixture.json` and `history.csv`.
Every trial is an MLflow run nested under the study's parent run.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
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
    parser.add_argument("--target", required=True, action="append",
                        help="subset number (e.g. 3) or triplet (CT-Lung-COVID); repeat it, or `all` "
                        "(experiment.targets), to search several targets side by side")
    parser.add_argument("--records", type=Path, required=True, help="records table (records.parquet)")
    parser.add_argument("--designs", type=Path, required=True, help="designs folder (medmat designs output)")
    parser.add_argument("--dev", type=Path, default=None, help="dev split JSON (default: from --designs)")
    out = parser.add_mutually_exclusive_group(required=True)
    out.add_argument("--out", type=Path, help="output folder of one target: best_mixture.json, history.csv")
    out.add_argument("--out-root", type=Path, help="one output folder per target under this one (<root>/03, ...)")
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


def _worker_command(w: argparse.Namespace) -> list[str]:
    """The command line of a worker process with arguments `w` (see _worker_args)."""
    return [sys.executable, "-m", "medmat.cli", "search", "--target", w.target, "--records", str(w.records),
            "--designs", str(w.designs), "--out", str(w.out), "--params", str(w.params),
            "--trials", str(w.trials), "--storage", w.storage, "--study-name", w.study_name, "--sampler", w.sampler,
            "--seed", str(w.seed), "--workers", "1", "--parent-run-id", w.parent_run_id,
            "--worker-index", str(w.worker_index)] + (["--dev", str(w.dev)] if w.dev else []) \
        + (["--no-warm-start"] if w.no_warm_start else [])


def run(args: argparse.Namespace) -> int:
    """One target here; several side by side, each in its own process (`_side_by_side`)."""
    from medmat.config import ConfigError

    if isinstance(args.target, str):  # a worker: _worker_args resolved its one target
        return run_target(args)
    try:
        experiment = _experiment(args.params)
        targets = resolve_targets(args.target, experiment.targets)
        for option, why in (("out", "one target's output folder: give --out-root"), ("dev", "one target's dev split"),
                            ("study_name", "one study's name")):
            if getattr(args, option) is not None and len(targets) > 1:
                raise ConfigError(f"--{option.replace('_', '-')} is {why} ({len(targets)} targets: "
                                  f"{', '.join(targets)})")
    except (ConfigError, ValueError) as exc:
        log.error("%s", exc)
        return 2
    if len(targets) > 1:
        return _side_by_side(args, targets, width=max(1, experiment.workers // config_from_args(args).workers))
    out = args.out if args.out is not None else args.out_root / targets[0]
    return run_target(argparse.Namespace(**{**vars(args), "target": targets[0], "out": out}))


def resolve_targets(values: list[str], experiment_targets: list) -> list[str]:
    """`--target` values in order, `all` expanded to experiment.targets, each named as its folder ("03")."""
    from medmat.names import norm_target

    out: list[str] = []
    for value in values:
        for target in (experiment_targets if value == "all" else [value]):
            if norm_target(target) not in out:
                out.append(norm_target(target))
    if not out:
        raise ValueError("no target to search (experiment.targets is empty)")
    return out


def _experiment(params: Path):
    """params' `experiment:` section (all defaults without a params file, as the search's own sections)."""
    from medmat.config import load_section
    from medmat.experiment import ExperimentConfig

    return load_section(ExperimentConfig, "experiment", params) if params.exists() else ExperimentConfig()


def _side_by_side(args: argparse.Namespace, targets: list[str], width: int) -> int:
    """Each target's search in its own process, `width` at a time; their log lines are prefixed with the
    target. Every target runs even when another fails."""
    import threading
    from concurrent.futures import ThreadPoolExecutor

    given = [arg for name, flag in (("trials", "--trials"), ("workers", "--workers"), ("storage", "--storage"),
                                    ("sampler", "--sampler"), ("seed", "--seed"))
             if getattr(args, name) is not None for arg in (flag, str(getattr(args, name)))]
    given += ["--no-warm-start"] if args.no_warm_start else []
    write = threading.Lock()
    log.info("searching %s, %d at a time", ", ".join(targets), width)

    def search(target: str) -> int:
        cmd = [sys.executable, "-m", "medmat.cli", "search", "--target", target, "--records", str(args.records),
               "--designs", str(args.designs), "--out", str(args.out_root / target), "--params", str(args.params),
               *given]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
        for line in proc.stdout:
            with write:
                sys.stderr.write(f"[{target}] {line}")
        return proc.wait()

    with ThreadPoolExecutor(width) as pool:
        codes = dict(zip(targets, pool.map(search, targets)))
    failed = [t for t, rc in codes.items() if rc]
    if failed:
        log.error("the search of target %s failed (its lines above start with [target])", ", ".join(failed))
    return max(codes.values())


def run_target(args: argparse.Namespace) -> int:
    """One target's search (worker 0 or another worker of the same study)."""
    from medmat import tracking
    from medmat.config import ConfigError, from_dict, load_params
    from medmat.experiment import ExperimentConfig

    try:
        cfg = config_from_args(args)
        problem = build_problem(args.records, args.designs, args.target, cfg, dev_path=args.dev)
        params = load_params(args.params) if args.params.exists() else {}
        experiment = from_dict(ExperimentConfig, params.get("experiment"), where=f"{args.params}: section 'experiment'")
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
    evaluate = train_objective(problem, cfg, args.params, parent, mixture_seed=cfg.seed)
    more = range(1, cfg.workers) if worker == 0 else range(0)
    with _other_workers(args, cfg, name, parent, more, experiment) as wait:
        try:
            run_worker(study, problem.space, evaluate, cfg.n_trials, lock)
        finally:
            rc = wait()
    if worker != 0:
        return rc
    return max(rc, _finish(study, args, cfg, problem, name, parent))


@contextlib.contextmanager
def _other_workers(args: argparse.Namespace, cfg: SearchConfig, name: str, parent: str, indices: range,
                   experiment) -> Iterator[Callable[[], int]]:
    """Workers `indices` on the same study, beside this one: processes on this machine, or Ray tasks
    when `experiment.executor` is ray (on a cluster, give the study a database storage every node
    reaches). Yields wait(): their highest exit code once all have ended."""
    if not indices:
        yield lambda: 0
    elif experiment.executor == "ray":
        # A Ray task whose worker process dies is retried: the new worker finds the dead one's trial
        # stale (its owner is gone on this host; on a database server its heartbeat stops), fails it
        # and re-enqueues its mixture once, so no trial is lost or run twice.
        from medmat.ray_cluster import ray_tasks

        calls = [(_worker_args(args, cfg, name, parent, k),) for k in indices]
        with ray_tasks(run, calls, experiment, name="medmat-search-worker") as wait:
            yield lambda: max(wait())
    else:
        procs = [subprocess.Popen(_worker_command(_worker_args(args, cfg, name, parent, k))) for k in indices]
        yield lambda: max(p.wait() for p in procs)


def _worker_args(args: argparse.Namespace, cfg: SearchConfig, name: str, parent: str, k: int) -> argparse.Namespace:
    """Worker k's arguments: this search's, with every setting fixed as worker 0 resolved it."""
    return argparse.Namespace(**{**vars(args), "trials": cfg.n_trials, "storage": cfg.storage, "study_name": name,
                                 "sampler": cfg.sampler, "seed": cfg.seed, "workers": 1, "parent_run_id": parent,
                                 "worker_index": k})


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

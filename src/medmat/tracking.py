"""MLflow run lifecycle and provenance: the store, the experiment, runs that always end in a definite
state, the tags every run carries, metrics, the training mixture.

Every training, evaluation and search trial goes through `tracked_run`, so a run always ends FINISHED,
FAILED with its reason, or KILLED, and carries the same tags: git commit, data version (the `.dvc`
hash of the data tree), target triplet, arm, backend, seed. A cell's seed runs nest under one parent
run (`parent_run`). The logged model is the served model's concern: medmat.served_model.

Many short runs are the normal case (arms × seeds × search trials), so per-run overhead is kept small:
importing this module imports no MLflow, the store is set up once per process (sqlite in WAL mode),
params and metrics go in batches, MLflow's chatter is silenced.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import logging
import math
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from medmat.io import atomic_write_text, file_lock

log = logging.getLogger(__name__)

# Where things are kept unless params.yaml says otherwise: one place for every store URI.
MLFLOW_TRACKING_URI = "sqlite:///mlruns/mlflow.db"
MLFLOW_ARTIFACT_ROOT = "mlruns/artifacts"
OPTUNA_STORAGE = "sqlite:///mlruns/optuna.db"  # medmat.search's default study storage

TAG_PREFIX = "medmat."
FAILURE_TAG = "failure_reason"
PARENT_KEY_TAG = TAG_PREFIX + "parent_key"
# The experiment's type in the MLflow UI ("Machine learning", not "GenAI apps & agents"); UIs that open
# an experiment by its kind read this tag. MLflow 3.17's UI opens the view of the browser's own choice
# (GenAI by default) unless the link says otherwise: experiment_url() gives that link.
EXPERIMENT_KIND_TAG = "mlflow.experimentKind"
EXPERIMENT_KIND = "custom_model_development"
# MLflow's own limits (mlflow.utils.validation) on params, tags, dataset digests: longer is rejected.
_MAX_PARAM_VALUE, _MAX_TAG_VALUE, _MAX_DIGEST = 6000, 8000, 36


@dataclasses.dataclass
class TrackingConfig:
    """`tracking:` section of params.yaml."""

    tracking_uri: str = MLFLOW_TRACKING_URI
    artifact_root: str = MLFLOW_ARTIFACT_ROOT  # used only when the experiment is created against a local store
    experiment: str = "medmat-cg"

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name")


def effective_uri(cfg: TrackingConfig) -> str:
    """The tracking URI in force: env MLFLOW_TRACKING_URI wins over params (teams point at a server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


# --------------------------------------------------------------------------------------------- store


def _quiet_mlflow() -> None:
    # MLflow logs alembic migrations, "View run ... at" links and environment warnings at INFO/WARNING;
    # with hundreds of short runs that drowns the pipeline's own log.
    for name in ("mlflow", "alembic", "mlflow.store.db.utils", "mlflow.models.model", "mlflow.tracking"):
        logging.getLogger(name).setLevel(logging.ERROR)
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    # Its per-download tqdm bars print on every log_model/load_model, even for three small files.
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    warnings.filterwarnings("ignore", module=r"mlflow(\..*)?")


def _sqlite_path(uri: str) -> Path | None:
    return Path(uri[len("sqlite:///"):]) if uri.startswith("sqlite:///") else None


def _store_lock(uri: str):
    """An exclusive lock beside a sqlite store (processes creating the same thing at once), else none."""
    db = _sqlite_path(uri)
    return contextlib.nullcontext() if db is None else file_lock(db.with_name(db.name + ".lock"))


def _set_uri(uri: str) -> None:
    """mlflow.set_tracking_uri without exporting MLFLOW_TRACKING_URI: that variable is how a *user* points
    medmat at a team server (it overrides params); left set, every later setup() in the process with
    another store would silently log to the first. In-process MLflow reads its own global first."""
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


@functools.lru_cache(maxsize=None)
def _experiment_id(uri: str, artifact_root: str, experiment: str) -> str:
    """Find or create the experiment, once per process and store (migrations of a fresh sqlite store
    run here, under a lock: several processes may open one at the same time)."""
    import mlflow

    with _store_lock(uri):
        client = mlflow.MlflowClient(uri)
        exp = client.get_experiment_by_name(experiment)  # creates (migrates) a new store first
        if (db := _sqlite_path(uri)) is not None:
            # A commit costs ~30 ms of fsyncs with sqlite's default journal, ~2 ms with write-ahead logging
            # (a run makes ~10), and the UI's reads never block a writer. Kept in the file: set once.
            with contextlib.closing(sqlite3.connect(db, timeout=60)) as con:
                con.execute("PRAGMA journal_mode=WAL")
        if exp is None:
            # A local store gets its artifacts under artifact_root/<experiment> (an absolute file URI, so
            # the UI and other working directories find them); a server chooses its own artifact root.
            location = None
            if _sqlite_path(uri) is not None or uri.startswith("file:"):
                location = (Path(artifact_root).resolve() / experiment).as_uri()
            try:
                return client.create_experiment(experiment, artifact_location=location,
                                                tags={EXPERIMENT_KIND_TAG: EXPERIMENT_KIND})
            except Exception:  # another process (on a server store) created it between look-up and create
                exp = client.get_experiment_by_name(experiment)
                if exp is None:
                    raise
        if exp.tags.get(EXPERIMENT_KIND_TAG) != EXPERIMENT_KIND:
            # Created by an older medmat, or by hand, or tagged by the UI's own guess.
            client.set_experiment_tag(exp.experiment_id, EXPERIMENT_KIND_TAG, EXPERIMENT_KIND)
        return exp.experiment_id


def setup(cfg: TrackingConfig | None = None) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    import mlflow

    exp_id = _activate(cfg)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def _activate(cfg: TrackingConfig | None) -> str:
    """The tracking URI set for this process and the experiment id (runs pass it to start_run, which
    saves a look-up per run over mlflow.set_experiment)."""
    import mlflow

    cfg = cfg or TrackingConfig()
    _quiet_mlflow()
    uri = effective_uri(cfg)
    exp_id = _experiment_id(uri, cfg.artifact_root, cfg.experiment)
    # Another caller may have switched the URI (tests use several stores in one process).
    if mlflow.get_tracking_uri() != uri:
        _set_uri(uri)
    return exp_id


def experiment_url(cfg: TrackingConfig | None = None, ui: str = "http://127.0.0.1:5000") -> str:
    """The experiment's runs in the MLflow UI (`make ui`), in its machine-learning view."""
    return f"{ui.rstrip('/')}/#/experiments/{_activate(cfg)}/runs?workflowType=machine_learning"


# ---------------------------------------------------------------------------------------- provenance


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's commit hash of the repository around `cwd` (default: the working directory), or
    "unknown" outside git / without git."""
    return _git_commit(str(Path(cwd or os.getcwd()).resolve()))


@functools.lru_cache(maxsize=64)
def _git_commit(cwd: str) -> str:
    # Cached per directory: one subprocess per process, not per run (many short runs).
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True,
                              timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return head or "unknown"


def data_version(dvc_file: str | os.PathLike = "data.dvc") -> str:
    """md5 of the data tree from `data.dvc` (DVC's own hash of the output), or "untracked"."""
    path = Path(dvc_file)
    if not path.exists():
        return "untracked"
    try:
        meta = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        outs = meta.get("outs") or []
        md5s = [str(o.get("md5")) for o in outs if isinstance(o, dict) and o.get("md5")]
    except (yaml.YAMLError, AttributeError, OSError) as exc:
        raise ValueError(f"{path}: cannot read the DVC output hash ({exc})") from exc
    if not md5s:
        return "untracked"
    return "+".join(md5s)


def run_tags(target: Any = None, arm: str | None = None, backend: str | None = None, seed: int | None = None,
             extra: Mapping[str, Any] | None = None) -> dict[str, str]:
    """The tags every run carries: git commit, data version, and what the run is about."""
    tags = {TAG_PREFIX + "git_commit": git_commit(), TAG_PREFIX + "data_version": data_version()}
    for key, value in (("target", target), ("arm", arm), ("backend", backend), ("seed", seed)):
        if value is not None:
            tags[TAG_PREFIX + key] = str(value)
    for key, value in (extra or {}).items():
        tags[key if "." in key else TAG_PREFIX + key] = str(value)
    return tags


# ---------------------------------------------------------------------------------------------- runs


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, str]:
    """Nested param dicts as dotted keys (`model.tiny.width`), values as MLflow-sized strings."""
    out: dict[str, str] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            value = dataclasses.asdict(value)
        if isinstance(value, Mapping) and value:
            out.update(flatten_params(value, prefix=name + "."))
        else:
            text = value if isinstance(value, str) else json.dumps(value, default=str)
            out[name] = text[:_MAX_PARAM_VALUE]
    return out


@contextlib.contextmanager
def tracked_run(cfg: TrackingConfig | None = None, run_name: str | None = None, tags: Mapping[str, Any] | None = None,
                params: Mapping[str, Any] | None = None, nested: bool = False, run_id: str | None = None,
                parent_run_id: str | None = None) -> Iterator[Any]:
    """An MLflow run that always ends in a definite state.

    - `run_id`: resume that run (a restarted training continues its own run).
    - `nested=True`: child of the active run; `parent_run_id`: child of that run even when it is not
      active in this process (a cell's seed run under `parent_run`, an Optuna worker's trial under the
      study's run).
    - An exception ends the run FAILED with tag `failure_reason` ("<Type>: <message>") and re-raises;
      KeyboardInterrupt (Ctrl-C, SIGINT from a supervisor) ends it KILLED; optuna.TrialPruned ends it
      FINISHED with tag `medmat.pruned=true` (a pruned trial is a normal outcome).
    """
    import mlflow

    exp_id = _activate(cfg)
    tags = {k: str(v)[:_MAX_TAG_VALUE] for k, v in (tags or {}).items()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(run_id=run_id, experiment_id=None if run_id else exp_id,
                           run_name=None if run_id else run_name, nested=nested or bool(parent_run_id),
                           tags=tags or None)
    try:
        if params:
            flat = flatten_params(params)
            if run_id:
                # A resumed run already holds its params; MLflow refuses to change a logged value.
                have = mlflow.get_run(run.info.run_id).data.params
                changed = {k for k, v in flat.items() if k in have and have[k] != v}
                if changed:
                    log.warning("run %s: params %s differ from the logged ones; kept the logged values",
                                run.info.run_id, sorted(changed))
                flat = {k: v for k, v in flat.items() if k not in have}
            if flat:
                mlflow.log_params(flat)
        yield run
    except Exception as exc:
        optuna = sys.modules.get("optuna")  # imported by whoever prunes; never imported here
        if optuna is not None and isinstance(exc, optuna.TrialPruned):
            mlflow.set_tag(TAG_PREFIX + "pruned", "true")
            mlflow.end_run(status="FINISHED")
            raise
        reason = f"{type(exc).__name__}: {exc}"[:_MAX_TAG_VALUE]
        try:
            mlflow.set_tag(FAILURE_TAG, reason)
        finally:
            mlflow.end_run(status="FAILED")
        raise
    except BaseException:
        # KeyboardInterrupt (Ctrl-C, SIGINT from a supervisor), SystemExit: stopped, not broken.
        mlflow.end_run(status="KILLED")
        raise
    else:
        mlflow.end_run(status="FINISHED")


def parent_run(cfg: TrackingConfig | None, run_name: str, key: str,
               tags: Mapping[str, Any] | None = None) -> str:
    """The id of the run that groups related runs (a cell's seeds, a study's trials), created once.

    The run is found again by `key` (tag `medmat.parent_key`), so a rerun of the cell nests its seeds
    under the same parent, from any process. It is created FINISHED: it holds no work of its own, only
    its children (`tracked_run(..., parent_run_id=...)`) and whatever summary is logged into it
    (`log_metrics(..., run_id=...)`). A deleted parent is not reused.
    """
    import mlflow

    if not key or "'" in key or "`" in key:
        raise ValueError(f"parent run key {key!r} must be non-empty, without quotes")
    exp_id, uri = _activate(cfg), mlflow.get_tracking_uri()
    client = mlflow.MlflowClient(uri)
    with _store_lock(uri):  # two processes opening the same cell must not create two parents
        found = client.search_runs([exp_id], filter_string=f"tags.`{PARENT_KEY_TAG}` = '{key}'", max_results=1,
                                   order_by=["attributes.start_time ASC"])
        if found:
            return found[0].info.run_id
        all_tags = {**{k: str(v)[:_MAX_TAG_VALUE] for k, v in (tags or {}).items()}, PARENT_KEY_TAG: key}
        run = client.create_run(exp_id, run_name=run_name, tags=all_tags)
        client.set_terminated(run.info.run_id, "FINISHED")
        return run.info.run_id


def log_metrics(metrics: Mapping[str, float], step: int | None = None, run_id: str | None = None,
                cfg: TrackingConfig | None = None) -> None:
    """Metrics in one batch; non-finite values are skipped (MLflow rejects NaN in some stores).

    Into the active run, or into run `run_id` of cfg's store (None: the one set up last) without reopening
    it (a finished run gets its evaluation, a parent run its cell summary): one write, no start/end."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if not clean:
        return
    if run_id is None:
        mlflow.log_metrics(clean, step=step)
        return
    from mlflow.entities import Metric

    if cfg is not None:
        _activate(cfg)
    now = int(time.time() * 1000)  # MLflow's timestamps are milliseconds
    mlflow.MlflowClient().log_batch(run_id, metrics=[Metric(k, v, now, step or 0) for k, v in clean.items()])


# ------------------------------------------------------------------------------------------ datasets


def log_mixture(manifest: Mapping[str, Any], data_version: str, name: str = "mixture") -> None:
    """Log the training mixture as an MLflow dataset input (context "training") + manifest.json.

    The dataset's rows are the manifest's components (subset, requested, selected, sha256), its digest the
    manifest's content hash, its source the data version: the UI answers "trained on which records"."""
    import hashlib

    import mlflow
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    components = manifest.get("components") or {}
    rows = []
    for subset, comp in sorted(components.items()):
        comp = comp if isinstance(comp, Mapping) else {"requested": comp, "selected": comp}
        rows.append({"subset": str(subset), "requested": int(comp.get("requested", 0) or 0),
                     "selected": int(comp.get("selected", 0) or 0), "sha256": str(comp.get("sha256", ""))})
    df = pd.DataFrame(rows, columns=["subset", "requested", "selected", "sha256"])
    digest = manifest.get("sha256") or hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    # MLflow resolves a string source to a source type by guessing (a local-artifact "path" here) and
    # warns that the guess is ambiguous; the string itself is what we want recorded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(data_version))
    dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=str(digest)[:_MAX_DIGEST])
    try:
        mlflow.log_input(dataset, context="training")
    except mlflow.exceptions.MlflowException as exc:
        # Two seeds of one arm log the same dataset at the same moment: the store checks, then inserts,
        # and the loser hits the unique key. The dataset exists now, so a second call just links it.
        if "unique constraint" not in str(exc).lower():
            raise
        mlflow.log_input(dataset, context="training")
    mlflow.log_dict(dict(manifest), "manifest.json")


# ------------------------------------------------------------------------------------------- run ids


def read_run_id(run_dir: str | os.PathLike) -> str | None:
    """The MLflow run id stored in RUN_DIR/mlflow_run_id, if any."""
    path = Path(run_dir) / "mlflow_run_id"
    if path.is_file():
        text = path.read_text(encoding="utf-8").strip()
        return text or None
    return None


def write_run_id(run_dir: str | os.PathLike, run_id: str) -> None:
    """Atomically record the run id in RUN_DIR/mlflow_run_id (a restart resumes this run)."""
    atomic_write_text(Path(run_dir) / "mlflow_run_id", run_id + "\n")


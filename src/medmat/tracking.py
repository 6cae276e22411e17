"""MLflow tracking: one place that knows the store, the run lifecycle, the tags and the logged model.

Every training, evaluation and search trial goes through `tracked_run`, so a run always ends in a
definite state (FINISHED, FAILED with its reason, KILLED) and carries the same tags: git commit, data
version (the `data.dvc` hash), target triplet, arm, backend, seed. The model is logged as a `pyfunc`
whose artifact is the backend's saved directory (for `hf`: base checkpoint reference + adapter), because
`mlflow.transformers` cannot round-trip a VLM on this stack (docs/ARCHITECTURE.md, DESIGN.md).

Many short runs are the normal case (arms × seeds × search trials), so this module keeps per-run overhead
small: batched param/metric logging, explicit pip requirements (no dependency inference), no
input-example validation pass, MLflow's chatter silenced.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import functools
import io
import json
import logging
import math
import os
import subprocess
import tempfile
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml
from medmat.io import atomic_write_text

log = logging.getLogger(__name__)

TAG_PREFIX = "medmat."
FAILURE_TAG = "failure_reason"
# MLflow's own limits (mlflow.utils.validation): longer values are rejected, so we truncate.
_MAX_PARAM_VALUE = 6000
_MAX_TAG_VALUE = 8000
_MAX_DIGEST = 36


@dataclasses.dataclass
class TrackingConfig:
    """`tracking:` section of params.yaml."""

    tracking_uri: str = "sqlite:///mlruns/mlflow.db"
    artifact_root: str = "mlruns/artifacts"  # used only when the experiment is created against a local store
    experiment: str = "medmat-cg"

    def __post_init__(self) -> None:
        if not self.experiment:
            raise ValueError("experiment must be a non-empty name")


def effective_uri(cfg: TrackingConfig) -> str:
    """The tracking URI in force: env MLFLOW_TRACKING_URI wins over params (teams point at a server)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or cfg.tracking_uri


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
    if uri.startswith("sqlite:///"):
        return Path(uri[len("sqlite:///") :])
    return None


@functools.lru_cache(maxsize=None)
def _setup_cached(uri: str, artifact_root: str, experiment: str) -> str:
    import mlflow

    db = _sqlite_path(uri)
    lock = contextlib.nullcontext()
    if db is not None:
        db.parent.mkdir(parents=True, exist_ok=True)
        # Several processes (search workers, parallel DVC stages) may open a fresh store at once;
        # MLflow's schema migrations on one sqlite file must not race.
        lock = _file_lock(db.with_name(db.name + ".lock"))
    with lock:
        return _experiment_id(mlflow, uri, db, artifact_root, experiment)


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    import fcntl

    with path.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _set_uri(uri: str) -> None:
    """mlflow.set_tracking_uri without its side effect of exporting MLFLOW_TRACKING_URI.

    MLflow exports the URI so that subprocesses inherit it; but that env variable is how a *user* points
    medmat at a team server (it overrides params), so after one setup() in a process every later setup()
    with another store would silently log to the first. In-process MLflow reads its own global first.
    """
    import mlflow

    before = os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    if before is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = before


def _experiment_id(mlflow, uri: str, db: Path | None, artifact_root: str, experiment: str) -> str:
    _set_uri(uri)
    client = mlflow.MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is not None:
        exp_id = exp.experiment_id
    else:
        # A local store gets its artifacts under artifact_root/<experiment> (an absolute file URI, so
        # the UI and other working directories find them); a server chooses its own artifact root.
        location = None
        if db is not None or uri.startswith("file:"):
            location = (Path(artifact_root).resolve() / experiment).as_uri()
        try:
            exp_id = client.create_experiment(experiment, artifact_location=location)
        except Exception:  # another process created it between our look-up and create
            exp = client.get_experiment_by_name(experiment)
            if exp is None:
                raise
            exp_id = exp.experiment_id
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


def setup(cfg: TrackingConfig | None = None) -> str:
    """Point MLflow at the configured store and experiment; return the experiment id."""
    cfg = cfg or TrackingConfig()
    _quiet_mlflow()
    uri = effective_uri(cfg)
    exp_id = _setup_cached(uri, cfg.artifact_root, cfg.experiment)
    import mlflow

    # Another caller may have switched URI/experiment (tests use several stores in one process).
    _set_uri(uri)
    mlflow.set_experiment(experiment_id=exp_id)
    return exp_id


# ---------------------------------------------------------------------------------------------- tags


def git_commit(cwd: str | os.PathLike | None = None) -> str:
    """HEAD's commit hash of the repository around `cwd` (default: the working directory), or
    "unknown" outside git / without git."""
    return _git_commit(str(Path(cwd or os.getcwd()).resolve()))


@functools.lru_cache(maxsize=64)
def _git_commit(cwd: str) -> str:
    # Cached per directory: one subprocess per process, not per run (many short runs).
    try:
        head = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
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


def run_tags(
    target: Any = None,
    arm: str | None = None,
    backend: str | None = None,
    seed: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> dict[str, str]:
    """The tags every run carries: git commit, data version, and what the run is about."""
    tags = {
        TAG_PREFIX + "git_commit": git_commit(),
        TAG_PREFIX + "data_version": data_version(),
    }
    for key, value in (("target", target), ("arm", arm), ("backend", backend), ("seed", seed)):
        if value is not None:
            tags[TAG_PREFIX + key] = str(value)
    for key, value in (extra or {}).items():
        tags[key if "." in key else TAG_PREFIX + key] = str(value)
    return tags


# ------------------------------------------------------------------------------------------- runs


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
def tracked_run(
    cfg: TrackingConfig | None = None,
    run_name: str | None = None,
    tags: Mapping[str, Any] | None = None,
    params: Mapping[str, Any] | None = None,
    nested: bool = False,
    run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Iterator[Any]:
    """An MLflow run that always ends in a definite state.

    - `run_id`: resume that run (a restarted training continues its own run).
    - `nested=True`: child of the active run; `parent_run_id`: child of that run even when it is not
      active in this process (an Optuna worker process logging a trial under the study's parent run).
    - An exception ends the run FAILED with tag `failure_reason` ("<Type>: <message>") and re-raises;
      KeyboardInterrupt (Ctrl-C, SIGINT from a supervisor) ends it KILLED.
    """
    import mlflow

    setup(cfg)
    tags = {k: str(v)[:_MAX_TAG_VALUE] for k, v in (tags or {}).items()}
    if parent_run_id:
        tags["mlflow.parentRunId"] = parent_run_id
    run = mlflow.start_run(
        run_id=run_id,
        run_name=None if run_id else run_name,
        nested=nested or bool(parent_run_id),
        tags=tags or None,
    )
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
        if _is_pruned(exc):
            # A pruned Optuna trial is a normal outcome, not a failure.
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


def _is_pruned(exc: BaseException) -> bool:
    import sys

    optuna = sys.modules.get("optuna")
    return optuna is not None and isinstance(exc, optuna.TrialPruned)


def log_metrics(metrics: Mapping[str, float], step: int | None = None) -> None:
    """Batched metric logging; non-finite values are skipped (MLflow rejects NaN in some stores)."""
    import mlflow

    clean = {k: float(v) for k, v in metrics.items() if v is not None and math.isfinite(float(v))}
    if clean:
        mlflow.log_metrics(clean, step=step)


# --------------------------------------------------------------------------------------- datasets


def _digest(text: str) -> str:
    return text[:_MAX_DIGEST]


def log_mixture(manifest: Mapping[str, Any], data_version: str, name: str = "mixture") -> None:
    """Log the training mixture as an MLflow dataset input (context "training") + manifest.json.

    The dataset's rows are the manifest's components (subset, requested, selected, sha256); its digest
    is the manifest's content hash and its source the data version, so the UI answers "trained on which
    records of which data".
    """
    import mlflow
    import pandas as pd
    from mlflow.data.dataset_source_registry import resolve_dataset_source

    components = manifest.get("components") or {}
    rows = []
    for subset, comp in sorted(components.items()):
        comp = comp if isinstance(comp, Mapping) else {"requested": comp, "selected": comp}
        rows.append(
            {
                "subset": str(subset),
                "requested": int(comp.get("requested", 0) or 0),
                "selected": int(comp.get("selected", 0) or 0),
                "sha256": str(comp.get("sha256", "")),
            }
        )
    df = pd.DataFrame(rows, columns=["subset", "requested", "selected", "sha256"])
    digest = manifest.get("sha256") or _content_hash(json.dumps(rows, sort_keys=True))
    # MLflow resolves a string source to a source type by guessing (a local-artifact "path" here) and
    # warns that the guess is ambiguous; the string itself is what we want recorded.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        source = resolve_dataset_source(str(data_version))
    dataset = mlflow.data.from_pandas(df, source=source, name=name, digest=_digest(str(digest)))
    mlflow.log_input(dataset, context="training")
    mlflow.log_dict(dict(manifest), "manifest.json")


def _content_hash(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode()).hexdigest()


# ------------------------------------------------------------------------------------------- model


def _pyfunc_base():
    import mlflow.pyfunc

    return mlflow.pyfunc.PythonModel


LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def parse_question_choice(text: str) -> tuple[str, list[str]]:
    """Split a Med-MAT `Question-choice` prompt into (question, option texts in letter order).

    The release's exact format is read by medmat.data.medmat_format; a hand-typed prompt (no closing
    instruction line, "A. text" or "(A) text" options) is read leniently: everything before the first
    option is the question.
    """
    import re

    try:
        from medmat.data.medmat_format import parse_question_choice as strict

        return strict(text)
    except (ImportError, ValueError):
        pass

    question_lines: list[str] = []
    options: dict[str, str] = {}
    pattern = re.compile(r"^\s*\(?([A-Z])\)?\s*[:.)]\s*(.*?)\s*$")
    for line in str(text).splitlines():
        m = pattern.match(line)
        if m and (m.group(1) == LETTERS[len(options)]):
            options[m.group(1)] = m.group(2)
        elif not options:
            question_lines.append(line.strip())
    if not options:
        raise ValueError(f"no options found in question_choice {text[:120]!r}")
    return " ".join(q for q in question_lines if q).strip(), list(options.values())


def _image_to_path(value: Any, scratch: Path, i: int) -> str:
    """A path on disk for `value`: an existing file path, or base64 / raw PNG/JPEG bytes written out."""
    if isinstance(value, (bytes, bytearray)):
        raw = bytes(value)
    else:
        text = str(value)
        if len(text) < 4096 and Path(text).is_file():
            return str(Path(text).resolve())
        try:
            raw = base64.b64decode(text, validate=True)
        except (ValueError, TypeError) as exc:
            raise ValueError(f"row {i}: image is neither an existing file nor base64 image bytes") from exc
    from PIL import Image

    try:
        with Image.open(io.BytesIO(raw)) as img:
            img.load()
            out = scratch / f"image_{i}.png"
            img.save(out, format="PNG")
    except Exception as exc:  # PIL raises several types for bad bytes
        raise ValueError(f"row {i}: image bytes are not a readable image ({exc})") from exc
    return str(out)


def rows_from_frame(df, scratch: Path) -> list[dict[str, Any]]:
    """Records-table-like rows from a pyfunc input frame (columns image, question_choice)."""
    missing = {"image", "question_choice"} - set(df.columns)
    if missing:
        raise ValueError(f"input frame lacks column(s) {sorted(missing)}; needs image and question_choice")
    rows = []
    for i, rec in enumerate(df.to_dict("records")):
        question, options = parse_question_choice(rec["question_choice"])
        path = _image_to_path(rec["image"], scratch, i)
        rows.append(
            {
                "record_id": str(rec.get("record_id", f"input-{i}")),
                "image": path,
                "image_path": path,
                "question": question,
                "question_choice": rec["question_choice"],
                "options": options,
                "answer_letter": "",
                "answer_text": "",
                "subset_no": rec.get("subset_no"),
            }
        )
    return rows


class _MedmatPyfuncMethods:
    """pyfunc wrapper: the artifact `model` is a directory that `medmat.models.load` reads.

    predict(DataFrame[image, question_choice]) -> list of answer letters. `params={"scorer": "generate"}`
    uses greedy generation + the letter parser instead of option likelihood (the default).
    """

    def load_context(self, context) -> None:
        from medmat import models

        self.backend = models.load(context.artifacts["model"])

    def predict(self, context, model_input, params=None):
        import pandas as pd

        from medmat.evaluate import predict_letters

        if not isinstance(model_input, pd.DataFrame):
            model_input = pd.DataFrame(model_input)
        scorer = (params or {}).get("scorer", "likelihood")
        with tempfile.TemporaryDirectory(prefix="medmat-pyfunc-") as tmp:
            rows = rows_from_frame(model_input, Path(tmp))
            letters, _raw = predict_letters(self.backend, rows, scorer=scorer)
        return [letter or "" for letter in letters]


def _subclass_quietly(name: str, bases: tuple, doc: str | None):
    """type(name, bases) with MLflow's class-creation warning ("add type hints to predict") dropped.

    PythonModel.__init_subclass__ forces that warning through a `once` filter of its own, so an
    ordinary warnings filter cannot silence it; the explicit signature in log_model does the job
    type hints would do (and type hints would switch on MLflow's own input coercion).
    """
    shown = warnings.showwarning
    warnings.showwarning = lambda *a, **k: None
    try:
        return type(name, bases, {"__module__": __name__, "__qualname__": name, "__doc__": doc})
    finally:
        warnings.showwarning = shown


# Pickled by reference (medmat.tracking.MedmatPyfunc): loading needs medmat installed, as serving does.
MedmatPyfunc = _subclass_quietly(
    "MedmatPyfunc", (_MedmatPyfuncMethods, _pyfunc_base()), _MedmatPyfuncMethods.__doc__
)


def _example_png() -> str:
    from PIL import Image

    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (90, 90, 90)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _signature():
    from mlflow.models import ModelSignature
    from mlflow.types.schema import ColSpec, ParamSchema, ParamSpec, Schema

    return ModelSignature(
        inputs=Schema([ColSpec("string", "image"), ColSpec("string", "question_choice")]),
        outputs=Schema([ColSpec("string")]),
        params=ParamSchema([ParamSpec("scorer", "string", "likelihood")]),
    )


def _pip_requirements() -> list[str]:
    # Explicit, so MLflow skips its slow dependency inference (it imports the model to trace imports).
    # `medmat` itself is not on an index: serve from an environment where it is installed.
    from importlib.metadata import PackageNotFoundError, version

    reqs = []
    for pkg in ("mlflow", "torch", "pandas", "pillow"):
        try:
            reqs.append(f"{pkg}=={version(pkg)}")
        except PackageNotFoundError:
            reqs.append(pkg)
    return reqs


def log_model(
    model_dir: str | os.PathLike,
    artifact_path: str = "model",
    registered_model_name: str | None = None,
    input_example: bool | None = None,
) -> str:
    """Log the saved model directory as a pyfunc model in the active run; return its model URI.

    For `hf` the directory holds the base checkpoint reference + adapter (what the backend saves), so
    the logged artifact stays small and loading reads the base checkpoint from its local path.

    `input_example`: MLflow validates an input example by loading the logged model and predicting on
    it — a real check for `tiny` (~0.35 s), but a second load of a multi-GB checkpoint for `hf`. None
    (default) = on for tiny, off otherwise; the signature is always logged.
    """
    import mlflow
    import pandas as pd

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise FileNotFoundError(f"{model_dir}: model directory not found (expected a backend's save())")
    if input_example is None:
        from medmat.models import read_backend_file

        try:
            backend = read_backend_file(model_dir).get("backend")
        except (OSError, ValueError):
            backend = None
        input_example = backend == "tiny"
    example = None
    if input_example:
        example = pd.DataFrame(
            {
                "image": [_example_png()],
                "question_choice": [
                    "What disease is shown in this image?\nA: Normal\nB: Cancer\n"
                    "Answer with the option's letter from the given choices directly."
                ],
            }
        )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        info = mlflow.pyfunc.log_model(
            name=artifact_path,
            python_model=MedmatPyfunc(),
            artifacts={"model": str(model_dir)},
            signature=_signature(),
            input_example=example,
            pip_requirements=_pip_requirements(),
            registered_model_name=registered_model_name,
        )
    return info.model_uri


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

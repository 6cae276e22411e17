"""The MLflow model registry: one registered model per target, a version per evaluated run, `champion`.

    medmat register --runs work/runs [--target 3] [--params params.yaml]

Each evaluated run directory (`metrics.json` + `mlflow_run_id`, its MLflow run holding a logged model)
adds a version of the target's registered model (named from the triplet: "medmat-CT-Lung-COVID"),
tagged with the triplet, arm or mixture, data version, git commit and target test accuracy with its CI.
The alias `champion` moves to a new version only when it beats the current champion's target test
accuracy (strictly): it never moves backwards. The run id is the key: registering a run again adds
nothing, so the stage can run after every `dvc repro`.

    mlflow.pyfunc.load_model("models:/medmat-CT-Lung-COVID@champion").predict(df[image, question_choice])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
from pathlib import Path

log = logging.getLogger(__name__)

TAG = "medmat."
ACC_TAG = TAG + "test_accuracy"


class RegistryError(ValueError):
    """A run that cannot be registered; the message names the run directory and what is missing."""


class NoModel(RegistryError):
    """The run holds no logged model to register."""


@dataclasses.dataclass
class RegisterConfig:
    """`register:` section of params.yaml."""

    alias: str = "champion"
    name_prefix: str = "medmat"
    metric: str = "accuracy"        # key of metrics.json compared for the alias (target test split)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.alias) or self.alias.lower().startswith("v"):
            # MLflow reserves aliases that look like versions ("v1", "latest").
            raise ValueError(f"alias {self.alias!r}: letters, digits, _ and -, not starting with 'v'")


@dataclasses.dataclass
class RunInfo:
    run_dir: Path
    run_id: str
    accuracy: float
    ci95: tuple[float, float] | None
    n: int | None
    triplet: str
    arm: str
    mixture: dict[str, int]
    tags: dict[str, str]


@dataclasses.dataclass
class Outcome:
    run_dir: str
    run_id: str
    name: str
    version: str
    created: bool          # a new version was added (False: the run was registered before)
    champion: bool         # this version holds the alias after the call
    moved: bool            # the alias moved to it in this call


def model_name(triplet: str, prefix: str = "medmat") -> str:
    """A readable registry name from the triplet: "medmat-CT-Lung-COVID" (odd characters -> '_')."""
    clean = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(triplet)).strip("_")
    if not clean:
        raise RegistryError(f"cannot build a model name from triplet {triplet!r}")
    return f"{prefix}-{clean}"


def canonical_triplet(target: str) -> str:
    """"03", "3" or "CT-Lung-COVID" -> "CT-Lung-COVID": runs tagged with the subset label and runs
    tagged with the triplet belong to the same registered model."""
    try:
        from medmat.catalog import parse_target

        return str(parse_target(str(target))[0])
    except Exception:  # not a catalogue target (a custom world): the tag as written
        return str(target)


def find_run_dirs(runs_root: Path, target: str | None = None) -> list[Path]:
    """Evaluated run dirs under `runs_root` (metrics.json + mlflow_run_id), sorted for a stable order.

    With `target` (the folder label, e.g. "03"), only `runs_root/<target>/...`."""
    root = runs_root / target if target and (runs_root / target).is_dir() else runs_root
    if target and root == runs_root and runs_root.is_dir():
        return []
    dirs = {p.parent for p in root.rglob("metrics.json") if (p.parent / "mlflow_run_id").is_file()}
    return sorted(dirs)


def read_run(run_dir: Path, client, metric: str = "accuracy") -> RunInfo:
    """What the registry needs about one run dir: metrics.json, the MLflow run's tags, the mixture."""
    metrics_path = run_dir / "metrics.json"
    try:
        metrics = json.loads(metrics_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{metrics_path}: cannot read ({exc})") from exc
    if not isinstance(metrics.get(metric), (int, float)):
        raise RegistryError(f"{metrics_path}: no numeric {metric!r} (target test accuracy) in it")
    run_id = (run_dir / "mlflow_run_id").read_text(encoding="utf-8").strip()
    if not run_id:
        raise RegistryError(f"{run_dir / 'mlflow_run_id'}: empty")
    try:
        run = client.get_run(run_id)
    except Exception as exc:  # MlflowException: unknown run (another tracking store?)
        raise RegistryError(f"{run_dir}: MLflow run {run_id} not found in {client.tracking_uri} ({exc})") from exc
    tags = dict(run.data.tags)
    raw = tags.get(TAG + "target") or metrics.get("triplet") or metrics.get("target")
    if not raw:
        raise RegistryError(f"{run_dir}: run {run_id} has no '{TAG}target' tag and metrics.json no triplet")
    triplet = canonical_triplet(raw)
    mixture: dict[str, int] = {}
    manifest_path = run_dir / "manifest.json"
    if manifest_path.is_file():
        try:
            comps = json.loads(manifest_path.read_text(encoding="utf-8")).get("components") or {}
            mixture = {str(k): int(v.get("selected", v.get("requested", 0)) if isinstance(v, dict) else v)
                       for k, v in comps.items()}
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
            raise RegistryError(f"{manifest_path}: not a mixture manifest ({exc})") from exc
    ci = metrics.get("ci95")
    return RunInfo(
        run_dir=run_dir, run_id=run_id, accuracy=float(metrics[metric]),
        ci95=(float(ci[0]), float(ci[1])) if isinstance(ci, (list, tuple)) and len(ci) == 2 else None,
        n=metrics.get("n"), triplet=str(triplet), arm=tags.get(TAG + "arm", run_dir.parent.name),
        mixture=mixture, tags=tags,
    )


def model_source(client, run_id: str) -> tuple[str, str | None]:
    """(source URI, logged model id) of the model logged in run `run_id` (the last one if several)."""
    run = client.get_run(run_id)
    outputs = getattr(run, "outputs", None)
    model_outputs = list(getattr(outputs, "model_outputs", None) or [])
    if model_outputs:
        latest = max(model_outputs, key=lambda m: m.step)
        return f"models:/{latest.model_id}", latest.model_id
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if found:
        return f"models:/{found[-1].model_id}", found[-1].model_id
    raise NoModel(f"MLflow run {run_id} has no logged model (train with tracking on: log_model)")


def _ensure_registered_model(client, name: str, triplet: str) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(
            name, tags={TAG + "target": triplet},
            description=f"MedMAT-CG models for target {triplet}. Versions are evaluated runs; alias "
                        "`champion` = the best target test accuracy so far.")
    except MlflowException:
        client.get_registered_model(name)  # created concurrently by another process: fine


def _champion(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _version_tags(info: RunInfo) -> dict[str, str]:
    tags = {
        TAG + "target": info.triplet,
        TAG + "arm": info.arm,
        TAG + "run_dir": info.run_dir.as_posix(),
        ACC_TAG: repr(info.accuracy),
        TAG + "data_version": info.tags.get(TAG + "data_version", "unknown"),
        TAG + "git_commit": info.tags.get(TAG + "git_commit", "unknown"),
    }
    if info.ci95:
        tags[TAG + "test_ci95"] = f"[{info.ci95[0]:.4f}, {info.ci95[1]:.4f}]"
    if info.n is not None:
        tags[TAG + "test_n"] = str(info.n)
    if info.mixture:
        tags[TAG + "mixture"] = json.dumps(info.mixture, sort_keys=True)
    for key in ("seed", "backend"):
        if TAG + key in info.tags:
            tags[TAG + key] = info.tags[TAG + key]
    return tags


def _description(info: RunInfo) -> str:
    ci = f" (95% CI {info.ci95[0]:.3f}-{info.ci95[1]:.3f})" if info.ci95 else ""
    mix = ", ".join(f"{k}: {v}" for k, v in sorted(info.mixture.items())) or "no training data"
    return (f"Arm '{info.arm}' for target {info.triplet}: target test accuracy {info.accuracy:.4f}{ci} "
            f"on {info.n} samples. Mixture (subset: samples): {mix}. Run {info.run_id}.")


def register_run(client, info: RunInfo, cfg: RegisterConfig | None = None, name: str | None = None) -> Outcome:
    """Add `info`'s run as a version (once per run id) and apply the champion rule."""
    cfg = cfg or RegisterConfig()
    name = name or model_name(info.triplet, cfg.name_prefix)
    _ensure_registered_model(client, name, info.triplet)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{info.run_id}'")
    created = False
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
    else:
        source, model_id = model_source(client, info.run_id)
        mv = client.create_model_version(name, source=source, run_id=info.run_id, tags=_version_tags(info),
                                         description=_description(info), model_id=model_id)
        created = True
    champion = _champion(client, name, cfg.alias)
    moved = False
    if champion is None or (str(champion.version) != str(mv.version) and info.accuracy > _accuracy_of(champion)):
        client.set_registered_model_alias(name, cfg.alias, mv.version)
        moved = True
        champion = mv
    return Outcome(run_dir=info.run_dir.as_posix(), run_id=info.run_id, name=name, version=str(mv.version),
                   created=created, champion=str(champion.version) == str(mv.version), moved=moved)


def _accuracy_of(version) -> float:
    try:
        return float(version.tags[ACC_TAG])
    except (KeyError, ValueError):
        # A version registered by hand without our tag can never be judged better or worse: keep it
        # from blocking the rule by treating it as the lowest possible score.
        return float("-inf")


def register_runs(runs_root: Path, target: str | None = None, cfg: RegisterConfig | None = None,
                  client=None) -> list[Outcome]:
    import mlflow

    cfg = cfg or RegisterConfig()
    client = client or mlflow.MlflowClient()
    dirs = find_run_dirs(runs_root, target)
    outcomes = []
    for d in dirs:
        info = read_run(d, client, cfg.metric)
        try:
            outcomes.append(register_run(client, info, cfg))
        except NoModel as exc:
            # An evaluated run without a logged model (tracking was off when it trained) cannot be a
            # version; it must not block the other runs either.
            log.warning("%s: skipped: %s", d, exc)
    return outcomes


# --------------------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=Path, required=True, help="run directories root (work/runs)")
    parser.add_argument("--target", default=None, help="only this target (subset number or triplet)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="write a JSON summary of what was registered")


def _target_label(text: str) -> str:
    try:
        from medmat.designs import target_label

        return target_label(text)
    except Exception:  # not a catalogue target: use it as the folder name as given
        return str(text)


def run(args: argparse.Namespace) -> int:
    from medmat import tracking
    from medmat.config import ConfigError, from_dict, load_params

    try:
        params = load_params(args.params) if args.params.exists() else {}
        cfg = from_dict(RegisterConfig, params.get("register"), where=f"{args.params}: section 'register'")
        track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{args.params}: tracking")
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    if not args.runs.is_dir():
        log.error("%s: runs folder not found (train and evaluate first)", args.runs)
        return 2
    import mlflow

    tracking.setup(track_cfg)
    target = _target_label(args.target) if args.target else None
    try:
        outcomes = register_runs(args.runs, target, cfg, mlflow.MlflowClient())
    except RegistryError as exc:
        log.error("%s", exc)
        return 2
    for o in outcomes:
        log.info("%s v%s <- %s%s%s", o.name, o.version, o.run_dir, "" if o.created else " (already registered)",
                 f" [{cfg.alias}]" if o.moved else "")
    if args.out:
        from medmat.search import _atomic_write

        _atomic_write(args.out, json.dumps([dataclasses.asdict(o) for o in outcomes], indent=1) + "\n")
    if not outcomes:
        log.warning("%s: no evaluated run directories (metrics.json + mlflow_run_id)%s", args.runs,
                    f" for target {target}" if target else "")
    return 0

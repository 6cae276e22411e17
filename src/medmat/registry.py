"""The MLflow model registry holds the best compositional-generalisation (CG) model of each target.

    medmat register --runs work/runs [--target 3] [--params params.yaml] [--out work/registry.json]

Candidates are the runs whose `metrics.json` says `candidate: true` — the Related arm of a Table-3
combination and the search's best mixture. Baselines, Baseline+, scale-up, limited-target and
in-distribution arms never are, and neither is any run that trained on the target's own data
(`trained_on_target`), whatever else it claims: a model that saw the target is not evidence of CG.

One registered model per (world, backend, target), named `medmat-<world>-<backend>-<triplet>`, e.g.
`medmat-mini-tiny-CT-Lung-COVID` or, for the real Med-MAT release (world "medmat"),
`medmat-real-hf-CT-Lung-COVID`: a champion of the synthetic Med-MAT-mini world or of the CPU backend
never competes with, nor blocks, a real-data model.

One version per candidate ARM (all its seeds together): the seed with the best dev accuracy is the
version's model; the arm is judged by its MEAN dev accuracy over seeds (target dev split, never the
test split: test accuracy is written on the version as a tag, and never read to choose). The alias
`champion` moves to a version only when its arm's mean dev accuracy is strictly higher than the
current champion's: it never moves backwards. The chosen run id is the key: registering the same runs
again adds nothing, so the stage can run after every `dvc repro`.

    mlflow.pyfunc.load_model("models:/medmat-mini-tiny-CT-Lung-COVID@champion").predict(df[image, question_choice])
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import re
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

TAG = "medmat."
SCORE_TAG = TAG + "mean_dev_accuracy"   # what the champion rule compares
WORLD_NAMES = {"medmat": "real"}         # world as written in model names (the release is "real" data)
# Arm paths that train on the target's own records: never candidates, even if a file says otherwise.
TARGET_DATA_ARMS = ("in_distribution", "limited", "scaleup/all_data")


class RegistryError(ValueError):
    """A run that cannot be registered; the message names the run directory and what is missing."""


class NoModel(RegistryError):
    """The run holds no logged model to register."""


@dataclasses.dataclass
class RegisterConfig:
    """`register:` section of params.yaml."""

    alias: str = "champion"
    name_prefix: str = "medmat"
    metric: str = "dev_accuracy"    # metrics.json key that chooses (a dev-split key: never the test split)

    def __post_init__(self) -> None:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_-]*", self.alias) or self.alias.lower().startswith("v"):
            # MLflow reserves aliases that look like versions ("v1", "latest").
            raise ValueError(f"alias {self.alias!r}: letters, digits, _ and -, not starting with 'v'")
        if not self.metric.startswith("dev_"):
            raise ValueError(f"metric {self.metric!r}: the champion is chosen on the dev split (a 'dev_' key of "
                             "metrics.json such as dev_accuracy), never on the test split")


@dataclasses.dataclass
class SeedRun:
    """One evaluated seed of a candidate arm (from its run dir's metrics.json)."""

    run_dir: Path
    run_id: str
    seed: int
    dev: float
    test: float | None
    metrics: dict[str, Any]


@dataclasses.dataclass
class Arm:
    """A candidate arm of one (world, backend, target): its seeds, judged together."""

    world: str
    backend: str
    target: str
    triplet: str
    arm: str
    seeds: list[SeedRun]

    @property
    def mean_dev(self) -> float:
        return statistics.fmean(s.dev for s in self.seeds)

    @property
    def best(self) -> SeedRun:
        """The seed whose model is registered: best dev accuracy (ties: the lowest seed)."""
        return min(self.seeds, key=lambda s: (-s.dev, s.seed))


@dataclasses.dataclass
class Outcome:
    name: str
    arm: str
    run_dir: str
    run_id: str
    version: str
    mean_dev_accuracy: float
    seeds: int
    created: bool          # a new version was added (False: this arm's chosen run was registered before)
    champion: bool         # this version holds the alias after the call
    moved: bool            # the alias moved to it in this call


def model_name(world: str, backend: str, triplet: str, prefix: str = "medmat") -> str:
    """`medmat-mini-tiny-CT-Lung-COVID` (odd characters -> '_')."""
    parts = [WORLD_NAMES.get(world, world), backend, triplet]
    clean = [re.sub(r"[^A-Za-z0-9_.-]+", "_", str(p)).strip("_") for p in parts]
    if not all(clean):
        raise RegistryError(f"cannot build a model name from world {world!r}, backend {backend!r}, "
                            f"triplet {triplet!r}")
    return "-".join([prefix, *clean])


def _norm_target(value: Any) -> str:
    from medmat.names import norm_target, subset_key

    return norm_target(value)


def trained_on_target(metrics: dict[str, Any]) -> bool:
    arm = str(metrics.get("arm", ""))
    return bool(metrics.get("trained_on_target")) or any(arm == a or arm.startswith(a + "/") for a in TARGET_DATA_ARMS)


def read_seed(run_dir: Path, metric: str = "dev_accuracy") -> tuple[dict[str, Any], SeedRun | None]:
    """(metrics.json, the seed as a candidate or None when the run is no candidate)."""
    path = run_dir / "metrics.json"
    try:
        metrics = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise RegistryError(f"{path}: cannot read ({exc})") from exc
    if not isinstance(metrics, dict):
        raise RegistryError(f"{path}: not a JSON object")
    if metrics.get("candidate") is not True:
        return metrics, None
    if trained_on_target(metrics):
        log.warning("%s: says candidate but trained on the target's data (arm %s): never a CG champion",
                    run_dir, metrics.get("arm"))
        return metrics, None
    missing = [k for k in ("world", "backend", "target", "arm", "seed") if metrics.get(k) in (None, "")]
    if missing:
        raise RegistryError(f"{path}: candidate run without {missing} (evaluate it again)")
    if not isinstance(metrics.get(metric), (int, float)) or isinstance(metrics.get(metric), bool):
        log.warning("%s: candidate without a numeric %r (no dev split?): cannot be judged, skipped", path, metric)
        return metrics, None
    run_id = (run_dir / "mlflow_run_id").read_text(encoding="utf-8").strip()
    if not run_id:
        raise RegistryError(f"{run_dir / 'mlflow_run_id'}: empty")
    test = metrics.get("accuracy")
    return metrics, SeedRun(run_dir=run_dir, run_id=run_id, seed=int(metrics["seed"]), dev=float(metrics[metric]),
                            test=float(test) if isinstance(test, (int, float)) else None, metrics=metrics)


def find_run_dirs(runs_root: Path) -> list[Path]:
    """Evaluated run dirs under `runs_root` (metrics.json + mlflow_run_id), sorted for a stable order."""
    return sorted({p.parent for p in runs_root.rglob("metrics.json") if (p.parent / "mlflow_run_id").is_file()})


def candidate_arms(runs_root: Path, target: str | None = None, metric: str = "dev_accuracy") -> list[Arm]:
    """The candidate arms under `runs_root` (of `target` only, if given), best mean dev first."""
    groups: dict[tuple[str, str, str, str], list[SeedRun]] = defaultdict(list)
    triplets: dict[tuple[str, str, str, str], str] = {}
    want = _norm_target(target) if target else None
    for d in find_run_dirs(runs_root):
        metrics, seed = read_seed(d, metric)
        if seed is None or (want and _norm_target(metrics["target"]) != want):
            continue
        k = (str(metrics["world"]), str(metrics["backend"]), _norm_target(metrics["target"]), str(metrics["arm"]))
        groups[k].append(seed)
        triplets[k] = str(metrics.get("triplet") or metrics["target"])
    arms = [Arm(world=w, backend=b, target=t, triplet=triplets[(w, b, t, a)], arm=a, seeds=s)
            for (w, b, t, a), s in groups.items()]
    for arm in arms:
        seeds = [s.seed for s in arm.seeds]
        if len(set(seeds)) != len(seeds):
            raise RegistryError(f"arm {arm.arm} of target {arm.target} ({arm.world}, {arm.backend}): seed given twice "
                                f"in {sorted(str(s.run_dir) for s in arm.seeds)}")
    return sorted(arms, key=lambda a: (a.world, a.backend, a.target, -a.mean_dev, a.arm))


def model_source(client, run_id: str) -> tuple[str, str | None]:
    """(source URI, logged model id) of the model logged in run `run_id` (the last one if several)."""
    run = client.get_run(run_id)
    model_outputs = list(getattr(getattr(run, "outputs", None), "model_outputs", None) or [])
    if model_outputs:
        latest = max(model_outputs, key=lambda m: m.step)
        return f"models:/{latest.model_id}", latest.model_id
    found = client.search_logged_models([run.info.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    if found:
        return f"models:/{found[-1].model_id}", found[-1].model_id
    raise NoModel(f"MLflow run {run_id} has no logged model (train with tracking on: log_model)")


def _ensure_registered_model(client, name: str, arm: Arm) -> None:
    from mlflow.exceptions import MlflowException

    try:
        client.get_registered_model(name)
        return
    except MlflowException:
        pass
    try:
        client.create_registered_model(
            name, tags={TAG + "target": arm.triplet, TAG + "world": arm.world, TAG + "backend": arm.backend},
            description=f"MedMAT-CG models for target {arm.triplet} (world {arm.world}, backend {arm.backend}). "
                        "Versions are candidate arms (Related combinations, the search's best mixture), each its "
                        "best-dev seed; alias `champion` = the best mean dev accuracy so far.")
    except MlflowException:
        client.get_registered_model(name)  # created concurrently by another process: fine


def _version_tags(arm: Arm, run_tags: dict[str, str]) -> dict[str, str]:
    best = arm.best
    tests = [s.test for s in arm.seeds if s.test is not None]
    tags = {
        TAG + "target": arm.triplet, TAG + "target_no": arm.target, TAG + "world": arm.world,
        TAG + "backend": arm.backend, TAG + "arm": arm.arm, TAG + "seed": str(best.seed),
        TAG + "seeds": ",".join(str(s.seed) for s in sorted(arm.seeds, key=lambda s: s.seed)),
        SCORE_TAG: repr(arm.mean_dev), TAG + "dev_accuracy": repr(best.dev),
        TAG + "run_dir": best.run_dir.as_posix(),
        TAG + "data_version": str(best.metrics.get("data_version") or run_tags.get(TAG + "data_version", "unknown")),
        TAG + "git_commit": run_tags.get(TAG + "git_commit", "unknown"),
    }
    # Test accuracy is reported, never compared: the seed's own and the arm's mean.
    if best.test is not None:
        tags[TAG + "test_accuracy"] = repr(best.test)
    if tests:
        tags[TAG + "mean_test_accuracy"] = repr(statistics.fmean(tests))
    ci = best.metrics.get("ci95")
    if isinstance(ci, (list, tuple)) and len(ci) == 2:
        tags[TAG + "test_ci95"] = f"[{float(ci[0]):.4f}, {float(ci[1]):.4f}]"
    if best.metrics.get("combination"):
        tags[TAG + "combination"] = str(best.metrics["combination"])
    mixture = _mixture(best.run_dir)
    if mixture:
        tags[TAG + "mixture"] = json.dumps(mixture, sort_keys=True)
    return tags


def _mixture(run_dir: Path) -> dict[str, int]:
    """{subset: selected} from the run dir's manifest.json, or from the manifest metrics.json names."""
    for path in (run_dir / "manifest.json", run_dir.parent / "manifest.json"):
        if path.is_file():
            try:
                comps = json.loads(path.read_text(encoding="utf-8")).get("components") or {}
                return {str(k): int(v.get("selected", v.get("requested", 0)) if isinstance(v, dict) else v)
                        for k, v in comps.items()}
            except (json.JSONDecodeError, AttributeError, TypeError, ValueError) as exc:
                raise RegistryError(f"{path}: not a mixture manifest ({exc})") from exc
    return {}


def _score(version) -> float:
    try:
        return float(version.tags[SCORE_TAG])
    except (KeyError, ValueError):
        # A version registered by hand without our tag can never be judged better or worse: keep it
        # from blocking the rule by treating it as the lowest possible score.
        return float("-inf")


def register_arm(client, arm: Arm, cfg: RegisterConfig | None = None) -> Outcome:
    """Add `arm`'s best-dev seed as a version (once per run id) and apply the champion rule."""
    from mlflow.exceptions import MlflowException

    cfg = cfg or RegisterConfig()
    name = model_name(arm.world, arm.backend, arm.triplet, cfg.name_prefix)
    best = arm.best
    _ensure_registered_model(client, name, arm)
    existing = client.search_model_versions(f"name = '{name}' and run_id = '{best.run_id}'")
    created = False
    if existing:
        mv = max(existing, key=lambda v: int(v.version))
    else:
        try:
            run_tags = dict(client.get_run(best.run_id).data.tags)
        except MlflowException as exc:
            raise RegistryError(f"{best.run_dir}: MLflow run {best.run_id} not found in {client.tracking_uri} "
                                f"({exc})") from exc
        source, model_id = model_source(client, best.run_id)
        mv = client.create_model_version(
            name, source=source, run_id=best.run_id, tags=_version_tags(arm, run_tags), model_id=model_id,
            description=(f"Arm '{arm.arm}' for target {arm.triplet} ({arm.world}, {arm.backend}): mean dev accuracy "
                         f"{arm.mean_dev:.4f} over {len(arm.seeds)} seed(s); this is seed {best.seed} (dev "
                         f"{best.dev:.4f}). Run {best.run_id}."))
        created = True
    try:
        champion = client.get_model_version_by_alias(name, cfg.alias)
    except MlflowException:
        champion = None
    moved = False
    if champion is None or (str(champion.version) != str(mv.version) and _score(mv) > _score(champion)):
        client.set_registered_model_alias(name, cfg.alias, mv.version)
        champion, moved = mv, True
    return Outcome(name=name, arm=arm.arm, run_dir=best.run_dir.as_posix(), run_id=best.run_id,
                   version=str(mv.version), mean_dev_accuracy=arm.mean_dev, seeds=len(arm.seeds), created=created,
                   champion=str(champion.version) == str(mv.version), moved=moved)


def register_runs(runs_root: Path, target: str | None = None, cfg: RegisterConfig | None = None,
                  client=None) -> list[Outcome]:
    import mlflow

    cfg = cfg or RegisterConfig()
    client = client or mlflow.MlflowClient()
    outcomes = []
    for arm in candidate_arms(runs_root, target, cfg.metric):
        try:
            outcomes.append(register_arm(client, arm, cfg))
        except NoModel as exc:
            # A candidate evaluated without a logged model (tracking was off when it trained) cannot be a
            # version; it must not block the other arms either.
            log.warning("%s: skipped: %s", arm.best.run_dir, exc)
    return outcomes


# --------------------------------------------------------------------------------------------- CLI


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", type=Path, action="append", required=True,
                        help="run directories root (work/runs); repeat for several (work/best_runs)")
    parser.add_argument("--target", default=None, help="only this target (subset number or triplet)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"))
    parser.add_argument("--out", type=Path, default=None, help="write a JSON summary of what was registered")


def _target_label(text: str) -> str:
    """"3", "03" or "CT-Lung-COVID" -> "03" (as metrics.json names targets); a triplet naming no
    catalogue subset stays as written."""
    from medmat.names import norm_target, subset_key

    try:
        from medmat.catalog import parse_target

        _, no = parse_target(text)
        return subset_key(no) if no is not None else norm_target(text)
    except (LookupError, ValueError):
        return norm_target(text)


def run(args: argparse.Namespace) -> int:
    from medmat import tracking
    from medmat.config import ConfigError, from_dict, load_params
    from medmat.io import atomic_write_json

    try:
        params = load_params(args.params) if args.params.exists() else {}
        cfg = from_dict(RegisterConfig, params.get("register"), where=f"{args.params}: section 'register'")
        track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{args.params}: tracking")
    except ConfigError as exc:
        log.error("%s", exc)
        return 2
    missing = [str(r) for r in args.runs if not r.is_dir()]
    if missing:
        log.error("%s: runs folder not found (train and evaluate first)", ", ".join(missing))
        return 2
    import mlflow

    tracking.setup(track_cfg)
    target = _target_label(args.target) if args.target else None
    client = mlflow.MlflowClient(tracking.effective_uri(track_cfg))
    try:
        outcomes = [o for root in args.runs for o in register_runs(root, target, cfg, client)]
    except RegistryError as exc:
        log.error("%s", exc)
        return 2
    for o in outcomes:
        log.info("%s v%s <- %s (mean dev %.4f over %d seeds)%s%s", o.name, o.version, o.run_dir, o.mean_dev_accuracy,
                 o.seeds, "" if o.created else " (already registered)", f" [{cfg.alias}]" if o.moved else "")
    if args.out:
        # a DVC output: the state of the registry, reproducible. The MLflow run id (random per run)
        # stays in MLflow; what this call did (created, moved) is in the log, since a rerun that
        # finds everything registered must write the same file as the run that registered it.
        volatile = ("run_id", "created", "moved")
        atomic_write_json(args.out, [{k: v for k, v in dataclasses.asdict(o).items() if k not in volatile}
                                     for o in outcomes], indent=1)
    if not outcomes:
        log.warning("%s: no candidate arms (metrics.json with candidate: true and a dev accuracy)%s",
                    ", ".join(map(str, args.runs)),
                    f" for target {target}" if target else "")
    return 0

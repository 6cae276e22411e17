"""Optuna search for the training mixture that serves a target best.

One study per target, kept in a file under `mlruns/` (SQLite by default, so `optuna-dashboard
sqlite:///mlruns/optuna.db` opens it). The search space is *which* candidate subsets enter and *how
many* samples each, under a total budget; the objective is accuracy on the target's dev split (disjoint
from the test split the report uses). The paper's Related mixtures and All Related are enqueued as the
first trials, so the search starts from what the MAT structure already suggests.

Resumability, exactly: the trial budget counts finished (COMPLETE, PRUNED) plus live RUNNING trials,
and every `ask` happens under a file lock next to the storage, so N workers never overshoot it. Each
trial records its owner (host, pid, process start time); a RUNNING trial whose owner is gone (kill -9)
is marked FAIL on the next start and its mixture re-enqueued once, so a killed search resumed by name
ends with the same number of finished trials as an uninterrupted one — none lost, none run twice.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import dataclasses
import fcntl
import hashlib
import io
import json
import logging
import math
import os
import socket
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

from medmat.io import atomic_write_text

import optuna
from optuna.trial import FrozenTrial, Trial, TrialState

log = logging.getLogger(__name__)

DEFAULT_STORAGE = "sqlite:///mlruns/optuna.db"
# user_attrs keys (visible in optuna-dashboard)
OWNER = "owner"              # host:pid:start-time of the process running the trial
MIXTURE = "mixture"          # the effective mixture (after the budget) as {subset: samples}
SOURCE = "source"            # "warm:<arm>", "sampler", "retry:<trial number>"
WARM = "warm_start"          # arm name of a warm-start trial (idempotency key for enqueueing)
RETRY_OF = "retry_of"        # number of the killed trial this one replaces
DESIGN = "design_mixture"    # a warm-start trial's exact mixture (the params are its grid approximation)
MLFLOW_RUN = "mlflow_run_id"
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


class SearchError(ValueError):
    """A search that cannot run as configured; the message names the file or setting."""


@dataclasses.dataclass
class SearchConfig:
    """`search:` section of params.yaml."""

    storage: str = DEFAULT_STORAGE
    n_trials: int = 10               # finished trials per study (a resumed search runs only the rest)
    workers: int = 1                 # processes sharing the study
    seed: int = 0                    # sampler seed (worker k uses seed + k: identical seeds would collide)
    sampler: str = "tpe"             # tpe | random (random is the benchmark's baseline)
    warm_start: bool = True          # enqueue the designs' Related mixtures and All Related first
    candidates: Any = "related"      # "related" (share >= 1 element, target excluded) or a list of subsets
    total_budget: int = 0            # total training samples; 0 = the largest warm-start mixture's total
    max_per_subset: int = 3000       # paper's cap per subset
    step: int = 50                   # sample-count grid
    pruner_startup_trials: int = 3   # MedianPruner: no pruning before this many finished trials
    pruner_warmup_steps: int = 0     # ... nor before this training step within a trial
    train: dict = dataclasses.field(default_factory=dict)  # overrides of the `train:` section for trials
    study_prefix: str = "medmat-search"

    def __post_init__(self) -> None:
        if self.n_trials < 1:
            raise ValueError("n_trials must be >= 1")
        if self.workers < 1:
            raise ValueError("workers must be >= 1")
        if self.sampler not in ("tpe", "random"):
            raise ValueError(f"sampler must be 'tpe' or 'random', got {self.sampler!r}")
        if self.step < 1 or self.max_per_subset < 1 or self.total_budget < 0:
            raise ValueError("step and max_per_subset must be >= 1, total_budget >= 0")
        if not (self.candidates == "related" or isinstance(self.candidates, (list, tuple))):
            raise ValueError("candidates must be 'related' or a list of subset numbers")


# ------------------------------------------------------------------------------------ search space


def _key(subset: Any) -> str:
    from medmat.mixture import subset_key

    return subset_key(subset)


@dataclasses.dataclass(frozen=True)
class MixtureSpace:
    """Which candidates enter (`use_<subset>`) and how many samples each (`n_<subset>`), scaled down
    proportionally when the total exceeds `budget`. Conditional: `n_<s>` exists only when `use_<s>`."""

    limits: Mapping[str, int]   # subset -> most samples it can give (cap, and what the records hold)
    budget: int
    step: int = 50

    def __post_init__(self) -> None:
        if not self.limits:
            raise SearchError("the search space has no candidate subsets (none with training records?)")
        if self.budget < 1:
            raise SearchError(f"total budget must be >= 1, got {self.budget}")

    def bounds(self, subset: str) -> tuple[int, int, int]:
        hi = int(self.limits[subset])
        step = min(self.step, hi)
        low = step
        high = low + ((hi - low) // step) * step
        return low, high, step

    def suggest(self, trial: Trial) -> dict[str, int]:
        chosen = {}
        for s in sorted(self.limits):
            if trial.suggest_categorical(f"use_{s}", [False, True]):
                low, high, step = self.bounds(s)
                chosen[s] = trial.suggest_int(f"n_{s}", low, high, step=step)
        return self.apply_budget(chosen)

    def apply_budget(self, mixture: Mapping[str, int]) -> dict[str, int]:
        total = sum(mixture.values())
        if total <= self.budget:
            return {s: int(n) for s, n in sorted(mixture.items()) if n > 0}
        scaled = {s: int(math.floor(n * self.budget / total)) for s, n in sorted(mixture.items())}
        return {s: n for s, n in scaled.items() if n > 0}

    def params_for(self, mixture: Mapping[str, int]) -> dict[str, Any]:
        """Trial params that reproduce `mixture` (as closely as the grid allows) — for enqueue_trial."""
        mixture = {_key(s): int(n) for s, n in mixture.items() if int(n) > 0}
        unknown = sorted(set(mixture) - set(self.limits))
        if unknown:
            raise SearchError(f"warm-start mixture uses subsets {unknown} outside the candidates")
        params: dict[str, Any] = {}
        for s in sorted(self.limits):
            params[f"use_{s}"] = s in mixture
            if s in mixture:
                low, high, step = self.bounds(s)
                n = low + round((min(max(mixture[s], low), high) - low) / step) * step
                params[f"n_{s}"] = int(min(n, high))
        return params


def mixture_of(trial: FrozenTrial) -> dict[str, int]:
    """The effective mixture a trial trained on (user attr), else rebuilt from its params."""
    if MIXTURE in trial.user_attrs:
        return {str(k): int(v) for k, v in trial.user_attrs[MIXTURE].items()}
    return {k[2:]: int(v) for k, v in trial.params.items() if k.startswith("n_") and trial.params.get("use_" + k[2:])}


# ----------------------------------------------------------------------------------------- storage


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


def open_storage(url: str) -> optuna.storages.BaseStorage:
    """SQLite (`sqlite:///path`), a journal file (`journal:path` or a path ending in .log), or any RDB URL.

    SQLite gets a long busy timeout: workers write small transactions, and the default 5 s can be
    exceeded while another process commits a trial."""
    path = _sqlite_path(url)
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.RDBStorage(url, engine_kwargs={"connect_args": {"timeout": 120}})
    if url.startswith("journal:") or url.endswith(".log"):
        from optuna.storages.journal import JournalFileBackend, JournalStorage

        jpath = Path(url[len("journal:"):] if url.startswith("journal:") else url)
        jpath.parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(str(jpath)))
    return optuna.storages.RDBStorage(url)


def lock_path(url: str, study_name: str) -> Path:
    local = _sqlite_path(url) or (Path(url[len("journal:"):]) if url.startswith("journal:") else None)
    if local is None and url.endswith(".log"):
        local = Path(url)
    if local is not None:
        return local.with_name(local.name + ".lock")
    digest = hashlib.sha256(f"{url}\n{study_name}".encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"medmat-optuna-{digest}.lock"


@contextlib.contextmanager
def study_lock(path: Path) -> Iterator[None]:
    """Exclusive lock between processes on this machine (workers of one search share a host)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def make_sampler(kind: str, seed: int) -> optuna.samplers.BaseSampler:
    if kind == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    # Warm-start trials count as startup trials: after them (and a few random ones) TPE takes over.
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=5)


def open_study(name: str, storage: str | optuna.storages.BaseStorage, sampler: str = "tpe", seed: int = 0,
               pruner_startup_trials: int = 3, pruner_warmup_steps: int = 0) -> optuna.Study:
    """Create or load (by name) the study; one sampler object per study object."""
    pruner = optuna.pruners.MedianPruner(n_startup_trials=pruner_startup_trials,
                                         n_warmup_steps=pruner_warmup_steps)
    # Under the study lock: two processes creating a fresh SQLite file at once race on its schema
    # ("table studies already exists") and on the study row.
    guard = study_lock(lock_path(storage, name)) if isinstance(storage, str) else contextlib.nullcontext()
    with guard:
        st = open_storage(storage) if isinstance(storage, str) else storage
        return optuna.create_study(study_name=name, storage=st, direction="maximize", load_if_exists=True,
                                   sampler=make_sampler(sampler, seed), pruner=pruner)


# --------------------------------------------------------------------------- owners and stale trials


def _start_time(pid: int) -> str:
    # Field 22 of /proc/<pid>/stat: start time in clock ticks since boot. With the pid it identifies a
    # process uniquely (a recycled pid gets another start time).
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_id(pid: int | None = None) -> str:
    pid = os.getpid() if pid is None else pid
    return f"{socket.gethostname()}:{pid}:{_start_time(pid)}"


def owner_alive(owner: str) -> bool | None:
    """True/False for an owner on this host; None when it ran elsewhere (cannot tell)."""
    try:
        host, pid_s, start = owner.rsplit(":", 2)
        pid = int(pid_s)
    except ValueError:
        return False
    if host != socket.gethostname():
        return None
    if start and Path("/proc").is_dir():
        return _start_time(pid) == start
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_stale(study: optuna.Study) -> list[int]:
    """Mark RUNNING trials of dead owners FAIL and re-enqueue their params once; return their numbers.

    Call under the study lock: our workers set the owner inside the same locked section as `ask`, so
    a RUNNING trial without an owner can only come from a process killed in between.
    """
    storage = study._storage  # noqa: SLF001 - Study exposes no public handle; BaseStorage API is public
    trials = study.get_trials(deepcopy=False)
    retried = {t.user_attrs.get(RETRY_OF) for t in trials}
    stale = []
    for t in trials:
        if t.state != TrialState.RUNNING:
            continue
        owner = t.user_attrs.get(OWNER)
        if owner is not None and owner_alive(owner) is not False:
            continue
        trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, t.number)  # noqa: SLF001
        storage.set_trial_user_attr(trial_id, "failure_reason", f"owner {owner} died (killed search)")
        storage.set_trial_state_values(trial_id, TrialState.FAIL)
        _end_mlflow_run(t.user_attrs.get(MLFLOW_RUN))
        if t.number not in retried:
            attrs = {RETRY_OF: t.number, SOURCE: f"retry:{t.number}"}
            for key in (WARM, DESIGN):
                if key in t.user_attrs:
                    attrs[key] = t.user_attrs[key]
            if t.params:
                study.enqueue_trial(dict(t.params), user_attrs=attrs)
        stale.append(t.number)
        log.warning("trial %d: owner %s is gone; marked FAIL and re-enqueued", t.number, owner)
    return stale


def _end_mlflow_run(run_id: str | None) -> None:
    if not run_id:
        return
    try:
        import mlflow

        client = mlflow.MlflowClient()
        if client.get_run(run_id).info.status == "RUNNING":
            client.set_terminated(run_id, status="KILLED")
    except Exception as exc:  # tracking is a record, not the search: never fail recovery on it
        log.warning("could not end MLflow run %s of a killed trial: %s", run_id, exc)


def enqueue_warm_start(study: optuna.Study, space: MixtureSpace, arms: Mapping[str, Mapping[str, int]]) -> list[str]:
    """Enqueue each arm's mixture once (keyed by arm name across all trials, so resume adds nothing)."""
    have = {t.user_attrs.get(WARM) for t in study.get_trials(deepcopy=False)}
    added = []
    for arm, mixture in arms.items():
        if arm in have:
            continue
        # The params are the design's mixture on the search grid (what the sampler learns from); the
        # trial itself trains on the design's exact counts (DESIGN), so it reproduces the arm.
        exact = {_key(s): int(n) for s, n in sorted(mixture.items()) if int(n) > 0}
        study.enqueue_trial(space.params_for(mixture), user_attrs={WARM: arm, SOURCE: f"warm:{arm}", DESIGN: exact})
        added.append(arm)
    return added


def counts(study: optuna.Study) -> dict[str, int]:
    out = {s.name: 0 for s in TrialState}
    for t in study.get_trials(deepcopy=False):
        out[t.state.name] += 1
    return out


# ----------------------------------------------------------------------------------------- worker

# evaluate(mixture, trial) -> dev accuracy; it may call trial.report and raise optuna.TrialPruned.
Evaluate = Callable[[dict[str, int], Trial], float]


def run_worker(study: optuna.Study, space: MixtureSpace, evaluate: Evaluate, n_trials: int,
               lock: Path, progress: bool = True) -> int:
    """Run trials until the study holds `n_trials` finished-or-running trials; return how many ran here."""
    ran = 0
    from tqdm import tqdm

    bar = tqdm(total=n_trials, desc=f"search {study.study_name}", unit="trial",
               disable=not (progress and sys.stderr.isatty()))
    while True:
        with study_lock(lock):
            recover_stale(study)
            c = counts(study)
            bar.n = c["COMPLETE"] + c["PRUNED"]
            bar.refresh()
            if c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] >= n_trials:
                break
            trial = study.ask()
            trial.set_user_attr(OWNER, owner_id())
        _run_one(study, trial, space, evaluate)
        ran += 1
    bar.close()
    return ran


def _run_one(study: optuna.Study, trial: Trial, space: MixtureSpace, evaluate: Evaluate) -> None:
    fixed = trial.user_attrs
    mixture = space.suggest(trial)
    if DESIGN in fixed:
        mixture = space.apply_budget({str(k): int(v) for k, v in fixed[DESIGN].items()})
    trial.set_user_attr(MIXTURE, mixture)
    if SOURCE not in fixed:
        trial.set_user_attr(SOURCE, "sampler")
    if not mixture:
        # Nothing entered: there is no training set; the untrained model is the Baseline arm's job.
        trial.set_user_attr("prune_reason", "empty mixture")
        study.tell(trial, state=TrialState.PRUNED)
        return
    try:
        value = float(evaluate(mixture, trial))
    except optuna.TrialPruned:
        study.tell(trial, state=TrialState.PRUNED)
        return
    except BaseException as exc:
        trial.set_user_attr("failure_reason", f"{type(exc).__name__}: {exc}"[:2000])
        study.tell(trial, state=TrialState.FAIL)
        raise
    if not math.isfinite(value):
        trial.set_user_attr("failure_reason", f"objective returned {value}")
        study.tell(trial, state=TrialState.FAIL)
        raise SearchError(f"trial {trial.number}: objective returned {value}")
    study.tell(trial, value)
    log.info("trial %d: dev accuracy %.4f on %s", trial.number, value, mixture)


# ----------------------------------------------------------------------------------------- results


def history_rows(study: optuna.Study) -> list[dict[str, Any]]:
    rows = []
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        rows.append({
            "trial": t.number,
            "value": "" if t.value is None else t.value,
            "state": t.state.name,
            "source": t.user_attrs.get(SOURCE, ""),
            "total": sum(mixture_of(t).values()),
            "mixture": json.dumps(mixture_of(t), sort_keys=True),
        })
    return rows


def _atomic_write(path: Path, text: str) -> None:
    atomic_write_text(path, text)


def write_outputs(study: optuna.Study, out_dir: Path, target: str, seed: int, extra: Mapping[str, Any] | None = None) -> dict:
    """best_mixture.json (a mixture manifest spec: retrain it like any arm) + history.csv."""
    complete = [t for t in study.get_trials(deepcopy=False) if t.state == TrialState.COMPLETE]
    if not complete:
        raise SearchError(f"study {study.study_name}: no completed trial, no best mixture")
    best = study.best_trial
    manifest = {
        "components": mixture_of(best),
        "seed": int(seed),
        "arm": "search_best",
        "target": target,
        "study": study.study_name,
        "trial": best.number,
        "dev_accuracy": best.value,
        "source": best.user_attrs.get(SOURCE, ""),
        "n_trials": sum(1 for t in study.get_trials(deepcopy=False) if t.state in FINISHED),
        **dict(extra or {}),
    }
    _atomic_write(out_dir / "best_mixture.json", json.dumps(manifest, indent=1) + "\n")
    buf = io.StringIO()
    rows = history_rows(study)
    writer = csv.DictWriter(buf, fieldnames=["trial", "value", "state", "source", "total", "mixture"])
    writer.writeheader()
    writer.writerows(rows)
    _atomic_write(out_dir / "history.csv", buf.getvalue())
    return manifest


def trials_to_reach(values: Sequence[float | None], threshold: float) -> int | None:
    """1-based number of trials (in order) until one reaches `threshold`; None if none does."""
    for i, v in enumerate(values, 1):
        if v is not None and v >= threshold - 1e-12:
            return i
    return None


# ------------------------------------------------------------------------ the target's real objective


@dataclasses.dataclass
class TargetProblem:
    """Everything the real objective needs, resolved from params, records and designs."""

    target: str                 # target key used in paths / names ("03" or the triplet)
    triplet: str
    records: Any                # records DataFrame
    dev_df: Any                 # target dev split
    space: MixtureSpace
    warm: dict[str, dict[str, int]]
    data_root: str | None = None


def _designs_target_dir(designs: Path, target: str) -> Path:
    return designs / target if (designs / target).is_dir() else designs


def load_designs(designs: Path, target: str) -> tuple[dict[str, dict[str, int]], list[str] | None]:
    """Warm-start mixtures and the dev split from `medmat designs` output (`<designs>/<target>/`).

    Warm start = the Related arms of each direction type (`related_<direction>.json`) and All Related
    (`all_related.json`) whose status is ok; not the ablations (`related_without_*`) nor limited-data arms,
    which answer other questions. The dev split is `splits.json`'s `dev` record ids.
    """
    root = _designs_target_dir(designs, target)
    if not root.is_dir():
        raise SearchError(f"{designs}: designs folder not found for target {target} (run `medmat designs`)")
    warm: dict[str, dict[str, int]] = {}
    dev_ids: list[str] | None = None
    splits = root / "splits.json"
    if splits.is_file():
        try:
            dev_ids = [str(i) for i in json.loads(splits.read_text(encoding="utf-8")).get("dev", [])]
        except (json.JSONDecodeError, AttributeError) as exc:
            raise SearchError(f"{splits}: not a splits file ({exc})") from exc
    for path in sorted(root.glob("*.json")):
        arm = path.stem
        if not ((arm.startswith("related_") and not arm.startswith(("related_wo_", "related_without")))
                or arm == "all_related"):
            continue
        try:
            m = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SearchError(f"{path}: not valid JSON ({exc})") from exc
        if m.get("status", "ok") != "ok" or not isinstance(m.get("components"), dict):
            continue
        comps = {}
        for s, v in m["components"].items():
            n = v.get("selected", v.get("requested")) if isinstance(v, Mapping) else v
            comps[_key(s)] = int(n)
        if comps:
            warm[arm] = comps
    return warm, dev_ids


def build_problem(records_path: Path, designs: Path, target_text: str, cfg: SearchConfig,
                  dev_path: Path | None = None) -> TargetProblem:
    import pandas as pd

    from medmat.catalog import load_catalog, parse_target

    cat = load_catalog()
    triplet, target_no = parse_target(target_text, cat)
    target = f"{target_no:02d}" if target_no is not None else str(triplet)
    import pyarrow.parquet as pq

    try:
        records = pd.read_parquet(records_path)
        meta = pq.read_schema(records_path).metadata or {}
    except (OSError, ValueError) as exc:
        raise SearchError(f"{records_path}: cannot read the records table ({exc})") from exc
    data_root = meta.get(b"medmat.data_root")
    data_root = data_root.decode() if data_root else None
    warm, dev_ids = load_designs(designs, target)
    if dev_path is not None:
        data = json.loads(Path(dev_path).read_text(encoding="utf-8"))
        dev_ids = [str(i) for i in (data.get("record_ids") if isinstance(data, dict) else data)]
    if not dev_ids:
        raise SearchError(f"{designs}: no dev split for target {target} (expected dev.json with record_ids)")
    by_id = records.set_index(records["record_id"].astype(str), drop=False)
    absent = [i for i in dev_ids if i not in by_id.index]
    if absent:
        raise SearchError(f"dev split of {target}: {len(absent)} record id(s) not in {records_path}, e.g. {absent[:3]}")
    dev_df = by_id.loc[dev_ids].reset_index(drop=True)
    if cfg.candidates == "related":
        cands = [_key(s) for s in cat.related_subsets(triplet) if s != target_no]
    else:
        cands = [_key(s) for s in cfg.candidates]
    train = records[records["split"] == "train"]
    avail = train["subset_no"].dropna().map(_key).value_counts().to_dict()
    dev_set = set(dev_ids)
    limits = {}
    for s in cands:
        if s == target:
            continue
        n = int(avail.get(s, 0))
        if n > 0:
            limits[s] = min(n, cfg.max_per_subset)
    if not limits:
        raise SearchError(f"target {target} ({triplet}): none of the candidate subsets {cands} has training records")
    if not set(train["record_id"].astype(str)).isdisjoint(dev_set) and target_no is not None:
        leak = train[(train["record_id"].astype(str).isin(dev_set)) & (train["subset_no"].map(
            lambda v: not pd.isna(v) and _key(v) in limits))]
        if len(leak):
            raise SearchError(f"dev split of {target} overlaps candidate training records, e.g. "
                              f"{leak['record_id'].iloc[0]}")
    warm = {a: {s: n for s, n in m.items() if s in limits} for a, m in warm.items()}
    warm = {a: m for a, m in warm.items() if m}
    budget = cfg.total_budget or max((sum(m.values()) for m in warm.values()), default=0) \
        or cfg.max_per_subset * 2
    space = MixtureSpace(limits=limits, budget=budget, step=cfg.step)
    return TargetProblem(target=target, triplet=str(triplet), records=records, dev_df=dev_df, space=space,
                         warm=warm, data_root=data_root)


def objective_fingerprint(problem: TargetProblem, cfg: SearchConfig, params: Mapping[str, Any]) -> str:
    """Hash of everything a trial's value depends on: training and model params, the evaluation scorer,
    the search space, the dev split and the candidates' records. Trials of one study must share it —
    values measured under other settings are not comparable (the sampler would learn from noise)."""
    import pandas as pd

    from medmat.mixture import ids_sha256

    train = problem.records[problem.records["split"] == "train"]
    cand = train[train["subset_no"].map(lambda v: not pd.isna(v) and _key(v) in problem.space.limits)]
    payload = {
        "train": {**(params.get("train") or {}), **cfg.train},
        "model": params.get("model") or {},
        "scorer": (params.get("evaluate") or {}).get("scorer", "likelihood"),
        "space": {"limits": dict(sorted(problem.space.limits.items())), "budget": problem.space.budget,
                  "step": problem.space.step},
        "dev": ids_sha256(problem.dev_df["record_id"].astype(str)),
        "candidates": ids_sha256(cand["record_id"].astype(str)),
        "mixture_seed": cfg.seed,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def train_objective(problem: TargetProblem, cfg: SearchConfig, params_path: Path, out_dir: Path,
                    parent_run_id: str | None, mixture_seed: int = 0) -> Evaluate:
    """The real objective: resolve the mixture, train with medmat.train, score the dev split."""
    from medmat import tracking
    from medmat.config import from_dict, load_params
    from medmat.evaluate import evaluate_backend
    from medmat.mixture import resolve_mixture
    from medmat.models import ModelConfig
    from medmat.train import TrainConfig, train_model

    params = load_params(params_path)
    train_cfg = from_dict(TrainConfig, {**(params.get("train") or {}), **cfg.train}, where=f"{params_path}: train")
    model_cfg = from_dict(ModelConfig, params.get("model"), where=f"{params_path}: model")
    track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{params_path}: tracking")
    eval_scorer = (params.get("evaluate") or {}).get("scorer", "likelihood")

    def evaluate(mixture: dict[str, int], trial: Trial) -> float:
        train_df, manifest = resolve_mixture(problem.records, {"components": mixture, "seed": mixture_seed})
        tags = tracking.run_tags(target=problem.triplet, arm="search", backend=model_cfg.backend,
                                 seed=train_cfg.seed, extra={"trial": trial.number, "study": trial.study.study_name})

        def on_eval(step: int, dev_acc: float) -> None:
            tracking.log_metrics({"dev_accuracy": dev_acc}, step=step)
            trial.report(dev_acc, step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step} (dev accuracy {dev_acc:.3f})")

        with tracking.tracked_run(track_cfg, run_name=f"trial-{trial.number}", tags=tags,
                                  # the mixture as one JSON param (readable in the UI's run table)
                                  params={"trial": trial.number, "mixture": json.dumps(mixture, sort_keys=True),
                                          "mixture_total": sum(mixture.values())},
                                  parent_run_id=parent_run_id) as run:
            trial.set_user_attr(MLFLOW_RUN, run.info.run_id)
            tracking.log_mixture(manifest, tags.get("medmat.data_version", "untracked"))
            # out_dir=None: a trial keeps no checkpoints or model (a killed trial is re-run whole);
            # tracking=None: the trial's own nested run above is where its metrics go.
            result = train_model(train_cfg, model_cfg, train_df, problem.dev_df, out_dir=None,
                                 on_eval=on_eval, tracking=None, data_root=problem.data_root)
            acc = result.final_dev_accuracy
            if acc is None or eval_scorer != "likelihood":
                acc = evaluate_backend(result.backend, problem.dev_df, scorer=eval_scorer).accuracy
            tracking.log_metrics({"dev_accuracy_final": acc, "train_wall_s": result.wall_s})
        return acc

    return evaluate


# --------------------------------------------------------------------------------------------- CLI


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
    parser.add_argument("--study-name", default=None, help="study to create or resume (default: per target)")
    parser.add_argument("--sampler", choices=["tpe", "random"], default=None)
    parser.add_argument("--seed", type=int, default=None, help="sampler seed (search.seed)")
    parser.add_argument("--no-warm-start", action="store_true", help="do not enqueue the designs' mixtures")
    # Internal: a worker process started by the main one.
    parser.add_argument("--worker-index", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--parent-run-id", default=None, help=argparse.SUPPRESS)


def _config_from_args(args: argparse.Namespace) -> SearchConfig:
    from medmat.config import from_dict, load_params

    section = dict((load_params(args.params).get("search") or {}) if args.params.exists() else {})
    for key, val in (("n_trials", args.trials), ("workers", args.workers), ("storage", args.storage),
                     ("sampler", args.sampler), ("seed", args.seed)):
        if val is not None:
            section[key] = val
    if args.no_warm_start:
        section["warm_start"] = False
    return from_dict(SearchConfig, section, where=f"{args.params}: section 'search'")


def _parent_run(track_cfg, study_name: str, target: str, triplet: str, cfg: SearchConfig) -> str:
    """The study's parent MLflow run id: found by tag (a resumed search reuses it) or created."""
    import mlflow

    from medmat import tracking

    exp_id = tracking.setup(track_cfg)
    client = mlflow.MlflowClient()
    found = client.search_runs([exp_id], filter_string=f"tags.`medmat.study` = '{study_name}' "
                               "and tags.`medmat.kind` = 'search'", max_results=1)
    if found:
        return found[0].info.run_id
    tags = tracking.run_tags(target=triplet, arm="search", extra={"study": study_name, "kind": "search"})
    run = client.create_run(exp_id, run_name=f"search-{target}", tags=tags)
    client.log_batch(run.info.run_id, params=[
        mlflow.entities.Param(k, v) for k, v in tracking.flatten_params(
            {"n_trials": cfg.n_trials, "sampler": cfg.sampler, "seed": cfg.seed, "warm_start": cfg.warm_start,
             "step": cfg.step, "max_per_subset": cfg.max_per_subset}).items()])
    return run.info.run_id


def run(args: argparse.Namespace) -> int:
    from medmat import tracking
    from medmat.config import ConfigError, from_dict, load_params

    try:
        cfg = _config_from_args(args)
        problem = build_problem(args.records, args.designs, args.target, cfg, dev_path=args.dev)
    except (SearchError, ConfigError, ValueError, LookupError) as exc:
        log.error("%s", exc)
        return 2
    params = load_params(args.params) if args.params.exists() else {}
    fp = objective_fingerprint(problem, cfg, params)
    # The default name carries the objective's fingerprint: the same settings resume the same study by
    # name; changed training/data settings start a new one instead of mixing incomparable values.
    name = args.study_name or f"{cfg.study_prefix}-{problem.target}-{fp[:8]}"
    worker = args.worker_index
    study = open_study(name, cfg.storage, cfg.sampler, cfg.seed + worker, cfg.pruner_startup_trials,
                       cfg.pruner_warmup_steps)
    have = study.user_attrs.get("objective_fingerprint")
    if have is None and worker == 0:
        study.set_user_attr("objective_fingerprint", fp)
    elif have is not None and have != fp:
        log.error("study %s in %s was run with other training/data settings (objective fingerprint %s, now "
                  "%s): its values are not comparable; give another --study-name or delete the study",
                  name, cfg.storage, have[:8], fp[:8])
        return 2
    lock = lock_path(cfg.storage, name)
    track_cfg = from_dict(tracking.TrackingConfig, params.get("tracking"), where=f"{args.params}: tracking")
    parent = args.parent_run_id
    procs: list[subprocess.Popen] = []
    if worker == 0:
        with study_lock(lock):
            recover_stale(study)
            if cfg.warm_start:
                added = enqueue_warm_start(study, problem.space, problem.warm)
                if added:
                    log.info("warm start: enqueued %s", ", ".join(added))
        study.set_user_attr("target", problem.target)
        study.set_user_attr("triplet", problem.triplet)
        parent = _parent_run(track_cfg, name, problem.target, problem.triplet, cfg)
        base = [sys.executable, "-m", "medmat.cli", "search", "--target", args.target,
                "--records", str(args.records), "--designs", str(args.designs), "--out", str(args.out),
                "--params", str(args.params), "--trials", str(cfg.n_trials), "--storage", cfg.storage,
                "--study-name", name, "--sampler", cfg.sampler, "--seed", str(cfg.seed), "--workers", "1",
                "--parent-run-id", parent] + (["--dev", str(args.dev)] if args.dev else [])
        for k in range(1, cfg.workers):
            procs.append(subprocess.Popen(base + ["--worker-index", str(k)]))
    evaluate = train_objective(problem, cfg, args.params, args.out, parent, mixture_seed=cfg.seed)
    rc = 0
    try:
        run_worker(study, problem.space, evaluate, cfg.n_trials, lock)
    finally:
        for p in procs:
            rc = max(rc, p.wait())
    if worker != 0:
        return rc
    c = counts(study)
    manifest = write_outputs(study, args.out, problem.target, cfg.seed,
                             extra={"triplet": problem.triplet, "storage": cfg.storage})
    try:
        import mlflow

        client = mlflow.MlflowClient()
        client.log_metric(parent, "best_dev_accuracy", manifest["dev_accuracy"])
        client.log_dict(parent, manifest, "best_mixture.json")
        client.log_artifact(parent, str(args.out / "history.csv"))
        client.set_terminated(parent, "FINISHED")
    except Exception as exc:  # the outputs are written; a tracking hiccup must not fail the stage
        log.warning("could not log the search summary to MLflow: %s", exc)
    log.info("study %s: %d complete, %d pruned, %d failed; best trial %d dev accuracy %.4f -> %s",
             name, c["COMPLETE"], c["PRUNED"], c["FAIL"], manifest["trial"], manifest["dev_accuracy"],
             args.out / "best_mixture.json")
    return rc

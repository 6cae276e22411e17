"""Where a study lives and how workers share it: storage, locks, stale-trial recovery, the worker loop.

Resumability, exactly: the trial budget counts finished (COMPLETE, PRUNED) plus live RUNNING trials,
and every `ask` happens under a file lock next to the storage, so N workers never overshoot it. Each
trial records its owner (host, pid, process start time); a RUNNING trial whose owner is gone (kill -9)
is marked FAIL on the next start and its mixture re-enqueued once, so a killed search resumed by name
ends with the same number of finished trials as an uninterrupted one — none lost, none run twice.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import math
import os
import socket
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import optuna
from optuna.trial import Trial, TrialState

from medmat.search.space import (DESIGN, MIXTURE, MLFLOW_RUN, OWNER, PRUNE_REASON, RETRY_OF, SOURCE, WARM,
                                 MixtureSpace, SearchError, key)

log = logging.getLogger("medmat.search")

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)


def _sqlite_path(url: str) -> Path | None:
    return Path(url[len("sqlite:///"):]) if url.startswith("sqlite:///") else None


# A database server (PostgreSQL, MySQL) is shared by workers on many hosts, where the owner check below
# cannot tell whether a worker is alive. There Optuna's heartbeats do it: a RUNNING trial whose worker
# has not beaten for RDB_GRACE_S is failed by the next worker that starts a trial, and retried once.
RDB_HEARTBEAT_S = 30
RDB_GRACE_S = 120


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
    import warnings

    # Optuna warns that heartbeats are meant for Study.optimize; run_worker keeps them beating itself.
    warnings.filterwarnings("ignore", message="Heartbeat of storage is supposed to be used")
    return optuna.storages.RDBStorage(
        url, heartbeat_interval=RDB_HEARTBEAT_S, grace_period=RDB_GRACE_S,
        failed_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=1))


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
        # trial itself trains on the design's exact proportions (DESIGN) at the budget, so a design
        # whose total is the budget is reproduced count for count.
        exact = {key(s): int(n) for s, n in sorted(mixture.items()) if int(n) > 0}
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
            with warnings.catch_warnings():  # "experimental" since optuna 2.9: a notice per trial, nothing to act on
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                optuna.storages.fail_stale_trials(study)  # heartbeats (database servers only; else a no-op)
            recover_stale(study)
            c = counts(study)
            bar.n = c["COMPLETE"] + c["PRUNED"]
            bar.refresh()
            if c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] >= n_trials:
                break
            trial = study.ask()
            trial.set_user_attr(OWNER, owner_id())
        # ask/tell does not beat by itself (study.optimize would): the same thread optimize uses.
        from optuna.storages._heartbeat import get_heartbeat_thread

        with get_heartbeat_thread(trial._trial_id, study._storage):  # noqa: SLF001
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
        trial.set_user_attr(PRUNE_REASON, "empty mixture")
        study.tell(trial, state=TrialState.PRUNED)
        return
    if not space.at_budget(mixture):
        # The chosen subsets hold fewer records than the budget: a value measured on less data is
        # not comparable with the others (equal totals, always), so it is not measured.
        trial.set_user_attr(PRUNE_REASON, f"chosen subsets hold {sum(mixture.values())} < budget {space.budget}")
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



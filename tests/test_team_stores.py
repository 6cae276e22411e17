"""The team's stores, for real, on 127.0.0.1: PostgreSQL (the pgserver wheel's binaries), an S3 server
(moto) and `mlflow server` on both, started once for this module by medmat.services and always stopped.

- MLflow: a run, its dataset input, its logged model and a registry alias land in PostgreSQL; the
  model's files land in the S3 bucket; the model loads back by alias through the server.
- Optuna: two workers share a study in PostgreSQL (RDBStorage with heartbeats); one is killed with -9
  mid-trial, the other finishes n_trials, and the dead worker's trial is retried exactly once.
- DVC: `dvc push` to the S3 remote, a fresh clone `dvc pull`s data and stage outputs, `dvc repro` is a no-op.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

import pytest

from medmat.services import team_stack


@pytest.fixture(scope="module")
def stack():
    # Under /tmp, not pytest's tmp_path: as root the database runs as `nobody`, who cannot enter
    # pytest's private (0700) temporary folders.
    root = tempfile.mkdtemp(prefix="medmat-team-")
    try:
        with team_stack(root) as s:
            yield s
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _sql(url: str, query: str, *args) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(query, args).fetchall()



def kill_when_in_trial(worker: subprocess.Popen, marker: Path) -> int:
    """Wait until `worker` has written `marker` (it is inside a trial), then SIGKILL its whole group, as a
    dead host would die: no chance to mark its trial FAIL. Returns the trial number it was running."""
    deadline = time.time() + 60
    while not marker.exists():
        assert worker.poll() is None and time.time() < deadline, "worker never started a trial"
        time.sleep(0.1)
    killed_number = int(marker.read_text())
    os.killpg(worker.pid, signal.SIGKILL)
    worker.wait()
    return killed_number

def test_servers_listen_on_loopback_only(stack):
    for url in (stack.postgres_url, stack.s3_endpoint, stack.tracking_uri):
        assert "@127.0.0.1:" in url or "//127.0.0.1:" in url
    assert all(s.proc.poll() is None for s in stack.servers)


def test_mlflow_run_input_model_and_alias_in_postgres_and_s3(stack, tmp_path, monkeypatch):
    import mlflow
    import pandas as pd

    from medmat import served_model, tracking
    from medmat.scoring import evaluate_backend
    from medmat.services import s3_client
    from test_evaluate import make_world, train_tiny

    # Clients need only the tracking URI (params here): artifacts go through the server to S3.
    cfg = tracking.TrackingConfig(tracking_uri=stack.tracking_uri, experiment="team-test")
    root = tmp_path / "world"
    df = make_world(root, per_label=4)
    backend = train_tiny(root, df, steps=5)
    backend.save(tmp_path / "model")
    manifest = {"components": {"04": {"requested": 8, "selected": 8, "sha256": "d" * 64}},
                "seed": 0, "total": 8, "sha256": "f" * 64}
    with tracking.tracked_run(cfg, run_name="related-seed0", tags={"medmat.arm": "related"}) as run:
        tracking.log_metrics({"test_accuracy": 0.75})
        tracking.log_mixture(manifest, "untracked")
        model_uri = served_model.log_model(tmp_path / "model")
    run_id = run.info.run_id
    client = mlflow.MlflowClient(stack.tracking_uri)
    version = mlflow.register_model(model_uri, "medmat-team-test").version
    client.set_registered_model_alias("medmat-team-test", "champion", version)

    # PostgreSQL holds the run, its dataset input, the model version and the alias
    db = stack.mlflow_db_url
    assert _sql(db, "SELECT status FROM runs WHERE run_uuid = %s", run_id) == [("FINISHED",)]
    assert _sql(db, "SELECT value FROM metrics WHERE run_uuid = %s AND key = 'test_accuracy'", run_id) == [(0.75,)]
    assert ("f" * 64)[:36] in {d for (d,) in _sql(db, "SELECT digest FROM datasets")}
    assert _sql(db, "SELECT version FROM registered_model_aliases WHERE name = %s AND alias = 'champion'",
                "medmat-team-test") == [(int(version),)]
    # S3 holds the files (MLmodel, the backend's saved folder, the manifest)
    keys = [o["Key"] for o in s3_client(stack.s3_endpoint).list_objects_v2(
        Bucket=stack.bucket, Prefix="mlflow/").get("Contents", [])]
    assert any(k.endswith("/MLmodel") for k in keys), keys
    assert any(k.endswith("/manifest.json") for k in keys), keys
    # and the champion loads back through the server and answers like the model it was
    monkeypatch.setenv("MLFLOW_TRACKING_URI", stack.tracking_uri)
    model = mlflow.pyfunc.load_model("models:/medmat-team-test@champion")
    test = df[df.split == "test"].head(4).reset_index(drop=True)
    answers = model.predict(pd.DataFrame({"image": test.image_path, "question_choice": test.question_choice}))
    assert answers == [p["predicted_letter"] for p in evaluate_backend(backend, test).predictions]


GRACE = 2  # seconds without a heartbeat after which a RUNNING trial counts as dead
WORKER = textwrap.dedent("""
    import os, sys, time
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    url, name, n, hang, grace = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4], int(sys.argv[5])
    storage = RDBStorage(url, heartbeat_interval=1, grace_period=grace,
                         failed_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1))
    study = optuna.load_study(study_name=name, storage=storage)

    def objective(trial):
        x = trial.suggest_int("x", 0, 1000)
        if hang != "-" and not os.path.exists(hang):
            open(hang, "w").write(str(trial.number))  # tell the test which trial to kill us in
            time.sleep(600)
        time.sleep(0.2)
        return x

    study.optimize(objective, callbacks=[optuna.study.MaxTrialsCallback(
        n, states=(optuna.trial.TrialState.COMPLETE,))])
""")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")  # retried_trial_number
def test_optuna_on_postgres_retries_the_trial_of_a_killed_worker_once(stack, tmp_path):
    import optuna
    from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    n, name = 6, f"kill-test-{os.getpid()}"
    optuna.create_study(study_name=name, storage=stack.optuna_url, direction="maximize")
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    marker = tmp_path / "hung-in-trial"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    doomed = subprocess.Popen([sys.executable, str(script), stack.optuna_url, name, str(n), str(marker), str(GRACE)], env=env,
                              start_new_session=True)
    try:
        killed_number = kill_when_in_trial(doomed, marker)
        time.sleep(GRACE + 1)  # its last heartbeat is now stale: the next trial start fails it
        survivor = subprocess.run([sys.executable, str(script), stack.optuna_url, name, str(n), "-", str(GRACE)], env=env,
                                  capture_output=True, text=True, timeout=120)
        assert survivor.returncode == 0, survivor.stderr[-2000:]
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()

    storage = RDBStorage(stack.optuna_url)
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert states.count(TrialState.COMPLETE) == n, states  # none lost
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    (failed,) = [t for t in trials if t.state == TrialState.FAIL]
    assert failed.number == killed_number  # the killed one, failed by the heartbeat check
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_number]
    assert len(retries) == 1 and retries[0].state == TrialState.COMPLETE  # retried exactly once
    assert retries[0].params == failed.params  # the same point, not a new one


def _dvc(cwd: Path, env: dict, *args: str) -> str:
    res = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, env=env, capture_output=True, text=True,
                         timeout=180)
    assert res.returncode == 0, f"dvc {' '.join(args)}: {res.stdout[-1500:]}{res.stderr[-1500:]}"
    return res.stdout + res.stderr


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", "-c", "user.name=t", "-c", "user.email=t@t", *args], cwd=cwd, check=True,
                   capture_output=True, timeout=60)


def test_dvc_push_pull_through_s3_then_repro_is_a_no_op(stack, tmp_path):
    from medmat.services import s3_client

    env = {**os.environ, **stack.env(), "DVC_NO_ANALYTICS": "1"}
    proj = tmp_path / "proj"
    (proj / "data").mkdir(parents=True)
    (proj / "data" / "a.txt").write_text("alpha\n")
    (proj / "data" / "b.txt").write_text("beta\n")
    (proj / "dvc.yaml").write_text(textwrap.dedent("""
        stages:
          count:
            cmd: python -c "import pathlib; n = sum(1 for _ in pathlib.Path('data').glob('*.txt')); pathlib.Path('out').mkdir(exist_ok=True); pathlib.Path('out/count.txt').write_text(str(n))"
            deps: [data]
            outs: [out]
    """))
    _git(proj, "init", "-q")
    _dvc(proj, env, "init", "-q")
    _dvc(proj, env, "add", "-q", "data")
    _dvc(proj, env, "repro", "-q")
    # = `dvc remote add -d team URL` + `dvc remote modify team endpointurl ...` (two fewer dvc starts)
    with open(proj / ".dvc" / "config", "a") as fh:
        fh.write(f"[core]\n    remote = team\n['remote \"team\"']\n    url = {stack.dvc_remote}/{tmp_path.name}\n"
                 f"    endpointurl = {stack.s3_endpoint}\n")
    _git(proj, "add", ".")
    _git(proj, "commit", "-q", "-m", "project")
    _dvc(proj, env, "push")
    keys = s3_client(stack.s3_endpoint).list_objects_v2(Bucket=stack.bucket, Prefix=f"dvc/{tmp_path.name}/")
    assert keys.get("KeyCount", 0) >= 4  # a.txt, b.txt, the data dir listing, out/count.txt (+ its listing)

    clone = tmp_path / "clone"
    _git(tmp_path, "clone", "-q", str(proj), str(clone))
    assert not (clone / "data").exists() and not (clone / "out").exists()
    _dvc(clone, env, "pull")
    assert (clone / "data" / "b.txt").read_text() == "beta\n"
    assert (clone / "out" / "count.txt").read_text() == "2"
    out = _dvc(clone, env, "repro")
    assert "didn't change, skipping" in out and "Running stage" not in out, out


SEARCH_WORKER = textwrap.dedent("""
    import os, sys, time
    import medmat.search.storage as st
    from medmat.search.space import MixtureSpace
    url, name, n, hang = sys.argv[1], sys.argv[2], int(sys.argv[3]), sys.argv[4]
    st.RDB_HEARTBEAT_S, st.RDB_GRACE_S = 1, int(sys.argv[5])
    if hang != "-":  # this worker plays one on another host: the owner check cannot judge it
        st.owner_id = lambda pid=None: "another-host:1:1"
    study = st.open_study(name, url, seed=0)
    space = MixtureSpace(limits={"01": 400, "02": 400}, budget=400, step=100)

    def evaluate(mixture, trial):
        if hang != "-" and not os.path.exists(hang):
            open(hang, "w").write(str(trial.number))
            time.sleep(600)
        time.sleep(0.1)
        return 1.0 - abs(mixture.get("01", 0) - 300) / 400

    st.run_worker(study, space, evaluate, n, st.lock_path(url, name), progress=False)
""")


@pytest.mark.filterwarnings("ignore::optuna.exceptions.ExperimentalWarning")
def test_the_search_on_postgres_retries_a_dead_remote_workers_trial_once(stack, tmp_path):
    """medmat.search's own worker loop on a database server: heartbeats catch a worker the host-local
    owner check cannot see (another host), and its trial is retried exactly once."""
    import optuna
    from optuna.storages import RetryHeartbeatStaleTrialCallback
    from optuna.trial import TrialState

    n, name = 4, f"search-kill-{os.getpid()}"
    script = tmp_path / "search_worker.py"
    script.write_text(SEARCH_WORKER)
    marker = tmp_path / "hung"
    doomed = subprocess.Popen([sys.executable, str(script), stack.optuna_url, name, str(n), str(marker), str(GRACE)],
                              start_new_session=True)
    try:
        killed_number = kill_when_in_trial(doomed, marker)
        time.sleep(GRACE + 1)
        survivor = subprocess.run([sys.executable, str(script), stack.optuna_url, name, str(n), "-", str(GRACE)],
                                  capture_output=True, text=True, timeout=120)
        assert survivor.returncode == 0, survivor.stderr[-2000:]
    finally:
        if doomed.poll() is None:
            os.killpg(doomed.pid, signal.SIGKILL)
            doomed.wait()
    trials = optuna.load_study(study_name=name, storage=stack.optuna_url).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert sum(s in (TrialState.COMPLETE, TrialState.PRUNED) for s in states) == n, states
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed_number]
    retries = [t for t in trials if RetryHeartbeatStaleTrialCallback.retried_trial_number(t) == killed_number]
    assert len(retries) == 1 and retries[0].params == trials[killed_number].params

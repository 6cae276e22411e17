"""optuna-dashboard started on 127.0.0.1 (free port) answers for a study in our SQLite storage.

`make dashboard` runs `optuna-dashboard sqlite:///mlruns/optuna.db`; this is the same command on a
study created by medmat.search.open_study in a temporary storage.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from medmat import search


def _env():
    return {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}


def test_optuna_dashboard_answers_for_the_study(tmp_path):
    import socket
    import urllib.request

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = search.open_study("medmat-search-03", storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    exe = Path(sys.executable).with_name("optuna-dashboard")
    proc = subprocess.Popen([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=_env(),
                            start_new_session=True)
    try:
        body = None
        deadline = time.time() + 40
        while time.time() < deadline and proc.poll() is None:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies", timeout=2) as r:
                    body = json.loads(r.read())
                break
            except OSError:
                time.sleep(0.3)
        assert body is not None, "optuna-dashboard did not answer"
        names = [s["study_name"] for s in body["study_summaries"]]
        assert "medmat-search-03" in names
        study_id = body["study_summaries"][names.index("medmat-search-03")]["study_id"]
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/studies/{study_id}", timeout=5) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == 2
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the group we started
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

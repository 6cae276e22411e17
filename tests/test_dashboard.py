"""optuna-dashboard started on 127.0.0.1 (free port) answers for a study in our SQLite storage.

`make dashboard` runs `optuna-dashboard sqlite:///mlruns/optuna.db`; this is the same command on a
study created by medmat.search.open_study in a temporary storage.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from conftest import free_port, local_server
from medmat import search


def test_optuna_dashboard_answers_for_the_study(tmp_path):
    import urllib.request

    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = search.open_study("medmat-search-03", storage)
    study.optimize(lambda t: t.suggest_float("x", 0, 1), n_trials=2)
    port = free_port()
    exe = Path(sys.executable).with_name("optuna-dashboard")
    api = f"http://127.0.0.1:{port}/api/studies"
    with local_server([str(exe), storage, "--host", "127.0.0.1", "--port", str(port)], api, timeout=40):
        with urllib.request.urlopen(api, timeout=5) as r:
            body = json.loads(r.read())
        names = [s["study_name"] for s in body["study_summaries"]]
        assert "medmat-search-03" in names
        study_id = body["study_summaries"][names.index("medmat-search-03")]["study_id"]
        with urllib.request.urlopen(f"{api}/{study_id}", timeout=5) as r:
            detail = json.loads(r.read())
        assert len(detail["trials"]) == 2

"""Shared fixtures: small real worlds built on the fly under tmp_path (never the repo's data/)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
from pathlib import Path

import pytest
from PIL import Image

# Cleared for the whole session, before any fixture (module-scoped ones included) opens a store:
# an inherited MLFLOW_TRACKING_URI overrides params and would send tests into the user's own mlruns/.
os.environ.pop("MLFLOW_TRACKING_URI", None)

FIXTURES = Path(__file__).parent / "fixtures"
SAMPLE_RECORD_PATH = FIXTURES / "medmat_sample_record.json"


@pytest.fixture(autouse=True)
def _isolated_offline_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every test offline, and never logging into the repo's own mlruns/.

    The Makefile exports MLFLOW_TRACKING_URI for the pipeline; a test that forgot to clear it would
    write into the developer's store, so it is cleared here for all of them.
    """
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for name, value in {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DVC_NO_ANALYTICS": "1",
        "GX_ANALYTICS_ENABLED": "false",
    }.items():
        monkeypatch.setenv(name, value)


def write_jpeg(path: Path, size: int = 16, colour: tuple[int, int, int] = (90, 90, 90)) -> Path:
    """A real (decodable) JPEG at `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (size, size), colour).save(path, "JPEG")
    return path


@pytest.fixture
def sample_record() -> dict:
    """The public Med-MAT sample record (dataset 2, CT kidney), a fresh copy per test."""
    return copy.deepcopy(json.loads(SAMPLE_RECORD_PATH.read_text(encoding="utf-8")))


@pytest.fixture
def sample_world(tmp_path: Path, sample_record: dict) -> Path:
    """A data root holding only the public sample record, with a real JPEG at its image path."""
    root = tmp_path / "data"
    write_jpeg(root / sample_record["image"])
    out = root / "Original_Medical_Datasets" / "ori--02-train.json"
    out.parent.mkdir(parents=True)
    out.write_text(json.dumps([sample_record], indent=4, ensure_ascii=False) + "\n", encoding="utf-8")
    return root


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def local_server(cmd: list[str], ready_url: str, *, timeout: float = 60, env: dict | None = None,
                 log_path: Path | None = None):
    """Start a server (mlflow, optuna-dashboard) on 127.0.0.1 and stop it afterwards.

    It runs in its own process group, because mlflow server forks workers: the whole group is
    stopped at the end. Ready = `ready_url` answers HTTP 200; a server that exits or stays silent
    for `timeout` seconds fails the test with the tail of its log.
    """
    import signal
    import subprocess
    import time
    import urllib.request

    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true", **(env or {})}
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)

    def tail() -> str:
        return log_path.read_text()[-2000:] if log_path else ""

    try:
        deadline = time.time() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"{cmd[0]} exited with {proc.returncode}: {tail()}")
            try:
                with urllib.request.urlopen(ready_url, timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:  # not listening yet, or still migrating its store
                pass
            if time.time() > deadline:
                raise RuntimeError(f"{cmd[0]} did not answer {ready_url} within {timeout:.0f} s: {tail()}")
            time.sleep(0.3)
        yield proc
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log_path:
            log.close()

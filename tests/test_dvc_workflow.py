"""DVC as its users drive it, on a real repository holding a tiny Med-MAT-mini and this project's
dvc.yaml: a killed `dvc repro` keeps its finished units; `dvc exp run --queue` + `dvc queue start`
run two experiments whose plots `dvc plots diff` compares; a no-op repro is quick to decide."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
BIN = str(Path(sys.executable).parent)


def small_params() -> dict:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["synth"].update(train_per_subset=40, test_per_subset=20, image_size=32)
    params["model"]["tiny"]["image_size"] = 32
    params["experiment"].update(targets=["03"], combinations=["fixed_area-04-28"], seeds=[0, 1], scaleup_targets=[], limited_targets=[],
                               control=False, workers=2, train_overrides={"max_steps": 30, "batch_size": 16})
    params["designs"].update(samples_per_subset=30, scaleup_total=60, limited_k=[0], dev_size=10)
    params["search"].update(n_trials=2, train={"max_steps": 10, "batch_size": 16})
    params["pretrain"].update(records=160, dev_records=32, steps=8, min_dev_accuracy=0)  # 8 steps: any tower
    return params


def env() -> dict:
    e = {**os.environ, "PATH": BIN + os.pathsep + os.environ["PATH"], "DVC_NO_ANALYTICS": "1",
         "MLFLOW_DISABLE_TELEMETRY": "true", "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    e.pop("MLFLOW_TRACKING_URI", None)
    return e


def sh(*cmd: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    proc = subprocess.run(list(cmd), cwd=cwd, env=env(), capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    return proc


@pytest.fixture(scope="module")
def project(tmp_path_factory) -> Path:
    """A git + DVC repository: this project's dvc.yaml, small params, a tiny generated data/ tracked by DVC."""
    from medmat.config import from_dict
    from medmat.data.synth_world import SynthParams, generate

    root = tmp_path_factory.mktemp("dvcproj")
    shutil.copy(REPO / "dvc.yaml", root / "dvc.yaml")
    shutil.copy(REPO / ".dvcignore", root / ".dvcignore")
    # the stages' code deps (the code that runs is the installed package, i.e. these same files)
    shutil.copytree(REPO / "src", root / "src", ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    (root / ".gitignore").write_text("/mlruns\n/work\n")
    params = small_params()
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    generate(root / "data", from_dict(SynthParams, params["synth"]), progress=False)
    sh("git", "init", "-q", cwd=root)
    sh("git", "config", "user.email", "t@example.invalid", cwd=root)
    sh("git", "config", "user.name", "test", cwd=root)
    sh(sys.executable, "-m", "dvc", "init", "-q", cwd=root)
    sh(sys.executable, "-m", "dvc", "config", "core.analytics", "false", cwd=root)
    sh(sys.executable, "-m", "dvc", "add", "-q", "data", cwd=root)
    sh("git", "add", "-A", cwd=root)
    sh("git", "commit", "-qm", "tiny study", cwd=root)
    return root


def unit_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mtime_ns for p in (root / "work" / "runs").rglob("unit.json")}


def test_killed_repro_keeps_its_finished_units(project):
    cmd = [sys.executable, "-m", "dvc", "repro", "study"]
    log = project / "killed-repro.log"
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=project, env=env(), stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            deadline = time.time() + 300
            while len(unit_files(project)) < 2 and proc.poll() is None and time.time() < deadline:
                time.sleep(0.1)
            assert proc.poll() is None, f"dvc repro ended before it could be killed:\n{log.read_text()[-3000:]}"
            os.killpg(proc.pid, signal.SIGKILL)  # the whole group: dvc, the stage, its worker processes
        finally:
            proc.wait()
    finished = unit_files(project)
    assert len(finished) >= 2, "the stage finished no unit before it was killed"
    sh(sys.executable, "-m", "dvc", "repro", "study", cwd=project)
    after = unit_files(project)
    kept = {k: v for k, v in finished.items() if after.get(k) == v}
    assert kept == finished, "units finished before the kill were run again"
    assert len(after) > len(finished)
    cells = list((project / "work" / "metrics" / "main" / "03").rglob("*.json"))
    assert cells and all(json.loads(c.read_text())["n"] >= 1 for c in cells)


def test_metrics_show_is_one_short_line_per_cell(project):
    sh(sys.executable, "-m", "dvc", "repro", "study", cwd=project)
    out = sh(sys.executable, "-m", "dvc", "metrics", "show", cwd=project).stdout
    lines = [ln for ln in out.splitlines() if "work/metrics/main/03" in ln]
    assert lines and all(len(ln) <= 120 for ln in lines), out
    assert any("baseline.json" in ln for ln in lines)


@pytest.mark.slow  # two whole experiments through the queue: minutes on 2 cores
def test_queued_experiments_and_plots_diff(project):
    sh(sys.executable, "-m", "dvc", "repro", cwd=project)
    sh("git", "add", "-A", cwd=project)
    sh("git", "commit", "-qm", "baseline results", cwd=project, check=False)
    for name, lr in (("lr-high", "0.01"), ("lr-low", "0.001")):
        sh(sys.executable, "-m", "dvc", "exp", "run", "--queue", "-n", name, "-S", f"train.lr={lr}", cwd=project)
    sh(sys.executable, "-m", "dvc", "queue", "start", "-j", "1", cwd=project)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = sh(sys.executable, "-m", "dvc", "queue", "status", cwd=project).stdout
        if status.count("Success") >= 2 or "Failed" in status:
            break
        time.sleep(5)
    assert status.count("Success") >= 2, status
    shown = sh(sys.executable, "-m", "dvc", "exp", "show", "--json", cwd=project).stdout
    assert "lr-high" in shown and "lr-low" in shown
    out = project / "plots-diff"
    sh(sys.executable, "-m", "dvc", "plots", "diff", "lr-high", "lr-low", "-o", str(out), cwd=project)
    html = (out / "index.html").read_text()
    assert "lr-high" in html and "lr-low" in html

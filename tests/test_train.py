"""Training: kill -9 and resume gives the very same model, two-process `accelerate launch`, MLflow
lifecycle (params, metrics, mixture input, model; NaN -> FAILED; pruning propagates), CLI errors."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medmat.data.records import read_records
from medmat.mixture import load_manifest, resolve_mixture, save_manifest, select_manifest
from medmat.models import ModelConfig
from medmat.train import TrainConfig, checkpoints, train_model

BIN = Path(sys.executable).parent
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true", "DVC_NO_ANALYTICS": "1"}
ENV.pop("MLFLOW_TRACKING_URI", None)  # the params file in tmp_path says where to log


@pytest.fixture(autouse=True)
def _one_store_per_test(monkeypatch):
    # mlflow.set_tracking_uri() also exports MLFLOW_TRACKING_URI, and medmat.tracking lets that env
    # variable win over the config; each test here names its own store, so start without it.
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small Med-MAT-mini, its records table, a training manifest and a dev manifest."""
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.synth_world import SynthParams, generate

    root = tmp_path_factory.mktemp("trainworld")
    generate(root / "data", SynthParams(train_per_subset=40, test_per_subset=20, image_size=32), progress=False)
    ingest_to_parquet(root / "data", root / "records.parquet")
    records = read_records(root / "records.parquet")
    _, man = resolve_mixture(records, {"components": {"03": 40, "28": 40}, "seed": 0})
    save_manifest(root / "manifest.json", man)
    _, dev = resolve_mixture(records, {"03": 18}, split="test")
    save_manifest(root / "dev.json", dev)
    return root


def _params(path: Path, store: Path, **train) -> Path:
    cfg = {
        "model": {"backend": "tiny", "tiny": {"image_size": 32}},
        "train": {"max_steps": 120, "batch_size": 16, "eval_every": 40, "checkpoint_every": 20,
                  "keep_checkpoints": 2, "log_every": 10, **train},
        "tracking": {"tracking_uri": f"sqlite:///{store}/mlflow.db", "artifact_root": str(store / "artifacts"),
                     "experiment": "test-train"},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def _train_cmd(world: Path, out: Path, params: Path, *extra: str) -> list[str]:
    return [str(BIN / "medmat"), "train", "--records", str(world / "records.parquet"),
            "--manifest", str(world / "manifest.json"), "--dev-manifest", str(world / "dev.json"),
            "--out", str(out), "--params", str(params), "--target", "03", "--arm", "related", *extra]


def _weights(model_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_kill_and_resume_matches_uninterrupted_run(world, tmp_path):
    store = tmp_path / "mlruns"
    params = _params(tmp_path / "params.yaml", store)
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(_train_cmd(world, run_dir, params), env=ENV, cwd=tmp_path,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not checkpoints(run_dir) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert checkpoints(run_dir), proc.stderr.read().decode()[-2000:]
    assert not (run_dir / "train_metrics.json").exists(), "run finished before it was killed; make it longer"
    first_id = (run_dir / "mlflow_run_id").read_text().strip()

    done = subprocess.run(_train_cmd(world, run_dir, params), env=ENV, cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]
    resumed = json.loads((run_dir / "train_metrics.json").read_text())
    assert 0 < resumed["resumed_from"] < 120
    assert resumed["run_id"] == first_id  # the same MLflow run continued
    assert len(checkpoints(run_dir)) == 2 and not list((run_dir / "checkpoints").glob(".tmp*"))

    # The same training uninterrupted (in-process, same params): identical weights and metrics.
    cfg = yaml.safe_load(params.read_text())
    records = read_records(world / "records.parquet")
    ref = train_model(
        TrainConfig(**cfg["train"]), ModelConfig(**cfg["model"]),
        select_manifest(records, load_manifest(world / "manifest.json")),
        select_manifest(records, load_manifest(world / "dev.json")), out_dir=tmp_path / "ref",
    )
    assert ref.final_train_loss == resumed["final_train_loss"]
    assert [list(x) for x in ref.dev_history] == resumed["dev_history"]
    assert [s for s, _ in ref.dev_history] == [40, 80, 120]
    a, b = _weights(tmp_path / "ref" / "model"), _weights(run_dir / "model")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)

    # MLflow: one FINISHED run with params, tags, metric histories, the mixture input and the model.
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{store}/mlflow.db")
    run = client.get_run(first_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["train.max_steps"] == "120" and run.data.params["model.backend"] == "tiny"
    assert run.data.tags["medmat.arm"] == "related" and run.data.tags["medmat.backend"] == "tiny"
    dev_steps = sorted({m.step for m in client.get_metric_history(first_id, "dev_accuracy")})
    assert dev_steps == [40, 80, 120]
    assert {m.step for m in client.get_metric_history(first_id, "train_loss")} >= {10, 120}
    assert run.inputs.dataset_inputs, "the mixture should be logged as a dataset input"
    logged = client.search_logged_models(experiment_ids=[run.info.experiment_id])
    assert any(m.source_run_id == first_id for m in logged)


def test_two_process_accelerate_launch(world, tmp_path):
    params = _params(tmp_path / "params.yaml", tmp_path / "mlruns", max_steps=12, eval_every=6, checkpoint_every=6)
    # On a CPU-only machine `--multi_gpu` starts the processes through torchrun; they talk over gloo.
    cmd = [str(BIN / "accelerate"), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "medmat.cli",
           *_train_cmd(world, tmp_path / "run", params, "--no-tracking")[1:]]
    done = subprocess.run(cmd, env=ENV, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    metrics = json.loads((tmp_path / "run" / "train_metrics.json").read_text())
    assert metrics["num_processes"] == 2 and metrics["steps"] == 12
    assert [s for s, _ in metrics["dev_history"]] == [6, 12]
    # each process saved its own RNG state into the same atomic checkpoint
    last = checkpoints(tmp_path / "run")[-1]
    assert sorted(p.name for p in last.glob("random_states_*")) == ["random_states_0.pkl", "random_states_1.pkl"]
    from medmat.models import load

    assert (tmp_path / "run" / "model").is_dir() and load(tmp_path / "run" / "model").vocab


def _tracking(tmp_path):
    from medmat.tracking import TrackingConfig

    return TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/mlflow.db", artifact_root=str(tmp_path / "art"),
                          experiment="t")


def _small(world):
    records = read_records(world / "records.parquet")
    return select_manifest(records, load_manifest(world / "manifest.json")), \
        select_manifest(records, load_manifest(world / "dev.json"))


def test_nan_loss_ends_the_run_failed_with_the_reason(world, tmp_path):
    import mlflow

    train_df, _ = _small(world)
    cfg = TrainConfig(max_steps=20, lr=1e35, warmup_steps=1, checkpoint_every=0, progress=False)
    with pytest.raises(FloatingPointError, match="loss is nan"):
        train_model(cfg, ModelConfig(), train_df, out_dir=tmp_path / "run", tracking=_tracking(tmp_path))
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status == "FAILED"
    assert "FloatingPointError: training loss is nan" in run.data.tags["failure_reason"]
    assert not (tmp_path / "run" / "model").exists()


def test_pruning_in_on_eval_propagates(world, tmp_path):
    import mlflow
    import optuna

    train_df, dev_df = _small(world)
    seen = []

    def on_eval(step, acc):
        seen.append((step, acc))
        if step >= 10:
            raise optuna.TrialPruned(f"pruned at {step}")

    cfg = TrainConfig(max_steps=50, batch_size=16, eval_every=5, checkpoint_every=0, progress=False)
    with pytest.raises(optuna.TrialPruned):
        train_model(cfg, ModelConfig(), train_df, dev_df, out_dir=tmp_path / "run", on_eval=on_eval,
                    tracking=_tracking(tmp_path))
    assert [s for s, _ in seen] == [5, 10] and all(0 <= a <= 1 for _, a in seen)
    run_id = (tmp_path / "run" / "mlflow_run_id").read_text().strip()
    run = mlflow.MlflowClient(f"sqlite:///{tmp_path}/mlflow.db").get_run(run_id)
    assert run.info.status != "RUNNING" and run.data.tags.get("medmat.pruned") == "true"
    assert not (tmp_path / "run" / "train_metrics.json").exists()


def test_changed_params_refuse_to_resume(world, tmp_path):
    train_df, _ = _small(world)
    cfg = TrainConfig(max_steps=4, batch_size=16, checkpoint_every=2, progress=False)
    train_model(cfg, ModelConfig(), train_df, out_dir=tmp_path / "run")
    from medmat.config import ConfigError

    with pytest.raises(ConfigError, match="different training setup"):
        train_model(TrainConfig(max_steps=4, batch_size=16, lr=1e-4, checkpoint_every=2, progress=False),
                    ModelConfig(), train_df, out_dir=tmp_path / "run")


def test_cli_errors_are_clear(world, tmp_path, caplog):
    from medmat.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text("train: {max_stpes: 3}\n")
    argv = ["train", "--records", str(world / "records.parquet"), "--manifest", str(world / "manifest.json"),
            "--out", str(tmp_path / "r"), "--no-tracking"]
    assert main(argv + ["--params", str(bad)]) == 2
    assert "max_stpes" in caplog.text and "bad.yaml" in caplog.text
    good = _params(tmp_path / "p.yaml", tmp_path / "mlruns")
    assert main(argv[:4] + [str(tmp_path / "nope.json")] + argv[5:] + ["--params", str(good)]) == 2
    assert "nope.json" in caplog.text
    shutil.rmtree(tmp_path / "r", ignore_errors=True)

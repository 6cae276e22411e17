"""medmat.tracking and medmat.served_model against a real MLflow sqlite store: run lifecycle (FINISHED /
FAILED with reason / KILLED), resume by run id, nested runs and cell parent runs, tags, the experiment's
kind, the mixture as a dataset input, and the pyfunc model answering a question about an image."""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest

from medmat import served_model, tracking
from test_evaluate import make_world, train_tiny  # the coloured-shapes world and its tiny VLM


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One store for the module: creating a sqlite store runs ~7 s of migrations."""
    root = tmp_path_factory.mktemp("mlruns")
    cfg = tracking.TrackingConfig(
        tracking_uri=f"sqlite:///{root}/mlflow.db", artifact_root=str(root / "artifacts"), experiment="test-tracking"
    )
    tracking.setup(cfg)
    return cfg


@pytest.fixture(autouse=True)
def _no_env_uri(monkeypatch):
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)


def client(cfg):
    return mlflow.MlflowClient(cfg.tracking_uri)


def test_setup_creates_store_and_experiment_with_local_artifacts(store):
    db = Path(store.tracking_uri[len("sqlite:///"):])
    assert db.is_file()
    exp = client(store).get_experiment_by_name("test-tracking")
    assert exp.artifact_location == (Path(store.artifact_root).resolve() / "test-tracking").as_uri()
    assert tracking.setup(store) == exp.experiment_id  # idempotent
    # a model-training experiment for the MLflow UI, linked in its machine-learning (runs) view
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"
    assert tracking.experiment_url(store, ui="http://localhost:5000/") == (
        f"http://localhost:5000/#/experiments/{exp.experiment_id}/runs?workflowType=machine_learning")


def test_sqlite_store_is_in_write_ahead_log_mode(store):
    import sqlite3

    db = store.tracking_uri[len("sqlite:///"):]
    assert sqlite3.connect(db).execute("PRAGMA journal_mode").fetchone() == ("wal",)


def test_setup_marks_an_existing_experiment_as_model_training(store):
    # made by an older medmat, or by hand, or tagged by the UI's own guess
    exp_id = client(store).create_experiment("made-elsewhere", tags={"mlflow.experimentKind": "genai_development"})
    other = tracking.TrackingConfig(tracking_uri=store.tracking_uri, artifact_root=store.artifact_root,
                                    experiment="made-elsewhere")
    assert tracking.setup(other) == exp_id
    assert client(store).get_experiment(exp_id).tags["mlflow.experimentKind"] == "custom_model_development"
    tracking.setup(store)


def test_env_uri_overrides_params(store, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store.tracking_uri)
    elsewhere = tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/never/mlflow.db",
                                        artifact_root=str(tmp_path / "a"), experiment="test-tracking")
    assert tracking.effective_uri(elsewhere) == store.tracking_uri
    with tracking.tracked_run(elsewhere, run_name="env") as run:
        pass
    assert client(store).get_run(run.info.run_id).info.status == "FINISHED"
    assert not (tmp_path / "never").exists()


def test_setup_does_not_leak_its_uri_into_the_environment(store, tmp_path):
    # mlflow.set_tracking_uri exports MLFLOW_TRACKING_URI; left there it would override the next
    # setup() with another store in the same process (env wins over params by design).
    tracking.setup(store)
    assert "MLFLOW_TRACKING_URI" not in os.environ
    assert mlflow.get_tracking_uri() == store.tracking_uri
    other = tracking.TrackingConfig(tracking_uri=f"sqlite:///{tmp_path}/never/mlflow.db", experiment="x")
    assert tracking.effective_uri(other) == other.tracking_uri


def test_finished_run_has_params_tags_metrics(store):
    tags = tracking.run_tags(target="CT-Lung-COVID", arm="related", backend="tiny", seed=2, extra={"direction": "area"})
    params = {"train": {"lr": 1e-3, "epochs": 2}, "model": {"backend": "tiny", "tiny": {"channels": [8, 16]}}}
    with tracking.tracked_run(store, run_name="ok", tags=tags, params=params) as run:
        for step in range(3):
            tracking.log_metrics({"loss": 1.0 / (step + 1), "dev_accuracy": float("nan")}, step=step)
    got = client(store).get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.info.run_name == "ok"
    assert got.data.params == {"train.lr": "0.001", "train.epochs": "2", "model.backend": "tiny",
                               "model.tiny.channels": "[8, 16]"}
    t = got.data.tags
    assert t["medmat.target"] == "CT-Lung-COVID" and t["medmat.arm"] == "related"
    assert t["medmat.backend"] == "tiny" and t["medmat.seed"] == "2" and t["medmat.direction"] == "area"
    assert t["medmat.git_commit"] == tracking.git_commit() and t["medmat.data_version"] == tracking.data_version()
    hist = client(store).get_metric_history(run.info.run_id, "loss")
    assert [m.step for m in hist] == [0, 1, 2]
    assert "dev_accuracy" not in got.data.metrics  # NaN skipped, not logged


def test_exception_ends_run_failed_with_reason(store):
    with pytest.raises(FloatingPointError):
        with tracking.tracked_run(store, run_name="nan") as run:
            raise FloatingPointError("loss is NaN at step 7")
    got = client(store).get_run(run.info.run_id)
    assert got.info.status == "FAILED"
    assert got.data.tags["failure_reason"] == "FloatingPointError: loss is NaN at step 7"
    assert mlflow.active_run() is None


def test_keyboard_interrupt_ends_run_killed(store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run(store, run_name="ctrl-c") as run:
            raise KeyboardInterrupt
    got = client(store).get_run(run.info.run_id)
    assert got.info.status == "KILLED" and "failure_reason" not in got.data.tags


def test_pruned_optuna_trial_is_not_a_failure(store):
    import optuna
    with pytest.raises(optuna.TrialPruned):
        with tracking.tracked_run(store, run_name="pruned") as run:
            raise optuna.TrialPruned("step 3")
    got = client(store).get_run(run.info.run_id)
    assert got.info.status == "FINISHED" and got.data.tags["medmat.pruned"] == "true"


def test_resume_by_run_id_continues_the_same_run(store):
    with pytest.raises(KeyboardInterrupt):
        with tracking.tracked_run(store, run_name="resumable", params={"lr": 0.1}) as run:
            tracking.log_metrics({"loss": 2.0}, step=0)
            raise KeyboardInterrupt  # killed mid-training
    run_id = run.info.run_id
    assert client(store).get_run(run_id).info.status == "KILLED"
    # restarted: same run, params unchanged (a changed value is kept as logged, not an error)
    with tracking.tracked_run(store, run_id=run_id, params={"lr": 0.1, "lr_note": "x"}) as again:
        tracking.log_metrics({"loss": 1.0}, step=1)
    assert again.info.run_id == run_id
    got = client(store).get_run(run_id)
    assert got.info.status == "FINISHED"
    assert got.data.params == {"lr": "0.1", "lr_note": "x"}
    assert [m.value for m in client(store).get_metric_history(run_id, "loss")] == [2.0, 1.0]
    with tracking.tracked_run(store, run_id=run_id, params={"lr": 0.5}):
        pass
    assert client(store).get_run(run_id).data.params["lr"] == "0.1"


def test_nested_runs_under_active_or_named_parent(store):
    with tracking.tracked_run(store, run_name="study") as parent:
        with tracking.tracked_run(store, run_name="trial-0", nested=True) as child:
            pass
    # an Optuna worker process: the parent is not active there, only its id is known
    with tracking.tracked_run(store, run_name="trial-1", parent_run_id=parent.info.run_id) as child2:
        pass
    for c in (child, child2):
        assert client(store).get_run(c.info.run_id).data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert client(store).get_run(parent.info.run_id).info.status == "FINISHED"


def test_parent_run_is_created_once_and_found_again_by_key(store):
    name = "03 CT-Lung-COVID · fixed_area-04-28/related"
    parent = tracking.parent_run(store, name, key="mini/03/fixed_area-04-28/related",
                                 tags={"medmat.arm": "fixed_area-04-28/related"})
    assert tracking.parent_run(store, "renamed", key="mini/03/fixed_area-04-28/related") == parent
    other = tracking.parent_run(store, name, key="mini/03/fixed_area-04-28/baseline_plus")
    assert other != parent
    with tracking.tracked_run(store, run_name=f"{name} · seed 0", parent_run_id=parent) as seed0:
        tracking.log_metrics({"test_accuracy": 0.75})
    tracking.log_metrics({"cell_accuracy": 0.75, "nan": float("nan")}, run_id=parent, cfg=store)  # not reopened
    tracking.log_metrics({"cell_n": 1}, run_id=parent)  # the store set up last, not the default one
    got = client(store).get_run(parent)
    assert got.info.run_name == name and got.info.status == "FINISHED"
    assert got.data.tags["medmat.arm"] == "fixed_area-04-28/related"
    assert got.data.metrics == {"cell_accuracy": 0.75, "cell_n": 1.0}
    assert client(store).get_run(seed0.info.run_id).data.tags["mlflow.parentRunId"] == parent
    client(store).delete_run(parent)  # a deleted parent is not reused
    assert tracking.parent_run(store, name, key="mini/03/fixed_area-04-28/related") != parent
    with pytest.raises(ValueError, match="quotes"):
        tracking.parent_run(store, name, key="it's")


def test_importing_tracking_imports_no_mlflow():
    # A process that only reads run ids (a no-op pipeline pass) must not pay MLflow's import (seconds).
    code = "import sys, medmat.tracking, medmat.names; print(sorted(m for m in sys.modules if m.startswith('mlflow')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_data_version_and_git_commit(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert tracking.data_version() == "untracked"
    assert tracking.git_commit() == "unknown"  # not a git repository
    (tmp_path / "data.dvc").write_text(
        "outs:\n- md5: 0123456789abcdef0123456789abcdef.dir\n  size: 12\n  nfiles: 3\n  path: data\n"
    )
    assert tracking.data_version() == "0123456789abcdef0123456789abcdef.dir"
    subprocess.run(["git", "init", "-q"], check=True)
    subprocess.run(["git", "-c", "user.email=t@t", "-c", "user.name=t", "commit", "-q", "--allow-empty", "-m", "x"],
                   check=True)
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    sub = tmp_path / "sub"
    sub.mkdir()
    assert tracking.git_commit(sub) == head and len(head) == 40
    (tmp_path / "bad.dvc").write_text("outs: [\n")
    with pytest.raises(ValueError, match="bad.dvc"):
        tracking.data_version(tmp_path / "bad.dvc")


def test_log_mixture_as_dataset_input(store):
    manifest = {
        "components": {"04": {"requested": 10, "selected": 8, "sha256": "a" * 64},
                       "28": {"requested": 5, "selected": 5, "sha256": "b" * 64}},
        "seed": 0, "total": 13, "sha256": "c" * 64, "record_ids": [f"r{i}" for i in range(13)],
    }
    with tracking.tracked_run(store, run_name="mixture") as run:
        tracking.log_mixture(manifest, "0123abcd.dir")
    got = client(store).get_run(run.info.run_id)
    (inp,) = got.inputs.dataset_inputs
    assert inp.dataset.digest == ("c" * 64)[:36]
    assert "0123abcd.dir" in inp.dataset.source
    assert {t.key: t.value for t in inp.tags}["mlflow.data.context"] == "training"
    assert json.loads(inp.dataset.profile)["num_rows"] == 2  # one row per component
    assert [c["name"] for c in json.loads(inp.dataset.schema)["mlflow_colspec"]] == [
        "subset", "requested", "selected", "sha256"]
    path = mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="manifest.json",
                                               tracking_uri=store.tracking_uri)
    assert json.loads(Path(path).read_text())["record_ids"] == manifest["record_ids"]


def test_logged_pyfunc_model_answers_a_question_about_an_image(store, tmp_path):
    root = tmp_path / "world"
    df = make_world(root)
    backend = train_tiny(root, df)
    backend.save(tmp_path / "model")
    with tracking.tracked_run(store, run_name="model") as run:
        uri = served_model.log_model(tmp_path / "model", input_example=True)  # MLflow predicts on it
    assert uri.startswith("models:/")
    model = mlflow.pyfunc.load_model(uri)
    assert model.metadata.saved_input_example_info is not None
    assert model.metadata.run_id == run.info.run_id
    test = df[df.split == "test"]
    # as file paths
    answers = model.predict(test[["image_path", "question_choice"]].rename(columns={"image_path": "image"}))
    acc = sum(a == b for a, b in zip(answers, test.answer_letter)) / len(test)
    assert acc >= 0.9
    # as base64 PNG bytes, with a prompt written by hand in the Med-MAT format
    row = test[test.answer_text == "Cyst"].iloc[0]
    png = base64.b64encode(Path(row.image_path).read_bytes()).decode()
    options = list(row.options)
    prompt = ("What does this image show?\n" + "\n".join(f"{'ABC'[i]}: {o}" for i, o in enumerate(options))
              + "\nAnswer with the option's letter from the given choices directly.")
    (letter,) = model.predict(pd.DataFrame({"image": [png], "question_choice": [prompt]}))
    assert options["ABC".index(letter)] == "Cyst"
    # another prompt format is not what the model was trained on: an error naming the row
    loose = "What does this image show?\n" + "\n".join(f"{'ABC'[i]}. {o}" for i, o in enumerate(options))
    with pytest.raises(Exception, match="row 1: question_choice is not a Med-MAT Question-choice prompt"):
        model.predict(pd.DataFrame({"image": [png, png], "question_choice": [prompt, loose]}))
    # the generate scorer through params
    (letter2,) = model.predict(pd.DataFrame({"image": [png], "question_choice": [prompt]}),
                               params={"scorer": "generate"})
    assert letter2 == letter
    with pytest.raises(Exception, match="neither an existing file nor base64"):
        model.predict(pd.DataFrame({"image": ["/no/such.png"], "question_choice": [prompt]}))


def test_log_model_needs_a_saved_dir(store, tmp_path):
    with tracking.tracked_run(store, run_name="nomodel"):
        with pytest.raises(FileNotFoundError, match="model directory not found"):
            served_model.log_model(tmp_path / "absent")

"""A real `mlflow server` on 127.0.0.1 (the team setup: tracking URI = a server): a run logged through
medmat.tracking is found through the REST API with its tags, metrics, mixture input and logged model,
and the logged pyfunc model, loaded through the server, answers a question about an image."""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import requests

from medmat import served_model, tracking
from medmat.scoring import evaluate_backend
from conftest import free_port, local_server
from test_evaluate import make_world, train_tiny


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("server")
    port = free_port()
    mlflow_bin = Path(sys.executable).with_name("mlflow")
    cmd = [str(mlflow_bin if mlflow_bin.exists() else shutil.which("mlflow")), "server",
           "--backend-store-uri", f"sqlite:///{root}/mlflow.db",
           "--default-artifact-root", str(root / "artifacts"),
           "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    url = f"http://127.0.0.1:{port}"
    # No background job executor: it spawns workers at start-up that this test does not use.
    with local_server(cmd, f"{url}/health", env={"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},
                      log_path=root / "server.log"):
        yield url


def api(url, method, path, **kw):
    r = requests.request(method, f"{url}/api/2.0/mlflow/{path}", timeout=10, **kw)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return r.json()


def test_run_metrics_and_model_found_through_rest_api(server, tmp_path, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)  # env wins over params: the team server
    cfg = tracking.TrackingConfig(experiment="server-test")

    root = tmp_path / "world"
    df = make_world(root, per_label=6)
    backend = train_tiny(root, df)
    backend.save(tmp_path / "model")
    result = evaluate_backend(backend, df[df.split == "test"])

    tags = tracking.run_tags(target="CT-Kidney-Cyst", arm="related", backend="tiny", seed=0)
    with tracking.tracked_run(cfg, run_name="related-seed0", tags=tags, params={"train": {"lr": 0.01}}) as run:
        tracking.log_metrics({"train_loss": 0.5}, step=0)
        tracking.log_metrics(result.mlflow_metrics("test"))
        tracking.log_mixture({"components": {"04": {"requested": 36, "selected": 36, "sha256": "d" * 64}},
                              "seed": 0, "total": 36, "sha256": "e" * 64}, "untracked")
        model_uri = served_model.log_model(tmp_path / "model")
    run_id = run.info.run_id

    # --- REST: experiment, run search by tag, metrics, params, input, artifacts, logged model
    exp = api(server, "GET", "experiments/get-by-name", params={"experiment_name": "server-test"})["experiment"]
    # the UI opens it as a model-training experiment, not in its GenAI (traces) view
    assert {t["key"]: t["value"] for t in exp["tags"]}["mlflow.experimentKind"] == "custom_model_development"
    found = api(server, "POST", "runs/search", json={
        "experiment_ids": [exp["experiment_id"]],
        "filter": "tags.`medmat.arm` = 'related' and metrics.test_accuracy > 0.5",
    })["runs"]
    assert [r["info"]["run_id"] for r in found] == [run_id]
    info = found[0]
    assert info["info"]["status"] == "FINISHED"
    metrics = {m["key"]: m["value"] for m in info["data"]["metrics"]}
    assert metrics["test_accuracy"] == pytest.approx(result.accuracy)
    assert metrics["test_s04_accuracy"] == pytest.approx(result.per_subset["04"]["accuracy"])
    assert {p["key"]: p["value"] for p in info["data"]["params"]} == {"train.lr": "0.01"}
    tag_map = {t["key"]: t["value"] for t in info["data"]["tags"]}
    assert tag_map["medmat.target"] == "CT-Kidney-Cyst" and tag_map["medmat.backend"] == "tiny"
    (ds,) = info["inputs"]["dataset_inputs"]
    assert ds["dataset"]["digest"] == ("e" * 64)[:36]
    hist = api(server, "GET", "metrics/get-history", params={"run_id": run_id, "metric_key": "train_loss"})
    assert [m["value"] for m in hist["metrics"]] == [0.5]
    arts = api(server, "GET", "artifacts/list", params={"run_id": run_id})
    assert "manifest.json" in {f["path"] for f in arts.get("files", [])}

    model_id = model_uri.split("/")[-1]
    models = api(server, "POST", "logged-models/search", json={"experiment_ids": [exp["experiment_id"]]})["models"]
    (lm,) = [m for m in models if m["info"]["model_id"] == model_id]
    assert lm["info"]["source_run_id"] == run_id and lm["info"]["status"] == "LOGGED_MODEL_READY"

    # --- the pyfunc model, loaded through the server, answers a question about an image
    model = mlflow.pyfunc.load_model(model_uri)
    test = df[df.split == "test"].head(8)
    answers = model.predict(pd.DataFrame({"image": test.image_path, "question_choice": test.question_choice}))
    assert answers == [p["predicted_letter"] for p in result.predictions[:8]]
    assert sum(a == b for a, b in zip(answers, test.answer_letter)) >= 7


def test_failed_run_is_failed_with_reason_on_the_server(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    cfg = tracking.TrackingConfig(experiment="server-test")
    with pytest.raises(FloatingPointError):
        with tracking.tracked_run(cfg, run_name="nan") as run:
            raise FloatingPointError("loss is NaN at step 12")
    got = api(server, "GET", "runs/get", params={"run_id": run.info.run_id})["run"]
    assert got["info"]["status"] == "FAILED"
    assert {t["key"]: t["value"] for t in got["data"]["tags"]}["failure_reason"] == \
        "FloatingPointError: loss is NaN at step 12"


def test_cell_parent_run_groups_its_seed_runs_on_the_server(server, monkeypatch):
    monkeypatch.setenv("MLFLOW_TRACKING_URI", server)
    cfg = tracking.TrackingConfig(experiment="server-cells")
    name = "03 CT-Lung-COVID · fixed_area-04-28/related"
    parent = tracking.parent_run(cfg, name, key="mini/03/fixed_area-04-28/related", tags={"medmat.arm": "related"})
    for seed in (0, 1):
        with tracking.tracked_run(cfg, run_name=f"{name} · seed {seed}", parent_run_id=parent):
            tracking.log_metrics({"test_accuracy": 0.5 + seed / 10})
    # a rerun (another process, same cell) finds the same parent
    assert tracking.parent_run(cfg, name, key="mini/03/fixed_area-04-28/related") == parent
    tracking.log_metrics({"cell_accuracy_mean": 0.55}, run_id=parent, cfg=cfg)
    exp = api(server, "GET", "experiments/get-by-name", params={"experiment_name": "server-cells"})["experiment"]
    children = api(server, "POST", "runs/search", json={
        "experiment_ids": [exp["experiment_id"]], "filter": f"tags.`mlflow.parentRunId` = '{parent}'"})["runs"]
    assert sorted(r["info"]["run_name"] for r in children) == [f"{name} · seed 0", f"{name} · seed 1"]
    got = api(server, "GET", "runs/get", params={"run_id": parent})["run"]
    assert got["info"]["run_name"] == name and got["info"]["status"] == "FINISHED"
    assert {m["key"]: m["value"] for m in got["data"]["metrics"]} == {"cell_accuracy_mean": 0.55}

"""The registry on a real MLflow SQLite store: versions per run, the champion rule, idempotence, pyfunc.

Runs are real MLflow runs holding a real logged model (a tiny VLM saved by its backend), with the run
directory layout `medmat evaluate` leaves (metrics.json + mlflow_run_id + manifest.json).
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from pathlib import Path

import pandas as pd
import pytest

from medmat import registry, tracking

from conftest import free_port, local_server, write_jpeg

TRIPLET = "CT-Lung-COVID"
QC = "What disease is shown in this image?\nA: COVID-19\nB: Normal\nAnswer with the option's letter from the given choices directly."


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """One fresh MLflow store for this module (creating one costs seconds of schema migrations);
    tests keep apart by using different targets. Env wins over params, as for a team server."""
    root = tmp_path_factory.mktemp("mlflow")
    uri = f"sqlite:///{root}/mlflow.db"
    old = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    cfg = tracking.TrackingConfig(tracking_uri=uri, artifact_root=str(root / "artifacts"), experiment="reg-test")
    tracking.setup(cfg)
    yield cfg
    if old is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = old


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A saved tiny VLM (vocabulary from four real records with real JPEGs)."""
    from medmat import models

    root = tmp_path_factory.mktemp("world")
    rows = []
    for i in range(4):
        img = write_jpeg(root / f"img{i}.jpg", colour=(40 * i, 90, 90))
        rows.append({"record_id": f"r{i}", "image": img.name, "image_path": str(img), "question": "What disease is shown in this image?",
                     "question_choice": QC, "options": ["COVID-19", "Normal"], "answer_letter": "AB"[i % 2],
                     "answer_text": ["COVID-19", "Normal"][i % 2], "subset_no": 3})
    backend = models.build({"backend": "tiny", "tiny": {"image_size": 16, "channels": [4], "embed_dim": 8,
                                                         "hidden": 8}}, data_root=root)
    backend.prepare_training(pd.DataFrame(rows))
    out = root / "model"
    backend.save(out)
    return out, root / "img0.jpg"


def make_run(cfg, runs_root: Path, arm: str, seed: int, accuracy: float, model: Path, triplet: str = TRIPLET) -> Path:
    run_dir = runs_root / "03" / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    tags = tracking.run_tags(target=triplet, arm=arm, backend="tiny", seed=seed)
    with tracking.tracked_run(cfg, run_name=f"03/{arm}/seed{seed}", tags=tags) as run:
        tracking.log_model(model, input_example=False)
    tracking.write_run_id(run_dir, run.info.run_id)
    (run_dir / "manifest.json").write_text(json.dumps({"components": {"04": {"requested": 100, "selected": 100}}}))
    (run_dir / "metrics.json").write_text(json.dumps({"accuracy": accuracy, "ci95": [accuracy - 0.05, accuracy + 0.05],
                                                      "n": 200}))
    return run_dir


def test_model_name_is_readable():
    assert registry.model_name("CT-Lung-COVID") == "medmat-CT-Lung-COVID"
    assert registry.model_name("X-ray-Chest/Lung-Level") == "medmat-X-ray-Chest_Lung-Level"


def test_champion_rule_and_idempotence(store, tmp_path, model_dir):
    import mlflow

    model, _ = model_dir
    runs = tmp_path / "runs"
    client = mlflow.MlflowClient()
    name = "medmat-" + TRIPLET
    make_run(store, runs, "baseline_plus", 0, 0.55, model)
    first = registry.register_runs(runs, "03", client=client)
    assert [(o.version, o.created, o.moved) for o in first] == [("1", True, True)]

    make_run(store, runs, "related_fixed_area", 0, 0.80, model)   # better: takes the alias
    make_run(store, runs, "related_fixed_task", 0, 0.70, model)   # worse than 0.80: never takes it
    out = {Path(o.run_dir).parent.name: o for o in registry.register_runs(runs, "03", client=client)}
    assert str(client.get_model_version_by_alias(name, "champion").version) == out["related_fixed_area"].version
    assert out["related_fixed_task"].created and not out["related_fixed_task"].moved
    assert not out["baseline_plus"].created  # registered before: no second version

    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 3
    again = registry.register_runs(runs, "03", client=client)
    assert not any(o.created or o.moved for o in again)
    assert len(client.search_model_versions(f"name = '{name}'")) == 3  # a rerun adds nothing

    # an equal score is not "better": the alias stays where it is
    make_run(store, runs, "all_related", 0, 0.80, model)
    registry.register_runs(runs, "03", client=client)
    champ = client.get_model_version_by_alias(name, "champion")
    assert str(champ.version) == out["related_fixed_area"].version
    assert champ.tags["medmat.test_accuracy"] == "0.8" and champ.tags["medmat.target"] == TRIPLET
    assert champ.tags["medmat.arm"] == "related_fixed_area" and json.loads(champ.tags["medmat.mixture"]) == {"04": 100}
    assert "medmat.git_commit" in champ.tags and "medmat.data_version" in champ.tags
    assert champ.tags["medmat.test_ci95"] == "[0.7500, 0.8500]" and "0.8000" in champ.description


def test_subset_label_tag_and_run_without_model(store, tmp_path, model_dir):
    """Runs tagged "03" (the pipeline's folder label) join the triplet's model; a run without a logged
    model is skipped, not fatal."""
    import mlflow

    model, _ = model_dir
    runs = tmp_path / "runs"
    make_run(store, runs, "related_fixed_area", 0, 0.6, model, triplet="28")
    bare = runs / "03" / "bare" / "seed0"
    bare.mkdir(parents=True)
    with tracking.tracked_run(store, run_name="bare", tags=tracking.run_tags(target="28", arm="bare")) as run:
        pass
    tracking.write_run_id(bare, run.info.run_id)
    (bare / "metrics.json").write_text(json.dumps({"accuracy": 0.9, "ci95": [0.8, 0.95], "n": 100}))
    out = registry.register_runs(runs, client=mlflow.MlflowClient())
    assert [(o.name, o.version) for o in out] == [("medmat-X-ray-Lung-COVID", "1")]


def test_bad_run_dir_is_a_clear_error(store, tmp_path, model_dir):
    import mlflow

    run_dir = tmp_path / "runs" / "03" / "x" / "seed0"
    run_dir.mkdir(parents=True)
    (run_dir / "mlflow_run_id").write_text("nope\n")
    (run_dir / "metrics.json").write_text(json.dumps({"n": 3}))
    with pytest.raises(registry.RegistryError, match=r"metrics\.json.*accuracy"):
        registry.register_runs(tmp_path / "runs", client=mlflow.MlflowClient())


def test_champion_pyfunc_answers_and_server_serves_it(store, tmp_path, model_dir):
    import mlflow

    model, image = model_dir
    runs = tmp_path / "runs"
    make_run(store, runs, "related_fixed_area", 0, 0.8, model, triplet="MRI-Brain-Cancer")
    registry.register_runs(runs, "03", client=mlflow.MlflowClient())
    name = "medmat-MRI-Brain-Cancer"

    loaded = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    answers = loaded.predict(pd.DataFrame({"image": [str(image)], "question_choice": [QC]}))
    assert list(answers) and answers[0] in ("A", "B")

    port = free_port()
    exe = Path(sys.executable).with_name("mlflow")
    cmd = [str(exe), "server", "--backend-store-uri", store.tracking_uri, "--default-artifact-root",
           store.artifact_root, "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    with local_server(cmd, f"http://127.0.0.1:{port}/health"):
        base = f"http://127.0.0.1:{port}/api/2.0/mlflow/registered-models"
        with urllib.request.urlopen(f"{base}/get?name={urllib.parse.quote(name)}", timeout=5) as r:
            body = json.loads(r.read())
        aliases = {a["alias"]: a["version"] for a in body["registered_model"].get("aliases", [])}
        assert aliases.get("champion") == "1"
        q = urllib.parse.urlencode({"name": name, "alias": "champion"})
        with urllib.request.urlopen(f"{base}/alias?{q}", timeout=5) as r:
            mv = json.loads(r.read())["model_version"]
        assert mv["version"] == "1" and any(t["key"] == "medmat.test_accuracy" for t in mv["tags"])

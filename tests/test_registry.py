"""The registry on a real MLflow SQLite store: candidates only, champion by mean dev accuracy, one
version per arm, names scoped by world and backend, idempotence, pyfunc.

Runs are real MLflow runs holding a real logged model (a tiny VLM saved by its backend), with the run
directory layout `medmat.unit` leaves (metrics.json + mlflow_run_id + manifest.json).
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

from medmat import registry, served_model, tracking

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


def make_run(cfg, runs_root: Path, arm: str, seed: int, dev: float, test: float, model: Path | None,
             candidate: bool = True, world: str = "mini", backend: str = "tiny", target: str = "03",
             triplet: str = TRIPLET, trained_on_target: bool = False) -> Path:
    """A run dir as `medmat.unit` leaves it: a real MLflow run (with a real logged model where `model`),
    mlflow_run_id, manifest.json and metrics.json in the contract's layout."""
    run_dir = runs_root / target / arm / f"seed{seed}"
    run_dir.mkdir(parents=True)
    tags = tracking.run_tags(target=triplet, arm=arm, backend=backend, seed=seed)
    with tracking.tracked_run(cfg, run_name=f"{target}/{arm}/seed{seed}", tags=tags) as run:
        if model is not None:
            served_model.log_model(model)
    tracking.write_run_id(run_dir, run.info.run_id)
    (run_dir / "manifest.json").write_text(json.dumps({"components": {"04": {"requested": 100, "selected": 100}}}))
    (run_dir / "metrics.json").write_text(json.dumps({
        "accuracy": test, "ci95": [test - 0.05, test + 0.05], "n": 200, "dev_accuracy": dev, "dev_n": 60,
        "seed": seed, "target": target, "triplet": triplet, "arm": arm,
        "combination": arm.split("/")[0] if arm.endswith("/related") else None, "world": world,
        "backend": backend, "trained_on_target": trained_on_target, "candidate": candidate}))
    return run_dir


def test_model_name_is_scoped_by_world_and_backend():
    assert registry.model_name("mini", "tiny", "CT-Lung-COVID") == "medmat-mini-tiny-CT-Lung-COVID"
    assert registry.model_name("medmat", "hf", "CT-Lung-COVID") == "medmat-real-hf-CT-Lung-COVID"
    assert registry.model_name("mini", "tiny", "X-ray-Chest/Lung-Level") == "medmat-mini-tiny-X-ray-Chest_Lung-Level"


def test_champion_is_the_best_mean_dev_candidate_arm(store, tmp_path, model_dir):
    """Baselines and arms that saw the target never become champion even with the best scores; the
    champion is chosen by mean dev accuracy where test accuracy says otherwise; one version per arm
    (its best-dev seed); a rerun adds nothing; the alias only moves forward."""
    import mlflow

    model, _ = model_dir
    runs = tmp_path / "runs"
    client = mlflow.MlflowClient(store.tracking_uri)
    name = "medmat-mini-tiny-" + TRIPLET
    # the best scores of all, on runs that are no CG candidates (each with a real logged model, so the
    # only thing keeping them out is the rule)
    make_run(store, runs, "baseline", 0, dev=0.99, test=0.99, model=model, candidate=False)
    make_run(store, runs, "fixed_area-04-28/baseline_plus", 0, dev=0.98, test=0.98, model=model, candidate=False)
    # a file claiming candidacy for an arm trained on the target's own data is still refused
    make_run(store, runs, "in_distribution", 0, dev=0.97, test=0.97, model=model, candidate=True,
             trained_on_target=True)
    make_run(store, runs, "limited/related_k100", 0, dev=0.96, test=0.96, model=model, candidate=True)
    # test and dev disagree: A is better on test, B on dev -> B is champion
    # (dev values are binary fractions: the means are exact, so "equal" below is equal)
    a = [make_run(store, runs, "fixed_task-04-28/related", s, dev=d, test=0.95, model=model)
         for s, d in ((0, 0.625), (1, 0.6875))]
    b = [make_run(store, runs, "fixed_area-04-28/related", s, dev=d, test=t, model=model)
         for s, d, t in ((0, 0.75, 0.62), (1, 0.875, 0.6), (2, 0.625, 0.61))]
    out = {o.arm: o for o in registry.register_runs(runs, "03", client=client)}
    assert sorted(out) == ["fixed_area-04-28/related", "fixed_task-04-28/related"]
    versions = client.search_model_versions(f"name = '{name}'")
    assert len(versions) == 2                                    # one per arm, not one per seed
    champ = client.get_model_version_by_alias(name, "champion")
    assert champ.tags["medmat.arm"] == "fixed_area-04-28/related"
    assert champ.run_id == registry.read_seed(b[1])[1].run_id   # the arm's best-dev seed
    assert float(champ.tags["medmat.mean_dev_accuracy"]) == 0.75
    assert champ.tags["medmat.test_accuracy"] == "0.6" and champ.tags["medmat.seeds"] == "0,1,2"
    assert champ.tags["medmat.world"] == "mini" and champ.tags["medmat.backend"] == "tiny"
    assert json.loads(champ.tags["medmat.mixture"]) == {"04": 100} and "medmat.git_commit" in champ.tags
    assert out["fixed_task-04-28/related"].created and not out["fixed_task-04-28/related"].champion
    assert out["fixed_task-04-28/related"].run_id == registry.read_seed(a[1])[1].run_id

    again = registry.register_runs(runs, "03", client=client)
    assert not any(o.created or o.moved for o in again)           # a rerun adds nothing
    assert len(client.search_model_versions(f"name = '{name}'")) == 2

    # equal mean dev is not "better"; the search's best with a higher mean takes the alias
    make_run(store, runs, "all_related_like/related", 0, dev=0.75, test=0.99, model=model)
    registry.register_runs(runs, "03", client=client)
    assert client.get_model_version_by_alias(name, "champion").tags["medmat.arm"] == "fixed_area-04-28/related"
    make_run(store, runs, "search_best", 0, dev=0.875, test=0.10, model=model)
    moved = [o for o in registry.register_runs(runs, "03", client=client) if o.moved]
    assert [o.arm for o in moved] == ["search_best"]
    assert client.get_model_version_by_alias(name, "champion").tags["medmat.arm"] == "search_best"
    # never backwards: a worse arm registered later does not take it
    make_run(store, runs, "modality_area-04-28/related", 0, dev=0.50, test=1.0, model=model)
    registry.register_runs(runs, "03", client=client)
    assert client.get_model_version_by_alias(name, "champion").tags["medmat.arm"] == "search_best"


def test_mini_world_champion_does_not_block_a_real_data_model(store, tmp_path, model_dir):
    import mlflow

    model, _ = model_dir
    runs = tmp_path / "runs"
    client = mlflow.MlflowClient(store.tracking_uri)
    make_run(store, runs, "fixed_area-04-28/related", 0, dev=0.95, test=0.95, model=model, triplet="MRI-Brain-Cancer")
    real = tmp_path / "real"
    make_run(store, real, "fixed_area-04-28/related", 0, dev=0.40, test=0.40, model=model, world="medmat",
             backend="hf", triplet="MRI-Brain-Cancer")
    registry.register_runs(runs, client=client)
    out = registry.register_runs(real, client=client)
    assert [(o.name, o.version, o.champion) for o in out] == [("medmat-real-hf-MRI-Brain-Cancer", "1", True)]
    assert client.get_model_version_by_alias("medmat-mini-tiny-MRI-Brain-Cancer", "champion").tags[
        "medmat.mean_dev_accuracy"] == "0.95"


def test_candidate_without_model_or_dev_is_skipped_and_bad_files_are_named(store, tmp_path, model_dir):
    import mlflow

    model, _ = model_dir
    runs = tmp_path / "runs"
    make_run(store, runs, "fixed_area-04-28/related", 0, dev=0.6, test=0.6, model=model, target="28",
             triplet="X-ray-Lung-COVID")
    make_run(store, runs, "fixed_task-04-28/related", 0, dev=0.9, test=0.9, model=None, target="28",
             triplet="X-ray-Lung-COVID")                        # tracking was off: no logged model
    nodev = make_run(store, runs, "modality_area-04-28/related", 0, dev=0.95, test=0.9, model=model, target="28",
                     triplet="X-ray-Lung-COVID")
    m = json.loads((nodev / "metrics.json").read_text())
    (nodev / "metrics.json").write_text(json.dumps({**m, "dev_accuracy": None}))  # no dev split: not judged
    out = registry.register_runs(runs, client=mlflow.MlflowClient(store.tracking_uri))
    assert [(o.name, o.arm) for o in out] == [("medmat-mini-tiny-X-ray-Lung-COVID", "fixed_area-04-28/related")]

    bad = tmp_path / "bad" / "03" / "x" / "seed0"
    bad.mkdir(parents=True)
    (bad / "mlflow_run_id").write_text("nope\n")
    (bad / "metrics.json").write_text(json.dumps({"candidate": True, "dev_accuracy": 0.5}))
    with pytest.raises(registry.RegistryError, match=r"metrics\.json.*without \['world', 'backend', 'target', 'arm', 'seed'\]"):
        registry.register_runs(tmp_path / "bad", client=mlflow.MlflowClient(store.tracking_uri))
    with pytest.raises(ValueError, match="dev split"):
        registry.RegisterConfig(metric="accuracy")


def test_champion_pyfunc_answers_and_server_serves_it(store, tmp_path, model_dir):
    import mlflow

    model, image = model_dir
    runs = tmp_path / "runs"
    make_run(store, runs, "fixed_area-04-28/related", 0, dev=0.8, test=0.8, model=model, target="06",
             triplet="CT-Brain-Cancer")
    registry.register_runs(runs, "06", client=mlflow.MlflowClient(store.tracking_uri))
    name = "medmat-mini-tiny-CT-Brain-Cancer"

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
        assert mv["version"] == "1" and any(t["key"] == "medmat.mean_dev_accuracy" for t in mv["tags"])

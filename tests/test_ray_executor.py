"""The study's units as Ray tasks on a local Ray cluster of two worker nodes (127.0.0.1 only).

Each node offers one CPU and one `gpu_slot`, a custom resource standing for a GPU; every unit asks for
one slot, so two units run at once, one per node. The same units run through the in-process
executor give byte-identical predictions; a finished unit is never run again.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import yaml

# Loopback only: Ray otherwise rewrites 127.0.0.1 in a cluster address to this machine's network
# address. This switch (read when ray is imported) makes every Ray process use 127.0.0.1.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
ray = pytest.importorskip("ray")
pytestmark = pytest.mark.timeout(300)  # a Ray that cannot start must fail the test, not hang it

SEEDS = (0, 1)


def build_tiny_study(root: Path, steps: int = 30, seeds=SEEDS):
    """A tiny real world under `root`: Med-MAT-mini (3 subsets, 16 px), ingested, a Related mixture of
    the CT-Lung-COVID target (04 + 28) and its dev split; returns the run specs of Baseline and
    Related x `seeds`, with paths relative to `root` (run them with `root` as working directory)."""
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.records import read_records
    from medmat.data.synth_world import SynthParams, generate
    from medmat.mixture import resolve_mixture, save_manifest
    from medmat.runspec import RunSpec, load_study_params

    generate(root / "data", SynthParams(train_per_subset=40, test_per_subset=20, image_size=16, subsets=[3, 4, 28]),
             progress=False)
    ingest_to_parquet(root / "data", root / "work" / "records.parquet", progress=False)
    params = {
        "model": {"backend": "tiny", "tiny": {"image_size": 16, "channels": [8, 16], "embed_dim": 32}},
        "train": {"max_steps": steps, "batch_size": 16, "lr": 0.01, "warmup_steps": 2, "eval_every": 0,
                  "checkpoint_every": 0, "progress": False},
        "evaluate": {"batch_size": 64},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db", "artifact_root": str(root / "mlruns/art")},
        "experiment": {"seeds": list(seeds), "workers": 1},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    study = load_study_params(root / "params.yaml")
    table = read_records(root / "work" / "records.parquet")
    save_manifest(root / "work" / "related.json", resolve_mixture(table, {"components": {"04": 40, "28": 40}}, seed=0)[1])
    save_manifest(root / "work" / "dev.json", resolve_mixture(table, {"components": {"03": 10}}, seed=0)[1])

    def specs(runs_root: str):
        return [RunSpec(target="03", triplet="CT-Lung-COVID", subset_no=3, arm=arm, seed=s,
                        records="work/records.parquet", run_dir=f"{runs_root}/03/{arm}/seed{s}", params=study,
                        manifest=manifest, dev_manifest="work/dev.json")
                for arm, manifest in (("baseline", None), ("fixed_area-04-28/related", "work/related.json"))
                for s in seeds]

    return specs


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("rayworld")
    return root, build_tiny_study(root)


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and one more node, each 1 CPU + 1 gpu_slot, small object stores, loopback only."""
    from ray.cluster_utils import Cluster

    node = {"num_cpus": 1, "resources": {"gpu_slot": 1}, "object_store_memory": 80 << 20,
            "node_ip_address": "127.0.0.1"}
    cluster = Cluster(initialize_head=True, head_node_args={**node, "include_dashboard": False})
    try:
        cluster.add_node(**node)
        cluster.wait_for_nodes()
        ray.init(address=cluster.address, log_to_driver=False)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def _predictions(root: Path, run_dir: str) -> str:
    return (root / run_dir / "predictions.jsonl").read_text()


def test_units_land_on_both_nodes_and_match_the_in_process_executor(world, two_node_cluster, monkeypatch):
    from medmat.ray_executor import run_units_ray
    from medmat.unit import run_units

    root, specs = world
    monkeypatch.chdir(root)
    local = run_units(specs("runs_local"), workers=1)
    on_ray = run_units_ray(specs("runs_ray"), num_cpus_per_unit=1, resources={"gpu_slot": 1})

    nodes = {n["NodeID"] for n in ray.nodes() if n["Alive"]}
    assert len(nodes) == 2
    assert {r["ray_node_id"] for r in on_ray} == nodes  # both workers took units
    for a, b, spec_a, spec_b in zip(local, on_ray, specs("runs_local"), specs("runs_ray")):
        assert (a["arm"], a["seed"]) == (b["arm"], b["seed"])
        for key in ("accuracy", "ci95", "n", "dev_accuracy", "per_subset"):
            assert a[key] == b[key], key
        assert _predictions(root, spec_a.run_dir) == _predictions(root, spec_b.run_dir)
    # the untrained Baseline and the trained arm differ: the comparison above is not vacuous
    baseline0, related0 = specs("runs_local")[0], specs("runs_local")[len(SEEDS)]
    assert (baseline0.arm, related0.arm) == ("baseline", "fixed_area-04-28/related")
    assert _predictions(root, baseline0.run_dir) != _predictions(root, related0.run_dir)


def test_a_finished_unit_is_not_run_again(world, two_node_cluster, monkeypatch):
    from medmat.ray_executor import dispatch, run_units_ray
    from medmat.unit import UNIT_FILE

    root, specs = world
    monkeypatch.chdir(root)
    first = run_units_ray(specs("runs_again"), resources={"gpu_slot": 1})
    stamps = {s.run_dir: os.stat(Path(s.run_dir) / UNIT_FILE).st_mtime_ns for s in specs("runs_again")}
    again = run_units_ray(specs("runs_again"), resources={"gpu_slot": 1})
    assert all("ray_node_id" not in r for r in again)  # answered by the driver, no task started
    assert [r["accuracy"] for r in again] == [r["accuracy"] for r in first]
    assert stamps == {s.run_dir: os.stat(Path(s.run_dir) / UNIT_FILE).st_mtime_ns for s in specs("runs_again")}
    # the params switch (experiment.executor: ray) reaches the same executor
    exp = specs("runs_again")[0].params.experiment
    if hasattr(exp, "ray_address"):
        exp.executor = "ray"
        assert [r["accuracy"] for r in dispatch(specs("runs_again"), exp)] == [r["accuracy"] for r in first]
    # and a changed setting is a different unit: it runs
    changed = specs("runs_again")[:1]
    changed[0].seed = 7
    (out,) = run_units_ray(changed, resources={"gpu_slot": 1})
    assert "ray_node_id" in out and out["seed"] == 7


def test_a_unit_killed_mid_training_is_retried_and_resumes_from_its_checkpoint(world, two_node_cluster,
                                                                                monkeypatch):
    """kill -9 of the Ray worker running a unit, once it has a checkpoint: Ray retries the task, the
    unit resumes from the checkpoint and ends as an uninterrupted run of the same unit does."""
    import dataclasses
    import threading
    import time

    import psutil

    from medmat.ray_executor import run_units_ray
    from medmat.unit import run_units

    root, specs = world
    monkeypatch.chdir(root)
    base = specs("unused")[len(SEEDS)].params  # the Related arm, seed 0
    longer = dataclasses.replace(base, train=dataclasses.replace(base.train, max_steps=300, checkpoint_every=20))
    killed_spec = dataclasses.replace(specs("runs_killed")[len(SEEDS)], params=longer)
    whole_spec = dataclasses.replace(specs("runs_whole")[len(SEEDS)], params=longer)
    killed: list[int] = []

    def kill_when_checkpointed():
        ckpts = root / killed_spec.run_dir / "checkpoints"
        deadline = time.time() + 120
        while time.time() < deadline:
            if ckpts.is_dir() and any(p.name.startswith("step-") for p in ckpts.iterdir()):
                for proc in psutil.process_iter(["cmdline"]):
                    if any("ray::medmat-unit" in part for part in proc.info["cmdline"] or []):
                        proc.kill()  # SIGKILL: no cleanup, as when a node is lost
                        killed.append(proc.pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_when_checkpointed)
    watcher.start()
    try:
        (out,) = run_units_ray([killed_spec], resources={"gpu_slot": 1})
    finally:
        watcher.join()
    assert killed, "the unit finished before it could be killed"
    train = json.loads((root / killed_spec.run_dir / "train_metrics.json").read_text())
    assert train["steps"] == 300 and train["resumed_from"] and train["resumed_from"] % 20 == 0
    (whole,) = run_units([whole_spec], workers=1)
    assert out["accuracy"] == whole["accuracy"]
    assert _predictions(root, killed_spec.run_dir) == _predictions(root, whole_spec.run_dir)

@pytest.mark.slow
def test_bench_ray_smoke(tmp_path):
    """bench/bench_ray.py runs end to end (2 short units) and finds the same predictions on both executors."""
    import subprocess
    import sys

    out = tmp_path / "bench.json"
    bench = Path(__file__).resolve().parents[1] / "bench" / "bench_ray.py"
    res = subprocess.run([sys.executable, str(bench), "--smoke", "--json", str(out)], capture_output=True,
                         text=True, timeout=280)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    report = json.loads(out.read_text())
    assert report["same_predictions"] and report["local_1_worker_s"] > 0 and report["ray_2_workers_s"] > 0


def test_a_unit_with_train_processes_2_trains_under_accelerate_launch(world, monkeypatch):
    """train.processes: 2 makes the unit start `accelerate launch` with two processes (gloo on this
    CPU-only machine); the unit then evaluates the saved model and logs to the launched MLflow run."""
    import dataclasses

    import mlflow

    from medmat.unit import run_unit

    root, specs = world
    monkeypatch.chdir(root)
    one = specs("runs_one_process")[len(SEEDS)]  # Related, seed 0
    p = one.params
    two = dataclasses.replace(specs("runs_two_processes")[len(SEEDS)],
                              params=dataclasses.replace(p, train=dataclasses.replace(p.train, processes=2)))
    out = run_unit(two)
    train = json.loads((root / two.run_dir / "train_metrics.json").read_text())
    assert train["num_processes"] == 2 and train["steps"] == p.train.max_steps
    assert not list((root / two.run_dir).glob(".launch-*"))  # the spec handed to the launch is gone
    assert 0 <= out["accuracy"] <= 1 and out["n"] > 0
    run_id = (root / two.run_dir / "mlflow_run_id").read_text().strip()
    run = mlflow.MlflowClient(p.tracking.tracking_uri).get_run(run_id)
    assert "train_wall_s" in run.data.metrics  # logged by the launched main process
    assert run.data.metrics["test_accuracy"] == out["accuracy"]  # logged by the unit after the launch
    # the same global batch, split over two processes, follows the one-process run's loss
    run_unit(one)
    ref = json.loads((root / one.run_dir / "train_metrics.json").read_text())
    assert ref["num_processes"] == 1
    assert abs(train["final_train_loss"] - ref["final_train_loss"]) <= 0.05 * ref["final_train_loss"]
    assert two.fingerprint() != one.fingerprint()  # a different setting is a different unit


def _search_worker(storage: str, name: str, n_trials: int, markers: str) -> int:
    """One worker of a search on a cheap analytic objective (storage and recovery do not depend on what
    the objective computes). The first trial of the study writes its pid and number to `markers`/first
    and sleeps until killed."""
    import time

    from medmat import search

    space = search.MixtureSpace(limits={"01": 400, "02": 400, "03": 400}, budget=800, step=50)
    study = search.open_study(name, storage, "tpe", seed=os.getpid(), pruner_startup_trials=100)

    def evaluate(mixture, trial):
        try:  # the first trial any worker enters waits to be killed, so the kill cannot miss a short trial
            with (Path(markers) / "first").open("x") as first:
                first.write(f"{os.getpid()}-{trial.number}")
            time.sleep(60)
        except FileExistsError:
            time.sleep(0.3)
        return 1.0 - abs(mixture.get("01", 0) - 400) / 800

    return search.run_worker(study, space, evaluate, n_trials, search.lock_path(storage, name), progress=False)


def test_search_workers_as_ray_tasks_lose_no_trial_when_one_is_killed(two_node_cluster, tmp_path):
    """Two search workers as Ray tasks (one per node) on one study; the worker process of one is killed
    with -9 inside a trial. Ray retries its task; the retried worker fails the dead one's trial and
    re-enqueues it once: the study ends with exactly n finished trials, none lost or run twice."""
    import threading
    import time

    import optuna
    from optuna.trial import TrialState
    from ray import cloudpickle

    from medmat import search
    from medmat.experiment import ExperimentConfig
    from medmat.ray_cluster import ray_tasks

    cloudpickle.register_pickle_by_value(__import__(__name__))  # this test module is not importable on a node
    storage, name, n = f"sqlite:///{tmp_path}/optuna.db", "ray-workers", 8
    markers = tmp_path / "markers"
    markers.mkdir()
    optuna.create_study(study_name=name, storage=storage, direction="maximize")
    killed: list[tuple[int, int]] = []
    seen: list[str] = []  # what the watcher found, for the failure message

    def kill_first_worker_inside_a_trial():
        deadline = time.time() + 120
        while time.time() < deadline and not killed:
            first = markers / "first"
            mark = first.read_text() if first.exists() else ""
            if mark:  # the worker holding the first trial is inside it until killed
                pid, number = map(int, mark.split("-"))
                try:
                    os.kill(pid, 9)
                except ProcessLookupError:
                    seen.append(f"{mark} had ended")
                else:
                    killed.append((pid, number))
                    return
            time.sleep(0.02)

    watcher = threading.Thread(target=kill_first_worker_inside_a_trial)
    watcher.start()
    try:
        with ray_tasks(_search_worker, [(storage, name, n, str(markers))] * 2, ExperimentConfig(executor="ray"),
                       name="medmat-search-worker") as wait:
            ran = wait()
    finally:
        watcher.join()
    assert killed, f"no worker was killed inside a trial; the watcher saw {seen[-5:]}"
    assert len(ran) == 2  # both tasks ended well: the killed one's through Ray's retry
    trials = optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)
    states = [t.state for t in trials]
    assert sum(s in search.FINISHED for s in states) == n, states  # none lost, no overshoot
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    killed_number = killed[0][1]
    assert [t.number for t in trials if t.state == TrialState.FAIL] == [killed_number]
    retries = [t for t in trials if t.user_attrs.get(search.RETRY_OF) == killed_number]
    assert len(retries) == 1 and retries[0].state in search.FINISHED  # run again exactly once
    assert dict(retries[0].params) == dict(trials[killed_number].params)

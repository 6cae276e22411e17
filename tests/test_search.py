"""Search mechanics on a real Optuna SQLite storage: resume after kill -9, workers, warm start, outputs.

The objective here is a cheap analytic function of the mixture (a real function, not a mock): storage,
locking, recovery and worker behaviour do not depend on what the objective computes. The real
objective (train + dev accuracy) is exercised in test_search_end_to_end (slow).
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from medmat import search

WORKER = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from medmat import search

    storage, name, n_trials, delay, seed = sys.argv[1], sys.argv[2], int(sys.argv[3]), float(sys.argv[4]), int(sys.argv[5])
    space = search.MixtureSpace(limits={"01": 400, "02": 400, "03": 400, "04": 400}, budget=800, step=50)
    study = search.open_study(name, storage, "tpe", seed=seed, pruner_startup_trials=100)
    lock = search.lock_path(storage, name)
    with search.study_lock(lock):
        search.recover_stale(study)
        search.enqueue_warm_start(study, space, {"related_modality": {"01": 300, "02": 300},
                                                 "all_related": {"01": 200, "02": 200, "03": 200, "04": 200}})

    def evaluate(mixture, trial):
        # peak at 01=400, 03=250; report per "step" like training would
        score = 1.0 - abs(mixture.get("01", 0) - 400) / 800 - abs(mixture.get("03", 0) - 250) / 800 \\
            - 0.1 * len(mixture)
        for step in range(3):
            trial.report(score * (step + 1) / 3, step)
            time.sleep(delay)
        return score

    if len(sys.argv) > 6:  # start barrier: tell the test we are ready, wait for "go"
        barrier = Path(sys.argv[6])
        (barrier / f"ready-{__import__('os').getpid()}").touch()
        while not (barrier / "go").exists():
            time.sleep(0.02)
    search.run_worker(study, space, evaluate, n_trials, lock, progress=False)
    """
)


def _env():
    env = dict(os.environ)
    env.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
    return env


def _start(tmp_path: Path, storage: str, name: str, n: int, delay: float, seed: int = 0,
           barrier: Path | None = None) -> subprocess.Popen:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    extra = [str(barrier)] if barrier else []
    return subprocess.Popen([sys.executable, str(script), storage, name, str(n), str(delay), str(seed), *extra],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _trials(storage: str, name: str):
    return optuna.load_study(study_name=name, storage=storage).get_trials(deepcopy=False)


def test_space_mixtures_are_exactly_the_budget_and_enqueue_roundtrips():
    space = search.MixtureSpace(limits={"01": 400, "02": 380}, budget=500, step=50)
    assert space.bounds("02") == (50, 350, 50)  # grid stops inside what the subset holds
    # requests are proportions: scaled up or down to exactly the budget (largest remainder)
    assert space.apply_budget({"01": 400, "02": 400}) == {"01": 250, "02": 250}
    assert space.apply_budget({"01": 100, "02": 200}) == {"01": 167, "02": 333}
    assert space.apply_budget({"01": 50, "02": 50}) == {"01": 250, "02": 250}
    # a subset short of its share passes the rest to the others
    assert space.apply_budget({"01": 100, "02": 900}) == {"01": 120, "02": 380}
    # alone, 01 holds fewer than the budget: not comparable at equal size
    assert space.apply_budget({"01": 100}) == {"01": 400} and not space.at_budget({"01": 400})
    params = space.params_for({"01": 300})
    assert params == {"use_01": True, "n_01": 300, "use_02": False}
    with pytest.raises(search.SearchError, match="outside the candidates"):
        space.params_for({"09": 10})
    with pytest.raises(search.SearchError, match="fewer than the budget"):
        search.MixtureSpace(limits={"01": 100}, budget=500)
    # enqueued params reproduce the mixture's proportions through suggest()
    study = optuna.create_study(direction="maximize")
    study.enqueue_trial(space.params_for({"01": 200, "02": 300}))
    assert space.suggest(study.ask()) == {"01": 200, "02": 300}


def test_every_trial_trains_on_exactly_the_budget(tmp_path):
    """Sampled, warm-start and short mixtures alike: a COMPLETE trial's mixture sums to the budget; one
    whose subsets hold less is pruned with its reason, never measured on less data."""
    storage = f"sqlite:///{tmp_path}/optuna.db"
    space = search.MixtureSpace(limits={"01": 100, "02": 400, "03": 400}, budget=300, step=50)
    study = search.open_study("exact-budget", storage, "random", seed=1)
    search.enqueue_warm_start(study, space, {"a/related": {"02": 100, "03": 50}, "b/related": {"01": 100}})
    seen = []
    search.run_worker(study, space, lambda m, t: seen.append(m) or sum(m.values()) / 1000, 12,
                      search.lock_path(storage, "exact-budget"), progress=False)
    assert seen and all(sum(m.values()) == 300 for m in seen)
    trials = study.get_trials(deepcopy=False)
    assert seen[0] == {"02": 200, "03": 100}                       # the design's 2:1 at the budget
    short = [t for t in trials if t.user_attrs.get(search.WARM) == "b/related"][0]
    assert short.state == TrialState.PRUNED and "< budget 300" in short.user_attrs[search.PRUNE_REASON]
    assert all(t.value == 0.3 for t in trials if t.state == TrialState.COMPLETE)


def test_killed_search_resumes_without_lost_or_duplicated_trials(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    name, n = "kill-resume", 8
    proc = _start(tmp_path, storage, name, n, delay=0.25)
    deadline = time.time() + 90
    killed_running = None
    try:
        while killed_running is None and time.time() < deadline:
            time.sleep(0.05)
            try:
                trials = _trials(storage, name)
            except (KeyError, Exception):
                continue
            done = [t for t in trials if t.state == TrialState.COMPLETE]
            # kill once the running trial's mixture is fixed (it is training): a kill while it is
            # still being sampled leaves partial params, which its retry completes by sampling
            running = [t for t in trials if t.state == TrialState.RUNNING and search.MIXTURE in t.user_attrs]
            if len(done) >= 3 and running:
                os.kill(proc.pid, signal.SIGKILL)
                proc.wait()
                stale = [t for t in _trials(storage, name) if t.state == TrialState.RUNNING]
                if stale:
                    killed_running = stale[0].number
                else:  # that trial ended (e.g. pruned) between the read and the kill: start again, kill later
                    proc = _start(tmp_path, storage, name, n, delay=0.25)
        if killed_running is None:
            pytest.fail("no kill left a running trial behind: " + (proc.stdout.read() if proc.poll() else ""))
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    after_kill = _trials(storage, name)
    before = {t.number: (t.state, t.value, dict(t.params)) for t in after_kill}
    assert before[killed_running][0] == TrialState.RUNNING  # the kill left a stale trial behind
    killed_params = before[killed_running][2]
    mixture_fixed = search.MIXTURE in after_kill[killed_running].user_attrs

    out = _start(tmp_path, storage, name, n, delay=0.0)
    assert out.wait(timeout=120) == 0, out.stdout.read()
    trials = _trials(storage, name)
    states = [t.state for t in trials]
    assert sum(s in search.FINISHED for s in states) == n          # budget exactly met, none lost
    assert TrialState.RUNNING not in states and TrialState.WAITING not in states
    failed = [t for t in trials if t.state == TrialState.FAIL]
    assert [t.number for t in failed] == [killed_running]           # only the killed one failed
    retries = [t for t in trials if t.user_attrs.get(search.RETRY_OF) == killed_running]
    if not killed_params:  # killed between ask and its first suggest (a loaded machine's timing):
        assert retries == []  # nothing to re-run; the budget's count samples a new trial instead
    else:
        assert len(retries) == 1 and retries[0].state in search.FINISHED  # re-run exactly once
    if mixture_fixed:  # killed while training: the retry trains the same mixture
        assert dict(retries[0].params) == killed_params
    for num, (state, value, params) in before.items():              # finished trials untouched
        if state in search.FINISHED:
            t = trials[num]
            assert (t.state, t.value, dict(t.params)) == (state, value, params)
    warm = [t.user_attrs.get(search.WARM) for t in trials if search.WARM in t.user_attrs
            and search.RETRY_OF not in t.user_attrs]
    assert sorted(warm) == ["all_related", "related_modality"]     # enqueued once despite the restart
    study = optuna.load_study(study_name=name, storage=storage)
    assert study.best_value == max(t.value for t in trials if t.state == TrialState.COMPLETE)

    # a third start has nothing to do: the count stays
    again = _start(tmp_path, storage, name, n, delay=0.0)
    assert again.wait(timeout=60) == 0
    assert len(_trials(storage, name)) == len(trials)


def test_two_workers_share_one_study(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    name, n = "two-workers", 8
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    procs = [_start(tmp_path, storage, name, n, delay=0.15, seed=k, barrier=barrier) for k in range(2)]
    # both start trials together (a slow start-up on a loaded machine would let one worker do them all)
    deadline = time.time() + 60
    while len(list(barrier.glob("ready-*"))) < 2 and time.time() < deadline:
        assert all(p.poll() is None for p in procs), procs[0].stdout.read() if procs[0].poll() else ""
        time.sleep(0.05)
    (barrier / "go").touch()
    for p in procs:
        assert p.wait(timeout=120) == 0, p.stdout.read()
    trials = _trials(storage, name)
    assert len(trials) == n and all(t.state in search.FINISHED for t in trials)  # no overshoot
    assert len({t.number for t in trials}) == n
    owners = {t.user_attrs[search.OWNER].split(":")[1] for t in trials}
    assert owners == {str(p.pid) for p in procs}  # both processes ran trials
    warm = [t.user_attrs[search.WARM] for t in trials if search.WARM in t.user_attrs]
    assert sorted(warm) == ["all_related", "related_modality"]
    sampled = [json.dumps(dict(t.params), sort_keys=True) for t in trials if search.WARM not in t.user_attrs]
    assert len(set(sampled)) == len(sampled)  # distinct trials, not one suggestion run twice


def test_stale_trial_of_live_owner_is_left_alone(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    study = search.open_study("live", storage)
    t = study.ask({"use_01": optuna.distributions.CategoricalDistribution([False, True])})
    t.set_user_attr(search.OWNER, search.owner_id())  # this very process: alive
    assert search.recover_stale(study) == []
    dead = study.ask()
    dead.set_user_attr(search.OWNER, search.owner_id().rsplit(":", 1)[0] + ":1")  # wrong start time
    assert search.recover_stale(study) == [dead.number]
    assert study.get_trials(deepcopy=False)[dead.number].state == TrialState.FAIL


def test_outputs_best_mixture_and_history(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    space = search.MixtureSpace(limits={"01": 200, "02": 200}, budget=300, step=50)
    study = search.open_study("outputs", storage, seed=3)
    lock = search.lock_path(storage, "outputs")
    search.enqueue_warm_start(study, space, {"related_area": {"01": 150, "02": 150}})
    ran = search.run_worker(study, space, lambda m, t: m.get("02", 0) / 300, 5, lock, progress=False)
    assert ran == 5
    manifest = search.write_outputs(study, tmp_path / "out", "03", seed=0)
    best = json.loads((tmp_path / "out" / "best_mixture.json").read_text())
    assert best == manifest and best["components"] and best["dev_accuracy"] == study.best_value
    assert sum(best["components"].values()) == 300
    # a warm-start trial trains on the design's exact counts even off the search grid
    study2 = search.open_study("exact", storage)
    search.enqueue_warm_start(study2, space, {"all_related": {"01": 167, "02": 133}})
    seen = []
    search.run_worker(study2, space, lambda m, t: seen.append(m) or 0.5, 1, lock, progress=False)
    assert seen == [{"01": 167, "02": 133}]
    assert study2.trials[0].params == {"use_01": True, "n_01": 150, "use_02": True, "n_02": 150}
    rows = list(csv.DictReader((tmp_path / "out" / "history.csv").open()))
    assert [int(r["trial"]) for r in rows] == list(range(5))
    assert rows[0]["source"] == "warm:related_area" and json.loads(rows[0]["mixture"]) == {"01": 150, "02": 150}


def test_trials_to_reach_and_to_beat():
    assert search.trials_to_reach([0.1, None, 0.5, 0.7], 0.5) == 3
    assert search.trials_to_reach([0.1, 0.2], 0.5) is None
    # to beat: strictly above, and never a warm-start trial (it is the threshold's own arm)
    study = optuna.create_study(direction="maximize")
    for value, attrs in ((0.8, {search.WARM: "a/related"}), (0.9, {search.WARM: "b/related"}), (0.8, {}),
                         (0.85, {}), (0.7, {})):
        study.enqueue_trial({}, user_attrs=attrs)
        study.tell(study.ask(), value)
    assert search.trials_to_beat(study.trials, 0.8) == 4
    assert search.trials_to_beat(study.trials, 0.9) is None


def test_readable_study_names_and_fingerprint_suffix(tmp_path):
    storage = f"sqlite:///{tmp_path}/optuna.db"
    assert search.choose_study_name(storage, "medmat-mini-03-CT-Lung-COVID", "aa" * 32) == "medmat-mini-03-CT-Lung-COVID"
    study = search.open_study("medmat-mini-03-CT-Lung-COVID", storage)
    study.set_user_attr("objective_fingerprint", "aa" * 32)
    assert search.choose_study_name(storage, "medmat-mini-03-CT-Lung-COVID", "aa" * 32) == "medmat-mini-03-CT-Lung-COVID"
    # other settings: a suffixed study beside it, never mixed into the first
    assert search.choose_study_name(storage, "medmat-mini-03-CT-Lung-COVID", "bb" * 32) == \
        "medmat-mini-03-CT-Lung-COVID-bbbbbb"


def _problem_world(tmp_path: Path) -> Path:
    """A records table (real parquet with the ingest's metadata) and designs files in the contract's
    layout for target 03: its dev/test records, two Related subsets (04, 28), and five 04 training
    records that show a target image (three byte-identical to test images, two re-encoded dev images)."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = []

    def add(subset, split, i, sha=None, phash=None):
        rid = f"s{subset:02d}-{split}-{i}"
        rows.append({"record_id": rid, "subset_no": subset, "split": split, "answer_text": ["COVID-19", "Normal"][i % 2],
                     "image": f"{rid}.jpg", "image_sha256": sha or f"sha-{rid}",
                     "image_phash": phash or hashlib.sha256(rid.encode()).hexdigest()[:16]})
        return rid

    dev = [add(3, "train", i, phash=f"{(i + 1) * 0x1111111111110000:016x}"[-16:]) for i in range(10)]
    for i in range(10, 40):
        add(3, "train", i)
    test = [add(3, "test", i) for i in range(10)]
    for i in range(60):
        sha = f"sha-{test[i]}" if i < 3 else None                                    # exact copies of test images
        near = f"{((i - 2) * 0x1111111111110000) ^ 0x3:016x}"[-16:] if 3 <= i < 5 else None  # 2 bits from dev images
        add(4, "train", i, sha=sha, phash=near)
        add(28, "train", i)
    root = tmp_path / "world"
    (root / "work/designs/03/fixed_area-04-28").mkdir(parents=True)
    table = pa.Table.from_pandas(pd.DataFrame(rows), preserve_index=False)
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"medmat.data_root": b"../data",
                                           b"medmat.world": b"mini"})
    pq.write_table(table, root / "work/records.parquet")
    d = root / "work/designs/03"
    (d / "dev.json").write_text(json.dumps({"arm": "dev", "record_ids": dev, "components": {"03": {"selected": 10}}}))
    (d / "fixed_area-04-28/related.json").write_text(json.dumps(
        {"components": {"04": {"requested": 40, "selected": 40}, "28": {"requested": 40, "selected": 40}}}))
    (d / "index.json").write_text(json.dumps({
        "target": "03", "triplet": "CT-Lung-COVID", "subset_no": 3, "dev": "dev.json", "arms": {},
        "leakage": {"phash_distance": 4},
        "combinations": [{"id": "fixed_area-04-28", "direction": "fixed_area", "related": ["04", "28"],
                          "arms": {"related": "fixed_area-04-28/related.json",
                                   "baseline_plus": "fixed_area-04-28/baseline_plus.json"},
                          "selected_total": 80}]}))
    return root


def test_problem_never_trains_on_target_images_and_budget_is_the_related_total(tmp_path):
    root = _problem_world(tmp_path)
    problem = search.build_problem(root / "work/records.parquet", root / "work/designs", "3", search.SearchConfig())
    assert problem.world == "mini" and problem.target == "03" and problem.triplet == "CT-Lung-COVID"
    assert problem.space.budget == 80                      # the Related combination's selected total
    assert problem.space.limits == {"04": 55, "28": 60}    # 5 leaking 04 records left out
    assert problem.leakage_dropped == 5
    leaked = {f"s04-train-{i}" for i in range(5)}
    assert not leaked & set(problem.pool["record_id"]) and set(problem.pool["subset_no"]) == {4, 28}
    assert list(problem.warm) == ["fixed_area-04-28/related"] and len(problem.dev_df) == 10
    # a mixture that asks for all of 04 still trains on exactly the budget, none of it leaking
    train_df, manifest = search.resolve(problem, problem.space.apply_budget({"04": 55, "28": 5}), seed=0)
    assert len(train_df) == 80 and manifest["matched"] and not leaked & set(train_df["record_id"])
    # the readable default study name
    assert search.default_study_name("medmat", problem) == "medmat-mini-03-CT-Lung-COVID"


def test_candidates_follow_the_designs_task_taxonomy(tmp_path, caplog):
    """The search space holds every member of the warm-start arms: 21 Mic-Cell-Cancer shares only the
    coarse task State with 03 (the paper's taxonomy, which built the designs), so it is a candidate and
    All Related is tried whole; under the fine taxonomy it is not, and the truncation is said."""
    import pandas as pd
    import pyarrow as pa
    import pyarrow.parquet as pq

    root = _problem_world(tmp_path)
    table = pq.read_table(root / "work/records.parquet")
    extra = pd.DataFrame([{"record_id": f"s21-train-{i}", "subset_no": 21, "split": "train", "answer_text": "Malignant",
                           "image": f"s21-train-{i}.jpg", "image_sha256": f"sha-s21-{i}",
                           "image_phash": hashlib.sha256(f"s21-{i}".encode()).hexdigest()[:16]} for i in range(30)])
    both = pa.concat_tables([table, pa.Table.from_pandas(extra, preserve_index=False).cast(table.schema)])
    pq.write_table(both, root / "work/records.parquet")
    d = root / "work/designs/03"
    (d / "scaleup").mkdir()
    (d / "scaleup/all_related.json").write_text(json.dumps({"components": {
        s: {"requested": 30, "selected": 30} for s in ("04", "21", "28")}}))
    index = json.loads((d / "index.json").read_text())
    index["arms"] = {"all_related": "scaleup/all_related.json"}
    for taxonomy in ("paper", "fine"):
        (d / "index.json").write_text(json.dumps({**index, "task_taxonomy": taxonomy}))
        caplog.clear()
        problem = search.build_problem(root / "work/records.parquet", root / "work/designs", "3", search.SearchConfig())
        if taxonomy == "paper":
            assert problem.space.limits == {"04": 55, "21": 30, "28": 60}
            assert problem.warm["scaleup/all_related"] == {"04": 30, "21": 30, "28": 30}
            assert "tried without" not in caplog.text
        else:
            assert "21" not in problem.space.limits
            assert problem.warm["scaleup/all_related"] == {"04": 30, "28": 30}
            assert "scaleup/all_related is tried without 21" in caplog.text


@pytest.mark.slow
def test_search_cli_end_to_end_on_med_mat_mini(tmp_path):
    """synth -> ingest -> designs -> `medmat search` (real train_model) -> resume with more trials and
    two workers; outputs, one parent MLflow run with one nested run per trial."""
    import mlflow
    import yaml

    repo = Path(__file__).resolve().parents[1]
    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["designs"].update(samples_per_subset=60, scaleup_total=300, dev_size=30)
    params["train"].update(max_steps=15, eval_every=5, checkpoint_every=0)
    params["model"]["tiny"]["vision_init"] = None  # no `pretrain` stage here: the vision tower starts from scratch
    params["tracking"]["tracking_uri"] = f"sqlite:///{tmp_path}/mlruns/mlflow.db"
    params["tracking"]["artifact_root"] = str(tmp_path / "mlruns/artifacts")
    # trials train with the shrunken `train:` above (params.yaml's search.train override is for the demo)
    params["search"].update(storage=f"sqlite:///{tmp_path}/mlruns/optuna.db", pruner_warmup_steps=0, train={})
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    env = {**_env(), "MLFLOW_TRACKING_URI": params["tracking"]["tracking_uri"], "HF_HUB_OFFLINE": "1"}

    def medmat(*argv):
        res = subprocess.run([sys.executable, "-m", "medmat.cli", *argv], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=600)
        assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]

    medmat("synth", "--out", "data", "--params", "params.yaml", "--train-per-subset", "80", "--test-per-subset", "20")
    medmat("ingest", "--data", "data", "--out", "work/records.parquet", "--params", "params.yaml")
    medmat("designs", "--records", "work/records.parquet", "--targets", "6,3", "--out", "work/designs",
           "--params", "params.yaml")
    args = ["search", "--target", "6", "--records", "work/records.parquet", "--designs", "work/designs",
            "--out", "work/search/06", "--params", "params.yaml"]
    medmat(*args, "--trials", "5")
    storage = params["search"]["storage"]
    best = json.loads((tmp_path / "work/search/06/best_mixture.json").read_text())
    name = best["study"]
    assert name == "medmat-mini-06-CT-Brain-Cancer"  # readable: prefix, world, target, triplet
    trials = _trials(storage, name)
    assert sum(t.state in search.FINISHED for t in trials) == 5
    # the Related arm of each combination and All Related are the first trials
    from medmat.designs import warm_start_mixtures

    warm = sorted(warm_start_mixtures(tmp_path / "work/designs", "06"))
    n_warm = min(len(warm), 5)
    assert n_warm >= 2 and all(t.user_attrs.get(search.WARM) for t in trials[:n_warm])
    assert {t.user_attrs[search.WARM] for t in trials[:n_warm]} <= set(warm)
    best = json.loads((tmp_path / "work/search/06/best_mixture.json").read_text())
    assert best["components"] and 0.0 <= best["dev_accuracy"] <= 1.0
    assert "06" not in best["components"]  # the target never trains on itself
    # exactly the budget, and the very records the best trial trained on (retrain them as they are)
    assert sum(best["components"].values()) == best["exact_total"] == best["total"] == len(best["record_ids"])
    assert all(sum(t.user_attrs[search.MIXTURE].values()) == best["exact_total"]
               for t in trials if t.state == TrialState.COMPLETE)

    medmat(*args, "--trials", "7", "--workers", "2")  # resume by name: two more, no warm start again
    trials = _trials(storage, name)
    assert sum(t.state in search.FINISHED for t in trials) == 7 and len(trials) == 7
    assert sum(search.WARM in t.user_attrs for t in trials) == len(warm)
    rows = list(csv.DictReader((tmp_path / "work/search/06/history.csv").open()))
    assert len(rows) == 7
    # the same name with other training settings is refused (values would not be comparable)
    params["train"]["max_steps"] = 16
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    res = subprocess.run([sys.executable, "-m", "medmat.cli", *args, "--trials", "8", "--study-name", name],
                         cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 2 and "other training/data settings" in res.stderr

    client = mlflow.MlflowClient(params["tracking"]["tracking_uri"])
    exp = client.get_experiment_by_name(params["tracking"]["experiment"])
    parents = client.search_runs([exp.experiment_id], "tags.`medmat.kind` = 'search'")
    assert len(parents) == 1  # the resumed search logs under the same parent

    children = client.search_runs([exp.experiment_id], f"tags.mlflow.parentRunId = '{parents[0].info.run_id}'")
    # one nested run per trial that trained; a mixture whose subsets cannot fill the budget is pruned
    # before training (no run), and says why
    trained = sorted(t.number for t in trials if search.MLFLOW_RUN in t.user_attrs)
    assert sorted(int(r.data.params["trial"]) for r in children) == trained and len(trained) >= 5
    assert all(t.state == TrialState.PRUNED and "budget" in t.user_attrs.get("prune_reason", "")
               for t in trials if t.number not in trained)
    assert all("dev_accuracy" in r.data.metrics and json.loads(r.data.params["mixture"]) for r in children)
    by_trial = {int(r.data.params["trial"]): r for r in children}
    for t in (t for t in trials if t.number in trained):  # the nested run holds the trial's own mixture
        assert json.loads(by_trial[t.number].data.params["mixture"]) == t.user_attrs[search.MIXTURE]
    # Two targets side by side (the `search` stage) give exactly what each gives searched alone. Last:
    # their studies (in other storages) bear the names above, so their trials nest under the same parent run.
    params["train"]["max_steps"] = 15
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    common = ["--records", "work/records.parquet", "--designs", "work/designs", "--params", "params.yaml",
              "--trials", "3"]
    medmat("search", "--target", "6", "--target", "3", "--out-root", "work/side",
           "--storage", f"sqlite:///{tmp_path}/side.db", *common)
    for target in ("06", "03"):
        medmat("search", "--target", target, "--out", f"work/alone/{target}",
               "--storage", f"sqlite:///{tmp_path}/alone.db", *common)
        side, alone = (json.loads((tmp_path / f"work/{d}/{target}/best_mixture.json").read_text())
                       for d in ("side", "alone"))
        assert side["record_ids"] == alone["record_ids"] and side["dev_accuracy"] == alone["dev_accuracy"]
        assert ((tmp_path / f"work/side/{target}/history.csv").read_text()
                == (tmp_path / f"work/alone/{target}/history.csv").read_text())


def test_several_targets_need_out_root_and_all_reads_experiment_targets(tmp_path, caplog):
    """`--target all` is experiment.targets (named as their folders); options that belong to one target
    are refused for several, naming the option and the targets."""
    import argparse

    from medmat.search import cli

    assert cli.resolve_targets(["all"], [3, "28", "06"]) == ["03", "28", "06"]
    assert cli.resolve_targets(["6", "all", "03"], ["03"]) == ["06", "03"]
    with pytest.raises(ValueError, match="no target"):
        cli.resolve_targets(["all"], [])
    parser = argparse.ArgumentParser()
    cli.configure(parser)
    params = tmp_path / "params.yaml"
    params.write_text("experiment:\n  targets: ['03', '28']\n")
    base = ["--records", "r.parquet", "--designs", "d", "--params", str(params)]
    for extra, says in ((["--out", "o"], "--out is one target's output folder: give --out-root (2 targets: 03, 28)"),
                        (["--out-root", "o", "--dev", "dev.json"], "--dev is one target's dev split"),
                        (["--out-root", "o", "--study-name", "s"], "--study-name is one study's name")):
        caplog.clear()
        assert cli.run(parser.parse_args(["--target", "all", *base, *extra])) == 2
        assert says in caplog.text
    with pytest.raises(SystemExit):  # one of --out / --out-root is required, not both
        parser.parse_args(["--target", "3", *base, "--out", "a", "--out-root", "b"])

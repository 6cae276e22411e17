"""The study stage: one typed run spec per unit, planned from the designs, run, resumed, summarised."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from medmat.config import ConfigError
from medmat.control import control_data
from medmat.pipeline import identical_units, plan_units
from medmat.runspec import load_study_params

REPO = Path(__file__).resolve().parents[1]


def write_params(path: Path, **sections) -> Path:
    path.write_text(yaml.safe_dump(sections))
    return path


@pytest.mark.parametrize("override", [{"max_step": 10}, {"weight_decay": 0.0, "keep_checkpoint": 1}])
def test_a_misspelled_train_override_stops_the_run_naming_it(tmp_path, override):
    p = write_params(tmp_path / "params.yaml", experiment={"train_overrides": override})
    with pytest.raises(ConfigError) as exc:
        load_study_params(p)
    bad = next(k for k in override if k not in ("weight_decay",))
    assert bad in str(exc.value) and "experiment.train_overrides" in str(exc.value)


def test_every_valid_override_reaches_the_train_config(tmp_path):
    over = {"max_steps": 7, "weight_decay": 0.5, "max_grad_norm": 0.25, "keep_checkpoints": 3, "lr": 0.01}
    study = load_study_params(write_params(tmp_path / "params.yaml", train={"max_steps": 400},
                                           experiment={"train_overrides": over}))
    for key, value in over.items():
        assert getattr(study.train, key) == value


@pytest.mark.parametrize("section,values,name", [
    ("experiment", {"seedz": [0]}, "seedz"),
    ("train", {"lr": 0.1, "warmup": 3}, "warmup"),
    ("evaluate", {"scorerr": "likelihood"}, "scorerr"),
    ("model", {"backnd": "tiny"}, "backnd"),
])
def test_an_unknown_key_in_any_section_is_an_error(tmp_path, section, values, name):
    with pytest.raises(ConfigError, match=name):
        load_study_params(write_params(tmp_path / "params.yaml", **{section: values}))


def test_the_study_cli_stops_on_a_bad_override_with_a_named_message(tmp_path):
    p = write_params(tmp_path / "params.yaml", experiment={"train_overrides": {"max_step": 5}})
    proc = subprocess.run([sys.executable, "-m", "medmat.pipeline", "study", "--target", "3", "--params", str(p)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "max_step" in proc.stderr and "Traceback" not in proc.stderr


def _index(tmp_path: Path) -> Path:
    """A designs folder as `medmat designs` writes it (medmat.designs): index.json per target."""
    d = tmp_path / "designs"
    index = {
        "target": "03", "triplet": "CT-Lung-COVID", "subset_no": 3, "dev": "dev.json",
        "combinations": [{"id": "fixed_area-04-28", "direction": "fixed_area", "related": ["04", "28"],
                          "paper_row": 15, "arms": {"related": "fixed_area-04-28/related.json",
                                                    "baseline_plus": "fixed_area-04-28/baseline_plus.json"}}],
        "arms": {"all_related": "scaleup/all_related.json", "in_distribution": "in_distribution.json",
                 "limited": {"related_k100": "limited/related_k100.json"}},
    }
    (d / "03").mkdir(parents=True)
    (d / "03" / "index.json").write_text(json.dumps(index))
    return d


def test_plan_units_one_spec_per_arm_and_seed(tmp_path):
    study = load_study_params(write_params(tmp_path / "params.yaml", experiment={
        "seeds": [0, 1, 2], "scaleup_targets": ["3"], "scaleup_seeds": [0], "limited_targets": ["03"]}))
    specs = plan_units(study, target="03", records="r.parquet", designs_dir=str(_index(tmp_path)),
                       runs_root="work/runs", world="mini", data_version="abc")
    arms = {}
    for s in specs:
        arms.setdefault(s.arm, []).append(s.seed)
    assert arms == {"baseline": [0, 1, 2], "fixed_area-04-28/related": [0, 1, 2],
                    "fixed_area-04-28/baseline_plus": [0, 1, 2], "scaleup/all_related": [0],
                    "in_distribution": [0], "limited/related_k100": [0]}
    by_arm = {s.arm: s for s in specs if s.seed == 0}
    # only Related combinations may become champion; arms that saw the target's data are marked
    assert [a for a, s in by_arm.items() if s.candidate] == ["fixed_area-04-28/related"]
    assert {a for a, s in by_arm.items() if s.trained_on_target} == {"in_distribution", "limited/related_k100"}
    assert by_arm["baseline"].manifest is None
    assert by_arm["fixed_area-04-28/related"].run_dir == "work/runs/03/fixed_area-04-28/related/seed0"
    assert by_arm["fixed_area-04-28/related"].dev_manifest.endswith("03/dev.json")
    tags = by_arm["fixed_area-04-28/related"].tags()
    assert tags["medmat.world"] == "mini" and tags["medmat.data_version"] == "abc"
    assert tags["medmat.arm"] == "fixed_area-04-28/related" and tags["medmat.target"] == "CT-Lung-COVID"


def test_the_control_world_plans_only_table3_arms_and_no_candidates(tmp_path):
    study = load_study_params(write_params(tmp_path / "params.yaml", experiment={
        "seeds": [0], "scaleup_targets": ["03"], "limited_targets": ["03"]}))
    specs = plan_units(study, target="03", records="r.parquet", designs_dir=str(_index(tmp_path)),
                       runs_root="work/control_runs", world="mini-entangled", data_version="x", main_world=False)
    assert sorted(s.arm for s in specs) == ["baseline", "fixed_area-04-28/baseline_plus", "fixed_area-04-28/related"]
    assert not any(s.candidate for s in specs)


def test_identical_units_are_shared_within_a_target_never_across_targets(tmp_path):
    """04 and 05 have the same Related mixture (03 + 06): one training run would do, but each result is
    an evaluation on its own target's test split, so only a target's own duplicates share it."""
    study = load_study_params(write_params(tmp_path / "params.yaml", experiment={"seeds": [0, 1]}))
    d = tmp_path / "designs"
    for target in ("04", "05"):
        combos = [{"id": cid, "direction": "fixed_modality", "related": ["03", "06"],
                   "arms": {"related": f"{cid}/related.json", "baseline_plus": f"{cid}/baseline_plus.json"}}
                  for cid in ("fixed_modality-03-06", "fixed_modality-03-06-again")]
        for c in combos:
            (d / target / c["id"]).mkdir(parents=True)
            (d / target / c["id"] / "related.json").write_text(json.dumps({"sha256": "mixture-03-06"}))
            (d / target / c["id"] / "baseline_plus.json").write_text(json.dumps({"sha256": f"unrelated-{target}"}))
        (d / target / "index.json").write_text(json.dumps({"target": target, "triplet": "CT-x-y",
                                                           "subset_no": int(target), "combinations": combos}))
    specs = [s for t in ("04", "05") for s in plan_units(study, target=t, records="r.parquet", designs_dir=str(d),
                                                           runs_root="runs", world="mini", data_version="v")]
    run, same_as = identical_units(specs)
    shared = {(specs[i].target, specs[i].arm, specs[i].seed): (specs[j].target, specs[j].arm) for i, j in same_as.items()}
    assert all(target == source[0] for (target, _, _), source in shared.items())
    # per target and seed: the second combination's Related and Baseline+ share the first's
    assert len(shared) == 2 * 2 * 2 and len(run) == len(specs) - 8
    assert shared[("05", "fixed_modality-03-06-again/related", 1)] == ("05", "fixed_modality-03-06/related")


def test_control_data_disabled_writes_a_note(tmp_path):
    p = write_params(tmp_path / "params.yaml", experiment={"control": False})
    assert control_data(str(tmp_path / "control"), str(p)) == 0
    assert (tmp_path / "control" / "DISABLED.json").exists()
    # the control stage's declared inputs exist (empty), so `dvc repro` runs it and it writes a note
    assert (tmp_path / "control" / "records.parquet").is_file() and (tmp_path / "control" / "designs").is_dir()


def test_the_control_world_is_regenerated_when_missing_and_checked_against_its_table(tmp_path):
    """The control world's images are not a DVC output: the control stage regenerates them where they
    are missing (byte-identical), and refuses them when they no longer match the table's hashes."""
    import shutil

    from medmat.data.synth_world import regenerate_missing
    from medmat.data.records import data_root_of

    synth = {"train_per_subset": 8, "test_per_subset": 8, "subsets": [3, 4, 28]}
    p = write_params(tmp_path / "params.yaml", synth=synth, experiment={"targets": ["03"]})
    out, world = tmp_path / "control", tmp_path / "control-world"
    assert control_data(str(out), str(p), str(world)) == 0
    records = str(out / "records.parquet")
    assert data_root_of(records) == world.resolve() and not (out / "data").exists()
    image = next(world.rglob("*.png"))
    before = image.read_bytes()
    shutil.rmtree(world)
    assert regenerate_missing(records, str(p))
    assert image.read_bytes() == before
    assert not regenerate_missing(records, str(p))  # present: trusted, nothing rewritten
    shutil.rmtree(world)
    write_params(p, synth={**synth, "seed": 7}, experiment={"targets": ["03"]})
    with pytest.raises(ValueError, match="differ from"):
        regenerate_missing(records, str(p))


def test_a_real_release_is_never_regenerated(tmp_path):
    """Only generated worlds are regenerated: a table ingested from a real release (no synth marker)
    whose images are gone is left alone (the units then name the missing images)."""
    import shutil

    from medmat.data.ingest import IngestParams, ingest_to_parquet
    from medmat.data.synth_world import SynthParams, generate, regenerate_missing

    release = tmp_path / "release"
    generate(release, SynthParams(train_per_subset=8, test_per_subset=8, subsets=[3]), progress=False)
    (release / "MEDMAT_MINI.json").unlink()  # now it reads as the real release
    ingest_to_parquet(release, tmp_path / "records.parquet", IngestParams())
    shutil.rmtree(release)
    assert not regenerate_missing(str(tmp_path / "records.parquet"), str(tmp_path / "absent.yaml"))
    assert not release.exists()


def test_use_gpu_config_replaces_sections_and_keeps_the_rest(tmp_path):
    from medmat.models import ModelConfig
    from medmat.models.hf import HFConfig
    from medmat.config import from_dict
    from medmat.pipeline import use_config
    from medmat.runspec import ExperimentConfig
    from medmat.train import TrainConfig

    repo = Path(__file__).resolve().parents[1]
    p = tmp_path / "params.yaml"
    p.write_text((repo / "params.yaml").read_text())
    names = use_config(repo / "configs" / "gpu.yaml", p)
    assert {"model", "train", "designs", "experiment"} <= set(names)
    new, old = yaml.safe_load(p.read_text()), yaml.safe_load((tmp_path / "params.yaml.bak").read_text())
    # the paper's recipe
    assert new["train"]["epochs"] == 5 and new["train"]["batch_size"] == 32 and new["train"]["lr"] == 5e-6
    assert new["designs"]["samples_per_subset"] == 3000 and new["designs"]["scaleup_total"] == 15000
    assert from_dict(ModelConfig, new["model"]).backend == "hf"
    from_dict(HFConfig, new["model"]["hf"])
    from_dict(TrainConfig, new["train"])
    from_dict(ExperimentConfig, new["experiment"])
    # untouched sections stay as they were, comments of params.yaml included
    for section in ("base", "tracking", "report"):
        assert new[section] == old[section]
    assert "# presentation only" in p.read_text()


@pytest.fixture(scope="module")
def small_study(tmp_path_factory):
    """A tiny Med-MAT-mini, ingested and designed for target 03, with params that train a few steps."""
    from medmat.config import from_dict
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.synth_world import SynthParams, generate
    from medmat.designs import design_targets

    root = tmp_path_factory.mktemp("study")
    params = {
        "model": {"backend": "tiny", "tiny": {"image_size": 32}},
        "train": {"max_steps": 400, "batch_size": 16, "eval_every": 0, "checkpoint_every": 5},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
                     "artifact_root": str(root / "mlruns" / "artifacts"), "experiment": "test-study"},
        "experiment": {"targets": ["03"], "combinations": ["fixed_area-04-28"], "seeds": [0, 1], "scaleup_targets": [],
                       "limited_targets": [], "workers": 1, "train_overrides": {"max_steps": 12}},
        "designs": {"samples_per_subset": 20, "scaleup_total": 40, "limited_k": [0], "dev_size": 8},
    }
    p = write_params(root / "params.yaml", **params)
    generate(root / "data", from_dict(SynthParams, {"train_per_subset": 40, "test_per_subset": 12, "image_size": 32}),
             progress=False)
    ingest_to_parquet(root / "data", root / "records.parquet")
    design_targets(root / "records.parquet", root / "designs", str(p))
    return root


def test_study_runs_every_unit_tracks_it_and_resumes(small_study):
    from mlflow import MlflowClient

    from medmat.pipeline import run_study

    root = small_study
    kw = dict(targets=["3"], params=str(root / "params.yaml"), records=str(root / "records.parquet"),
              designs_dir=str(root / "designs"), runs_root=str(root / "runs"), metrics_root=str(root / "metrics"))
    cells = run_study(**kw)["03"]
    combos = json.loads((root / "designs" / "03" / "index.json").read_text())["combinations"]
    assert combos, "the tiny world builds no Table-3 combination for target 03"
    assert set(cells) == {"baseline"} | {f"{c['id']}/{a}" for c in combos for a in c["arms"]}
    for arm, cell in cells.items():
        on_disk = json.loads((root / "metrics" / "03" / f"{arm}.json").read_text())
        assert on_disk == cell and set(cell) == {"acc", "lo", "hi", "n", "degenerate"} and cell["n"] == 2
        assert 0 <= cell["lo"] <= cell["acc"] <= cell["hi"] <= 100
    related = root / "runs" / "03" / f"{combos[0]['id']}" / "related" / "seed1"
    m = json.loads((related / "metrics.json").read_text())
    assert m["candidate"] and not m["trained_on_target"] and m["world"] == "mini" and m["seed"] == 1
    assert m["dev_accuracy"] is not None and m["dev_n"] == 8
    assert not (related / "checkpoints").exists()  # only an unfinished unit needs them
    # MLflow: one parent run per cell, its seeds nested; a model logged only where the registry can use it
    client = MlflowClient(f"sqlite:///{root}/mlruns/mlflow.db")
    seed_run = client.get_run((related / "mlflow_run_id").read_text().strip())
    sibling = client.get_run((related.parent / "seed0" / "mlflow_run_id").read_text().strip())
    parent = client.get_run(seed_run.data.tags["mlflow.parentRunId"])
    assert sibling.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert parent.info.run_name == f"03 CT-Lung-COVID · {combos[0]['id']}/related"
    assert seed_run.data.tags["medmat.world"] == "mini" and seed_run.data.tags["medmat.arm"] == f"{combos[0]['id']}/related"
    assert client.search_logged_models(experiment_ids=[seed_run.info.experiment_id],
                                       filter_string=f"source_run_id = '{seed_run.info.run_id}'")
    base_run = client.get_run((root / "runs" / "03" / "baseline" / "seed0" / "mlflow_run_id").read_text().strip())
    assert not client.search_logged_models(experiment_ids=[base_run.info.experiment_id],
                                           filter_string=f"source_run_id = '{base_run.info.run_id}'")
    # a rerun answers every unit from its folder
    stamps = {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("metrics.json")}
    assert run_study(**kw)["03"] == cells
    assert {p: p.stat().st_mtime_ns for p in (root / "runs").rglob("metrics.json")} == stamps

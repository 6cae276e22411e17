"""The experiment cell: real designs on a small Med-MAT-mini, seeds trained and evaluated in-process,
metrics with the t-interval over seeds; unavailable and skipped arms say why."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medmat.designs import DesignsConfig, build_designs, resolve_target, write_designs
from medmat.pipeline import _cli, control_data, norm_target, run_cell, t_interval


def test_t_interval_three_seeds():
    mean, lo, hi = t_interval([0.5, 0.6, 0.7])
    assert mean == pytest.approx(0.6)
    assert hi - mean == pytest.approx(4.302653 * 0.1 / math.sqrt(3), rel=1e-5)
    assert math.isnan(t_interval([0.4])[1])


def test_norm_target():
    assert norm_target(3) == norm_target("3") == norm_target("03") == "03"
    assert norm_target("CT-Lung-COVID") == "CT-Lung-COVID"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    from medmat.data.ingest import ingest_to_parquet
    from medmat.data.synth import SynthParams, generate

    root = tmp_path_factory.mktemp("cellworld")
    generate(root / "data", SynthParams(train_per_subset=40, test_per_subset=15, image_size=32), progress=False)
    ingest_to_parquet(root / "data", root / "records.parquet")
    records = pd.read_parquet(root / "records.parquet")
    cfg = DesignsConfig(samples_per_subset=30, scaleup_total=60, limited_k=[0, 10], dev_size=10)
    write_designs([build_designs(records, resolve_target(3), cfg)], root / "designs", cfg)
    params = {
        "model": {"backend": "tiny", "tiny": {"image_size": 32}},
        "train": {"max_steps": 400, "batch_size": 16, "eval_every": 0, "checkpoint_every": 0},
        "tracking": {"tracking_uri": f"sqlite:///{root}/mlruns/mlflow.db",
                     "artifact_root": str(root / "mlruns" / "artifacts"), "experiment": "test-pipeline"},
        "experiment": {"targets": ["03"], "seeds": [0, 1], "scaleup_targets": ["28"], "scaleup_seeds": [0],
                       "limited_targets": ["03"], "train_overrides": {"max_steps": 15}},
    }
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    return root


def cell(world: Path, arm: str, **kw):
    return run_cell(designs_dir=str(world / "designs"), records=str(world / "records.parquet"), target="3",
                    arm=arm, out=str(world / "runs" / "03" / arm), metrics=str(world / "metrics" / f"{arm}.json"),
                    params=str(world / "params.yaml"), **kw)


def test_unavailable_and_skipped_cells_say_why(world):
    r = cell(world, "related_fixed_task")
    assert r["status"] == "unavailable" and "task COVID" in r["reason"]
    assert json.loads((world / "runs" / "03" / "related_fixed_task" / "cell.json").read_text())["status"] == "unavailable"
    r = cell(world, "all_related")  # 03 is not in this params' scaleup_targets
    assert r["status"] == "skipped" and "scaleup_targets" in r["reason"]


@pytest.mark.slow  # ~30-60 s: two seeds trained in parallel worker processes
def test_trained_cell_runs_every_seed_and_the_stage_clis(world):
    r = cell(world, "related_fixed_area")
    assert r["status"] == "ok" and sorted(r["seeds"]) == ["0", "1"]
    assert r["components"] == {"04": 30, "28": 30}
    for s in (0, 1):
        run_dir = world / "runs" / "03" / "related_fixed_area" / f"seed{s}"
        m = json.loads((run_dir / "metrics.json").read_text())
        assert 0.0 <= m["accuracy"] <= 1.0 and r["seeds"][str(s)] == m["accuracy"]
        assert (run_dir / "model").is_dir() and (run_dir / "mlflow_run_id").exists()
        # the cell's training override reached `medmat train`
        assert json.loads((run_dir / "train_metrics.json").read_text())["steps"] == 15
    mean, lo, hi = t_interval(list(r["seeds"].values()))
    assert r["mean"] == pytest.approx(mean) and r["ci95"] == pytest.approx([lo, hi])
    # rerun: finished seeds are reused, not retrained
    before = (world / "runs" / "03" / "related_fixed_area" / "seed0" / "metrics.json").stat().st_mtime_ns
    cell(world, "related_fixed_area")
    assert (world / "runs" / "03" / "related_fixed_area" / "seed0" / "metrics.json").stat().st_mtime_ns == before


@pytest.mark.slow
def test_baseline_cell_is_the_untrained_model(world):
    r = cell(world, "baseline")
    assert r["status"] == "ok" and r["total"] == 0
    assert not (world / "runs" / "03" / "baseline" / "seed0" / "train_metrics.json").exists()  # never trained
    assert r["seeds"]["0"] == json.loads((world / "runs" / "03" / "baseline" / "seed0" / "metrics.json").read_text())["accuracy"]


def test_cli_filter_drops_flags_a_stage_lacks(world, tmp_path):
    # --no-such-flag is dropped (with its value); the stage still runs and fails only on what it checks
    rc = _cli("medmat.designs", ["--records", str(tmp_path / "missing.parquet"), "--targets", "3",
                                 "--out", str(tmp_path / "d"), "--no-such-flag", "x",
                                 "--params", str(world / "params.yaml")])
    assert rc == 2


def test_control_data_disabled_writes_a_note(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"experiment": {"control": False}}))
    assert control_data(str(tmp_path / "control"), str(p)) == 0
    assert (tmp_path / "control" / "DISABLED.json").exists()


def test_use_gpu_config_replaces_sections_and_keeps_the_rest(tmp_path):
    from medmat.models import ModelConfig
    from medmat.models.hf import HFConfig
    from medmat.config import from_dict
    from medmat.pipeline import ExperimentConfig, use_config
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

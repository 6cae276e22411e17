"""The study on another world than params.yaml's, judged by the report's own numbers."""

from __future__ import annotations

import json
import statistics

import mlflow
import pytest
import yaml

from medmat.config import ConfigError
from medmat.data.records import world_of
from medmat.other_worlds import main, parse_world


def test_another_world_runs_table3_and_reports_every_seed(tmp_path, capsys):
    params = {
        "synth": {"seed": 0, "train_per_subset": 40, "test_per_subset": 12, "image_size": 32,
                  "subsets": [3, 4, 7, 22, 28]},
        "model": {"backend": "tiny", "tiny": {"image_size": 32}},
        "train": {"batch_size": 16, "eval_every": 0, "checkpoint_every": 0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                     "artifact_root": str(tmp_path / "mlruns" / "artifacts"), "experiment": "test-study"},
        "experiment": {"targets": ["28"], "combinations": ["fixed_area-04-28"], "seeds": [0],
                       "scaleup_targets": ["28"], "limited_targets": ["28"], "workers": 1,
                       "train_overrides": {"max_steps": 8}},
        "designs": {"samples_per_subset": 20, "scaleup_total": 40, "limited_k": [0], "dev_size": 8},
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = tmp_path / "other"
    assert main(["--world", "1:3", "--seeds", "2", "--out", str(out), "--params", str(p)]) == 0

    root = out / "w1-03"
    world_params = yaml.safe_load((root / "params.yaml").read_text())
    assert world_params["synth"]["seed"] == 1 and world_params["experiment"]["targets"] == ["03"]
    assert world_of(str(root / "data" / "records.parquet")) == "mini"  # not the entangled control's world
    # Table 3's arms only, two seeds each: no scale-up, limited-data or in-distribution arm of the params' own study
    arms = sorted(str(d.relative_to(root / "runs" / "03")) for d in (root / "runs" / "03").glob("**/seed1"))
    assert arms == ["baseline/seed1", "fixed_area-04-28/baseline_plus/seed1", "fixed_area-04-28/related/seed1"]

    summary = json.loads((out / "summary.json").read_text())
    (world,) = summary["worlds"]
    row = world["rows"]["03/fixed_area-04-28"]
    accs = [100 * json.loads((root / "runs" / "03" / "fixed_area-04-28" / "related" / f"seed{s}" / "metrics.json")
                             .read_text())["accuracy"] for s in (0, 1)]
    assert list(row["trained_per_seed"].values()) == [round(a, 1) for a in accs]
    assert row["trained_sd"] == round(statistics.stdev(accs), 2) and world["max_trained_sd"] == row["trained_sd"]
    assert (world["rows_over_sd_limit"] == ["03/fixed_area-04-28"]) == (row["trained_sd"] > 5)
    assert row["lo"] <= row["gap"] <= row["hi"] and world["n_rows"] == 1
    assert world["claim"] == (row["significant"] and world["lo"] > 0)  # one row: most rows = that row
    # the same verdict over the rows whose Related data name more of the target's labels than Baseline+'s
    ceiling = row["name_ceiling"]
    edge = ceiling["related"] > ceiling["baseline_plus"]
    assert world["headroom"]["n_rows"] == int(edge)
    assert world["headroom"]["mean_gap"] == (world["mean_gap"] if edge else None)
    printed = capsys.readouterr().out
    assert "world synth seed 1, targets 03" in printed
    assert " ".join(f"{a:.1f}" for a in accs) in printed  # every seed's accuracy, not only their sd
    assert f"{ceiling['related']:.1f} / {ceiling['baseline_plus']:.1f}" in printed
    assert f"name ceiling above Baseline+'s): {int(edge)}" in printed

    mlflow.set_tracking_uri(params["tracking"]["tracking_uri"])
    assert mlflow.get_experiment_by_name("test-study-other-worlds") is not None  # apart from the study's runs
    assert mlflow.get_experiment_by_name("test-study") is None

    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")}
    assert main(["--world", "1:03", "--seeds", "2", "--out", str(out), "--params", str(p)]) == 0
    assert {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")} == stamps  # resumed: nothing retrained
    assert json.loads((out / "summary.json").read_text()) == summary


@pytest.mark.parametrize("spec", ["2", "2:", "x:04", ":04"])
def test_a_bad_world_is_named(spec):
    with pytest.raises(ConfigError, match="SYNTH_SEED:TARGET"):
        parse_world(spec)


def test_a_bad_world_on_the_command_line_exits_2_naming_it(tmp_path, caplog):
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"experiment": {"targets": ["03"]}}))
    assert main(["--world", "two:04", "--out", str(tmp_path / "o"), "--params", str(p)]) == 2
    assert "'two:04'" in caplog.text

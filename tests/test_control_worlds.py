"""The negative control over several entangled worlds: the world is the unit of replication."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pandas as pd
import yaml

from medmat.control_worlds import headline, main, replicate
from medmat.stats import equivalence, t_interval


def test_worlds_are_pooled_as_units_and_a_rerun_trains_nothing(tmp_path, caplog):
    params = {
        "synth": {"train_per_subset": 40, "test_per_subset": 12, "image_size": 32, "subsets": [3, 4, 7, 22, 28]},
        "model": {"backend": "tiny", "tiny": {"image_size": 32}},
        "train": {"batch_size": 16, "eval_every": 0, "checkpoint_every": 0},
        "tracking": {"tracking_uri": f"sqlite:///{tmp_path}/mlruns/mlflow.db",
                     "artifact_root": str(tmp_path / "mlruns" / "artifacts"), "experiment": "test-control-worlds"},
        "experiment": {"targets": ["03"], "combinations": ["fixed_area-04-28"], "seeds": [0, 1, 2],
                       "scaleup_targets": [], "limited_targets": [], "workers": 1, "train_overrides": {"max_steps": 8}},
        "designs": {"samples_per_subset": 20, "scaleup_total": 40, "limited_k": [0], "dev_size": 8},
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    out = tmp_path / "worlds"
    summary = replicate(2, seeds=1, out=str(out), params=str(p))

    assert [w["synth_seed"] for w in summary["per_world"]] == [0, 1]  # synth.seed + 0, + 1
    tables = [pd.read_parquet(out / f"w{i}" / "control" / "records.parquet") for i in (0, 1)]
    assert set(tables[0]["image_sha256"]) != set(tables[1]["image_sha256"])  # two different worlds
    for i, world in enumerate(summary["per_world"]):
        metrics = out / f"w{i}" / "metrics" / "03" / "fixed_area-04-28"
        related, plus = (json.loads((metrics / f"{arm}.json").read_text()) for arm in ("related", "baseline_plus"))
        baseline = json.loads((out / f"w{i}" / "metrics" / "03" / "baseline.json").read_text())
        assert related["n"] == plus["n"] == 1  # --seeds 1: one training seed per world
        assert world["rows"] == {"03/fixed_area-04-28": round(related["acc"] - plus["acc"], 2)}
        assert world["rows_vs_baseline"] == {"03/fixed_area-04-28": round(related["acc"] - baseline["acc"], 2)}
        assert not (out / f"w{i}" / "world").exists()  # images removed once the world's units are done
    mean, lo, hi = t_interval([w["mean_gap"] for w in summary["per_world"]])
    assert (summary["mean_gap"], summary["lo"], summary["hi"]) == (round(mean, 2), round(lo, 2), round(hi, 2))
    assert summary["equivalent"] == equivalence(lo, hi, 5.0)
    mean, lo, hi = t_interval([w["mean_gap_vs_baseline"] for w in summary["per_world"]])
    vs = summary["vs_baseline"]
    assert (vs["mean_gap"], vs["lo"], vs["hi"], vs["equivalent"]) == (round(mean, 2), round(lo, 2), round(hi, 2),
                                                                       equivalence(lo, hi, 5.0))
    mean, lo, hi = t_interval([w["rows"]["03/fixed_area-04-28"] for w in summary["per_world"]])
    target = summary["per_target"]["03"]  # one row of target 03: its mean is that row's gap
    assert (target["mean_gap"], target["lo"], target["hi"]) == (round(mean, 2), round(lo, 2), round(hi, 2))
    mean, lo, hi = t_interval([w["rows_vs_baseline"]["03/fixed_area-04-28"] for w in summary["per_world"]])
    target = summary["per_target_vs_baseline"]["03"]
    assert (target["mean_gap"], target["lo"], target["hi"]) == (round(mean, 2), round(lo, 2), round(hi, 2))
    assert json.loads((out / "summary.json").read_text()) == summary

    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")}
    caplog.set_level(logging.INFO, logger="medmat.data.synth_world")
    assert stamps and replicate(2, seeds=1, out=str(out), params=str(p)) == summary
    assert {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")} == stamps  # resumed: nothing retrained
    assert "regenerating" not in caplog.text  # nor a finished world's images drawn again
    assert not any((out / f"w{i}" / "world").exists() for i in (0, 1))

    (out / "w1" / "runs" / "03" / "fixed_area-04-28" / "related" / "seed0" / "metrics.json").unlink()
    assert replicate(2, seeds=1, out=str(out), params=str(p)) == summary  # one unit lost: its world redrawn
    assert caplog.text.count("regenerating") == 1 and "w1" in caplog.text.split("regenerating")[0].splitlines()[-1]

    # As the stage runs it: N from experiment.control_worlds, the pooled numbers (without per-world
    # detail) as DVC metrics for the report; the worlds above are resumed, not retrained.
    params["experiment"]["control_worlds"] = 2
    p.write_text(yaml.safe_dump(params))
    stamps = {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")}
    metrics = tmp_path / "metrics" / "control_worlds.json"
    assert main(["--params", str(p), "--out", str(out), "--metrics", str(metrics)]) == 0
    assert {f: f.stat().st_mtime_ns for f in out.rglob("metrics.json")} == stamps
    pooled = json.loads(metrics.read_text())
    assert pooled == headline(summary) and pooled["worlds"] == 2 and "per_world" not in pooled


def test_the_stage_is_off_by_default_and_says_so(tmp_path, capsys):
    p, out, metrics = tmp_path / "params.yaml", tmp_path / "worlds", tmp_path / "metrics" / "control_worlds.json"
    p.write_text(yaml.safe_dump({"experiment": {"targets": ["03"]}}))
    assert main(["--params", str(p), "--out", str(out), "--metrics", str(metrics)]) == 0
    assert json.loads(metrics.read_text())["worlds"] == 0 and out.is_dir()  # DVC's outputs exist, nothing ran
    assert "experiment.control_worlds=60" in capsys.readouterr().out
    p.write_text(yaml.safe_dump({"experiment": {"control_worlds": 1}}))  # one world is no replication
    assert main(["--params", str(p), "--out", str(out), "--metrics", str(metrics)]) == 2

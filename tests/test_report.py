"""The report from cell metrics: Table 3 rows with paired gaps and marks, control beside, figures."""

from __future__ import annotations

import argparse
import json
import math

import pytest

from medmat.pipeline import t_interval
from medmat.report import ReportConfig, build_report, paired_gap, run, summary_of, table3_rows


def cell(target, arm, accs, **extra):
    mean, lo, hi = t_interval(accs)
    return {"target": target, "arm": arm, "status": "ok", "triplet": extra.pop("triplet", "CT-Lung-COVID"),
            "seeds": {str(i): a for i, a in enumerate(accs)}, "mean": mean, "ci95": [lo, hi], **extra}


def write(root, world, target, arm, data):
    p = root / world / target / f"{arm}.json"
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(json.dumps(data))


@pytest.fixture
def world(tmp_path):
    m = tmp_path / "metrics"
    write(m, "main", "03", "baseline", cell("03", "baseline", [0.30, 0.32, 0.31]))
    write(m, "main", "03", "baseline_plus", cell("03", "baseline_plus", [0.40, 0.42, 0.38]))
    write(m, "main", "03", "related_fixed_area",
          cell("03", "related_fixed_area", [0.70, 0.66, 0.74], members={"04": "CT-Lung-Cancer", "28": "X-ray-Lung-COVID"}))
    write(m, "main", "03", "related_fixed_task", {"status": "unavailable", "reason": "fixed_task: no other subset has modality CT with task COVID"})
    # a failing target: Trained below Baseline+ (must be shown with a cross, not dropped)
    write(m, "main", "06", "baseline_plus", cell("06", "baseline_plus", [0.50, 0.52, 0.48], triplet="CT-Brain-Cancer"))
    write(m, "main", "06", "related_fixed_task", cell("06", "related_fixed_task", [0.45, 0.47, 0.43], triplet="CT-Brain-Cancer"))
    for arm, accs in (("all_related", [0.8]), ("all_unrelated", [0.4]), ("all_data", [0.82])):
        write(m, "main", "03", arm, cell("03", arm, accs))
    write(m, "main", "03", "limited", {"status": "ok", "variants": {
        "related_k0": {"companion": "related", "k": 0, **cell("03", "x", [0.6, 0.7])},
        "related_k50": {"companion": "related", "k": 50, **cell("03", "x", [0.8, 0.85])},
        "unrelated_k0": {"companion": "unrelated", "k": 0, **cell("03", "x", [0.4, 0.42])},
        "unrelated_k50": {"companion": "unrelated", "k": 50, **cell("03", "x", [0.7, 0.72])}}})
    write(m, "entangled", "03", "baseline_plus", cell("03", "baseline_plus", [0.40, 0.41, 0.39]))
    write(m, "entangled", "03", "related_fixed_area", cell("03", "related_fixed_area", [0.39, 0.43, 0.40]))
    s = tmp_path / "search" / "03"
    s.mkdir(parents=True)
    s.joinpath("history.csv").write_text(
        "trial,value,state,source,total,mixture\n0,0.6,COMPLETE,warm:related_fixed_area,600,{}\n"
        "1,0.55,COMPLETE,sampler,600,{}\n2,,PRUNED,sampler,600,{}\n3,0.72,COMPLETE,sampler,600,{}\n")
    s.joinpath("best_mixture.json").write_text(json.dumps({"components": {"04": 300, "30": 300}, "dev_accuracy": 0.72, "n_trials": 4}))
    return tmp_path


def test_paired_gap_is_per_seed():
    a = cell("03", "a", [0.7, 0.6, 0.8])
    b = cell("03", "b", [0.5, 0.5, 0.5])
    g = paired_gap(a, b)
    assert g["diffs"] == pytest.approx([0.2, 0.1, 0.3])
    assert g["mean"] == pytest.approx(0.2)
    # t(2) quantile 4.303 x sd 0.1 / sqrt 3
    assert g["ci95"][1] - g["mean"] == pytest.approx(4.3027 * 0.1 / math.sqrt(3), rel=1e-3)


def test_report_rows_marks_control_and_figures(world):
    summary = build_report(str(world / "metrics"), str(world / "search"), None, str(world / "reports"),
                           ReportConfig(), str(world / "summary.json"))
    text = (world / "reports" / "report.md").read_text()
    # the winning row and the failing row are both there, with their marks
    row03 = next(line for line in text.splitlines() if line.startswith("| 03 | CT-Lung-COVID | Fixed area"))
    assert row03.endswith("✓ |") and "+30.0" in row03
    row06 = next(line for line in text.splitlines() if line.startswith("| 06 |"))
    assert row06.endswith("✗ |") and "-5.0" in row06
    assert "fixed_task: no other subset has modality CT with task COVID" in text
    assert "Negative control" in text and "dev split" in text and "Normal" in text
    # per-target average: (30 + (-5)) / 2 = 12.5 < 15 -> not met; control gap ~ +0.7 -> as expected
    assert summary["main_mean_gap_pts"] == pytest.approx(12.5)
    assert summary["main_target_met"] is False and "NOT met" in text
    assert summary["control_as_expected"] is True
    for png in ("table3.png", "scaleup.png", "limited.png", "search_history.png"):
        assert (world / "reports" / png).stat().st_size > 1000, png
    assert json.loads((world / "summary.json").read_text())["main_rows"] == 2


def test_summary_over_targets_not_rows(world):
    from medmat.report import load_cells

    rows = table3_rows(load_cells(world / "metrics")["main"])
    s = summary_of(rows)
    assert s["rows"] == 2 and s["improved"] == 1


def test_cli_unknown_report_key(tmp_path, capsys):
    p = tmp_path / "params.yaml"
    p.write_text("report:\n  min_gian: 3\n")
    args = argparse.Namespace(metrics=str(tmp_path), search=None, designs=None, out=str(tmp_path / "r"),
                              summary=None, params=str(p))
    assert run(args) == 2
    assert "min_gian" in capsys.readouterr().out

"""The report in the paper's shape, from the runs' predictions (never a retrain):

    medmat report --runs work/runs --control-runs work/control_runs --designs work/designs \
        --control-designs work/control/designs --search work/search --out reports

- `runs`: designs indexes and run folders (per-seed metrics.json and predictions.jsonl);
- `analysis`: cells, Table 3 rows, headline, the control's equivalence test, caveats (medmat.stats);
- `plots`: figures and the CSV data behind them (reports/plots/*.csv, for `dvc plots`);
- `build`: report.md and the summary JSON.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from medmat.config import ConfigError, from_dict, load_params
from medmat.report.build import ReportConfig, build_report

__all__ = ["ReportConfig", "build_report", "configure", "run"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--runs", default="work/runs", help="main-world runs: RUNS/<target>/<arm path>/seed<k>/")
    parser.add_argument("--control-runs", default="work/control_runs", help="entangled-world runs (same layout)")
    parser.add_argument("--best-runs", default="work/best_runs", help="the search's best mixtures retrained: "
                        "BEST_RUNS/<target>/search_best/seed<k>/")
    parser.add_argument("--designs", default="work/designs", help="designs folder (<target>/index.json)")
    parser.add_argument("--control-designs", default="work/control/designs", help="the control world's designs")
    parser.add_argument("--search", default="work/search", help="search outputs: SEARCH/<target>/history.csv")
    parser.add_argument("--out", default="reports", help="report folder (report.md, PNGs, plots/*.csv)")
    parser.add_argument("--summary", default="work/report_summary.json", help="headline numbers (DVC metrics)")
    parser.add_argument("--control-worlds", default="work/metrics/control_worlds.json",
                        help="the negative control replicated over entangled worlds (stage control-worlds)")
    parser.add_argument("--params", default="params.yaml", help="params file with the `report:` section")


def run(args: argparse.Namespace) -> int:
    try:
        params = load_params(args.params) if Path(args.params).exists() else {}
        cfg = from_dict(ReportConfig, params.get("report"), where=f"{args.params}: section 'report'")
    except ConfigError as exc:
        print(f"medmat report: {exc}")
        return 2
    if not Path(args.designs).is_dir():
        print(f"medmat report: {args.designs}: no designs folder (run `medmat designs` and the study first)")
        return 2
    s = build_report(args.runs, args.control_runs, args.designs, args.control_designs, args.search, args.out, cfg,
                     args.summary, best_runs_dir=args.best_runs, control_worlds_path=args.control_worlds)
    print(f"report -> {Path(args.out) / 'report.md'} ({', '.join(s['figures']) or 'no figures'}); "
          f"main gap {s['main_mean_gap_pts']} pts {s['main_gap_ci95_pts']}, "
          f"control gap {s['control_mean_gap_pts']} pts {s['control_gap_ci95_pts']}")
    return 0

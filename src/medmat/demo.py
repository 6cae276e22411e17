"""`make demo`: Med-MAT-mini into data/ (if absent), then the whole pipeline with `dvc repro`.

    python -m medmat.demo [--no-repro]

Steps: (1) generate Med-MAT-mini into data/ when it is absent and (re)create data.dvc with `dvc add data`
(the world is byte-identical for a seed, so a fresh clone regenerates exactly the tracked version);
(2) `dvc repro`, one stage group at a time (ingest, validate, designs, pretrain, study, the entangled control,
search, best, register, report), timing each; (3) print the headline, the time per phase and where
to look.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

OFFLINE_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "MLFLOW_DISABLE_TELEMETRY": "true",
               "DVC_NO_ANALYTICS": "1", "GX_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
               "TOKENIZERS_PARALLELISM": "false"}


def _dvc(*args: str) -> int:
    cmd = [sys.executable, "-m", "dvc", *args]
    print("+ dvc " + " ".join(args), flush=True)
    return subprocess.call(cmd)


def ensure_data(data: Path, params: str) -> int:
    """Med-MAT-mini into `data` when absent; data.dvc (re)written so DVC tracks that version."""
    if data.is_dir() and any(data.iterdir()):
        print(f"{data}/ present: using it (delete it to regenerate Med-MAT-mini)")
        if not Path(f"{data}.dvc").exists():
            return _dvc("add", "-q", str(data))
        return 0
    print(f"{data}/ absent: generating Med-MAT-mini there", flush=True)
    from medmat.data.synth_world import generate, world_params

    generate(data, world_params(params), progress=sys.stderr.isatty())
    return _dvc("add", "-q", str(data))


# Stage groups in data order: `dvc repro <group>` runs that group (and nothing upstream that is done),
# so timing the groups one after the other gives the per-phase times the demo prints.
PHASES = ("ingest", "validate", "designs", "pretrain", "study", "control-data", "control", "control-worlds", "search",
          "best", "register", "report")


def print_summary(phases: dict[str, float], t_total: float) -> None:
    from medmat import tracking

    summary_path = Path("work/report_summary.json")
    print("\n" + "=" * 72)
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        print(f"Trained - Baseline+ over {s['main_rows']} Table-3 rows: {s['main_mean_gap_pts']} points "
              f"{s['main_gap_ci95_pts']}; {s['main_significant']} rows significant, {s['main_improves']} improve "
              f"(the paper's convention); CG claim supported: {s['main_claim_supported']}")
        print(f"negative control (entangled world): {s['control_mean_gap_pts']} points {s['control_gap_ci95_pts']}; "
              f"equivalent to 0 within the band: {s['control_equivalent']}")
        if s.get("control_worlds"):
            print(f"negative control over {s['control_worlds']} entangled worlds: {s['control_worlds_mean_gap_pts']} "
                  f"points {s['control_worlds_ci95_pts']}; equivalent: {s['control_worlds_equivalent']}")
        print(f"degenerate cells: {s['degenerate_cells']} (control world: {s.get('control_degenerate_cells', 0)}); "
              f"largest seed sd of a Trained arm: {s['max_trained_seed_sd']} points; rows whose Related arm never "
              f"trained on some target label: {s.get('main_rows_with_unseen_labels', 'n/a')}")
    print("time per phase (s): " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()))
    print(f"demo wall time: {t_total / 60:.1f} min (setup not included; see `make demo`'s first lines)")
    print("where to look:")
    print("  reports/report.md          the report (Table 3, Figure 4, limited data, search, control)")
    print("  make ui                    MLflow UI on http://127.0.0.1:5000 (runs, registered models);")
    print(f"                             the study's runs: {tracking.experiment_url()}")
    print("  make dashboard             optuna-dashboard on http://127.0.0.1:8080 (mixture studies)")
    print("  dvc metrics show           every cell: accuracy %, 95% interval over seeds, n")
    print("  dvc plots show             Table 3 gaps and Figure 4 from reports/plots/*.csv")
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-repro", action="store_true", help="only make sure data/ and data.dvc exist")
    args = parser.parse_args(argv)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    from medmat.tracking import MLFLOW_TRACKING_URI

    os.environ.setdefault("MLFLOW_TRACKING_URI", MLFLOW_TRACKING_URI)
    # dvc.yaml's commands call `medmat` and `python`: put this interpreter's bin/ (the venv) first on
    # PATH so they resolve to it even when the venv is not activated (as under `make demo`).
    bin_dir = str(Path(sys.executable).parent)
    os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    Path("mlruns").mkdir(exist_ok=True)
    t0 = time.time()
    rc = ensure_data(Path(args.data), args.params)
    if rc:
        print(f"demo: preparing {args.data}/ failed (exit {rc})")
        return rc
    phases = {"data": time.time() - t0}
    if args.no_repro:
        return 0
    for phase in PHASES:
        t = time.time()
        rc = _dvc("repro", phase)
        phases[phase] = time.time() - t
        if rc:
            print(f"demo: dvc repro {phase} failed (exit {rc}); `dvc status` shows what is left, a rerun resumes")
            return rc
    print_summary(phases, time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

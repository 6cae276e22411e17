"""`make demo`: Med-MAT-mini into data/ (if absent), then the whole pipeline with `dvc repro`.

    python -m medmat.demo [--no-repro]

Steps: (1) generate Med-MAT-mini into data/ when it is absent and (re)create data.dvc with `dvc add data`
(the world is byte-identical for a seed, so a fresh clone regenerates exactly the tracked version);
(2) `dvc repro` (ingest, validate, designs, the experiment matrix, the entangled control, search,
registry, report); (3) print the headline numbers and where to look.
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
    t0 = time.time()
    from medmat.pipeline import _cli

    rc = _cli("medmat.data.synth", ["--out", str(data), "--params", params])
    if rc:
        return rc
    print(f"generated in {time.time() - t0:.0f} s", flush=True)
    return _dvc("add", "-q", str(data))


def print_summary(t_total: float) -> None:
    summary_path = Path("work/report_summary.json")
    print("\n" + "=" * 72)
    if summary_path.exists():
        s = json.loads(summary_path.read_text())
        print(f"Trained (Related) - Baseline+: {s.get('main_mean_gap_pts')} points on average over targets "
              f"(per target {s.get('per_target_gap_pts')}); target met: {s.get('main_target_met')}")
        print(f"negative control (entangled world): gap {s.get('control_mean_gap_pts')} points, "
              f"CI {s.get('control_gap_ci95_pts')}; as expected: {s.get('control_as_expected')}")
    print(f"demo wall time: {t_total / 60:.1f} min")
    print("where to look:")
    print("  reports/report.md          the report (Table 3, Figure 4, limited data, search, control)")
    print("  make ui                    MLflow UI on http://127.0.0.1:5000 (runs, registered models)")
    print("  make dashboard             optuna-dashboard on http://127.0.0.1:8080 (mixture studies)")
    print("  dvc metrics show           every cell's mean and CI;  dvc exp run -S experiment.targets=[3,28]")
    print("=" * 72)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m medmat.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--data", default="data")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--no-repro", action="store_true", help="only make sure data/ and data.dvc exist")
    args = parser.parse_args(argv)
    for k, v in OFFLINE_ENV.items():
        os.environ.setdefault(k, v)
    os.environ.setdefault("MLFLOW_TRACKING_URI", "sqlite:///mlruns/mlflow.db")
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
    if args.no_repro:
        return 0
    rc = _dvc("repro")
    if rc:
        print(f"demo: dvc repro failed (exit {rc}); `dvc status` shows what is left, rerun resumes")
        return rc
    print_summary(time.time() - t0)
    return 0


if __name__ == "__main__":
    sys.exit(main())

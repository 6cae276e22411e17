"""One cell of the experiment matrix: a target x arm, every seed trained and evaluated in one process.

Why one process per (target, arm) and not per (target, arm, seed): each fresh Python process pays
~3-5 s of imports (torch, MLflow, pandas) on 2 cores, about as long as training the tiny model once;
with seeds in-process the demo's matrix stays under its 15-minute budget while DVC still sees one
stage per target x arm (so a changed arm reruns only its own cell). Train and evaluate are the
`medmat train` / `medmat evaluate` CLIs called in-process with the same arguments a user would type,
so the cell adds no training logic of its own.

    python -m medmat.pipeline cell --designs work/designs --records work/records.parquet \
        --target 03 --arm related_fixed_area --out work/runs/03/related_fixed_area \
        --metrics work/metrics/03/related_fixed_area.json

Outputs: OUT/seed<k>/ run directories (the contract's `work/runs/<target>/<arm>/seed<k>/`; limited-data
variants under OUT/<variant>/seed<k>/) and a metrics JSON: accuracy per seed, the mean and a 95%
t-interval over seeds. An arm the catalogue cannot build for the target writes its reason instead and
imports nothing heavy.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import sys
import time
from pathlib import Path
from typing import Any

from medmat.config import ConfigError, from_dict, load_params
from medmat.io import atomic_write_text

log = logging.getLogger("medmat.pipeline")

from medmat.designs import SCALEUP_ARMS as SCALEUP  # noqa: E402  (light: catalogue + pandas)


@dataclasses.dataclass
class ExperimentConfig:
    """params.yaml `experiment:` section (what runs; `designs:` says with which data)."""

    targets: list = dataclasses.field(default_factory=lambda: ["03", "28", "06"])
    seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    # Scale-up and limited-data arms are the paper's two scale-up targets only (Figure 4); their seeds
    # can be fewer than the main table's to keep the demo inside its time budget.
    scaleup_targets: list = dataclasses.field(default_factory=lambda: ["03", "28"])
    scaleup_seeds: list = dataclasses.field(default_factory=lambda: [0, 1, 2])
    limited_targets: list = dataclasses.field(default_factory=lambda: ["03"])
    control: bool = True  # run Related vs Baseline+ on the --entangled world (negative control)
    # `train:` keys overridden for every cell (as `medmat train --max-steps ...` would): the demo trains
    # shorter than `train:` to fit ~100 runs into 15 minutes on 2 cores; empty = `train:` as it is.
    train_overrides: dict = dataclasses.field(default_factory=dict)
    workers: int = 2  # seeds trained in parallel processes inside a cell (1 torch thread each)


def load_experiment(params_path: str | os.PathLike = "params.yaml") -> ExperimentConfig:
    params = load_params(params_path) if Path(params_path).exists() else {}
    return from_dict(ExperimentConfig, params.get("experiment"), where=f"{params_path}: section 'experiment'")


def norm_target(t: Any) -> str:
    """3, '3', '03' -> '03'; a triplet stays as written (the designs' folder name)."""
    s = str(t).strip()
    return f"{int(s):02d}" if s.isdigit() else s


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float, float]:
    """(mean, low, high): Student-t interval of the mean over seeds (3 seeds -> t(2) = 4.30)."""
    n = len(values)
    if n == 0:
        return (math.nan, math.nan, math.nan)
    mean = sum(values) / n
    if n == 1:
        return (mean, math.nan, math.nan)
    from scipy import stats

    sd = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1))
    half = stats.t.ppf(0.5 + level / 2, n - 1) * sd / math.sqrt(n)
    return (mean, mean - half, mean + half)


def write_json(path: str | os.PathLike, data: Any) -> Path:
    from medmat.designs import write_json as _w

    return _w(path, data)


# ---- running one seed through the stage CLIs -----------------------------------------------------
def _cli(module_name: str, argv: list[str]) -> int:
    """Run `medmat <stage>` in this process: its own parser, its own run(); returns the exit code."""
    import importlib

    module = importlib.import_module(module_name)
    parser = argparse.ArgumentParser(prog=f"medmat {module_name.rsplit('.', 1)[-1]}")
    module.configure(parser)
    known = {opt for action in parser._actions for opt in action.option_strings}
    # Pass optional tags only where the stage accepts them (keeps this cell working as stages grow).
    filtered: list[str] = []
    i = 0
    while i < len(argv):
        arg = argv[i]
        takes_value = i + 1 < len(argv) and not argv[i + 1].startswith("--")
        if arg.startswith("--") and arg not in known:
            i += 2 if takes_value else 1
            continue
        filtered.append(arg)
        if takes_value:
            filtered.append(argv[i + 1])
        i += 2 if takes_value else 1
    return int(module.run(parser.parse_args(filtered)) or 0)


def run_seed(*, records: str, manifest: str | None, run_dir: Path, target_no: int, target_label: str,
             arm: str, seed: int, params: str, overrides: dict | None = None) -> dict[str, Any]:
    """Train (unless Baseline) and evaluate one seed; return metrics.json's content."""
    run_dir.mkdir(parents=True, exist_ok=True)
    metrics_file = run_dir / "metrics.json"
    if metrics_file.exists() and (manifest is None or (run_dir / "model").exists()):
        # A cell killed mid-way keeps its finished seeds (dvc repro re-enters the stage).
        return json.loads(metrics_file.read_text())
    t0 = time.time()
    if manifest is None:  # Baseline: the untrained model of the same architecture
        rc = _cli("medmat.evaluate", ["--model", "untrained", "--records", records, "--target", str(target_no),
                                      "--out", str(run_dir), "--params", params, "--seed", str(seed),
                                      "--arm", arm, "--target-tag", target_label])
        if rc:
            raise RuntimeError(f"medmat evaluate (untrained, seed {seed}) exited {rc}")
    else:
        rc = _cli("medmat.train", ["--records", records, "--manifest", manifest, "--out", str(run_dir),
                                   "--params", params, "--seed", str(seed), "--arm", arm,
                                   "--target", target_label]
                 + [x for k, v in (overrides or {}).items() for x in ("--" + k.replace("_", "-"), str(v))])
        if rc:
            raise RuntimeError(f"medmat train ({arm}, seed {seed}) exited {rc}; see {run_dir}")
        rc = _cli("medmat.evaluate", ["--model", str(run_dir / "model"), "--records", records,
                                      "--target", str(target_no), "--out", str(run_dir), "--params", params])
        if rc not in (0, 3):  # 3: metrics written, only MLflow logging failed (logged above)
            raise RuntimeError(f"medmat evaluate ({arm}, seed {seed}) exited {rc}")
    out = json.loads(metrics_file.read_text())
    log.info("%s %s seed %d: accuracy %.3f (%.1f s)", target_label, arm, seed, out["accuracy"], time.time() - t0)
    return out


def _run_seed_job(job: dict) -> dict[str, Any]:
    import torch

    torch.set_num_threads(1)  # one core per worker process (evaluation too, not only training)
    return run_seed(**job)


def run_jobs(jobs: list[dict], workers: int) -> list[dict[str, Any]]:
    """run_seed over `jobs`, `workers` processes at a time (results in job order).

    Each training uses one torch thread (train.num_threads: 1), so two processes are how a sequential
    `dvc repro` uses both cores. Forked before this process imports torch (the cell imports only
    pandas and the catalogue), so every worker starts clean."""
    if workers <= 1 or len(jobs) <= 1:
        return [run_seed(**j) for j in jobs]
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    if "torch" in sys.modules:
        # torch was imported (and maybe used) before: its thread pools do not survive fork, so the
        # workers start afresh (tests, library callers)
        ctx = multiprocessing.get_context("spawn")
    else:
        # Import the heavy stack once here, before any tensor work, and fork: each worker then starts
        # with torch/MLflow loaded instead of paying ~5 s (more under load) of imports itself.
        import mlflow  # noqa: F401
        import torch  # noqa: F401

        import medmat.evaluate  # noqa: F401
        import medmat.train  # noqa: F401

        ctx = multiprocessing.get_context("fork")
    with ProcessPoolExecutor(max_workers=min(workers, len(jobs)), mp_context=ctx) as pool:
        return list(pool.map(_run_seed_job, jobs))


def summarise(accs: dict[int, float], n_test: int | None) -> dict[str, Any]:
    mean, lo, hi = t_interval(list(accs.values()))
    return {"seeds": {str(k): v for k, v in accs.items()}, "mean": mean, "ci95": [lo, hi], "n_test": n_test}


def run_cell(*, designs_dir: str, records: str, target: str, arm: str, out: str, metrics: str,
             params: str = "params.yaml", world: str = "main", manifest: str | None = None) -> dict[str, Any]:
    """Every seed of one (target, arm); writes and returns the cell's metrics.

    `manifest` trains a mixture from elsewhere (the search's best mixture) as arm `arm`."""
    from medmat.designs import DesignError, load_arm

    exp = load_experiment(params)
    label = norm_target(target)
    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    base = {"target": label, "arm": arm, "world": world}
    if manifest is not None:
        try:
            man = {"status": "ok", **json.loads(Path(manifest).read_text(encoding="utf-8"))}
        except (OSError, ValueError) as exc:
            man = {"status": "unavailable", "reason": f"{manifest}: cannot read the mixture ({exc})"}
        else:
            # resolve the bare spec once, into the cell folder, so every seed trains the same records
            from medmat.mixture import resolve_mixture, save_manifest
            import pandas as pd

            _, resolved = resolve_mixture(pd.read_parquet(records), {"components": man["components"]},
                                          seed=int(man.get("seed", 0)))
            man = {**man, **resolved, "status": "ok", "arm": arm, "target": label}
            save_manifest(out_dir / "manifest.json", man)
    else:
        try:
            man = load_arm(designs_dir, label, arm)
        except DesignError as exc:
            man = {"status": "unavailable", "reason": str(exc)}
    seeds = [int(s) for s in exp.seeds]
    if arm in SCALEUP or arm == "in_distribution":
        if label not in {norm_target(t) for t in exp.scaleup_targets}:
            man = {"status": "skipped", "reason": f"{label} is not in experiment.scaleup_targets"}
        seeds = [int(s) for s in exp.scaleup_seeds]
    if arm == "limited":
        if label not in {norm_target(t) for t in exp.limited_targets}:
            man = {"status": "skipped", "reason": f"{label} is not in experiment.limited_targets"}
        seeds = [int(s) for s in exp.scaleup_seeds]
    if man.get("status") != "ok":
        result = {**base, "status": man.get("status"), "reason": man.get("reason") or man.get("note", "")}
        if man.get("alias_of"):
            result["alias_of"] = man["alias_of"]
        write_json(metrics, result)
        write_json(out_dir / "cell.json", result)  # a DVC out is never an empty folder
        log.info("%s %s: %s (%s)", label, arm, result["status"], result["reason"])
        return result

    index = json.loads((Path(designs_dir) / "designs.json").read_text())
    entry = index["targets"][label]
    target_no = entry["subset_no"]
    if target_no is None:
        result = {**base, "status": "unavailable",
                  "reason": f"{entry['triplet']} names no subset, so it has no test split to score"}
        write_json(metrics, result)
        write_json(out_dir / "cell.json", result)
        return result
    result = {**base, "status": "ok", "triplet": entry["triplet"], "seeds_run": seeds}
    if arm == "limited":
        jobs = []
        for name, var in man["variants"].items():
            vdir = out_dir / name
            write_json(vdir / "manifest.json", {**var, "arm": f"limited_{name}", "target": label})
            jobs += [dict(records=records, manifest=str(vdir / "manifest.json"), run_dir=vdir / f"seed{s}",
                          target_no=target_no, target_label=label, arm=f"limited_{name}", seed=s, params=params,
                          overrides=exp.train_overrides) for s in seeds]
        done = run_jobs(jobs, exp.workers)
        variants = {}
        for name, var in man["variants"].items():
            ms = {j["seed"]: m for j, m in zip(jobs, done) if j["arm"] == f"limited_{name}"}
            accs = {s: float(m["accuracy"]) for s, m in ms.items()}
            variants[name] = {"companion": var["companion"], "k": var["k"],
                              **summarise(accs, next(iter(ms.values())).get("n"))}
        result["variants"] = variants
    else:
        if manifest is not None:
            arm_manifest = str(out_dir / "manifest.json")
        else:
            arm_manifest = None if arm == "baseline" else str(Path(designs_dir) / label / f"{arm}.json")
        jobs = [dict(records=records, manifest=arm_manifest, run_dir=out_dir / f"seed{s}", target_no=target_no,
                     target_label=label, arm=arm, seed=s, params=params, overrides=exp.train_overrides)
                for s in seeds]
        done = run_jobs(jobs, exp.workers)
        accs = {j["seed"]: float(m["accuracy"]) for j, m in zip(jobs, done)}
        result.update(summarise(accs, done[0].get("n")))
        result["components"] = {k: v.get("selected") for k, v in man.get("components", {}).items()}
        result["total"] = man.get("total", 0)
        for key in ("direction", "members", "dev_accuracy", "study", "trial"):
            if key in man:
                result[key] = man[key]
    write_json(metrics, result)
    write_json(out_dir / "cell.json", result)
    return result


def control_data(out: str, params: str = "params.yaml") -> int:
    """The negative control's world: Med-MAT-mini --entangled, ingested, with the same designs.

    One process for synth + ingest + designs (imports paid once). With experiment.control false it
    writes only a note, and the control cells report "skipped"."""
    import shutil

    exp = load_experiment(params)
    root = Path(out)
    if root.exists():
        shutil.rmtree(root)  # synth refuses a non-empty folder; this stage owns `out` entirely
    root.mkdir(parents=True)
    if not exp.control:
        write_json(root / "DISABLED.json", {"reason": "experiment.control is false"})
        return 0
    steps = [
        ("medmat.data.synth", ["--out", str(root / "data"), "--entangled", "--params", params]),
        ("medmat.data.ingest", ["--data", str(root / "data"), "--out", str(root / "records.parquet"),
                                "--params", params]),
        ("medmat.designs", ["--records", str(root / "records.parquet"), "--out", str(root / "designs"),
                            "--params", params]),
    ]
    for module, argv in steps:
        rc = _cli(module, argv)
        if rc:
            log.error("control world: %s exited %d", module, rc)
            return rc
    return 0


def use_config(overlay: str | os.PathLike, params: str | os.PathLike = "params.yaml") -> list[str]:
    """Replace whole top-level sections of `params` by those of `overlay`, keeping both files' comments.

    Text-level on purpose: a YAML round trip would drop every comment of params.yaml. The old file is
    kept as <params>.bak. Returns the replaced section names."""
    import re
    import shutil

    import yaml

    def blocks(text: str) -> tuple[list[str], dict[str, str]]:
        """Top-level sections in order: each block is its key line, the indented/blank/comment lines after."""
        order, out, current = [], {}, None
        for line in text.splitlines(keepends=True):
            m = re.match(r"^([A-Za-z_][\w-]*):", line)
            if m:
                current = m.group(1)
                order.append(current)
                out[current] = ""
            if current is not None:
                out[current] += line
        return order, out

    over_text = Path(overlay).read_text(encoding="utf-8")
    yaml.safe_load(over_text)  # a broken overlay is an error before anything is touched
    params_path = Path(params)
    text = params_path.read_text(encoding="utf-8")
    _, over = blocks(over_text)
    order, mine = blocks(text)
    head = text[: text.index(mine[order[0]])] if order else text
    for name, block in over.items():
        if name not in mine:
            order.append(name)
        mine[name] = block.rstrip("\n") + "\n\n"
    new = head + "".join(mine[n] for n in order)
    yaml.safe_load(new)
    shutil.copyfile(params_path, str(params_path) + ".bak")
    atomic_write_text(params_path, new)
    return list(over)


# ---- CLI -----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    c = sub.add_parser("cell", help="train + evaluate every seed of one target x arm")
    c.add_argument("--designs", required=True, help="designs folder (medmat designs --out)")
    c.add_argument("--records", required=True, help="records table the designs were made from")
    c.add_argument("--target", required=True, help="target (subset number or triplet)")
    c.add_argument("--arm", required=True, help="arm name (see designs.json)")
    c.add_argument("--out", required=True, help="cell folder: OUT/seed<k>/ run directories")
    c.add_argument("--metrics", required=True, help="cell metrics JSON (mean and t-interval over seeds)")
    c.add_argument("--params", default="params.yaml")
    c.add_argument("--world", default="main", help="label for the report: main or entangled")
    c.add_argument("--manifest", help="train this mixture (e.g. the search's best_mixture.json) instead of a design")
    d = sub.add_parser("control-data", help="generate + ingest + design the --entangled world")
    d.add_argument("--out", required=True, help="folder: data/, records.parquet, designs/")
    d.add_argument("--params", default="params.yaml")
    u = sub.add_parser("use-config", help="switch params.yaml to another configuration (e.g. configs/gpu.yaml)")
    u.add_argument("overlay", help="YAML file of whole params.yaml sections to put in place")
    u.add_argument("--params", default="params.yaml")


def run(args: argparse.Namespace) -> int:
    if args.action == "control-data":
        return control_data(args.out, args.params)
    if args.action == "use-config":
        try:
            names = use_config(args.overlay, args.params)
        except Exception as exc:  # noqa: BLE001 - missing file or broken YAML: say which, touch nothing
            print(f"use-config: {args.overlay}: {exc}")
            return 2
        print(f"{args.params}: sections {', '.join(names)} now from {args.overlay} (old file: {args.params}.bak)")
        return 0
    try:
        result = run_cell(designs_dir=args.designs, records=args.records, target=args.target, arm=args.arm,
                          out=args.out, metrics=args.metrics, params=args.params, world=args.world,
                          manifest=args.manifest)
    except (ConfigError, RuntimeError, FileNotFoundError, KeyError) as exc:
        log.error("cell %s/%s failed: %s", args.target, args.arm, exc)
        return 1
    if result.get("status") == "ok" and "mean" in result:
        print(f"{result['target']} {result['arm']} ({args.world}): mean accuracy {result['mean']:.3f} "
              f"95% CI [{result['ci95'][0]:.3f}, {result['ci95'][1]:.3f}] over seeds {result['seeds_run']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    parser = argparse.ArgumentParser(prog="python -m medmat.pipeline", description=__doc__.splitlines()[0])
    configure(parser)
    return run(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())

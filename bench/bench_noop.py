"""Benchmark: `dvc repro` with nothing to do (target <= 2 s on the default world), beside its floor.

    python bench/bench_noop.py [--repo .] [--runs 5]

Run it in a repository whose pipeline is up to date (after `make demo`). It prints:
- the wall time of `dvc repro` run `--runs` times as a user types it (a new process each time);
- one run inside this process with the time DVC spends deciding each stage (`Stage.changed`), so the
  stages that cost the time are named;
- the floor: a single os.walk + stat of every file under the pipeline's directory dependencies and
  outputs, each path once. A no-op must at least notice a changed file, so it cannot stat less; DVC
  checks `data/` twice (data.dvc's output, ingest's dependency) and also hashes through its state DB.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path


def wall_times(repo: Path, runs: int) -> list[float]:
    # `dvc` as the user types it: the console script beside this interpreter (the project's venv), even
    # when the venv is not activated
    env = {**os.environ, "DVC_NO_ANALYTICS": "1",
           "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")}
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        done = subprocess.run(["dvc", "repro"], cwd=repo, env=env, capture_output=True, text=True)
        out.append(time.perf_counter() - t0)
        if done.returncode != 0 or "up to date" not in done.stdout:
            raise SystemExit(f"{repo}: `dvc repro` is not a no-op here (run `make demo` first):\n{done.stdout[-2000:]}")
    return out


def per_stage(repo: Path) -> tuple[float, dict[str, float], list[str]]:
    """One in-process `dvc repro`: total seconds, seconds per stage in Stage.changed, the directory paths."""
    import logging

    from dvc.repo import Repo
    from dvc.stage import Stage

    logging.getLogger("dvc").setLevel(logging.WARNING)  # not a line per stage: the table below says it

    spent: dict[str, float] = {}
    original = Stage.changed

    def timed(self, *args, **kwargs):
        t0 = time.perf_counter()
        try:
            return original(self, *args, **kwargs)
        finally:
            spent[self.addressing] = spent.get(self.addressing, 0.0) + time.perf_counter() - t0

    Stage.changed = timed
    try:
        t0 = time.perf_counter()
        # DVC resolves the default target (dvc.yaml) against the working directory, as the CLI does
        with contextlib.chdir(repo), Repo(str(repo)) as r:
            r.reproduce()
            dirs = sorted({str(o.fs_path) for s in r.index.stages for o in [*s.deps, *s.outs]
                           if getattr(o, "fs_path", None) and os.path.isdir(o.fs_path)})
        return time.perf_counter() - t0, spent, dirs
    finally:
        Stage.changed = original


def floor(dirs: list[str]) -> tuple[float, int]:
    """Seconds to stat every file under `dirs` once (nested paths counted once), and the file count."""
    roots = [d for d in dirs if not any(d != o and d.startswith(o + os.sep) for o in dirs)]
    t0, n = time.perf_counter(), 0
    for root in roots:
        for base, _, files in os.walk(root):
            for f in files:
                os.stat(os.path.join(base, f))
                n += 1
    return time.perf_counter() - t0, n


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repo", default=".", type=Path)
    ap.add_argument("--runs", type=int, default=5)
    args = ap.parse_args()
    os.environ["DVC_NO_ANALYTICS"] = "1"
    repo = args.repo.resolve()
    walls = wall_times(repo, args.runs)
    total, spent, dirs = per_stage(repo)
    floor_s, n_files = floor(dirs)
    print(f"machine: {platform.machine()}, {os.cpu_count()} cores, Python {platform.python_version()}, "
          f"load {os.getloadavg()[0]:.2f}")
    print(f"`dvc repro` no-op, {args.runs} runs: median {statistics.median(walls):.2f} s "
          f"(min {min(walls):.2f}, max {max(walls):.2f}); target <= 2 s")
    print(f"floor: stat every tracked file once ({n_files} files): {floor_s:.2f} s")
    print(f"in-process repro {total:.2f} s; deciding each stage:")
    for name, s in sorted(spent.items(), key=lambda kv: -kv[1]):
        print(f"  {s:6.3f} s  {name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

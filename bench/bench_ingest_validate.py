"""Benchmark: ingest and validation of full-scale Med-MAT metadata (~2.36M records) against the floor
of parsing the same JSON files with orjson, the fastest parser ingest itself uses.

    python bench/bench_ingest_validate.py [--work DIR] [--records N] [--keep | --reuse DIR]

Generates Med-MAT-mini with full-scale metadata (`medmat synth --scale full`: every record points at a
real image of the mini pool) into a temporary folder, then runs each phase in its own process so each
peak memory (ru_maxrss) is its own:
  floor     orjson.loads of every JSON file ingest reads (medmat.data.discovery finds them)
  ingest    medmat.data.ingest.ingest_to_parquet -> records.parquet (problems in its metadata)
  validate  medmat.validate: read the table, compute columns, decode each unique image once, GX checks
Prints records/s and peak memory of each, the ratio (ingest + validate) / floor (target <= 3x wall),
validate's peak memory (target <= 1.5 GB), the machine and its load (other jobs on a shared machine
stretch wall time, not CPU time, so CPU seconds are printed beside). Not a test: it takes minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # Linux: kilobytes


def _cpu_s() -> float:
    """CPU seconds of this process (all threads). Shown beside wall time: on a shared 2-core machine
    other people's jobs stretch wall time, not CPU time."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def phase_floor(data: Path, work: Path) -> dict:
    import orjson

    from medmat.data.discovery import discover

    files = [f.path for f in discover(data).files]
    t0, c0 = time.perf_counter(), _cpu_s()
    n = 0
    for p in files:
        n += len(orjson.loads(Path(p).read_bytes()))
    return {"files": len(files), "records_parsed": n, "seconds": time.perf_counter() - t0,
            "floor_cpu_seconds": _cpu_s() - c0, "bytes": sum(Path(p).stat().st_size for p in files),
            "peak_mb": _peak_mb()}


def phase_ingest(data: Path, work: Path) -> dict:
    from medmat.data.ingest import ingest_to_parquet

    t0 = time.perf_counter()
    problems, summary = ingest_to_parquet(data, work / "records.parquet", progress=False)
    return {"seconds": time.perf_counter() - t0, "records": summary.records,
            "duplicates_skipped": summary.duplicates_skipped, "problems": len(problems),
            "unique_images": summary.unique_images, "peak_mb": _peak_mb()}


def phase_validate(data: Path, work: Path) -> dict:
    from medmat.data.ingest import read_problems
    from medmat.validate import ValidateParams, validate_records, write_report
    from medmat.validate.suite import read_records_table, summary_lines

    t0 = time.perf_counter()
    records = read_records_table(work / "records.parquet")
    read_s, read_mb = time.perf_counter() - t0, _peak_mb()
    report = validate_records(records, data.resolve(), ValidateParams(), read_problems(work / "records.parquet"))
    write_report(work / "validation.json", report)
    from medmat.data import images
    return {"seconds": time.perf_counter() - t0, "read_seconds": read_s, "read_peak_mb": read_mb,
            "records": report["records"], "stages": report["seconds"], "passed": report["passed"],
            "summary": summary_lines(report)[-1], "peak_mb": _peak_mb(),
            "failing": {c["check"]: c["failed"] for c in report["checks"] if not c["ok"]},
            "decode_peak_pixels": images.DECODE_BUDGET.peak, "decode_budget_pixels": images.DECODE_BUDGET.limit}


PHASES = {"floor": phase_floor, "ingest": phase_ingest, "validate": phase_validate}


def machine() -> str:
    model = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                  if ln.startswith("model name")), platform.processor() or "unknown CPU")
    mem = next((int(ln.split()[1]) for ln in Path("/proc/meminfo").read_text().splitlines()
                if ln.startswith("MemTotal")), 0)
    return (f"{os.cpu_count()} cores ({len(os.sched_getaffinity(0))} usable), {model}, "
            f"{mem / 2**20:.1f} GiB RAM, Python {platform.python_version()}")


def run_phase(name: str, data: Path, work: Path) -> dict:
    env = {**os.environ, "GX_ANALYTICS_ENABLED": "false", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, __file__, "--phase", name, "--data", str(data), "--work", str(work)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        sys.exit(f"phase {name} failed:\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="folder for the generated data (default: a temp dir)")
    ap.add_argument("--records", type=int, default=None, help="full-scale records (default: synth's ~2.36M)")
    ap.add_argument("--keep", action="store_true", help="keep the generated data")
    ap.add_argument("--reuse", type=Path, default=None,
                    help="a folder kept by an earlier --keep run: skip generation, measure again")
    ap.add_argument("--phase", choices=sorted(PHASES), help=argparse.SUPPRESS)
    ap.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.phase:   # child process: one phase, one JSON line
        cpu0 = _cpu_s()
        out = PHASES[args.phase](args.data, args.work)
        out["cpu_seconds"] = _cpu_s() - cpu0
        print(json.dumps(out))
        return 0

    from medmat.data.synth_world import SynthParams, generate

    base = args.reuse or Path(tempfile.mkdtemp(prefix="medmat-bench-", dir=args.work))
    data, work = base / "data", base / "work"
    work.mkdir(exist_ok=True)
    keep = args.keep or args.reuse is not None
    try:
        if args.reuse is None:
            params = SynthParams(scale="full", **({"full_records": args.records} if args.records else {}))
            t0 = time.perf_counter()
            world = generate(data, params, progress=False)
            print(f"generated: {world} in {time.perf_counter() - t0:.0f} s", flush=True)
        res = {}
        load0 = os.getloadavg()
        for name in ("floor", "ingest", "validate"):
            res[name] = run_phase(name, data, work)
            print(f"{name}: {json.dumps(res[name])}", flush=True)
        load1 = os.getloadavg()
        fl, ing, val = res["floor"], res["ingest"], res["validate"]
        n = ing["records"]
        print("\n=== ingest + validate of full-scale Med-MAT metadata ===")
        print(f"machine:  {machine()}; load average {load0[0]:.1f} before, {load1[0]:.1f} after "
              "(other jobs on the machine stretch wall time)")
        print(f"input:    {fl['files']} JSON files, {fl['bytes'] / 2**20:.0f} MiB, {fl['records_parsed']:,} records "
              f"(every file ingest reads); {n:,} records in the table")
        print(f"floor:    orjson {fl['seconds']:.1f} s ({fl['records_parsed'] / fl['seconds']:,.0f} records/s), "
              f"peak {fl['peak_mb']:.0f} MB")
        print(f"ingest:   {ing['seconds']:.1f} s ({n / ing['seconds']:,.0f} records/s), peak {ing['peak_mb']:.0f} MB")
        print(f"validate: {val['seconds']:.1f} s ({n / val['seconds']:,.0f} records/s; read {val['read_seconds']:.1f} s, "
              f"stages {val['stages']}), peak {val['peak_mb']:.0f} MB (after reading the table "
              f"{val['read_peak_mb']:.0f} MB; target <= 1536 MB -> {'MET' if val['peak_mb'] <= 1536 else 'MISSED'}); "
              f"{val['summary']}; failing {val['failing']}")
        print(f"decode:   at most {val['decode_peak_pixels']:,} pixels in flight (budget {val['decode_budget_pixels']:,}, "
              "whatever the thread count)")
        ratio = (ing["seconds"] + val["seconds"]) / fl["seconds"]
        cpu_ratio = (ing["cpu_seconds"] + val["cpu_seconds"]) / fl["floor_cpu_seconds"]
        print(f"cpu:      floor {fl['floor_cpu_seconds']:.1f} s, ingest {ing['cpu_seconds']:.1f} s, "
              f"validate {val['cpu_seconds']:.1f} s (CPU seconds, all threads)")
        print(f"ratio:    (ingest + validate) / orjson floor = {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU "
              f"(ingest alone {ing['seconds'] / fl['seconds']:.2f}x, validate alone {val['seconds'] / fl['seconds']:.2f}x; "
              f"target <= 3x wall) -> {'MET' if ratio <= 3 else 'MISSED'}")
    finally:
        if keep:
            print(f"kept: {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""`medmat validate`: Great Expectations checks of the records table and its images.

    medmat validate --data data --records work/records.parquet --report work/validation.json

Exit 1 when any critical check fails, else 0. The JSON report names, for every failure, the check, the
GX expectation, the file, the record id and a message; at most `validate.max_listed` rows are listed
per expectation, the count is always exact. Problems found by ingest (`<records stem>.problems.json`:
malformed JSON, wrong types, ...) enter the report too. Severities: params.yaml `validate.severity`.

Checks and their default severities: medmat.validate.checks.CHECKS; computed columns:
medmat.validate.checks (table), .image_checks (files), .leakage (duplicates across the table);
GX expectations and the engine: medmat.validate.expectations.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from medmat.io import atomic_write_json
from medmat.validate.checks import CHECKS, CRITICAL, NEEDED, OPTIONAL, WARNING, ValidateParams, prepare
from medmat.validate.expectations import GXEngine, balance_frame, rules
from medmat.validate.leakage import group_name, pair_list

log = logging.getLogger(__name__)


# ---- core ----------------------------------------------------------------------------------------
@dataclass
class Outcome:
    check: str
    severity: str
    description: str
    failed: int = 0
    expectations: list[dict] = field(default_factory=list)
    failures: list[dict] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.failed == 0


def _vocabulary(catalog) -> dict[str, list[str]]:
    return {"modality": list(catalog.modalities), "area": list(catalog.areas), "task": list(catalog.tasks)}


def validate_records(records: pd.DataFrame, data_root: str | os.PathLike, params: ValidateParams | None = None,
                     problems: list[dict] | None = None, catalog=None, progress: bool = False) -> dict:
    """The validation report (a JSON-able dict) of a records table and the ingest's problems."""
    from medmat.catalog import load_catalog

    params = params or ValidateParams()
    catalog = catalog or load_catalog()
    started = time.perf_counter()
    frame, labels = prepare(records, catalog, data_root, params, progress=progress)
    release_memory()
    frames = {"records": frame, "balance": balance_frame(frame, labels)}
    prepared_s = time.perf_counter() - started

    gx = GXEngine()
    all_rules = rules(_vocabulary(catalog), params, frame)
    outcomes = {name: Outcome(name, params.severity_of(name), desc) for name, (_, desc) in CHECKS.items()}
    for frame_name, df in frames.items():
        mine = [r for r in all_rules if r.frame == frame_name]
        for rule, (success, unexpected, elements) in zip(mine, gx.counts(df, mine)):
            out = outcomes[rule.check]
            exp_name = _expectation_name(rule.expectation)
            out.expectations.append({"expectation": exp_name, "success": success, "unexpected_count": unexpected,
                                     "element_count": elements})
            if success:
                continue
            out.failed += unexpected
            room = params.max_listed - len(out.failures)
            if room <= 0:
                continue
            for pos in gx.listed_rows(df, rule, unexpected, room):
                row = df.iloc[pos]
                out.failures.append({"expectation": exp_name, "file": row["source_file"],
                                     "record_id": _jsonable(row["record_id"]), "message": rule.message(row)})

    _add_problems(outcomes, problems or [], params)
    checks = list(outcomes.values())
    critical = sum(1 for o in checks if not o.ok and o.severity == CRITICAL)
    warnings = sum(1 for o in checks if not o.ok and o.severity == WARNING)
    balance = frames["balance"]
    return {
        "passed": critical == 0,
        "records": len(records),
        "data_root": str(data_root),
        "critical_checks_failed": critical,
        "warning_checks_failed": warnings,
        "checks": [{"check": o.check, "severity": o.severity, "ok": o.ok, "failed": o.failed,
                    "description": o.description, "expectations": o.expectations,
                    "listed": len(o.failures), "failures": o.failures} for o in checks],
        "test_label_balance": [{"test_set": group_name(r["_group"]), "files": r["source_file"],
                                "counts": r["counts"], "largest_to_smallest": (round(r["imbalance_ratio"], 3)
                                                                if math.isfinite(r["imbalance_ratio"]) else None)}
                               for _, r in balance.iterrows()],
        # Image pairs behind cross_subset_duplicate / near_duplicate: both sides' file, record, subset, split.
        "duplicates": {"exact": pair_list(frame, "dup_partner", "exact", params.max_listed),
                       "near": pair_list(frame, "near_partner", "near", params.max_listed, "near_distance"),
                       "records_with_perceptual_hash": frame.attrs.get("phash_known", 0)},
        "params": {"max_listed": params.max_listed, "images": params.images,
                   "label_set_min_records": params.label_set_min_records,
                   "balance_max_ratio": params.balance_max_ratio, "phash_distance": params.phash_distance},
        "seconds": {"prepare": round(prepared_s, 2), "total": round(time.perf_counter() - started, 2)},
    }


def _add_problems(outcomes: dict[str, Outcome], problems: list[dict], params: ValidateParams) -> None:
    """Ingest problems as checks `ingest.<check>`: severity from params, else the one ingest gave."""
    base = outcomes["ingest_problems"]
    by_check: dict[str, list[dict]] = {}
    for p in problems:
        by_check.setdefault(str(p.get("check") or "problem"), []).append(p)
    for name, items in sorted(by_check.items()):
        key = f"ingest.{name}"
        given = items[0].get("severity") if items[0].get("severity") in (CRITICAL, WARNING) else CRITICAL
        sev = params.severity.get(key) or params.severity.get("ingest_problems") or given
        out = Outcome(key, sev, f"ingest found: {name}", failed=len(items))
        out.expectations.append({"expectation": "ingest problems file", "success": False,
                                 "unexpected_count": len(items)})
        out.failures = [{"expectation": "ingest problems file", "file": p.get("file"),
                         "record_id": p.get("record_id"),
                         "message": p.get("message", "") + (f" (record #{p['index']} of the file)"
                                                            if p.get("index") is not None else "")}
                        for p in items[: params.max_listed]]
        outcomes[key] = out
    base.expectations.append({"expectation": "ingest problems file", "success": not problems,
                              "unexpected_count": len(problems)})
    # The umbrella row only counts; the per-kind rows above carry the severities and listings.
    base.severity = WARNING if not problems else base.severity
    base.failed = 0


def _expectation_name(exp) -> str:
    kw = {k: v for k, v in exp.configuration.kwargs.items()
          if k in ("column", "column_A", "column_B", "min_value", "max_value", "regex")}
    return f"{exp.expectation_type}({', '.join(f'{k}={v!r}' for k, v in kw.items())})"


def _jsonable(v):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return None
    return v.item() if isinstance(v, np.generic) else v


def summary_lines(report: dict) -> list[str]:
    lines = []
    for c in report["checks"]:
        if c["check"] == "ingest_problems":
            continue
        status = "ok  " if c["ok"] else "FAIL"
        extra = "" if c["ok"] else f"  {c['failed']} failing ({c['severity']})"
        lines.append(f"{status} {c['check']}{extra}")
    verdict = "PASSED" if report["passed"] else "FAILED"
    lines.append(f"validate: {verdict}: {report['records']} records, {report['critical_checks_failed']} critical "
                 f"and {report['warning_checks_failed']} warning check(s) failing")
    return lines


def write_report(path: str | os.PathLike, report: dict) -> Path:
    return atomic_write_json(path, report, indent=2, ensure_ascii=False, default=_jsonable)


# ---- CLI ----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="data root the records' image paths are relative to")
    parser.add_argument("--records", required=True, type=Path, help="records table written by `medmat ingest`")
    parser.add_argument("--report", required=True, type=Path, help="JSON report to write")
    parser.add_argument("--problems", type=Path, default=None,
                        help="ingest problems JSON (default: <records stem>.problems.json beside --records)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameter file; section `validate` (defaults when the file is absent)")


# Columns read dictionary-encoded (pandas categoricals): few distinct values over millions of rows.
DICTIONARY = ["source_file", "modality", "area", "task", "split", "image", "image_sha256", "image_phash",
              "answer_letter", "answer_text"]


def read_records_table(path: str | os.PathLike) -> pd.DataFrame:
    """The columns of a records table the checks read, strings dictionary-encoded and options as Arrow
    lists: no per-row Python objects (at full scale, 2.4M rows, plain strings alone took ~1.5 GB)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    # Arrow's own allocator keeps freed pages for reuse; the system one hands them back (with
    # release_memory below), which lowers validate's peak by ~300 MB at full scale.
    pa.set_memory_pool(pa.system_memory_pool())
    names = pq.read_schema(path).names
    columns = NEEDED + [c for c in OPTIONAL if c in names]
    table = pq.read_table(path, columns=columns, read_dictionary=[c for c in DICTIONARY if c in columns])
    df = table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)
    del table
    release_memory()
    return df


def release_memory() -> None:
    """Return freed heap pages to the system (glibc); a no-op elsewhere."""
    import ctypes
    import gc

    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def load_params(path: Path) -> ValidateParams:
    from medmat.config import from_dict, load_params as load_all

    section = load_all(path).get("validate") if path.exists() else None
    return from_dict(ValidateParams, section, where=f"{path}: section 'validate'")


def run(args: argparse.Namespace) -> int:
    from medmat.config import ConfigError
    from medmat.data.ingest import read_problems

    try:
        params = load_params(args.params)
    except ConfigError as exc:
        print(f"validate: {exc}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"validate: data root {args.data} is not a directory", file=sys.stderr)
        return 2
    # Ingest's problems live in the table's own metadata (one unit with it: medmat.data.records);
    # --problems reads an exported JSON instead.
    problems_path = args.problems or args.records
    problems: list[dict] = []
    if problems_path.exists():
        try:
            problems = read_problems(problems_path)
        except Exception as exc:  # noqa: BLE001 - an unreadable table is reported below as records_file
            if args.problems:
                problems = [{"check": "problems_file", "severity": CRITICAL, "file": str(problems_path),
                             "record_id": None, "message": f"cannot read the ingest problems file: {exc}"}]
    elif args.problems:
        print(f"validate: problems file {problems_path} not found", file=sys.stderr)
        return 2
    try:
        records = read_records_table(args.records)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is one clear failure, not a traceback
        records = None
        problems.append({"check": "records_file", "severity": CRITICAL, "file": str(args.records),
                         "record_id": None, "message": f"cannot read the records table: {exc}"})
    if records is None:
        from medmat.data.ingest import SCHEMA
        records = SCHEMA.empty_table().to_pandas()
    report = validate_records(records, args.data.resolve(), params, problems,
                              progress=sys.stderr.isatty())
    report["records_file"] = str(args.records)
    report["problems_file"] = str(problems_path) if problems_path.exists() else None
    # The report is a DVC output: the data root as given (no absolute path) and no timings, so the same
    # data gives the same bytes in every checkout; the timings go to the log instead.
    report["data_root"] = str(args.data)
    seconds = report.pop("seconds")
    write_report(args.report, report)
    for line in summary_lines(report):
        print(line)
    print(f"validated in {seconds['total']} s (prepare {seconds['prepare']} s)")
    print(f"report: {args.report}")
    return 0 if report["passed"] else 1

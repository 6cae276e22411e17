"""`medmat validate`: Great Expectations checks of the records table and its images.

    medmat validate --data data --records work/records.parquet --report work/validation.json

Exit 1 when any critical check fails, else 0. The JSON report names, for every failure, the check, the
GX expectation, the file, the record id and a message; at most `validate.max_listed` rows are listed
per expectation, the count is always exact. Problems found by ingest (`<records stem>.problems.json`:
malformed JSON, wrong types, ...) enter the report too. Severities: params.yaml `validate.severity`.

GX lists failing rows slowly (hundreds of microseconds per row), so it runs twice: once over the whole
table for every expectation's exact count (BASIC), then COMPLETE, with the rows named by
record_id/source_file, only over as many leading rows as the listing cap needs.
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
from typing import Any, Callable

import numpy as np
import pandas as pd

from medmat.validate.checks import (
    CHECKS, CRITICAL, NEEDED, NOT_CHECKED, WARNING, ValidateParams, _LEXICAL_ESCAPE, prepare,
)
from medmat.io import atomic_write_json

log = logging.getLogger(__name__)
INDEX_COLUMNS = ["record_id", "source_file", "_row"]


@dataclass
class Rule:
    """One GX expectation under a named check, and how to say what a failing row means."""

    check: str
    expectation: Any
    message: Callable[[pd.Series], str]
    frame: str = "records"                               # records | balance
    candidates: Callable[[pd.DataFrame], np.ndarray] | None = None   # rows that can fail (non-row-local rules)


def _rules(vocab: dict[str, list[str]], params: ValidateParams) -> list[Rule]:
    import great_expectations.expectations as gxe

    def vocab_msg(col):
        return lambda r: f"{col} {r[col]!r} is not in the canonical vocabulary ({', '.join(vocab[col])})"

    return [
        Rule("modality_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=vocab["modality"]),
             vocab_msg("modality")),
        Rule("area_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="area", value_set=vocab["area"]),
             vocab_msg("area")),
        Rule("task_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="task", value_set=vocab["task"]),
             vocab_msg("task")),
        Rule("triplet_matches_dataset",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="triplet", column_B="dataset_triplet",
                                                 ignore_row_if="either_value_is_missing"),
             lambda r: f"record triplet {r['triplet']} differs from dataset {r['dataset_no']}'s catalogue "
                       f"triplet {r['dataset_triplet']}"),
        Rule("triplet_matches_subset",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="triplet", column_B="subset_triplet",
                                                 ignore_row_if="either_value_is_missing"),
             lambda r: f"record triplet {r['triplet']} differs from subset {r['subset_no']}'s catalogue "
                       f"triplet {r['subset_triplet']}"),
        Rule("dataset_single_triplet",
             gxe.ExpectColumnValuesToBeBetween(column="dataset_triplet_count", min_value=0, max_value=1),
             lambda r: f"dataset {r['dataset_no']} carries {r['dataset_triplet_count']} different triplets "
                       f"(this record: {r['triplet']})"),
        Rule("answer_letter_in_options", gxe.ExpectColumnValuesToNotBeNull(column="answer_option"),
             lambda r: f"answer letter {r['answer_letter']!r} names none of the record's {r['n_options']} options"),
        Rule("answer_matches_option",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="answer_text", column_B="answer_option",
                                                 ignore_row_if="either_value_is_missing"),
             lambda r: f"answer {r['answer_text']!r} differs from option {r['answer_letter']} "
                       f"{r['answer_option']!r}"),
        Rule("option_count",
             gxe.ExpectColumnValuesToBeBetween(column="n_options", min_value=2, max_value=4),
             lambda r: f"record has {r['n_options']} options; a Med-MAT question has 2 to 4"),
        Rule("options_distinct",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="n_options", column_B="n_distinct_options"),
             lambda r: f"record repeats an option ({r['n_distinct_options']} distinct of {r['n_options']})"),
        Rule("answer_in_label_set",
             gxe.ExpectColumnValuesToBeInSet(column="answer_in_label_set", value_set=[True]),
             lambda r: f"answer {r['answer_text']!r} is offered as an option by no other record of "
                       f"{_group_name(r['_group'])} ({r['_group_size']} records): not one of its labels"),
        Rule("record_id_unique", gxe.ExpectColumnValuesToBeUnique(column="record_id"),
             lambda r: f"record id {r['record_id']!r} occurs more than once",
             candidates=lambda f: f["record_id"].duplicated(keep=False).to_numpy()),
        Rule("image_path_confined",
             gxe.ExpectColumnValuesToNotMatchRegex(column="image", regex=_LEXICAL_ESCAPE),
             lambda r: f"image path {r['image']!r} is absolute or contains '..'; it must stay inside the data root"),
        Rule("image_path_confined",
             gxe.ExpectColumnValuesToBeInSet(column="image_link_escapes", value_set=[False]),
             lambda r: f"image path {r['image']!r} leaves the data root through a symbolic link"),
        Rule("image_readable",
             gxe.ExpectColumnValuesToBeInSet(column="image_status", value_set=["ok", NOT_CHECKED]),
             lambda r: f"image {r['image']!r}: {r['image_status']}"),
        Rule("train_test_leakage", gxe.ExpectColumnValuesToBeInSet(column="leaks", value_set=[False]),
             lambda r: f"image {r['image']!r} (sha256 {r['image_sha256'][:12]}...) is in both train and test "
                       f"of {_group_name(r['_group'])}; this record is in {r['split']}"),
        Rule("test_label_balance",
             gxe.ExpectColumnValuesToBeBetween(column="imbalance_ratio", min_value=1.0,
                                               max_value=params.balance_max_ratio),
             lambda r: f"test set of {_group_name(r['_group'])} is unbalanced: {r['counts']} "
                       f"(largest/smallest {r['imbalance_ratio']:.2f} > {params.balance_max_ratio})",  # inf: a label is absent
             frame="balance"),
    ]


def _group_name(group: int) -> str:
    return f"subset {int(group):02d}" if group > 0 else f"dataset {-int(group)} (no subset)"


def balance_frame(f: pd.DataFrame) -> pd.DataFrame:
    """One row per test set (subset, or dataset without one): label counts and largest/smallest ratio."""
    test = f[f["split"] == "test"]
    rows = []
    for group, g in test.groupby("_group", sort=True):
        labels = f.attrs.get("labels", {}).get(int(group), [])
        counts = g["answer_text"].value_counts().reindex(sorted(set(labels) | set(g["answer_text"])), fill_value=0)
        rows.append({"record_id": None, "source_file": ", ".join(sorted(g["source_file"].unique())),
                     "_group": int(group), "counts": {str(k): int(v) for k, v in counts.items()},
                     # a label with no test record at all is the worst imbalance: infinite
                     "imbalance_ratio": float(counts.max() / counts.min()) if counts.min() else math.inf})
    out = pd.DataFrame(rows, columns=["record_id", "source_file", "_group", "counts", "imbalance_ratio"])
    out["_row"] = np.arange(len(out))
    return out


# ---- GX engine ----------------------------------------------------------------------------------
class _GX:
    def __init__(self) -> None:
        # GX logs its set-up at INFO (closures, temp doc sites): noise beside our summary. Quiet its
        # loggers during the import and again after it (the import configures some of them).
        quiet = logging.getLogger("great_expectations")
        quiet.setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in [quiet.name, *(n for n in logging.root.manager.loggerDict if n.startswith("great_expectations"))]:
            logging.getLogger(name).setLevel(logging.WARNING)

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        # GX prints a tqdm bar per validation otherwise; we validate many small slices.
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.asset = self.ctx.data_sources.add_pandas("medmat").add_dataframe_asset("table")
        self.batches = self.asset.add_batch_definition_whole_dataframe("whole")
        self._n = 0

    def batch(self, df: pd.DataFrame):
        return self.batches.get_batch(batch_parameters={"dataframe": df})

    def counts(self, df: pd.DataFrame, rules: list[Rule]) -> list[tuple[bool, int, int]]:
        """(success, unexpected count, element count) per rule, over the whole frame."""
        if not rules:
            return []
        self._n += 1
        suite = self.gx.ExpectationSuite(name=f"medmat_{self._n}")
        for i, rule in enumerate(rules):
            # GX does not keep the suite's order in its results: tag each copy with its rule.
            suite.add_expectation(rule.expectation.__class__(**rule.expectation.configuration.kwargs,
                                                             meta={"rule": i}))
        result = self.batch(df).validate(suite, result_format="BASIC")
        out: list = [None] * len(rules)
        for res in result.results:
            r = res.result or {}
            out[res.expectation_config.meta["rule"]] = (
                bool(res.success), int(r.get("unexpected_count") or 0), int(r.get("element_count") or len(df)))
        return out

    def listed_rows(self, df: pd.DataFrame, rule: Rule, unexpected: int, cap: int) -> list[int]:
        """Positions (`_row`) of up to `cap` failing rows, named by GX (COMPLETE, index columns)."""
        if rule.candidates is not None:
            df = df[rule.candidates(df)]
        n = len(df)
        rate = max(unexpected / max(n, 1), 1e-12)
        size = min(n, max(1000, math.ceil(cap / rate * 1.5)))
        while True:
            res = self.batch(df.iloc[:size]).validate(
                rule.expectation, result_format={"result_format": "COMPLETE",
                                                 "unexpected_index_column_names": INDEX_COLUMNS,
                                                 "partial_unexpected_count": 0,
                                                 "return_unexpected_index_query": False})
            rows = [int(item["_row"]) for item in res.result.get("unexpected_index_list") or []]
            if len(rows) >= min(cap, unexpected) or size >= n:
                return rows[:cap]
            size = min(n, size * 4)


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
    frame = prepare(records, catalog, data_root, params, progress=progress)
    frames = {"records": frame, "balance": balance_frame(frame)}
    prepared_s = time.perf_counter() - started

    gx = _GX()
    rules = _rules(_vocabulary(catalog), params)
    outcomes = {name: Outcome(name, params.severity_of(name), desc) for name, (_, desc) in CHECKS.items()}
    for frame_name, df in frames.items():
        mine = [r for r in rules if r.frame == frame_name]
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
        "test_label_balance": [{"test_set": _group_name(r["_group"]), "files": r["source_file"],
                                "counts": r["counts"], "largest_to_smallest": (round(r["imbalance_ratio"], 3)
                                                                if math.isfinite(r["imbalance_ratio"]) else None)}
                               for _, r in balance.iterrows()],
        "params": {"max_listed": params.max_listed, "images": params.images,
                   "label_set_min_records": params.label_set_min_records,
                   "balance_max_ratio": params.balance_max_ratio},
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


def read_records_table(path: str | os.PathLike) -> pd.DataFrame:
    """The columns of a records table the checks read; options stay Arrow lists (no per-row Python
    objects: at full scale that conversion alone costs more than the checks)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pq.read_table(path, columns=NEEDED)
    return table.to_pandas(types_mapper=lambda t: pd.ArrowDtype(t) if pa.types.is_list(t) else None)


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
    write_report(args.report, report)
    for line in summary_lines(report):
        print(line)
    print(f"report: {args.report}")
    return 0 if report["passed"] else 1

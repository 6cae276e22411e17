"""`medmat ingest`: read a Med-MAT tree (as published, or any layout it has used) into one records table.

    medmat ingest --data data --out work/records.parquet [--read datasets|subsets] [--problems FILE]

One row per QA record, counted once (columns: medmat.data.records; how ids, duplicates, splits and
partial downloads are handled: medmat.data.ingest_core). Bad input never stops the run: each bad file
or record becomes a problem entry {check, severity, file, record_id, table_record_id, index, message}
and every good record still reaches the table. The problems are stored inside the table's own file
(medmat.data.records.read_problems), which is written locked and atomically (medmat.data.ingest_output);
`medmat validate` reads them from there and decides what is fatal (severities: validate.severity with
`ingest.<check>` keys). `--problems FILE` also exports them as JSON for people.

The table holds no absolute path (relocatable): the same data gives the same bytes in every checkout.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path

import pandas as pd

from medmat.catalog import load_catalog
from medmat.config import ConfigError, from_dict, load_params
from medmat.data.ingest_core import CRITICAL, READ_SIDES, WARNING, Ingest
from medmat.data.ingest_output import (
    OutputLocked, clean_stale_temps, output_lock, publish, stage_writer, temp_names, write_table,
)
from medmat.data.medmat_format import DEFAULT_TEST_FRACTION
from medmat.data.records import (  # noqa: F401  (re-exported: older callers import them from here)
    COLUMNS, DATA_ROOT_KEY, PROBLEMS_KEY, SCHEMA, SUMMARY_KEY, WORLD_KEY, read_records, world_of_root,
)
from medmat.data import records as _records
from medmat.io import atomic_write_json

log = logging.getLogger(__name__)
__all__ = ["CRITICAL", "WARNING", "IngestParams", "IngestSummary", "ingest", "ingest_to_parquet", "ingest_world"]

# Problem entries stored in the table's metadata at most (the summary counts them all): a tree whose
# every record is broken must still give a table file of sensible size.
MAX_STORED_PROBLEMS = 20_000


@dataclass
class IngestParams:
    """params.yaml section `ingest`."""

    read: str = "datasets"          # primary side: datasets (ori--NN files) or subsets (Subset--NN files)
    seed: int = 0                   # seed of derived test splits
    # Derived test share per subset. None: the world's own (Med-MAT-mini declares it in MEDMAT_MINI.json),
    # else the paper's 9:1.
    test_fraction: float | None = None

    def __post_init__(self) -> None:
        if self.read not in READ_SIDES:
            raise ValueError(f"read must be one of {sorted(READ_SIDES)}, got {self.read!r}")
        if self.test_fraction is not None and not 0.0 <= float(self.test_fraction) < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1) or null, got {self.test_fraction}")


@dataclass
class IngestSummary:
    read: str
    world: str = "medmat"
    test_fraction: float = DEFAULT_TEST_FRACTION
    files_found: int = 0
    files_read: int = 0
    files_failed: int = 0
    records: int = 0
    test_records: int = 0
    duplicates_skipped: int = 0
    records_rejected: int = 0
    images_missing: int = 0
    derived_split_groups: int = 0
    unique_images: int = 0
    problems: dict[str, int] = field(default_factory=dict)       # severity -> count
    problem_checks: dict[str, int] = field(default_factory=dict)  # check -> count
    seconds: float = 0.0                                          # not stored in the table (not reproducible)

    def line(self) -> str:
        probs = ", ".join(f"{n} {sev}" for sev, n in sorted(self.problems.items())) or "none"
        return (f"ingest: {self.records} records ({self.test_records} test) from {self.files_read}/"
                f"{self.files_found} files (read {self.read}, world {self.world}); {self.duplicates_skipped} "
                f"duplicates skipped; {self.records_rejected} records rejected ({self.images_missing} for absent "
                f"images); problems: {probs}; {self.seconds:.1f} s")


def _phash():
    try:  # the content-independent image hash for near-duplicate checks (medmat.data.images)
        from medmat.data.images import perceptual_hash
    except ImportError:  # pragma: no cover - older images.py
        return None
    return perceptual_hash


def ingest_to_parquet(data_root: str | os.PathLike, out: str | os.PathLike, params: IngestParams | None = None,
                      progress: bool | None = None, echo=None) -> tuple[list[dict], IngestSummary]:
    """Read `data_root` and write the records table `out` (locked, atomic; problems inside).

    Raises OutputLocked when another ingest holds `out`. The table is written even with no record
    (then empty, with its problems), so `out` always belongs to the last run that finished."""
    from tqdm import tqdm

    started = time.perf_counter()
    params = params or IngestParams()
    root, out = Path(data_root).resolve(), Path(out)
    world, card = world_of_root(root)
    fraction = params.test_fraction
    if fraction is None:
        fraction = float(card.get("test_fraction", DEFAULT_TEST_FRACTION)) if world != "medmat" else DEFAULT_TEST_FRACTION
    job = Ingest(root, params.read, load_catalog(), phash=_phash())
    with output_lock(out):
        clean_stale_temps(out)
        stage, tmp = temp_names(out)
        try:
            found = job.discover()
            for line in found.lines():
                (echo or log.info)(_printable(f"ingest: {line}"))
            files = job.ordered(found.files)
            if not files:
                job.problem("no_files", CRITICAL, ".", "no Med-MAT JSON files (ori--NN-train.json, "
                            "Subset--NN-train.json) anywhere under the data root")
            has_test = {(f.kind, f.number) for f in files if f.split == "test"}
            job.note_other_side_tests(files)
            disable = (not sys.stderr.isatty()) if progress is None else not progress
            # Each file's rows go to the stage until the splits of all rows are known (bounded memory).
            with stage_writer(stage) as writer:
                for i, sf in enumerate(tqdm(files, desc="ingest", unit="file", disable=disable)):
                    own_test = sf.split == "train" and (sf.kind, sf.number) in has_test
                    table = job.file_table(sf, i, own_test)
                    if table is not None:
                        writer.write_table(table)
            job.report_missing_images()
            is_test = job.test_rows(params.seed, fraction)
            phashes = job.images.phashes()
            summary = _summary(job, params, world, fraction)
            write_table(stage, tmp, is_test, phashes, _metadata(root, out, world, job.problems, summary))
            publish(tmp, out)
        finally:
            stage.unlink(missing_ok=True)
            tmp.unlink(missing_ok=True)
    summary.seconds = time.perf_counter() - started
    return job.problems, summary


def _summary(job: Ingest, params: IngestParams, world: str, fraction: float) -> IngestSummary:
    c = job.counts
    s = IngestSummary(read=params.read, world=world, test_fraction=fraction, **{
        k: getattr(c, k) for k in ("files_found", "files_read", "files_failed", "records", "test_records",
                                   "duplicates_skipped", "records_rejected", "images_missing",
                                   "derived_split_groups", "unique_images")})
    s.problems = dict(sorted(Counter(p["severity"] for p in job.problems).items()))
    s.problem_checks = dict(sorted(Counter(p["check"] for p in job.problems).items()))
    return s


def _metadata(root: Path, out: Path, world: str, problems: list[dict], summary: IngestSummary) -> dict:
    stored = problems[:MAX_STORED_PROBLEMS]
    if len(problems) > len(stored):
        left = Counter(p["check"] for p in problems[len(stored):])
        worst = CRITICAL if any(p["severity"] == CRITICAL for p in problems[len(stored):]) else WARNING
        stored = stored + [{"check": "more_problems", "severity": worst, "file": ".", "record_id": None,
                            "table_record_id": None, "index": None,
                            "message": f"{len(problems) - len(stored)} more problems not listed: {dict(left)}"}]
    doc = {k: v for k, v in asdict(summary).items() if k != "seconds"}
    rel_root = os.path.relpath(root, out.resolve().parent)
    return {**SCHEMA.metadata, DATA_ROOT_KEY: Path(rel_root).as_posix().encode(), WORLD_KEY: world.encode(),
            PROBLEMS_KEY: json.dumps(stored, ensure_ascii=False, default=str).encode(),
            SUMMARY_KEY: json.dumps(doc, sort_keys=True).encode()}


def ingest(data_root: str | os.PathLike, params: IngestParams | None = None,
           progress: bool | None = None) -> tuple[pd.DataFrame, list[dict], IngestSummary]:
    """The records table in memory (tests, notebooks): (DataFrame with image_path, problems, summary).
    Runs exactly what `medmat ingest` runs, into a temporary file."""
    with tempfile.TemporaryDirectory(prefix="medmat-ingest-") as tmp:
        out = Path(tmp) / "records.parquet"
        problems, summary = ingest_to_parquet(data_root, out, params, progress)
        df = read_records(out)
    return df, problems, summary


def ingest_world(data_root: str | os.PathLike, out: str | os.PathLike, raw_params: dict | None = None
                 ) -> tuple[list[dict], IngestSummary]:
    """Ingest with the `ingest:` section of a params dict (pipeline stages)."""
    params = from_dict(IngestParams, (raw_params or {}).get("ingest"), where="params: section 'ingest'")
    return ingest_to_parquet(data_root, out, params, progress=False)


def load_records_table(path: str | os.PathLike) -> pd.DataFrame:
    """Deprecated name of medmat.data.records.read_records."""
    return read_records(path)


def read_problems(path: str | os.PathLike) -> list[dict]:
    """Problems of a records table (from its metadata), or of an exported problems JSON file."""
    if str(path).endswith(".parquet"):
        return _records.read_problems(path)
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data["problems"] if isinstance(data, dict) else data


def default_problems_path(out: str | os.PathLike) -> Path:
    """Where an exported problems JSON goes by default (only written with `--problems`)."""
    out = Path(out)
    return out.with_name(f"{out.stem}.problems.json")


def write_problems(path: str | os.PathLike, problems: list[dict], summary: IngestSummary,
                   records_file: str | None) -> Path:
    """Export problems as JSON for people; the table's own copy is what validate reads."""
    doc = {"records_file": records_file, "summary": asdict(summary), "problems": problems}
    return atomic_write_json(path, doc, indent=2, ensure_ascii=False, default=str)


def _printable(text: str) -> str:
    """Control characters escaped: a file or path name from the data must not drive the terminal."""
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in text)


# ---- CLI ----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="data root of a Med-MAT tree")
    parser.add_argument("--out", required=True, type=Path, help="records table to write (.parquet)")
    parser.add_argument("--read", choices=sorted(READ_SIDES), default=None,
                        help="primary side (default: params.yaml ingest.read, else datasets)")
    parser.add_argument("--problems", type=Path, default=None,
                        help="also export the problems as JSON here (validate reads them from the table)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="parameter file; section `ingest` (defaults when the file is absent)")


def run(args: argparse.Namespace) -> int:
    try:
        section = load_params(args.params).get("ingest") if args.params.exists() else None
        params = from_dict(IngestParams, section, where=f"{args.params}: section 'ingest'")
        if args.read:
            params.read = args.read
    except ConfigError as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 2
    if not args.data.is_dir():
        print(f"ingest: {args.data}: data root is not a directory", file=sys.stderr)
        return 1
    try:
        problems, summary = ingest_to_parquet(args.data, args.out, params, echo=print)
    except OutputLocked as exc:
        print(f"ingest: {exc}", file=sys.stderr)
        return 3
    if args.problems:
        write_problems(args.problems, problems, summary, str(args.out))
    print(summary.line())
    for p in problems[:5]:
        where = p["file"] + (f" record #{p['index']}" if p["index"] is not None else "")
        print(_printable(f"  {p['severity']}: {p['check']}: {where}: {p['message']}")[:400])
    if len(problems) > 5:
        print(f"  ... {len(problems) - 5} more (medmat validate lists them; or ingest --problems FILE)")
    if not summary.records:
        print(f"ingest: no record could be read; {args.out} holds an empty table and the problems",
              file=sys.stderr)
        return 1
    return 0

"""`medmat ingest`: read a Med-MAT tree (public layout) into one records table.

    medmat ingest --data data --out work/records.parquet [--read datasets|subsets] [--problems FILE]

One row per QA record, counted once (columns: docs/ARCHITECTURE.md). Subset files repeat the
per-dataset files' records, so one side is read as the primary (params `ingest.read`) and the other
only adds records the primary lacks (same data-no, image and answer); the rest are counted as
duplicates and skipped. Bad input never stops the run: each bad file or record becomes a problem
entry {check, severity, file, record_id, index, message} in the problems JSON, and every good record
still reaches the table. The validate stage reads that file and decides what is fatal.

Splits: a file's own split (`-train`/`-test`); where a dataset has only a train file, the test split
the other side ships for it, else a derived one (medmat_format.derive_split: seeded, label-balanced,
~10 %, never one image on both sides, and an image keeps its split across the files of a subset).
Record ids are `{ori|sub}{NN}-{file split}-{id}`: the file's split, so ids never move with the seed.
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
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from medmat.catalog import Catalog, CatalogError, load_catalog
from medmat.config import ConfigError, from_dict, load_params
from medmat.data.images import PathEscapeError, resolve_image_path, sha256_file
from medmat.data.medmat_format import (
    DEFAULT_TEST_FRACTION, FormatError, SourceFile, default_file_mode, derive_split, find_files,
    parse_question_choice, read_records,
)
from medmat.io import atomic_write_json

log = logging.getLogger(__name__)

DATA_ROOT_KEY = b"medmat.data_root"
SUMMARY_KEY = b"medmat.ingest"
READ_SIDES = {"datasets": "dataset", "subsets": "subset"}
CRITICAL, WARNING = "critical", "warning"

# Fields a record must carry, with the JSON types accepted. `Question` (free-text form) is not
# needed for the table, so its absence is not an ingest problem.
REQUIRED: dict[str, tuple[type, ...]] = {
    "id": (int, str), "caption": (str,), "image": (str,), "Answer": (str,),
    "Question-choice": (str,), "Answer-choice": (str,), "data-no": (str, int),
}
_REQUIRED_KEYS = frozenset(REQUIRED)
_ID_TYPES = (int, str)      # `type(x) in` this excludes bool, which JSON true/false would give
_UNSEEN = object()
_QC_CACHE_MAX = 200_000

COLUMNS: list[tuple[str, pa.DataType]] = [
    ("record_id", pa.string()), ("source_file", pa.string()), ("source_index", pa.int64()),
    ("dataset_no", pa.int64()), ("subset_no", pa.int64()),
    ("modality", pa.string()), ("area", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("image", pa.string()), ("image_path", pa.string()), ("image_sha256", pa.string()),
    ("question", pa.string()), ("question_choice", pa.string()), ("options", pa.list_(pa.string())),
    ("answer_letter", pa.string()), ("answer_text", pa.string()), ("caption", pa.string()),
]


def _schema() -> pa.Schema:
    """Arrow schema with pandas metadata, so pandas reads subset_no back as nullable Int64."""
    base = pa.schema(COLUMNS)
    template = base.empty_table().to_pandas()
    template["subset_no"] = template["subset_no"].astype("Int64")
    meta = pa.Schema.from_pandas(template, preserve_index=False).metadata
    return base.with_metadata(meta)


SCHEMA = _schema()


@dataclass
class IngestParams:
    """params.yaml section `ingest`."""

    read: str = "datasets"          # primary side: datasets (ori--NN files) or subsets (Subset--NN files)
    seed: int = 0                   # seed of derived test splits
    test_fraction: float = DEFAULT_TEST_FRACTION   # derived test share (the paper's 9:1)

    def __post_init__(self) -> None:
        if self.read not in READ_SIDES:
            raise ValueError(f"read must be one of {sorted(READ_SIDES)}, got {self.read!r}")
        if not 0.0 <= self.test_fraction < 1.0:
            raise ValueError(f"test_fraction must be in [0, 1), got {self.test_fraction}")


@dataclass
class IngestSummary:
    data_root: str
    read: str
    files_found: int = 0
    files_read: int = 0
    files_failed: int = 0
    records: int = 0
    duplicates_skipped: int = 0
    records_rejected: int = 0
    derived_split_files: int = 0
    unique_images: int = 0
    problems: dict[str, int] = field(default_factory=dict)   # severity -> count
    seconds: float = 0.0

    def line(self) -> str:
        probs = ", ".join(f"{n} {sev}" for sev, n in sorted(self.problems.items())) or "none"
        return (f"ingest: {self.records} records from {self.files_read}/{self.files_found} files "
                f"(read {self.read}); {self.duplicates_skipped} duplicates skipped; "
                f"{self.records_rejected} records rejected; problems: {probs}; {self.seconds:.1f} s")


class _Ingest:
    """State shared across files: catalogue and image caches, problems, counters."""

    def __init__(self, data_root: Path, params: IngestParams, catalog: Catalog):
        self.root = data_root
        self.params = params
        self.cat = catalog
        self.problems: list[dict] = []
        self.summary = IngestSummary(data_root=str(data_root), read=params.read)
        self._datasets: dict[object, tuple | None] = {}
        # image path as written in a record -> (absolute path, sha256) or the escape message.
        # Hashing once per unique path matters: the release repeats images across many records.
        self._images: dict[str, tuple[str, str] | str] = {}
        self._hash_of_abs: dict[str, str] = {}
        self._seen: set[int] = set()   # keys (data-no, image, answer) of records already in the table
        self._parsed_qc: dict[str, tuple[str, list[str]]] = {}
        self._split_of_image: dict[tuple, str] = {}   # (subset_no, sha256 or path) -> first split given
        self._other_side_test: dict[int, set[int]] = {}  # dataset_no -> keys of its test records, other side

    def problem(self, check: str, severity: str, file: str, message: str, index: int | None = None,
                record_id: object = None, table_prefix: str | None = None) -> None:
        """One problem entry. `record_id` is the record's own `id`; `table_record_id` the id its row
        has (or would have had) in the records table, so warnings can be joined to rows."""
        table_id = f"{table_prefix}{record_id}" if table_prefix and record_id is not None else None
        self.problems.append({"check": check, "severity": severity, "file": file, "record_id": record_id,
                              "table_record_id": table_id, "index": index, "message": message})

    def dataset(self, data_no: object) -> tuple | None:
        """(dataset_no, subset_no, modality, area, task) for a record's data-no, or None if unknown."""
        try:
            return self._datasets[data_no]
        except KeyError:
            pass
        try:
            if isinstance(data_no, bool):
                raise CatalogError("not a number")
            info = self.cat.dataset(data_no)
            hit = (info.no, info.subset_no, info.modality, info.area, info.task or "")
        except CatalogError:
            hit = None
        self._datasets[data_no] = hit
        return hit

    def image(self, rel: str) -> tuple[str, str] | str:
        try:
            return self._images[rel]
        except KeyError:
            pass
        try:
            abs_path = str(resolve_image_path(self.root, rel))
        except PathEscapeError as exc:
            self._images[rel] = str(exc)
            return str(exc)
        digest = self._hash_of_abs.get(abs_path)
        if digest is None:
            try:
                digest = sha256_file(abs_path)
            except OSError:
                digest = ""   # missing/unreadable: the validator reports it, with decode failures
            self._hash_of_abs[abs_path] = digest
        hit = (abs_path, digest)
        self._images[rel] = hit
        return hit

    def file_table(self, sf: SourceFile, primary: bool, derive: bool) -> pa.Table | None:
        s = self.summary
        try:
            records = read_records(sf.path, display=sf.rel)
        except FormatError as exc:
            s.files_failed += 1
            self.problem(exc.check, CRITICAL, sf.rel, exc.reason)
            return None
        s.files_read += 1
        # Hot loop (millions of records at full scale): plain type tests and cache look-ups only;
        # the slow paths (problem messages, parsing, hashing) run once per fault or unique value.
        good: list[tuple] = []
        keys: list[int] = []
        seen, rel, number = self._seen, sf.rel, sf.number
        owner = 0 if sf.kind == "dataset" else 1   # a file's number is a dataset's (0) or a subset's (1)
        datasets, images, parsed_qc = self._datasets, self._images, self._parsed_qc
        rejected = dups = 0
        prefix = f"{sf.prefix}{number:02d}-{sf.split}-"
        for idx, rec in enumerate(records):
            if type(rec) is not dict:
                self.problem("record_type", CRITICAL, rel, f"record is a JSON {type(rec).__name__}, not an object",
                             idx)
                rejected += 1
                continue
            try:
                rid, image, qc, answer = rec["id"], rec["image"], rec["Question-choice"], rec["Answer"]
                letter, data_no, caption = rec["Answer-choice"], rec["data-no"], rec["caption"]
            except KeyError:
                self.problem("missing_field", CRITICAL, rel, f"missing field(s) {sorted(_REQUIRED_KEYS - rec.keys())}",
                             idx, _jsonable(rec.get("id")), _prefix_if_id(rec.get("id"), prefix))
                rejected += 1
                continue
            if not (type(image) is str and type(qc) is str and type(answer) is str and type(letter) is str
                    and type(caption) is str and type(rid) in _ID_TYPES and type(data_no) in _ID_TYPES):
                self.problem("wrong_type", CRITICAL, rel, _wrong_types(rec), idx, _jsonable(rid),
                             _prefix_if_id(rid, prefix))
                rejected += 1
                continue
            ds = datasets.get(data_no, _UNSEEN)
            if ds is _UNSEEN:
                ds = self.dataset(data_no)
            if ds is None:
                self.problem("unknown_data_no", CRITICAL, rel, f"data-no {data_no!r} is not a dataset of the "
                             f"catalogue (1..{len(self.cat.datasets)})", idx, rid, prefix)
                rejected += 1
                continue
            key = hash((ds[0], image, answer))
            if not primary and key in seen:
                dups += 1
                continue
            parsed = parsed_qc.get(qc)
            if parsed is None:
                try:
                    parsed = parse_question_choice(qc)
                except ValueError as exc:
                    self.problem("question_choice", CRITICAL, rel, str(exc), idx, rid, prefix)
                    rejected += 1
                    continue
                # Prompts repeat (6 templates x option orders per subset); bound the cache all the same.
                if len(parsed_qc) < _QC_CACHE_MAX:
                    parsed_qc[qc] = parsed
            img = images.get(image) or self.image(image)
            if type(img) is str:
                self.problem("path_escape", CRITICAL, rel, img, idx, rid, prefix)
                rejected += 1
                continue
            if ds[owner] != number:
                self._misfiled(sf, ds, idx, rid, prefix)
            keys.append(key)
            good.append((idx, rec, ds, parsed, img))
        s.records_rejected += rejected
        s.duplicates_skipped += dups
        seen.update(keys)
        n = len(good)
        cols: dict[str, list] = {
            "record_id": [f"{prefix}{g[1]['id']}" for g in good],
            "source_file": [rel] * n,
            "source_index": [g[0] for g in good],
            "dataset_no": [g[2][0] for g in good],
            "subset_no": [g[2][1] for g in good],
            "modality": [g[2][2] for g in good],
            "area": [g[2][3] for g in good],
            "task": [g[2][4] for g in good],
            "split": [sf.split] * n,
            "image": [g[1]["image"] for g in good],
            "image_path": [g[4][0] for g in good],
            "image_sha256": [g[4][1] for g in good],
            "question": [g[3][0] for g in good],
            "question_choice": [g[1]["Question-choice"] for g in good],
            "options": [g[3][1] for g in good],
            "answer_letter": [g[1]["Answer-choice"] for g in good],
            "answer_text": [g[1]["Answer"] for g in good],
            "caption": [g[1]["caption"] for g in good],
        }
        # An image (by content, else by path) keeps one split within a subset across files: datasets
        # of one subset share images (ISIC 2017/2018), and a test image seen in training is leakage.
        content = [(g[2][1], g[4][1] or g[4][0]) for g in good]
        if derive and n:
            s.derived_split_files += 1
            split_of, other_test = self._split_of_image, self._other_side_test
            # A dataset whose test split the other side ships keeps that split: its records there are
            # test, its others train. Only the rest is derived.
            forced = [
                ("test" if k in other_test[g[2][0]] else "train") if g[2][0] in other_test else split_of.get(c)
                for g, k, c in zip(good, keys, content)
            ]
            cols["split"] = derive_split(
                cols["answer_text"], list(zip(cols["image"], cols["image_sha256"])),
                seed=self.params.seed, test_fraction=self.params.test_fraction, forced=forced)
        for c, split in zip(content, cols["split"]):
            self._split_of_image.setdefault(c, split)
        for d in sorted({g[2][0] for g in good if g[2][1] is None}):
            self.problem("no_subset", WARNING, rel, f"dataset {d} belongs to no subset in the catalogue, so its "
                         "records have no task element")
        s.records += n
        return pa.table(cols, schema=SCHEMA)

    def _misfiled(self, sf: SourceFile, ds: tuple, idx: int, rid: object, prefix: str) -> None:
        if sf.kind == "dataset":
            msg = f"record of dataset {ds[0]} in the file of dataset {sf.number}"
            self.problem("data_no_mismatch", WARNING, sf.rel, msg, idx, rid, prefix)
        else:
            msg = (f"dataset {ds[0]} belongs to subset {ds[1]} in the catalogue, but sits in the file of "
                   f"subset {sf.number}")
            self.problem("subset_mismatch", WARNING, sf.rel, msg, idx, rid, prefix)

    def tables(self, progress: bool | None = None) -> Iterator[pa.Table]:
        from tqdm import tqdm

        files = find_files(self.root)
        self.summary.files_found = len(files)
        primary_kind = READ_SIDES[self.params.read]
        has_test = {(f.kind, f.number) for f in files if f.split == "test"}
        # Primary side first, so the other side only adds what the primary lacks.
        ordered = [f for f in files if f.kind == primary_kind] + [f for f in files if f.kind != primary_kind]
        if not files:
            self.problem("no_files", CRITICAL, str(self.root),
                         "no Original_Medical_Datasets/ori--NN-*.json or Aggregated_Subsets/Subset--NN-*.json "
                         "files under the data root")
        disable = (not sys.stderr.isatty()) if progress is None else not progress
        to_derive = [f for f in files if f.kind == primary_kind and f.split == "train"
                     and (f.kind, f.number) not in has_test]
        other_tests = [f for f in files if f.kind != primary_kind and f.split == "test"]
        if to_derive and other_tests:
            self._read_other_side_tests(other_tests)
        for sf in tqdm(ordered, desc="ingest", unit="file", disable=disable):
            derive = sf.split == "train" and (sf.kind, sf.number) not in has_test
            table = self.file_table(sf, primary=sf.kind == primary_kind, derive=derive)
            if table is not None and table.num_rows:
                yield table

    def _read_other_side_tests(self, files: list[SourceFile]) -> None:
        """Keys of the test records the other side ships, by dataset (a pre-pass over its test files
        only; their faults are reported when they are read in the main pass)."""
        for sf in files:
            try:
                records = read_records(sf.path, display=sf.rel)
            except FormatError:
                continue
            for rec in records:
                if type(rec) is not dict or type(rec.get("image")) is not str or type(rec.get("Answer")) is not str:
                    continue
                ds = self.dataset(rec.get("data-no")) if type(rec.get("data-no")) in _ID_TYPES else None
                if ds is not None:
                    self._other_side_test.setdefault(ds[0], set()).add(hash((ds[0], rec["image"], rec["Answer"])))

    def finish(self, started: float) -> IngestSummary:
        s = self.summary
        s.unique_images = len(self._hash_of_abs)
        s.problems = dict(Counter(p["severity"] for p in self.problems))
        s.seconds = time.perf_counter() - started
        if s.duplicates_skipped:
            log.info("ingest: %d records of the %s side repeat records already read; counted once",
                     s.duplicates_skipped, "subsets" if self.params.read == "datasets" else "datasets")
        return s


def ingest(data_root: str | os.PathLike, params: IngestParams | None = None,
           progress: bool | None = None) -> tuple[pd.DataFrame, list[dict], IngestSummary]:
    """The records table in memory (for tests and notebooks): (DataFrame, problems, summary)."""
    started = time.perf_counter()
    job = _Ingest(Path(data_root).resolve(), params or IngestParams(), load_catalog())
    tables = list(job.tables(progress))
    table = pa.concat_tables(tables) if tables else SCHEMA.empty_table()
    df = table.to_pandas()
    df.attrs["data_root"] = str(job.root)
    return df, job.problems, job.finish(started)


def ingest_to_parquet(data_root: str | os.PathLike, out: str | os.PathLike, params: IngestParams | None = None,
                      progress: bool | None = None) -> tuple[list[dict], IngestSummary]:
    """Stream the table to `out` file by file (bounded memory at full scale), atomically.

    Nothing is written when no record could be read (summary.records == 0).
    """
    started = time.perf_counter()
    job = _Ingest(Path(data_root).resolve(), params or IngestParams(), load_catalog())
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    schema = SCHEMA.with_metadata({**SCHEMA.metadata, DATA_ROOT_KEY: str(job.root).encode()})
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    os.close(fd)
    try:
        with pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
            for table in job.tables(progress):
                writer.write_table(table.replace_schema_metadata(schema.metadata))
        summary = job.finish(started)
        if summary.records:
            os.chmod(tmp, default_file_mode())
            os.replace(tmp, out)
    finally:
        Path(tmp).unlink(missing_ok=True)
    return job.problems, summary


def load_records_table(path: str | os.PathLike) -> pd.DataFrame:
    """A records table written by `medmat ingest`; its data root is in df.attrs['data_root']."""
    table = pq.read_table(path)
    df = table.to_pandas()
    root = (table.schema.metadata or {}).get(DATA_ROOT_KEY)
    df.attrs["data_root"] = root.decode() if root else None
    return df


def read_problems(path: str | os.PathLike) -> list[dict]:
    """The problem entries of an ingest problems file."""
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    return data["problems"] if isinstance(data, dict) else data


def default_problems_path(out: str | os.PathLike) -> Path:
    out = Path(out)
    return out.with_name(f"{out.stem}.problems.json")


def write_problems(path: str | os.PathLike, problems: list[dict], summary: IngestSummary,
                   records_file: str | None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    doc = {"data_root": summary.data_root, "records_file": records_file,
           "summary": summary.__dict__, "problems": problems}
    return atomic_write_json(path, doc, indent=2, ensure_ascii=False)


def _prefix_if_id(rid: object, prefix: str) -> str | None:
    """A table id is only meaningful for an id of the right type."""
    return prefix if type(rid) in _ID_TYPES else None


def _wrong_types(rec: dict) -> str:
    wrong = [k for k, types in REQUIRED.items() if type(rec[k]) not in types]
    return "; ".join(f"field {k!r} is {type(rec[k]).__name__} ({_short(rec[k])}), expected "
                     f"{' or '.join(t.__name__ for t in REQUIRED[k])}" for k in wrong)


def _short(value: object, limit: int = 40) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _jsonable(value: object) -> object:
    return value if isinstance(value, (int, str, float, bool)) or value is None else _short(value)


# ---- CLI ----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--data", required=True, type=Path, help="data root in the public Med-MAT layout")
    parser.add_argument("--out", required=True, type=Path, help="records table to write (.parquet)")
    parser.add_argument("--read", choices=sorted(READ_SIDES), default=None,
                        help="primary side (default: params.yaml ingest.read, else datasets)")
    parser.add_argument("--problems", type=Path, default=None,
                        help="problems JSON (default: <out stem>.problems.json next to --out)")
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
    problems_path = args.problems or default_problems_path(args.out)
    problems, summary = ingest_to_parquet(args.data, args.out, params)
    write_problems(problems_path, problems, summary, str(args.out) if summary.records else None)
    print(summary.line())
    for p in problems[:5]:
        where = p["file"] + (f" record #{p['index']}" if p["index"] is not None else "")
        print(f"  {p['severity']}: {p['check']}: {where}: {p['message']}")
    if len(problems) > 5:
        print(f"  ... {len(problems) - 5} more in {problems_path}")
    if not summary.records:
        print(f"ingest: no record could be read; {args.out} not written (see {problems_path})", file=sys.stderr)
        return 1
    return 0

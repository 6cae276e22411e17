"""The work of `medmat ingest`: release files -> rows of the records table, problems, derived splits.

Identity. A subset file concatenates its datasets and each keeps its own ids 1..n, so a row's id
carries the dataset: `ori02-train-7` (dataset file), `sub03-d04-train-7` (subset file). A record is
counted once whatever side is read: its key is (dataset, image, answer); the primary side (params
`ingest.read`) is read first and a key already read from another file is a duplicate, skipped (this
also covers a dataset listed under two subsets, e.g. 44 under 18 and 22). A record read from a subset
file belongs to that file's subset; when the catalogue says otherwise it is reported.

Splits. Derived per subset over all its files once every file is read (medmat.data.ingest_splits);
rows are spilled to a stage file as they are read (bounded memory), and splits filled in at the end.

Speed. A file without faults is read column by column (`_columns`, no Python loop per record); a file
with any fault record by record (`_record_by_record`), which names each one. Both give the same rows.

Partial downloads. A record whose image file is absent is left out; one warning per dataset counts them.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path

import numpy as np
import pyarrow as pa

from medmat.catalog import Catalog, CatalogError
from medmat.data.discovery import Discovery, discover
from medmat.data.json_records import BadRecord, load_records
from medmat.data.ingest_images import ImageLedger
from medmat.data.ingest_output import rows_table
from medmat.data.ingest_splits import Part, derive_splits
from medmat.data.medmat_format import FormatError, SourceFile, parse_question_choice

CRITICAL, WARNING = "critical", "warning"
READ_SIDES = {"datasets": "dataset", "subsets": "subset"}
_ID_TYPES = (int, str)      # `type(x) in` this excludes bool, which JSON true/false would give
_UNSEEN = object()
_QC_CACHE_MAX = 200_000
_ID_SET, _STR_SET = {int, str}, {str}
_FIELDS = ("id", "image", "Question-choice", "Answer", "Answer-choice", "data-no", "caption")
_FIELD_TYPES = (_ID_SET, _STR_SET, _STR_SET, _STR_SET, _STR_SET, _ID_SET, _STR_SET)
_SLICE = 2048
REQUIRED: dict[str, tuple[type, ...]] = {
    "id": (int, str), "caption": (str,), "image": (str,), "Answer": (str,),
    "Question-choice": (str,), "Answer-choice": (str,), "data-no": (str, int),
}


@dataclass
class Counts:
    files_found: int = 0
    files_read: int = 0
    files_failed: int = 0
    records: int = 0
    duplicates_skipped: int = 0
    records_rejected: int = 0
    images_missing: int = 0
    unique_images: int = 0
    test_records: int = 0
    derived_split_groups: int = 0
    files: list[str] = field(default_factory=list)


def _norm_label(text: str) -> str:
    return " ".join(re.split(r"[\s_\-]+", text.casefold())).strip()


class Ingest:
    """One ingest run: read every file, collect rows (spilled to `stage`) and problems."""

    def __init__(self, root: Path, read: str, catalog: Catalog, phash=None):
        self.root = root
        self.primary = READ_SIDES[read]
        self.cat = catalog
        self.images = ImageLedger(root, phash)
        self.problems: list[dict] = []
        self.counts = Counts()
        self._datasets: dict[object, tuple | None] = {}
        self._seen: dict[int, int] = {}       # record key -> number of the file that first had it
        self._parsed_qc: dict[str, tuple[str, list[str]]] = {}
        self._missing: dict[int, list] = {}   # dataset -> [records, first file, example image]
        self._other_test: dict[int, set[int]] = {}
        self.parts: list[Part] = []          # light columns of each file's rows, for the splits

    # ---- problems -----------------------------------------------------------------------------
    def problem(self, check: str, severity: str, file: str, message: str, index: int | None = None,
                record_id: object = None, table_id: str | None = None) -> None:
        message = message.replace(str(self.root), "<data root>")   # relocatable: no checkout path
        self.problems.append({"check": check, "severity": severity, "file": file, "record_id": record_id,
                              "table_record_id": table_id, "index": index, "message": message})

    # ---- look-ups -----------------------------------------------------------------------------
    def dataset(self, data_no: object) -> tuple | None:
        """(dataset_no, subset_no, modality, area, task, name) of a data-no, None if unknown."""
        if data_no in self._datasets:
            return self._datasets[data_no]
        try:
            if isinstance(data_no, bool):
                raise CatalogError("not a number")
            i = self.cat.dataset(data_no)
            hit = (i.no, i.subset_no, i.modality, i.area, i.task or "", i.name)
        except CatalogError:
            hit = None
        self._datasets[data_no] = hit
        return hit

    # ---- files --------------------------------------------------------------------------------
    def discover(self) -> Discovery:
        found = discover(self.root)
        for ig in found.ignored:
            if ig.check:
                sev = WARNING if ig.check == "lfs_pointer" else CRITICAL
                self.problem(ig.check, sev, ig.rel, ig.reason)
        self.counts.files_found = len(found.files)
        return found

    def ordered(self, files: list[SourceFile]) -> list[SourceFile]:
        """Primary side first, so the other side only adds what the primary lacks."""
        return ([f for f in files if f.kind == self.primary] + [f for f in files if f.kind != self.primary])

    def note_other_side_tests(self, files: list[SourceFile]) -> None:
        """Keys of the test records the other side ships, by dataset: those records keep that split."""
        for sf in files:
            if sf.kind == self.primary or sf.split != "test":
                continue
            try:
                records = load_records(sf.path, sf.rel)
            except FormatError:
                continue
            for rec in records:
                if type(rec) is dict and type(rec.get("image")) is str and type(rec.get("Answer")) is str \
                        and type(rec.get("data-no")) in _ID_TYPES:
                    ds = self.dataset(rec["data-no"])
                    if ds is not None:
                        self._other_test.setdefault(ds[0], set()).add(hash((ds[0], rec["image"], rec["Answer"])))

    def file_table(self, sf: SourceFile, file_no: int, own_test: bool) -> pa.Table | None:
        c = self.counts
        try:
            records = load_records(sf.path, sf.rel)
        except FormatError as exc:
            c.files_failed += 1
            sev = WARNING if exc.check == "lfs_pointer" else CRITICAL
            self.problem(exc.check, sev, sf.rel, exc.reason)
            return None
        c.files_read += 1
        c.files.append(sf.rel)
        rows = self._columns(sf, file_no, records) or self._record_by_record(sf, file_no, records)
        self._report_file(sf, rows["dataset_no"], rows.pop("mismatch"))
        return self._table(sf, rows, own_test) if rows["index"] else None

    def _columns(self, sf: SourceFile, file_no: int, records: list) -> dict | None:
        """The file's rows built column by column, without a Python loop per record (ingest reads
        ~4.7M records on both sides; the loop was most of its time). Only for a file without a fault
        a record must be named for: every element a record with its fields of the right types, of a
        known dataset, prompts that parse, images present or absent, ids distinct. Otherwise None,
        before anything but caches has changed, and _record_by_record reads the file: both give the
        same rows and problems."""
        if not records or set(map(type, records)) != {dict}:
            return None
        cols: list[list] = [[] for _ in _FIELDS]
        types: list[set] = [set() for _ in _FIELDS]
        try:   # in slices: each record's fields read while it is in the CPU cache (1.4x faster)
            for a in range(0, len(records), _SLICE):
                part = records[a:a + _SLICE]
                for col, seen_types, k in zip(cols, types, _FIELDS):
                    values = [r[k] for r in part]
                    seen_types.update(map(type, values))
                    col += values
        except KeyError:
            return None
        if not all(t <= allowed for t, allowed in zip(types, _FIELD_TYPES)):
            return None
        rids, images, qcs, answers, letters, data_nos, captions = cols
        ds_of = {x: self.dataset(x) for x in set(data_nos)}
        if None in ds_of.values():
            return None
        dnos = list(map({x: ds[0] for x, ds in ds_of.items()}.__getitem__, data_nos))
        # Counted once: the first file with a key keeps it (a key repeated inside one file is kept).
        first = list(map(self._seen.setdefault, map(hash, zip(dnos, images, answers)), repeat(file_no)))
        kept = [i for i, f in enumerate(first) if f == file_no]
        cols = [list(range(len(records))), rids, images, qcs, answers, letters, data_nos, captions, dnos]
        if len(kept) < len(records):
            cols = [[col[i] for i in kept] for col in cols]
        parsed = {}
        for q in set(cols[3]):
            p = self._parsed_qc.get(q)
            if p is None:
                try:
                    p = parse_question_choice(q)
                except ValueError:
                    return None
                if len(self._parsed_qc) < _QC_CACHE_MAX:
                    self._parsed_qc[q] = p
            parsed[q] = p
        known, check = self.images.known, self.images.check
        status = {x: known.get(x) or check(x) for x in dict.fromkeys(cols[2])}
        if any(st[0] not in ("ok", "missing") for st in status.values()):
            return None
        absent = []
        if any(st[0] == "missing" for st in status.values()):
            absent = [i for i, x in enumerate(cols[2]) if status[x][0] == "missing"]
            gone = set(absent)
            absent = [(cols[8][i], cols[2][i]) for i in absent]
            cols = [[v for i, v in enumerate(col) if i not in gone] for col in cols]
        idx, rids, images, qcs, answers, letters, data_nos, captions, dnos = cols
        prefix = {d: sf.id_prefix(d) for d in set(dnos)}
        table_ids = [prefix[d] + str(r) for d, r in zip(dnos, rids)]
        if len(set(table_ids)) < len(table_ids):
            return None
        # No fault: commit the counts, then the warnings, in record order as _record_by_record does.
        for d, image in absent:
            self._missing.setdefault(d, [0, sf.rel, image])[0] += 1
        self.counts.records_rejected += len(absent)
        self.counts.duplicates_skipped += len(records) - len(kept)
        if captions != answers:   # compared in C; the release's captions are its answers
            for j in [j for j, (cap, ans) in enumerate(zip(captions, answers)) if cap != ans]:
                self._caption(sf.rel, captions[j], answers[j], idx[j], rids[j], table_ids[j])
        pos = 0 if sf.kind == "dataset" else 1
        misfiled = {d for d in set(dnos) if self.dataset(d)[pos] != sf.number}
        return {"index": idx, "dataset_no": dnos, "parsed": [parsed[q] for q in qcs],
                "sha": [status[x][1] for x in images], "table_id": table_ids, "image": images,
                "question_choice": qcs, "letter": letters, "answer": answers, "caption": captions,
                "mismatch": Counter(d for d in dnos if d in misfiled) if misfiled else Counter()}

    def _caption(self, rel: str, caption: str, answer: str, idx: int, rid: object, table_id: str) -> None:
        if _norm_label(caption) != _norm_label(answer):
            self.problem("caption_contradicts_answer", WARNING, rel, f"caption {caption!r} contradicts the "
                         f"answer {answer!r} (the answer is trained on)", idx, rid, table_id)

    def _record_by_record(self, sf: SourceFile, file_no: int, records: list) -> dict:
        """The rows of a file with faults, each faulty record named (file, index, id, reason)."""
        rel = sf.rel
        seen, parsed_qc, images, check = self._seen, self._parsed_qc, self.images.known, self.images.check
        rows: list[tuple] = []
        ids_here: set[str] = set()
        prefixes: dict[int, str] = {}
        mismatch: Counter = Counter()
        rejected = dups = 0
        for idx, rec in enumerate(records):
            if type(rec) is not dict:
                rejected += 1
                if isinstance(rec, BadRecord):
                    self.problem(rec.check, CRITICAL, rel, rec.message, idx, rec.record_id)
                else:
                    self.problem("record_type", CRITICAL, rel, f"record is a JSON {type(rec).__name__}, not an "
                                 "object", idx)
                continue
            try:
                rid, image, qc, answer = rec["id"], rec["image"], rec["Question-choice"], rec["Answer"]
                letter, data_no, caption = rec["Answer-choice"], rec["data-no"], rec["caption"]
            except KeyError:
                rejected += 1
                rid = rec.get("id")
                self.problem("missing_field", CRITICAL, rel, f"missing field(s) {sorted(REQUIRED.keys() - rec.keys())}",
                             idx, rid if type(rid) in _ID_TYPES else _short(rid))
                continue
            if not (type(image) is str and type(qc) is str and type(answer) is str and type(letter) is str
                    and type(caption) is str and type(rid) in _ID_TYPES and type(data_no) in _ID_TYPES):
                rejected += 1
                self.problem("wrong_type", CRITICAL, rel, _wrong_types(rec), idx,
                             rid if type(rid) in _ID_TYPES else _short(rid))
                continue
            ds = self._datasets.get(data_no, _UNSEEN)
            if ds is _UNSEEN:
                ds = self.dataset(data_no)
            if ds is None:
                rejected += 1
                self.problem("unknown_data_no", CRITICAL, rel, f"data-no {data_no!r} is not a dataset of the "
                             f"catalogue (1..{len(self.cat.datasets)})", idx, rid)
                continue
            key = hash((ds[0], image, answer))
            first = seen.setdefault(key, file_no)
            if first != file_no:
                dups += 1
                continue
            parsed = parsed_qc.get(qc)
            if parsed is None:
                try:
                    parsed = parse_question_choice(qc)
                except ValueError as exc:
                    rejected += 1
                    self.problem("question_choice", CRITICAL, rel, str(exc), idx, rid)
                    continue
                if len(parsed_qc) < _QC_CACHE_MAX:   # prompts repeat; bound the cache all the same
                    parsed_qc[qc] = parsed
            img = images.get(image) or check(image)
            if img[0] != "ok":
                rejected += 1
                if img[0] == "missing":
                    miss = self._missing.setdefault(ds[0], [0, rel, image])
                    miss[0] += 1
                else:
                    self.problem(img[0], CRITICAL, rel, img[1], idx, rid)
                continue
            owner = ds[0] if sf.kind == "dataset" else ds[1]
            if owner != sf.number:
                mismatch[ds[0]] += 1
            prefix = prefixes.get(ds[0])
            if prefix is None:
                prefix = prefixes[ds[0]] = sf.id_prefix(ds[0])
            table_id = prefix + str(rid)
            if table_id in ids_here:
                self.problem("duplicate_id", WARNING, rel, f"id {rid!r} of dataset {ds[0]} repeats in this file; "
                             f"this record is kept as {table_id}~{idx}", idx, rid, f"{table_id}~{idx}")
                table_id = f"{table_id}~{idx}"
            ids_here.add(table_id)
            if caption != answer:
                self._caption(rel, caption, answer, idx, rid, table_id)
            rows.append((idx, ds[0], parsed, img[1], table_id, image, qc, letter, answer, caption))
        self.counts.records_rejected += rejected
        self.counts.duplicates_skipped += dups
        names = ("index", "dataset_no", "parsed", "sha", "table_id", "image", "question_choice", "letter", "answer",
                 "caption")
        cols = {name: list(col) for name, col in zip(names, zip(*rows))} if rows else {n: [] for n in names}
        return {**cols, "mismatch": mismatch}

    def _report_file(self, sf: SourceFile, ds_nos: list[int], mismatch: Counter) -> None:
        for d, n in sorted(mismatch.items()):
            info = self.dataset(d)
            if sf.kind == "dataset":
                self.problem("data_no_mismatch", WARNING, sf.rel, f"{n} record(s) of dataset {d} in the file of "
                             f"dataset {sf.number}")
            else:
                self.problem("subset_mismatch", WARNING, sf.rel, f"{n} record(s) of dataset {d} ({info[5]}) sit in "
                             f"the file of subset {sf.number}, but the catalogue puts dataset {d} in subset "
                             f"{info[1]}; they are counted in subset {sf.number}, as the file says")
        if sf.kind == "dataset":
            for d in sorted(d for d in set(ds_nos) if self.dataset(d)[1] is None):
                self.problem("no_subset", WARNING, sf.rel, f"dataset {d} belongs to no subset in the catalogue, "
                             "so its records have no task element")

    def _table(self, sf: SourceFile, rows: dict, own_test: bool) -> pa.Table:
        n, ds_nos = len(rows["index"]), rows["dataset_no"]
        infos = {d: self.dataset(d) for d in set(ds_nos)}
        # A record keeps its file's split when the file has a partner of the other split, or the other
        # side ships this dataset's test split; else its split is derived (medmat.data.ingest_splits).
        other = self._other_test
        if sf.split == "test" or own_test:
            forced = [sf.split] * n
        elif not other:
            forced = [None] * n
        else:
            forced = [None if d not in other else ("test" if hash((d, img, a)) in other[d] else "train")
                      for d, img, a in zip(ds_nos, rows["image"], rows["answer"])]
        group = {d: (-d if i[1] is None else i[1]) if sf.kind == "dataset" else sf.number for d, i in infos.items()}
        groups = set(group.values())
        self.parts.append(Part(self.counts.records, sf.rel, groups.pop() if len(groups) == 1 else
                               list(map(group.__getitem__, ds_nos)), rows["answer"],
                               list(zip(rows["image"], rows["sha"])), forced, rows["table_id"]))
        self.counts.records += n
        return rows_table(sf, rows, infos)

    # ---- after all files ----------------------------------------------------------------------
    def report_missing_images(self) -> None:
        for d, (n, first_file, example) in sorted(self._missing.items()):
            self.counts.images_missing += n
            name = self.dataset(d)[5]
            self.problem("images_missing", WARNING, first_file,
                         f"dataset {d} ({name}): {n} record(s) left out because their image files are absent "
                         f"(e.g. {example!r}); a partial download? The other datasets' records are used")

    def test_rows(self, seed: int, test_fraction: float) -> np.ndarray:
        """Split of every row (True: test), derived per subset over all its files."""
        def warn(check: str, file: str, message: str, table_id: str) -> None:
            self.problem(check, WARNING, file, message, None, None, table_id)

        is_test, self.counts.derived_split_groups = derive_splits(self.parts, self.counts.records, seed,
                                                                  test_fraction, warn)
        self.counts.test_records = int(is_test.sum())
        self.counts.unique_images = self.images.unique
        return is_test


def _wrong_types(rec: dict) -> str:
    wrong = [k for k, types in REQUIRED.items() if type(rec[k]) not in types]
    return "; ".join(f"field {k!r} is {type(rec[k]).__name__} ({_short(rec[k])}), expected "
                     f"{' or '.join(t.__name__ for t in REQUIRED[k])}" for k in wrong)


def _short(value: object, limit: int = 40) -> object:
    if value is None or type(value) in (int, str, float, bool) and len(repr(value)) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."



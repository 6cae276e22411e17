"""The work of `medmat ingest`: release files -> rows of the records table, problems, derived splits.

Identity. A subset file concatenates its datasets and each keeps its own ids 1..n, so a row's id
carries the dataset: `ori02-train-7` (dataset file), `sub03-d04-train-7` (subset file). A record is
counted once whatever side is read: its key is (dataset, image, answer); the primary side (params
`ingest.read`) is read first and a key already read from another file is a duplicate, skipped (this
also covers a dataset listed under two subsets, e.g. 44 under 18 and 22). A record read from a subset
file belongs to that file's subset; when the catalogue says otherwise it is reported.

Splits. The release ships only `-train.json` files, so test splits are derived, per SUBSET across all
its datasets and files (medmat_format.derive_split: seeded, label-balanced, never one image - by path
or content - on both sides). Records of a file's own split, or of a test split the other side ships,
keep it. Rows are spilled to a stage file as they are read (bounded memory), and splits are filled in
when every file has been read.

Partial downloads. A record whose image file is absent is left out; one warning per dataset counts them.
"""

from __future__ import annotations

import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa

from medmat.catalog import Catalog, CatalogError
from medmat.data.discovery import Discovery, discover
from medmat.data.images import NotAFileError, PathEscapeError, sha256_file
from medmat.data.json_records import BadRecord, load_records
from medmat.data.links import dvc_cache_dirs, resolve_record_image
from medmat.data.medmat_format import FormatError, SourceFile, derive_split, parse_question_choice
from medmat.data.records import SCHEMA

CRITICAL, WARNING = "critical", "warning"
READ_SIDES = {"datasets": "dataset", "subsets": "subset"}
_ID_TYPES = (int, str)      # `type(x) in` this excludes bool, which JSON true/false would give
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_UNSEEN = object()
_QC_CACHE_MAX = 200_000
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
        self.phash = phash
        self.allowed = dvc_cache_dirs(root)
        self.problems: list[dict] = []
        self.counts = Counts()
        self._datasets: dict[object, tuple | None] = {}
        self._images: dict[str, tuple[str, str] | tuple[str, None]] = {}
        self._hash_of_file: dict[str, str] = {}
        self._path_of_digest: dict[str, str] = {}
        self._seen: dict[int, int] = {}       # record key -> number of the file that first had it
        self._parsed_qc: dict[str, tuple[str, list[str]]] = {}
        self._missing: dict[int, list] = {}   # dataset -> [records, first file, example image]
        self._other_test: dict[int, set[int]] = {}
        # Light columns of every row, for the split derivation at the end.
        self.group: list[int] = []
        self.label: list[str] = []
        self.key: list[tuple[str, str]] = []
        self.forced: list[str | None] = []
        self.row_id: list[str] = []
        self.row_file: list[str] = []

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

    def image(self, rel: str) -> tuple[str, str | None]:
        """('ok', sha256) | ('missing', None) | (check, message): once per distinct path."""
        hit = self._images.get(rel)
        if hit is not None:
            return hit
        m = _CONTROL.search(rel)
        if m:
            hit = ("path_control_character", f"image path {rel!r} contains the control character "
                   f"U+{ord(m.group()):04X}")
        else:
            try:
                path = str(resolve_record_image(self.root, rel, self.allowed))
            except PathEscapeError as exc:
                hit = ("path_escape", str(exc))
            else:
                hit = self._hash(path, rel)
        self._images[rel] = hit
        return hit

    def _hash(self, path: str, rel: str) -> tuple[str, str | None]:
        digest = self._hash_of_file.get(path)
        if digest is not None:
            return ("ok", digest)
        try:
            digest = sha256_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return ("missing", None)
        except NotAFileError:
            return ("image_not_a_file", f"image path {rel!r} is not a regular file (a directory, FIFO or device)")
        except OSError as exc:
            return ("image_unreadable", f"image {rel!r} cannot be read ({exc.strerror or exc})")
        self._hash_of_file[path] = digest
        self._path_of_digest.setdefault(digest, path)
        return ("ok", digest)

    def phashes(self, workers: int | None = None) -> dict[str, str]:
        """Perceptual hash of every distinct image content ("" if it does not decode: validate says
        why). Threads: decoding releases the GIL (~3x on 4 threads), and images.py bounds the pixels
        decoded at once, so memory does not grow with the thread count."""
        if self.phash is None or not self._path_of_digest:
            return {}
        from concurrent.futures import ThreadPoolExecutor

        def one(path: str) -> str:
            try:
                return self.phash(path)
            except (ValueError, OSError):
                return ""

        digests = list(self._path_of_digest)
        with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
            return dict(zip(digests, pool.map(one, [self._path_of_digest[d] for d in digests])))

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
        rel, primary = sf.rel, sf.kind == self.primary
        seen, parsed_qc, images = self._seen, self._parsed_qc, self._images
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
            img = images.get(image) or self.image(image)
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
            if caption != answer and _norm_label(caption) != _norm_label(answer):
                self.problem("caption_contradicts_answer", WARNING, rel, f"caption {caption!r} contradicts the "
                             f"answer {answer!r} (the answer is trained on)", idx, rid, table_id)
            rows.append((idx, rec, ds, parsed, img[1], table_id))
        c.records_rejected += rejected
        c.duplicates_skipped += dups
        self._report_file(sf, rows, mismatch)
        return self._table(sf, rows, own_test) if rows else None

    def _report_file(self, sf: SourceFile, rows: list[tuple], mismatch: Counter) -> None:
        for d, n in sorted(mismatch.items()):
            info = self.dataset(d)
            if sf.kind == "dataset":
                self.problem("data_no_mismatch", WARNING, sf.rel, f"{n} record(s) of dataset {d} in the file of "
                             f"dataset {sf.number}")
            else:
                self.problem("subset_mismatch", WARNING, sf.rel, f"{n} record(s) of dataset {d} ({info[5]}) sit in "
                             f"the file of subset {sf.number}, but the catalogue puts dataset {d} in subset "
                             f"{info[1]}; they are counted in subset {sf.number}, as the file says")
        for d in sorted({r[2][0] for r in rows if r[2][1] is None and sf.kind == "dataset"}):
            self.problem("no_subset", WARNING, sf.rel, f"dataset {d} belongs to no subset in the catalogue, so "
                         "its records have no task element")

    def _table(self, sf: SourceFile, rows: list[tuple], own_test: bool) -> pa.Table:
        n = len(rows)
        subset = [r[2][1] for r in rows] if sf.kind == "dataset" else [sf.number] * n
        cols = {
            "record_id": [r[5] for r in rows], "source_file": [sf.rel] * n, "source_index": [r[0] for r in rows],
            "dataset_no": [r[2][0] for r in rows], "subset_no": subset,
            "modality": [r[2][2] for r in rows], "area": [r[2][3] for r in rows], "task": [r[2][4] for r in rows],
            "split": [sf.split] * n, "image": [r[1]["image"] for r in rows],
            "image_sha256": [r[4] for r in rows], "image_phash": [""] * n,   # filled in at the end
            "question": [r[3][0] for r in rows], "question_choice": [r[1]["Question-choice"] for r in rows],
            "options": [r[3][1] for r in rows], "answer_letter": [r[1]["Answer-choice"] for r in rows],
            "answer_text": [r[1]["Answer"] for r in rows], "caption": [r[1]["caption"] for r in rows],
        }
        # Light columns for the derivation. A record keeps its file's split when the file has a
        # partner of the other split, or the other side ships this dataset's test split.
        ds_nos = cols["dataset_no"]
        self.group.extend(-d if s is None else s for s, d in zip(subset, ds_nos))
        self.label.extend(cols["answer_text"])
        self.key.extend(zip(cols["image"], cols["image_sha256"]))
        other = self._other_test
        if sf.split == "test" or own_test:
            self.forced.extend([sf.split] * n)
        elif not other:
            self.forced.extend([None] * n)
        else:
            self.forced.extend(
                None if d not in other else ("test" if hash((d, img, a)) in other[d] else "train")
                for d, img, a in zip(ds_nos, cols["image"], cols["answer_text"]))
        self.row_id.extend(cols["record_id"])
        self.row_file.extend([sf.rel] * n)
        self.counts.records += n
        return pa.table(cols, schema=SCHEMA)

    # ---- after all files ----------------------------------------------------------------------
    def report_missing_images(self) -> None:
        for d, (n, first_file, example) in sorted(self._missing.items()):
            self.counts.images_missing += n
            name = self.dataset(d)[5]
            self.problem("images_missing", WARNING, first_file,
                         f"dataset {d} ({name}): {n} record(s) left out because their image files are absent "
                         f"(e.g. {example!r}); a partial download? The other datasets' records are used")

    def splits(self, seed: int, test_fraction: float) -> list[str]:
        """Split of every row, derived per subset (group) over all its files."""
        by_group: dict[int, list[int]] = {}
        for i, g in enumerate(self.group):
            by_group.setdefault(g, []).append(i)
        out = [""] * len(self.group)
        for g, rows in sorted(by_group.items()):
            derived = derive_split([self.label[i] for i in rows], [self.key[i] for i in rows], seed=seed,
                                   test_fraction=test_fraction, forced=[self.forced[i] for i in rows])
            if any(self.forced[i] is None for i in rows):
                self.counts.derived_split_groups += 1
            for i, s in zip(rows, derived):
                out[i] = s
            self._labels_missing_in_train(g, rows, derived)
        self.counts.test_records = out.count("test")
        self.counts.unique_images = len(self._hash_of_file)
        return out

    def _labels_missing_in_train(self, group: int, rows: list[int], splits: list[str]) -> None:
        train = {self.label[i] for i, s in zip(rows, splits) if s == "train"}
        first: dict[str, int] = {}
        count: Counter = Counter()
        for i, s in zip(rows, splits):
            lab = self.label[i]
            if s == "test" and lab not in train:
                first.setdefault(lab, i)
                count[lab] += 1
        what = f"subset {group:02d}" if group > 0 else f"dataset {-group} (no subset)"
        for lab, i in sorted(first.items()):
            self.problem("test_label_not_in_train", WARNING, self.row_file[i],
                         f"{what}: label {lab!r} has {count[lab]} test record(s) but none in training",
                         None, None, self.row_id[i])


def _wrong_types(rec: dict) -> str:
    wrong = [k for k, types in REQUIRED.items() if type(rec[k]) not in types]
    return "; ".join(f"field {k!r} is {type(rec[k]).__name__} ({_short(rec[k])}), expected "
                     f"{' or '.join(t.__name__ for t in REQUIRED[k])}" for k in wrong)


def _short(value: object, limit: int = 40) -> object:
    if value is None or type(value) in (int, str, float, bool) and len(repr(value)) <= limit:
        return value
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


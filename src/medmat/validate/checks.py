"""The validation checks: names, default severities, and the computed columns GX expectations read.

Every rule that needs more than one column (a triplet against the catalogue, an answer letter against
its options, image content across splits) is first turned into a plain column here, vectorised over
the whole table (millions of rows at full scale); Great Expectations then checks and reports those
columns (medmat.validate.suite). Row-local rules (vocabularies, uniqueness, path regex) use the
records' own columns directly.
"""

from __future__ import annotations

import logging
import os
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from medmat.catalog import Catalog, CatalogError

log = logging.getLogger(__name__)

CRITICAL, WARNING = "critical", "warning"
SEVERITIES = (CRITICAL, WARNING)

# check name -> (default severity, what it guards). Ingest problems are reported under `ingest.<check>`
# with the severity ingest gave them, unless params name `ingest.<check>` or `ingest_problems`.
CHECKS: dict[str, tuple[str, str]] = {
    "modality_vocabulary": (CRITICAL, "modality is a canonical modality of the catalogue"),
    "area_vocabulary": (CRITICAL, "area is a canonical anatomical area of the catalogue"),
    "task_vocabulary": (CRITICAL, "task is a task of the catalogue (records of datasets with a subset)"),
    "triplet_matches_dataset": (CRITICAL, "the record's triplet equals its dataset's catalogue triplet"),
    "triplet_matches_subset": (CRITICAL, "the record's triplet equals its subset's catalogue triplet"),
    "dataset_single_triplet": (CRITICAL, "all records of one dataset carry one triplet"),
    "answer_letter_in_options": (CRITICAL, "the answer letter names one of the record's options"),
    "answer_matches_option": (CRITICAL, "the option under the answer letter is the answer text"),
    "option_count": (CRITICAL, "a record has 2 to 4 options"),
    "options_distinct": (CRITICAL, "a record's options are distinct"),
    "answer_in_label_set": (CRITICAL, "the answer is a label of its subset (offered as a distractor elsewhere)"),
    "record_id_unique": (CRITICAL, "record ids are unique"),
    "image_path_confined": (CRITICAL, "image paths stay inside the data root (no absolute, '..' or escaping link)"),
    "image_readable": (CRITICAL, "the image exists and decodes"),
    "train_test_leakage": (CRITICAL, "no image content is in both train and test of a subset"),
    "test_label_balance": (WARNING, "test sets are label-balanced (largest/smallest label count)"),
    "ingest_problems": (CRITICAL, "bad input found by ingest (malformed JSON, wrong types, ...)"),
}

IMAGE_MODES = ("decode", "exists", "skip")
NOT_CHECKED = "not checked"


@dataclass
class ValidateParams:
    """params.yaml section `validate`."""

    severity: dict[str, str] = field(default_factory=dict)   # check -> critical | warning
    max_listed: int = 1000            # failing rows listed per expectation (the count is always exact)
    images: str = "decode"            # decode | exists (stat only) | skip
    workers: int = 0                  # image decode threads; 0 = one per CPU
    label_set_min_records: int = 10   # subsets smaller than this have too few records to know their labels
    balance_max_ratio: float = 1.5    # test set: largest / smallest label count above this is reported

    def __post_init__(self) -> None:
        self.severity = dict(self.severity or {})
        for name, sev in self.severity.items():
            if name not in CHECKS and not str(name).startswith("ingest."):
                raise ValueError(f"severity: unknown check {name!r}; known: {sorted(CHECKS)} or ingest.<check>")
            if sev not in SEVERITIES:
                raise ValueError(f"severity of {name!r} must be one of {SEVERITIES}, got {sev!r}")
        if self.images not in IMAGE_MODES:
            raise ValueError(f"images must be one of {IMAGE_MODES}, got {self.images!r}")
        if self.max_listed < 1:
            raise ValueError(f"max_listed must be >= 1, got {self.max_listed}")
        if self.balance_max_ratio < 1:
            raise ValueError(f"balance_max_ratio must be >= 1, got {self.balance_max_ratio}")

    def severity_of(self, check: str) -> str:
        return self.severity.get(check, CHECKS[check][0])


# Columns of the records table the checks read (docs/ARCHITECTURE.md).
NEEDED = ["record_id", "source_file", "dataset_no", "subset_no", "modality", "area", "task", "split",
          "image", "image_sha256", "options", "answer_letter", "answer_text"]


def _triplet_of(cat: Catalog, kind: str, no: int) -> str | None:
    try:
        return str(cat.triplet_of_dataset(no) if kind == "dataset" else cat.triplet_of_subset(no))
    except CatalogError:
        return None


def _distinct(keys: np.ndarray) -> np.ndarray:
    """Distinct int64 keys, unordered. pandas' hash table: numpy's unique on 10M keys is several
    times slower here (measured on the full-scale benchmark)."""
    return pd.unique(keys)


def _options_array(options: pd.Series) -> pa.ListArray:
    if isinstance(options.dtype, pd.ArrowDtype):
        arr = pa.chunked_array(options.array._pa_array).combine_chunks()
    else:
        arr = pa.array(options, type=pa.list_(pa.string()), from_pandas=True)
    return arr.cast(pa.list_(pa.string()))


def prepare(records: pd.DataFrame, catalog: Catalog, data_root: str | os.PathLike,
            params: ValidateParams, progress: bool = False) -> pd.DataFrame:
    """The frame GX validates: identifying columns, the records' checked columns and computed ones."""
    missing = [c for c in NEEDED if c not in records.columns]
    if missing:
        raise ValueError(f"records table lacks column(s) {missing} (see docs/ARCHITECTURE.md)")
    n = len(records)
    f = pd.DataFrame({c: records[c] for c in ["record_id", "source_file", "dataset_no", "modality", "area",
                                              "split", "image", "answer_letter", "answer_text"]})
    f["_row"] = np.arange(n)
    subset = records["subset_no"].astype("Int64")
    has_subset = subset.notna().to_numpy()
    # Records of datasets without a subset have no task element (ingest warns); nothing to check there.
    f["task"] = records["task"].where(has_subset, None)

    # Triplets: as carried by the record, and as the catalogue gives for its dataset and its subset.
    f["triplet"] = (records["modality"].astype(str) + "-" + records["area"].astype(str) + "-"
                    + records["task"].astype(str))
    ds_nos = records["dataset_no"].astype("int64")
    ds_map = {int(d): _triplet_of(catalog, "dataset", int(d)) for d in ds_nos.unique()}
    f["dataset_triplet"] = ds_nos.map(ds_map).where(has_subset, None)
    f.loc[~has_subset, "triplet"] = None   # no task element: pair checks skip these rows
    sub_map = {int(s): _triplet_of(catalog, "subset", int(s)) for s in subset.dropna().unique()}
    f["subset_no"] = subset
    f["subset_triplet"] = subset.map(sub_map).astype(object).where(has_subset, None)
    # Distinct triplets per dataset, on integer codes (a string groupby is slow at millions of rows).
    t_code = pd.factorize(f["triplet"])[0].astype(np.int64)          # -1: no triplet (no subset)
    d_code = pd.factorize(ds_nos)[0].astype(np.int64)
    width = int(t_code.max()) + 1 if n else 1
    pairs = _distinct(d_code[t_code >= 0] * width + t_code[t_code >= 0])
    per_dataset = np.bincount(pairs // width, minlength=int(d_code.max()) + 1 if n else 0)
    f["dataset_triplet_count"] = per_dataset[d_code] if n else np.zeros(0, dtype=np.int64)

    # Options, vectorised through Arrow: count, distinct count, the text under the answer letter.
    opts = _options_array(records["options"])
    n_opt = pc.fill_null(pc.list_value_length(opts), 0).to_numpy().astype(np.int64)
    flat = pc.list_flatten(opts)
    parent = pc.list_parent_indices(opts).to_numpy()
    # One integer code per text (options and answers together), by Arrow's dictionary encoding:
    # millions of option strings never become Python objects.
    answers = pa.array(records["answer_text"], type=pa.string(), from_pandas=True)
    if isinstance(answers, pa.ChunkedArray):   # pandas' Arrow-backed strings come chunked
        answers = answers.combine_chunks()
    enc = pc.dictionary_encode(pc.fill_null(pa.concat_arrays([flat, answers]), ""))
    codes = enc.indices.to_numpy(zero_copy_only=False).astype(np.int64)
    texts = enc.dictionary.to_numpy(zero_copy_only=False)
    flat_code, answer_code = codes[: len(flat)], codes[len(flat):]
    k = len(texts) + 1
    pair = _distinct(parent.astype(np.int64) * k + flat_code)
    f["n_options"] = n_opt
    f["n_distinct_options"] = np.bincount(pair // k, minlength=n)[:n]
    letter_idx = records["answer_letter"].map(
        {chr(65 + i): i for i in range(26)}).fillna(-1).astype(np.int64).to_numpy()
    valid = (letter_idx >= 0) & (letter_idx < n_opt)
    offsets = opts.offsets.to_numpy()[:n] - opts.offsets[0].as_py()   # positions in `flat`
    take = pa.array(np.where(valid, offsets + letter_idx, 0), mask=~valid)
    f["answer_option"] = pc.take(flat, take).to_pandas()

    # Label set of a subset (of the dataset, when it has none): the texts offered as distractors in
    # its records. Distractors are drawn from the subset's other labels, so every real label turns up
    # as one somewhere; an answer that never does is a typo or a record from another subset.
    group = np.where(has_subset, subset.fillna(0).to_numpy(dtype=np.int64), -ds_nos.to_numpy())
    group_code, group_of_code = pd.factorize(group)
    group_code = group_code.astype(np.int64)
    distractor = flat_code != answer_code[parent]
    label_keys = _distinct(group_code[parent][distractor] * k + flat_code[distractor])
    in_set = np.isin(group_code * k + answer_code, label_keys)
    small = np.bincount(group_code)[group_code] < params.label_set_min_records
    f["answer_in_label_set"] = in_set | small
    f["_group"] = group
    # Every option text of a test set's subset is one of its labels: the balance report counts them all,
    # so a label missing from the test set shows as 0 rather than vanishing.
    all_pairs = _distinct(group_code[parent] * k + flat_code)
    labels_of = pd.Series(texts[all_pairs % k], dtype=object).groupby(
        all_pairs // k).agg(lambda s: sorted(set(s)))
    f.attrs["labels"] = {int(g): labels_of.get(c, []) for c, g in enumerate(group_of_code)}
    f["_group_size"] = np.bincount(group_code)[group_code]

    # Leakage: one image content (sha256) in both train and test of one subset.
    sha = records["image_sha256"].fillna("").astype(str)
    sha_code, _ = pd.factorize(sha)
    is_test = (records["split"] == "test").to_numpy()
    key = group_code * (int(sha_code.max()) + 2 if n else 1) + sha_code
    key_code, _ = pd.factorize(key)
    n_keys = int(key_code.max()) + 1 if n else 0
    tests = np.bincount(key_code, weights=is_test, minlength=n_keys)
    trains = np.bincount(key_code, weights=~is_test, minlength=n_keys)
    f["leaks"] = ((tests[key_code] > 0) & (trains[key_code] > 0) & (sha != "").to_numpy())
    f["image_sha256"] = sha

    # Images: paths that escape through a link, then existence and decoding (once per content).
    f["image_link_escapes"], f["image_status"] = image_columns(records, data_root, params, progress)
    return f


_LEXICAL_ESCAPE = r"^(?:[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"


def image_columns(records: pd.DataFrame, data_root: str | os.PathLike, params: ValidateParams,
                  progress: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """(link escapes, status) per record; status is 'ok', NOT_CHECKED or what is wrong with the image."""
    from medmat.data.images import ImageError, load_image

    images = records["image"].fillna("").astype(str)
    codes, uniques = pd.factorize(images)
    root = Path(data_root)
    escapes = np.zeros(len(uniques), dtype=bool)
    paths: list[Path | None] = []
    lexical = pd.Series(uniques, dtype=object).str.contains(_LEXICAL_ESCAPE, regex=True).to_numpy()
    # Link escapes: resolve each directory once and only the files that are links themselves.
    # (resolve_image_path resolves the root and every component per call: ~0.6 ms per image, which
    # at the release's ~1M images is minutes; this is the same rule.)
    root_real = os.path.realpath(root)
    dirs: dict[str, str] = {}
    for i, rel in enumerate(uniques):
        if lexical[i] or not rel:
            paths.append(None)   # absolute or '..': the regex expectation reports it
            continue
        full = os.path.join(root_real, rel)
        head, tail = os.path.split(full)
        real_dir = dirs.get(head)
        if real_dir is None:
            real_dir = dirs[head] = os.path.realpath(head)
        real = os.path.realpath(full) if os.path.islink(full) else os.path.join(real_dir, tail)
        if not real.startswith(root_real + os.sep):
            escapes[i] = True
            paths.append(None)
        else:
            paths.append(Path(real))
    status = np.full(len(uniques), NOT_CHECKED, dtype=object)
    if params.images != "skip":
        # Decode each content once: the release repeats one image across many records (and the
        # full-scale benchmark cycles a small pool), so key by the ingest's sha256 where known.
        sha = records["image_sha256"].fillna("").astype(str).to_numpy()
        first_sha = np.full(len(uniques), "", dtype=object)
        first_sha[codes[::-1]] = sha[::-1]   # any one record's hash per unique path
        by_key: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            if p is not None:
                by_key.setdefault(first_sha[i] or f"path:{p}", []).append(i)

        def probe(i: int) -> str:
            p = paths[i]
            if params.images == "exists":
                try:
                    return "ok" if p.stat().st_size > 0 else "image file is empty (0 bytes)"
                except OSError as exc:
                    return f"image file cannot be read ({exc.strerror or exc})"
            try:
                load_image(p)
                return "ok"
            except ImageError as exc:
                return str(exc).replace(f"{p}: ", "", 1)

        reps = [v[0] for v in by_key.values()]
        workers = params.workers or os.cpu_count() or 1
        from tqdm import tqdm
        with ThreadPoolExecutor(max_workers=workers) as pool:
            results = list(tqdm(pool.map(probe, reps, chunksize=64), total=len(reps), desc="images",
                                unit="img", disable=not progress))
        for members, result in zip(by_key.values(), results):
            for i in members:
                # A missing file has no hash, so it is keyed by path; paths sharing a hash share bytes.
                status[i] = result
    return escapes[codes], status[codes]

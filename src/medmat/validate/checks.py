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
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc

from medmat.catalog import Catalog, CatalogError
from medmat.validate.image_checks import ABSENT, NOT_CHECKED, OK, codes_of, image_columns
from medmat.validate.leakage import exact_partners, near_partners

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
    "image_present": (CRITICAL, "the image file exists (ingest leaves out records whose images are absent, "
                                "one warning per dataset; an absent one here means the table is older than the data)"),
    "image_readable": (CRITICAL, "the image is a regular file that decodes (not empty, truncated, a bomb, a FIFO ...)"),
    "train_test_leakage": (CRITICAL, "no image content is in both train and test of a subset"),
    # Warnings: a property of the published release that `medmat designs` handles (it drops training
    # records matching a target's dev/test image); see medmat.validate.leakage for the why.
    "cross_subset_duplicate": (WARNING, "no image content (sha256) is in two subsets"),
    "near_duplicate": (WARNING, "no two different images within validate.phash_distance bits of perceptual hash "
                                "are in two subsets, or in train and test of one"),
    "test_label_balance": (WARNING, "test sets are label-balanced (largest/smallest label count)"),
    "ingest_problems": (CRITICAL, "bad input found by ingest (malformed JSON, wrong types, ...)"),
}

IMAGE_MODES = ("decode", "exists", "skip")
OPTION_SLICE = 1 << 18   # records whose options are coded at once (bounds prepare's temporaries)


@dataclass
class ValidateParams:
    """params.yaml section `validate`."""

    severity: dict[str, str] = field(default_factory=dict)   # check -> critical | warning
    max_listed: int = 1000            # failing rows listed per expectation (the count is always exact)
    images: str = "decode"            # decode | exists (stat only) | skip
    workers: int = 0                  # image decode threads; 0 = one per CPU
    label_set_min_records: int = 10   # subsets smaller than this have too few records to know their labels
    balance_max_ratio: float = 1.5    # test set: largest / smallest label count above this is reported
    phash_distance: int = 4           # near duplicates: perceptual hashes at most this many bits apart (of 64);
                                      # -1: exact copies only (Med-MAT-mini's images all lie within a few bits)

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
        if not -1 <= self.phash_distance <= 16:
            raise ValueError(f"phash_distance must be in 0..16 bits (of 64), or -1 (exact copies only), "
                             f"got {self.phash_distance}")
        if self.balance_max_ratio < 1:
            raise ValueError(f"balance_max_ratio must be >= 1, got {self.balance_max_ratio}")

    def severity_of(self, check: str) -> str:
        return self.severity.get(check, CHECKS[check][0])


# Columns of the records table the checks read (docs/ARCHITECTURE.md).
NEEDED = ["record_id", "source_file", "dataset_no", "subset_no", "modality", "area", "task", "split",
          "image", "image_sha256", "options", "answer_letter", "answer_text"]
OPTIONAL = ["image_phash"]   # written by newer ingests; validate hashes the decoded images otherwise


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
    """The options as one Arrow list<string> array, without a copy where they already are one."""
    if isinstance(options.dtype, pd.ArrowDtype):
        chunked = pa.chunked_array(options.array._pa_array)
        arr = chunked.chunk(0) if chunked.num_chunks == 1 else chunked.combine_chunks()
    else:
        arr = pa.array(options, type=pa.list_(pa.string()), from_pandas=True)
    return arr if arr.type == pa.list_(pa.string()) else arr.cast(pa.list_(pa.string()))


def prepare(records: pd.DataFrame, catalog: Catalog, data_root: str | os.PathLike,
            params: ValidateParams, progress: bool = False) -> tuple[pd.DataFrame, dict[int, list[str]]]:
    """(the frame GX validates, the label set of each test set's group).

    The frame holds identifying columns, the records' checked columns and computed ones. Strings stay
    categorical (read_records_table) or become object arrays sharing one string per distinct value:
    at 2.4M records a string per row would cost gigabytes.
    """
    missing = [c for c in NEEDED if c not in records.columns]
    if missing:
        raise ValueError(f"records table lacks column(s) {missing} (see docs/ARCHITECTURE.md)")
    n = len(records)
    f = pd.DataFrame({c: records[c] for c in ["record_id", "source_file", "dataset_no", "modality", "area",
                                              "split", "image", "answer_letter", "answer_text", "image_sha256"]})
    f["_row"] = np.arange(n, dtype=np.int32)
    # Occurrences of each record id, through Arrow's hash table (pandas' unique on 2.4M strings held
    # ~600 MB more).
    ids = pa.array(records["record_id"], type=pa.string(), from_pandas=True)
    ids = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    id_code = pc.dictionary_encode(ids).indices.to_numpy(zero_copy_only=False)
    f["record_id_count"] = np.bincount(id_code)[id_code].astype(np.int32)
    del ids, id_code
    subset = records["subset_no"].astype("Int64")
    has_subset = subset.notna().to_numpy()
    # Records of datasets without a subset have no task element (ingest warns); nothing to check there.
    f["task"] = records["task"].where(has_subset, None)

    ds_nos = records["dataset_no"].astype("int64")
    _triplet_columns(f, records, catalog, has_subset, ds_nos, subset)
    f["subset_no"] = subset

    # Label set of a subset (of the dataset, when it has none): the texts offered as distractors in
    # its records. Distractors are drawn from the subset's other labels, so every real label turns up
    # as one somewhere; an answer that never does is a typo or a record from another subset.
    group = np.where(has_subset, subset.fillna(0).to_numpy(dtype=np.int64), -ds_nos.to_numpy())
    labels = _option_columns(f, records, group, params)
    f["_group"] = group.astype(np.int32)

    f.attrs["phash_known"] = _image_columns(f, records, group, data_root, params, progress)
    return f, labels


def _first_index(code: np.ndarray, n_codes: int) -> np.ndarray:
    first = np.zeros(n_codes, dtype=np.int64)
    first[code[::-1]] = np.arange(len(code) - 1, -1, -1)
    return first


def _triplet_columns(f: pd.DataFrame, records: pd.DataFrame, catalog: Catalog, has_subset: np.ndarray,
                     ds_nos: pd.Series, subset: pd.Series) -> None:
    """Triplets: as carried by the record, and as the catalogue gives for its dataset and its subset,
    spelled once per distinct combination; and the count of distinct triplets of each dataset."""
    n = len(records)
    parts = [codes_of(records[c]) for c in ("modality", "area", "task")]
    base = max(len(u) for _, u in parts) + 1
    combo, combos = pd.factorize(sum(code * base ** i for i, (code, _) in enumerate(parts)))
    spelled = np.array([None] * len(combos), dtype=object)
    for j, rep in enumerate(_first_index(combo, len(combos))):
        spelled[j] = "-".join(str(u[code[rep]]) for code, u in parts)
    triplet = np.where(has_subset, spelled[combo], None)       # no task element: pair checks skip these rows
    f["triplet"] = triplet
    d_code, d_vals = pd.factorize(ds_nos)
    d_code = d_code.astype(np.int64)
    ds_trip = np.array([_triplet_of(catalog, "dataset", int(d)) for d in d_vals] + [None], dtype=object)
    f["dataset_triplet"] = np.where(has_subset, ds_trip[d_code], None)
    s_code, s_vals = pd.factorize(subset.fillna(0).to_numpy(dtype=np.int64))
    sub_trip = np.array([_triplet_of(catalog, "subset", int(v)) if v else None for v in s_vals], dtype=object)
    f["subset_triplet"] = np.where(has_subset, sub_trip[s_code], None)
    # Distinct triplets per dataset, on integer codes (a string groupby is slow at millions of rows).
    t_code = np.where(has_subset, combo, -1).astype(np.int64)
    width = len(combos) + 1
    pairs = _distinct(d_code[t_code >= 0] * width + t_code[t_code >= 0])
    per_dataset = np.bincount(pairs // width, minlength=len(d_vals))
    f["dataset_triplet_count"] = (per_dataset[d_code] if n else np.zeros(0, dtype=np.int64)).astype(np.int32)


def _option_columns(f: pd.DataFrame, records: pd.DataFrame, group: np.ndarray,
                    params: ValidateParams) -> dict[int, list[str]]:
    """Option columns (count, distinct count, text under the answer letter, answer in its label set);
    returns the label set of each group (subset, or -dataset without one)."""
    n = len(records)
    group_code, group_of_code = pd.factorize(group)
    group_code = group_code.astype(np.int64)

    # Options, through Arrow: one integer code per text (options and answers together; option strings
    # never become Python objects), then per record the option count, the distinct count and the text
    # under the answer letter, in slices of records: slices bound the temporaries (millions of options
    # at full scale); only small sets of distinct (group, text) keys cross slices.
    opts = _options_array(records["options"])
    distinct_texts = pc.unique(pc.list_flatten(opts)).drop_null()
    index = {t: i for i, t in enumerate(distinct_texts.to_pylist())}
    empty = index.setdefault("", len(index))          # a null option reads as ""
    rec_answer, answer_vals = codes_of(records["answer_text"])
    answer_code = np.array([index.setdefault(str(v), len(index)) for v in answer_vals], dtype=np.int64)[rec_answer]
    texts = np.array(list(index), dtype=object)       # code -> text
    k = len(texts) + 1
    rec_letter, letter_vals = codes_of(records["answer_letter"])
    letter_idx = np.array([ord(v) - 65 if isinstance(v, str) and len(v) == 1 and "A" <= v <= "Z" else -1
                           for v in letter_vals], dtype=np.int64)[rec_letter]
    n_opt, n_distinct = np.zeros(n, np.int32), np.zeros(n, np.int32)
    answer_opt = np.full(n, -1, np.int64)
    label_keys, all_keys = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)]
    for lo in range(0, n, OPTION_SLICE):
        part = opts.slice(lo, OPTION_SLICE)
        m = len(part)
        count = pc.fill_null(pc.list_value_length(part), 0).to_numpy()
        code = pc.fill_null(pc.index_in(pc.list_flatten(part), value_set=distinct_texts), empty).to_numpy().astype(np.int64)
        parent = pc.list_parent_indices(part).to_numpy().astype(np.int64)
        n_opt[lo:lo + m] = count
        n_distinct[lo:lo + m] = np.bincount(_distinct(parent * k + code) // k, minlength=m)[:m]
        li = letter_idx[lo:lo + m]
        valid = (li >= 0) & (li < count)
        offsets = part.offsets.to_numpy()[:m] - part.offsets[0].as_py()   # positions in this slice's options
        if len(code):
            answer_opt[lo:lo + m] = np.where(valid, code[np.where(valid, offsets + li, 0)], -1)
        g = group_code[lo + parent]
        distractor = code != answer_code[lo + parent]
        label_keys.append(_distinct(g[distractor] * k + code[distractor]))
        all_keys.append(_distinct(g * k + code))
    del opts
    f["n_options"], f["n_distinct_options"] = n_opt, n_distinct
    f["answer_option"] = np.where(answer_opt >= 0, texts[np.maximum(answer_opt, 0)], None)
    # Compared as codes (no letter naming an option is answer_letter_in_options' finding, not this one's).
    f["answer_matches_option"] = (answer_opt < 0) | (answer_opt == answer_code)
    label_keys = np.unique(np.concatenate(label_keys))
    answer_key = group_code * k + answer_code
    in_set = np.isin(answer_key, label_keys)
    # ... or an answer many records give: when a partial download leaves a subset with the records of
    # one label only, that label is offered as a distractor nowhere, yet it is no typo.
    answer_key_code, _ = pd.factorize(answer_key)
    common = np.bincount(answer_key_code)[answer_key_code] >= params.label_set_min_records
    small = np.bincount(group_code)[group_code] < params.label_set_min_records
    f["answer_in_label_set"] = in_set | small | common
    # Every option text of a test set's subset is one of its labels: the balance report counts them all,
    # so a label missing from the test set shows as 0 rather than vanishing.
    all_pairs = np.unique(np.concatenate(all_keys))
    labels_of = pd.Series(texts[all_pairs % k], dtype=object).groupby(
        all_pairs // k).agg(lambda s: sorted(set(s)))
    labels = {int(g): labels_of.get(c, []) for c, g in enumerate(group_of_code)}
    f["_group_size"] = np.bincount(group_code)[group_code].astype(np.int32)

    return labels


def _image_columns(f: pd.DataFrame, records: pd.DataFrame, group: np.ndarray, data_root: str | os.PathLike,
                   params: ValidateParams, progress: bool) -> int:
    """Image columns and leakage columns; returns how many records have a perceptual hash."""
    n = len(records)
    # Images: link escapes, existence and decoding, perceptual hashes (once per distinct image).
    phash = records["image_phash"] if "image_phash" in records.columns else None
    i_code, lexical, escapes, status, hashes = image_columns(records["image"], records["image_sha256"], phash, data_root,
                                                    params.images, params.workers, progress)
    f["image_link_escapes"] = escapes[i_code]
    f["image_lexical_escape"] = lexical[i_code]
    # Absent files and broken ones are two checks: a partial download is not a corrupt image.
    f["image_present"] = (status != ABSENT)[i_code]
    f["image_status"] = np.where(status == ABSENT, NOT_CHECKED, status)[i_code]

    # Leakage, exact (sha256) and near (perceptual hash), over the whole table (medmat.validate.leakage).
    sha_code, sha_vals = pd.factorize(records["image_sha256"], use_na_sentinel=True)
    sha_code = np.where(np.append(np.asarray(sha_vals, dtype=object) == "", True)[sha_code], -1,
                        sha_code).astype(np.int64)   # "" and missing: content unknown
    is_test = (records["split"] == "test").to_numpy(dtype=bool, na_value=False)
    exact = exact_partners(sha_code, group, is_test)
    f["leaks"] = exact["leaks"]
    f["dup_partner"] = exact["dup_partner"]                       # a row in another subset, or -1
    h_code, h_vals = pd.factorize(hashes)                         # per distinct image path
    h_vals = np.asarray(h_vals, dtype=object)
    h_code = np.where(h_vals[h_code] == "", -1, h_code)[i_code] if len(hashes) else np.full(n, -1)
    near, near_d = near_partners(sha_code, h_code, h_vals, group, is_test, params.phash_distance)
    f["near_partner"], f["near_distance"] = near, near_d.astype(np.int8)
    return int((h_code >= 0).sum())

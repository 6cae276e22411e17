"""Training records that show a target's dev/test image: dropped from every arm of that target.

Real Med-MAT draws several subsets from overlapping sources, so a training image of one subset can be
a test image of the target, byte for byte (same `image_sha256`) or re-encoded/resized (a perceptual
hash, `image_phash`, within a small Hamming distance). Either would let an arm "generalise" by memory.

Near duplicates are found without comparing every pair: with 64-bit hashes and distance <= d, split the
bits into d+1 blocks; two hashes within distance d agree exactly on at least one block (pigeonhole), so
only pairs that share a block value are compared. Hashes are deduplicated first (many records share
an image).
"""

from __future__ import annotations

from typing import Iterable

import numpy as np
import pandas as pd


def _hashes(values: pd.Series) -> pd.Series:
    """hex phash -> uint64; '' / None / unparsable -> dropped."""
    out = {}
    for v in pd.unique(values.dropna().astype(str)):
        try:
            if v:
                out[v] = np.uint64(int(v, 16) & 0xFFFFFFFFFFFFFFFF)
        except ValueError:
            continue
    return pd.Series(out, dtype="uint64")


def near_hashes(candidates: np.ndarray, protected: np.ndarray, distance: int) -> np.ndarray:
    """Boolean mask over `candidates` (uint64): within Hamming `distance` of some `protected` hash."""
    hit = np.zeros(len(candidates), dtype=bool)
    if distance < 0 or not len(candidates) or not len(protected):
        return hit
    blocks = min(int(distance) + 1, 64)
    edges = np.linspace(0, 64, blocks + 1).astype(int)
    for lo, hi in zip(edges[:-1], edges[1:]):
        mask = np.uint64((1 << (hi - lo)) - 1)
        ka = pd.DataFrame({"key": (candidates >> np.uint64(lo)) & mask, "ia": np.arange(len(candidates))})
        kb = pd.DataFrame({"key": (protected >> np.uint64(lo)) & mask, "ib": np.arange(len(protected))})
        pairs = ka.merge(kb, on="key")
        if pairs.empty:
            continue
        ia, ib = pairs["ia"].to_numpy(), pairs["ib"].to_numpy()
        close = np.bitwise_count(candidates[ia] ^ protected[ib]) <= distance
        hit[ia[close]] = True
    return hit


def leaking_records(records: pd.DataFrame, protected_ids: Iterable[str], phash_distance: int = 4,
                    split: str = "train") -> dict[str, str]:
    """record id -> "exact" | "near" for every `split` record (outside `protected_ids`) whose image is
    a protected record's image: the same image_sha256, or an image_phash within `phash_distance` bits.
    The near check is skipped when the table has no image_phash column (tables from before it)."""
    ids = records["record_id"].astype(str)
    protected = ids.isin({str(i) for i in protected_ids})
    pool = records[(records["split"] == split) & ~protected]
    out: dict[str, str] = {}
    if "image_sha256" in records.columns:
        shas = set(records.loc[protected, "image_sha256"].dropna().astype(str)) - {""}
        same = pool["image_sha256"].astype(str).isin(shas)
        out.update(dict.fromkeys(pool.loc[same, "record_id"].astype(str), "exact"))
    if "image_phash" in records.columns and phash_distance >= 0:
        prot = _hashes(records.loc[protected, "image_phash"])
        rest = pool[~pool["record_id"].astype(str).isin(out)]
        cand = _hashes(rest["image_phash"])
        near = cand.index[near_hashes(cand.to_numpy(), prot.to_numpy(), phash_distance)]
        hit = rest["image_phash"].astype(str).isin(set(near))
        out.update(dict.fromkeys(rest.loc[hit, "record_id"].astype(str), "near"))
    return out

"""Leakage across the whole table: one image, exactly or nearly, in more than one subset or split.

Med-MAT draws several subsets from overlapping public sources, so one picture can sit in the training
data of one subset and the test data of another; a compositional-generalisation result is void if the
model was trained on the target's test images. Three findings, each a column GX checks
(medmat.validate.checks.CHECKS):

- `train_test_leakage` (critical): identical bytes (image_sha256) in train and test of ONE subset. Ingest's
  derived splits promise this never happens, so it means a broken or hand-edited table.
- `cross_subset_duplicate` (warning): identical bytes in records of two different subsets (any splits).
- `near_duplicate` (warning): two different files whose perceptual hashes (image_phash, 64 bits) differ
  in at most `validate.phash_distance` bits -- a re-encoded, resized or re-windowed copy -- in
  different subsets, or in train and test of one subset.

Why the cross-subset findings are warnings: they are a property of the published release (the user
cannot fix them), and `medmat designs` acts on them -- it drops every training record whose image
matches a target's dev/test image, and records how many in the manifest. Failing the stage would stop
every study on the real release for something already handled downstream; the report measures it, and
`validate.severity` makes either check critical for a user who wants a hard gate.

Everything runs on integer codes of the distinct contents (the full-scale table has ~2.4M records but
~21k distinct images), never on per-record Python objects.
"""

from __future__ import annotations

import numpy as np
import pandas as pd

NONE = -1   # no partner


def _first_rows(key: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(code per row, first row per code) of an integer key."""
    code, uniques = pd.factorize(key)
    first = np.full(len(uniques), -1, dtype=np.int64)
    first[code[::-1]] = np.arange(len(code) - 1, -1, -1)   # the last write wins: the smallest row
    return code.astype(np.int64), first


def exact_partners(sha_code: np.ndarray, group: np.ndarray, split_test: np.ndarray) -> dict[str, np.ndarray]:
    """Per record: `leaks` (its content is in the other split of its own subset) and `dup_partner` (a row
    in another subset with the same content, or NONE). `sha_code` is -1 where the content is unknown."""
    n = len(sha_code)
    known = sha_code >= 0
    g_code, _ = pd.factorize(group)
    g_code = g_code.astype(np.int64)
    n_groups = int(g_code.max()) + 1 if n else 1
    # Train/test of one subset: a (content, subset) key present in both splits.
    key, _ = pd.factorize(sha_code * n_groups + g_code)
    n_keys = int(key.max()) + 1 if n else 0
    tests = np.bincount(key, weights=split_test, minlength=n_keys)
    trains = np.bincount(key, weights=~split_test, minlength=n_keys)
    leaks = (tests[key] > 0) & (trains[key] > 0) & known
    # Another subset: the first row of the content, or, for records of that first row's subset, the
    # first row of the content outside that subset.
    partner = np.full(n, NONE, dtype=np.int64)
    if n and known.any():
        rows = np.flatnonzero(known)
        c_code, first = _first_rows(sha_code[rows])
        first_group = g_code[rows][first]
        other = g_code[rows] != first_group[c_code]
        second = np.full(len(first), NONE, dtype=np.int64)
        if other.any():
            oc, of = _first_rows(sha_code[rows][other])
            # map the codes of the `other` subset back to codes of all known rows
            back = c_code[np.flatnonzero(other)[of]]
            second[back] = np.flatnonzero(other)[of]
        mine_first = ~other
        cand = np.where(mine_first, second[c_code], first[c_code])
        ok = cand >= 0
        partner[rows[ok]] = rows[cand[ok]]
    return {"leaks": leaks, "dup_partner": partner}


def _hash_ints(values: np.ndarray) -> np.ndarray:
    return np.array([int(v, 16) for v in values], dtype=np.uint64)


def near_value_pairs(hashes: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, distance) of every pair of DISTINCT 64-bit hashes within `max_distance` bits, i < j.

    A banded index: split the 64 bits into max_distance + 1 bands; two hashes within max_distance bits
    agree exactly on at least one band (pigeonhole), so only hashes sharing a band value are compared.
    """
    if max_distance <= 0 or len(hashes) < 2:
        return (np.zeros(0, np.int64),) * 3
    bands = max_distance + 1
    width = -(-64 // bands)
    found: list[np.ndarray] = []
    for b in range(bands):
        shift = b * width
        if shift >= 64:
            break
        key = (hashes >> np.uint64(shift)) & np.uint64((1 << min(width, 64 - shift)) - 1)
        order = np.argsort(key, kind="stable")
        k_sorted = key[order]
        starts = np.flatnonzero(np.r_[True, k_sorted[1:] != k_sorted[:-1]])
        sizes = np.diff(np.r_[starts, len(order)])
        for s, size in zip(starts[sizes > 1], sizes[sizes > 1]):
            members = order[s:s + size]
            for lo in range(0, size, 2048):   # chunks bound memory in a large bucket
                a = members[lo:lo + 2048]
                x = hashes[a][:, None] ^ hashes[members][None, :]
                d = np.bitwise_count(x)
                ia, ib = np.nonzero((d <= max_distance) & (a[:, None] < members[None, :]))
                if len(ia):
                    found.append(np.stack([a[ia], members[ib], d[ia, ib].astype(np.int64)], axis=1))
    if not found:
        return (np.zeros(0, np.int64),) * 3
    pairs = np.unique(np.concatenate(found).astype(np.int64), axis=0)
    return pairs[:, 0], pairs[:, 1], pairs[:, 2]


def near_partners(sha_code: np.ndarray, phash_code: np.ndarray, phash_values: np.ndarray, group: np.ndarray,
                  split_test: np.ndarray, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Per record: (partner row or NONE, distance in bits) -- a record of ANOTHER content whose
    perceptual hash is within `max_distance` bits, in another subset or the other split of its own.

    `phash_code` indexes `phash_values` (hex strings; -1 unknown). Work is per unit = (content,
    subset, split), so the cost follows the distinct images, not the records.
    """
    n = len(sha_code)
    partner = np.full(n, NONE, dtype=np.int64)
    dist = np.full(n, -1, dtype=np.int64)
    known = (sha_code >= 0) & (phash_code >= 0)
    if max_distance < 0 or not known.any():   # -1: near duplicates not looked for
        return partner, dist
    rows = np.flatnonzero(known)
    value_code, used = pd.factorize(phash_code[rows])
    values = np.asarray(phash_values, dtype=object)[used]
    place = pd.factorize(group[rows].astype(np.int64) * 2 + split_test[rows])[0].astype(np.int64)
    n_places = int(place.max()) + 1
    unit_of_row, unit_first = _first_rows(sha_code[rows].astype(np.int64) * n_places + place)
    u_row = rows[unit_first]                 # a representative record per unit
    u_content = sha_code[u_row]
    u_place = place[unit_first]
    u_value = value_code[unit_first].astype(np.int64)
    ints = _hash_ints(np.asarray(values))
    vi, vj, vd = near_value_pairs(ints, max_distance)
    # Neighbour values of each value (itself at distance 0: another content with the very same hash).
    nb_src = np.r_[np.arange(len(values)), vi, vj]
    nb_dst = np.r_[np.arange(len(values)), vj, vi]
    nb_d = np.r_[np.zeros(len(values), np.int64), vd, vd]
    order = np.argsort(nb_src, kind="stable")
    nb_src, nb_dst, nb_d = nb_src[order], nb_dst[order], nb_d[order]
    nb_start = np.searchsorted(nb_src, np.arange(len(values) + 1))
    u_order = np.argsort(u_value, kind="stable")
    u_start = np.searchsorted(u_value[u_order], np.arange(len(values) + 1))
    u_partner = np.full(len(u_row), NONE, dtype=np.int64)
    u_dist = np.full(len(u_row), -1, dtype=np.int64)
    # Only values whose neighbourhood holds two contents can produce a finding.
    contents_per_value = pd.Series(u_content).groupby(u_value).nunique().reindex(
        range(len(values)), fill_value=0).to_numpy()
    candidates = [v for v in range(len(values))
                  if nb_start[v + 1] - nb_start[v] > 1 or contents_per_value[v] > 1]
    for v in candidates:
        mine = u_order[u_start[v]:u_start[v + 1]]
        nbs = nb_dst[nb_start[v]:nb_start[v + 1]]
        nds = nb_d[nb_start[v]:nb_start[v + 1]]
        others = np.concatenate([u_order[u_start[w]:u_start[w + 1]] for w in nbs])
        o_dist = np.concatenate([np.full(u_start[w + 1] - u_start[w], d) for w, d in zip(nbs, nds)])
        for lo in range(0, len(mine), 1024):
            m = mine[lo:lo + 1024]
            ok = ((u_content[m][:, None] != u_content[others][None, :])
                  & (u_place[m][:, None] != u_place[others][None, :]))
            hit = ok.any(axis=1)
            if hit.any():
                first = ok.argmax(axis=1)
                u_partner[m[hit]] = others[first[hit]]
                u_dist[m[hit]] = o_dist[first[hit]]
    has = u_partner[unit_of_row] >= 0
    partner[rows[has]] = u_row[u_partner[unit_of_row[has]]]
    dist[rows[has]] = u_dist[unit_of_row[has]]
    return partner, dist


def pair_list(f: pd.DataFrame, partner_col: str, kind: str, limit: int, dist_col: str | None = None) -> list[dict]:
    """Distinct (image, place) pairs behind the flagged records, for the report: file, record id,
    subset and split of both sides (the first `limit`). Distinct before any per-row work: at full
    scale one image pair stands behind hundreds of flagged records."""
    partner = f[partner_col].to_numpy()
    rows = np.flatnonzero(partner >= 0)
    if not len(rows):
        return []
    image = pd.factorize(f["image"])[0].astype(np.int64)
    place = (f["_group"].to_numpy().astype(np.int64) * 2 + (f["split"] == "test").to_numpy())
    place = pd.factorize(place)[0].astype(np.int64)
    n_img, n_place = int(image.max()) + 1, int(place.max()) + 1
    side = image * n_place + place
    a, b = side[rows], side[partner[rows]]
    key = np.minimum(a, b) * (n_img * n_place) + np.maximum(a, b)
    _, first = np.unique(key, return_index=True)
    out: list[dict] = []
    for r in rows[np.sort(first)[:limit]]:
        p = int(partner[r])
        sa, sb = _side(f, r), _side(f, p)
        item = {"kind": kind, "splits": "/".join(sorted([sa["split"], sb["split"]])), "a": sa, "b": sb}
        if dist_col:
            item["distance"] = int(f[dist_col].iat[r])
        out.append(item)
    return out


def _side(f: pd.DataFrame, r: int) -> dict:
    g = int(f["_group"].iat[r])
    return {"record_id": str(f["record_id"].iat[r]), "file": str(f["source_file"].iat[r]),
            "image": str(f["image"].iat[r]), "test_set": group_name(g), "split": str(f["split"].iat[r])}


def group_name(group: int) -> str:
    return f"subset {int(group):02d}" if group > 0 else f"dataset {-int(group)} (no subset)"

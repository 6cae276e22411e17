"""Training mixtures: named components -> a deterministic, label-balanced selection of records.

A mixture is named weights, never a positional list: `{"components": {"04": 1000, "28": 1000}, "seed": 0}`
(subset numbers as zero-padded strings -> number of training samples). `resolve_mixture` turns it into
the selected records and a manifest with counts and content hashes, so two runs that claim the same
data can be checked to have used the same record ids.

Equal-size comparisons (Baseline+ vs its Related arm, scale-up arms, search trials at one budget) ask
for an *exact total*: `resolve_mixture(..., exact_total=N)` (or a spec with "exact_total": N) shares N
over the components in proportion to their requests, and where a component holds fewer records than
its share, spreads the shortfall over the others that have records to spare (`allocate`). If all of
them together hold fewer than N, the manifest says so (`matched: false`, `shortfall`), never silently.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from medmat import names
from medmat.io import atomic_write_json

# The paper caps training sets at 3,000 samples per subset (reference README).
DEFAULT_CAP = 3000


class MixtureError(ValueError):
    """A mixture that cannot be resolved, with the component and reason in the message."""


def subset_key(subset: Any) -> str:
    """Canonical component name (medmat.names.subset_key); a bad one is a MixtureError naming it."""
    try:
        return names.subset_key(subset)
    except ValueError:
        raise MixtureError(f"mixture component {subset!r}: not a subset number") from None


def ids_sha256(record_ids) -> str:
    """Content hash of a set of records: sha256 of the sorted ids, one per line."""
    h = hashlib.sha256()
    for rid in sorted(record_ids):
        h.update(str(rid).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


def _components(spec: Mapping[str, Any]) -> dict[str, int]:
    raw = spec.get("components", spec) if isinstance(spec, Mapping) else None
    if not isinstance(raw, Mapping):
        raise MixtureError(f"mixture spec must map subset -> samples, got {type(spec).__name__}")
    out: dict[str, int] = {}
    for name, n in raw.items():
        if name in ("seed", "exact_total") and raw is spec:
            continue
        key = subset_key(name)
        if isinstance(n, Mapping):  # a manifest's own component entry: reuse its request
            n = n.get("requested")
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or int(n) < 0:
            raise MixtureError(f"mixture component '{key}': samples must be a non-negative integer, got {n!r}")
        if key in out:
            raise MixtureError(f"mixture component '{key}' given twice")
        out[key] = int(n)
    return dict(sorted(out.items()))


def _component_rng(seed: int, key: str) -> np.random.Generator:
    # One stream per (seed, subset): adding a component never changes what another one selects.
    return np.random.default_rng([int(seed), int(key)])


def allocate(requested: Mapping[str, int], capacity: Mapping[str, int], total: int) -> dict[str, int]:
    """Integers summing to min(total, capacity of the requested components), in proportion to
    `requested`, none above its `capacity`.

    Water-filling: share what is left over the open components by their requests; a component whose
    share exceeds its capacity takes all it has and closes, and the rest is shared again, so a
    shortfall moves to the components with records to spare. Rounding: largest remainder, ties to
    the lower key. A component requested at 0 gets 0 (it is not a member); all requests 0 = equal shares.
    """
    weights = {k: float(v) for k, v in requested.items()}
    if weights and not any(weights.values()):
        weights = {k: 1.0 for k in weights}
    out = {k: 0 for k in requested}
    open_ = [k for k in sorted(weights) if weights[k] > 0 and capacity.get(k, 0) > 0]
    left = min(int(total), sum(capacity.get(k, 0) for k in open_))
    while open_ and left > 0:
        wsum = sum(weights[k] for k in open_)
        share = {k: left * weights[k] / wsum for k in open_}
        full = [k for k in open_ if share[k] >= capacity[k] - out[k]]
        if full:
            for k in full:
                left -= capacity[k] - out[k]
                out[k] = capacity[k]
            open_ = [k for k in open_ if k not in full]
            continue
        base = {k: int(share[k]) for k in open_}
        extra = left - sum(base.values())
        for k in sorted(open_, key=lambda k: (-(share[k] - base[k]), k))[:extra]:
            base[k] += 1
        for k in open_:
            out[k] += base[k]
        left = 0
    return out


def _balanced_pick(pool: pd.DataFrame, n: int, rng: np.random.Generator, balance: bool) -> pd.DataFrame:
    """n rows of `pool`, label-balanced where possible (round-robin over labels, each label shuffled)."""
    pool = pool.sort_values("record_id", kind="stable")
    if not balance:
        return pool.iloc[rng.permutation(len(pool))[:n]]
    per_label = [
        grp.index[rng.permutation(len(grp))].to_list()
        for _, grp in sorted(pool.groupby("answer_text", sort=True), key=lambda kv: str(kv[0]))
    ]
    # Round-robin: every label gives one record per round until n are taken; a label that runs out
    # simply drops out, so the scarce labels are all used and the rest are as equal as they can be.
    chosen: list = []
    depth = 0
    while len(chosen) < n:
        took = False
        for ids in per_label:
            if depth < len(ids):
                chosen.append(ids[depth])
                took = True
                if len(chosen) == n:
                    break
        if not took:
            break
        depth += 1
    return pool.loc[chosen]


def resolve_mixture(
    records: pd.DataFrame,
    spec: Mapping[str, Any],
    seed: int | None = None,
    split: str = "train",
    cap_per_subset: int | None = DEFAULT_CAP,
    balance_labels: bool = True,
    exact_total: int | None = None,
    exclude: Any = None,
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Select the records of mixture `spec`; return (selected records, manifest).

    Deterministic for (records, spec, seed): the selection does not depend on the row order of
    `records`. A component asking for more than its subset holds (or more than the cap) gets what
    there is; the manifest's `requested` vs `selected` shows it. A component naming a subset with no
    records in `split` is an error (a design that silently trains on nothing is worse than a crash).

    exact_total: select exactly this many records in all (see `allocate`; default: the spec's
    "exact_total" key, else none); the manifest gains `exact_total`, `matched` and `shortfall`, and
    each component its `allocated` count. exclude: record ids never selected (e.g. leaking images);
    each component reports how many of its records were `excluded`, the manifest their sum.
    """
    missing = {"record_id", "subset_no", "split", "answer_text"} - set(records.columns)
    if missing:
        raise MixtureError(f"records table lacks column(s) {sorted(missing)}")
    if seed is None:
        seed = int(spec.get("seed", 0)) if isinstance(spec, Mapping) else 0
    if exact_total is None and isinstance(spec, Mapping) and spec.get("exact_total") is not None:
        exact_total = spec["exact_total"]
    if exact_total is not None and (isinstance(exact_total, bool) or int(exact_total) < 0):
        raise MixtureError(f"exact_total must be a non-negative integer, got {exact_total!r}")
    comps = _components(spec)
    pool_all = records[records["split"] == split]
    # subset numbers compared as numbers (vectorised: the full table has millions of rows)
    subset_nums = pd.to_numeric(pool_all["subset_no"], errors="coerce")
    excluded_ids = {str(x) for x in exclude} if exclude is not None else set()
    pools, n_excluded = {}, {}
    for key in comps:
        pool = pool_all[subset_nums == int(key)]
        if pool.empty:
            raise MixtureError(f"mixture component '{key}': no records of subset {key} in split '{split}'")
        if excluded_ids:
            drop = pool["record_id"].astype(str).isin(excluded_ids)
            n_excluded[key] = int(drop.sum())
            pool = pool[~drop]
        pools[key] = pool
    capacity = {k: min(len(p), cap_per_subset) if cap_per_subset else len(p) for k, p in pools.items()}
    if exact_total is None:
        counts = {k: min(comps[k], capacity[k]) for k in comps}
    else:
        counts = allocate(comps, capacity, int(exact_total))
    frames, entries = [], {}
    for key, requested in comps.items():
        pool = pools[key]
        picked = _balanced_pick(pool, counts[key], _component_rng(seed, key), balance_labels)
        frames.append(picked)
        entries[key] = {
            "requested": requested,
            **({"allocated": counts[key]} if exact_total is not None else {}),
            "selected": int(len(picked)),
            "available": int(len(pool)),
            **({"excluded": n_excluded[key]} if excluded_ids else {}),
            "labels": {str(k): int(v) for k, v in sorted(picked["answer_text"].value_counts().items())},
            "sha256": ids_sha256(picked["record_id"]),
        }
    selected = pd.concat(frames) if frames else records.iloc[:0]
    dup = selected["record_id"].duplicated()
    if dup.any():
        raise MixtureError(f"record id {selected['record_id'][dup].iloc[0]!r} selected twice (ids must be unique)")
    # The manifest's order (sorted ids): what trains on a fresh resolution (a search trial) trains on
    # the very sequence a unit reads back from the manifest, so a trial and its retraining at the same
    # seed are the same run (07's best trial scored 100% on dev, its seed-0 retraining in the manifest's
    # order 50%: one run turned on data order).
    selected = selected.sort_values("record_id", key=lambda ids: ids.astype(str)).reset_index(drop=True)
    ids = selected["record_id"].astype(str).tolist()
    manifest = {
        "components": entries,
        "seed": int(seed),
        "split": split,
        "cap_per_subset": cap_per_subset,
        "balance_labels": bool(balance_labels),
        "total": len(ids),
        "sha256": ids_sha256(ids),
        "record_ids": ids,
    }
    if exact_total is not None:
        manifest.update(exact_total=int(exact_total), matched=len(ids) == int(exact_total),
                        shortfall=int(exact_total) - len(ids))
    if excluded_ids:
        manifest["excluded"] = sum(n_excluded.values())
    return selected, manifest


def select_manifest(records: pd.DataFrame, manifest: Mapping[str, Any], where: str = "manifest") -> pd.DataFrame:
    """The records a manifest names. With `record_ids`, take exactly those (and check the hash);
    a bare spec (components + seed) is resolved afresh."""
    if "record_ids" not in manifest:
        return resolve_mixture(records, manifest, seed=manifest.get("seed"))[0]
    ids = [str(r) for r in manifest["record_ids"]]
    if "sha256" in manifest and ids_sha256(ids) != manifest["sha256"]:
        raise MixtureError(f"{where}: record_ids do not match the manifest's sha256 (edited by hand?)")
    by_id = records.set_index(records["record_id"].astype(str), drop=False)
    absent = [r for r in ids if r not in by_id.index]
    if absent:
        raise MixtureError(
            f"{where}: {len(absent)} record id(s) not in the records table, e.g. {absent[:3]} "
            "(manifest written from another data version?)"
        )
    return by_id.loc[ids].reset_index(drop=True)


def save_manifest(path: str | os.PathLike, manifest: Mapping[str, Any]) -> Path:
    """Write `manifest` as JSON atomically (medmat.io)."""
    return atomic_write_json(path, manifest, indent=1)


def load_manifest(path: str | os.PathLike) -> dict[str, Any]:
    """Read a manifest (or a bare mixture spec); clear errors name the file."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MixtureError(f"{path}: manifest not found") from None
    except json.JSONDecodeError as exc:
        raise MixtureError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict) or not isinstance(data.get("components"), dict):
        raise MixtureError(f"{path}: a manifest needs a 'components' mapping (subset -> samples)")
    return data

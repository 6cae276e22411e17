"""Training mixtures: named components -> a deterministic, label-balanced selection of records.

A mixture is named weights, never a positional list: `{"components": {"04": 1000, "28": 1000}, "seed": 0}`
(subset numbers as zero-padded strings -> number of training samples). `resolve_mixture` turns it into
the selected records and a manifest with counts and content hashes, so two runs that claim the same
data can be checked to have used the same record ids.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import pandas as pd
from medmat.io import atomic_write_json

# The paper caps training sets at 3,000 samples per subset (reference README).
DEFAULT_CAP = 3000


class MixtureError(ValueError):
    """A mixture that cannot be resolved, with the component and reason in the message."""


def subset_key(subset: Any) -> str:
    """Canonical component name: subset number as a zero-padded string ("4", 4, "04" -> "04")."""
    try:
        return f"{int(str(subset).strip()):02d}"
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
        if name == "seed" and raw is spec:
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
) -> tuple[pd.DataFrame, dict[str, Any]]:
    """Select the records of mixture `spec`; return (selected records, manifest).

    Deterministic for (records, spec, seed): the selection does not depend on the row order of
    `records`. A component asking for more than its subset holds (or more than the cap) gets what
    there is; the manifest's `requested` vs `selected` shows it. A component naming a subset with no
    records in `split` is an error (a design that silently trains on nothing is worse than a crash).
    """
    missing = {"record_id", "subset_no", "split", "answer_text"} - set(records.columns)
    if missing:
        raise MixtureError(f"records table lacks column(s) {sorted(missing)}")
    if seed is None:
        seed = int(spec.get("seed", 0)) if isinstance(spec, Mapping) else 0
    comps = _components(spec)
    pool_all = records[records["split"] == split]
    subset_keys = pool_all["subset_no"].map(lambda s: "" if pd.isna(s) else subset_key(s))
    frames, entries = [], {}
    for key, requested in comps.items():
        pool = pool_all[subset_keys == key]
        if pool.empty:
            raise MixtureError(f"mixture component '{key}': no records of subset {key} in split '{split}'")
        n = min(requested, len(pool), cap_per_subset if cap_per_subset else requested)
        picked = _balanced_pick(pool, n, _component_rng(seed, key), balance_labels)
        frames.append(picked)
        entries[key] = {
            "requested": requested,
            "selected": int(len(picked)),
            "available": int(len(pool)),
            "labels": {str(k): int(v) for k, v in sorted(picked["answer_text"].value_counts().items())},
            "sha256": ids_sha256(picked["record_id"]),
        }
    selected = pd.concat(frames) if frames else records.iloc[:0]
    dup = selected["record_id"].duplicated()
    if dup.any():
        raise MixtureError(f"record id {selected['record_id'][dup].iloc[0]!r} selected twice (ids must be unique)")
    selected = selected.reset_index(drop=True)
    ids = sorted(selected["record_id"].astype(str))
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

"""The experiment arms of the Med-MAT paper for one target, written as mixture manifests.

A *target* is a MAT triplet (a subset number like 3, or a triplet like CT-Lung-COVID). From the
catalogue alone we know which subsets share which elements with it; from the records table we know
which records exist. `build_designs` turns both into the paper's arms (reference README, "The
experiments"), each one a mixture manifest (`medmat.mixture.resolve_mixture`) with the record ids it
trains on:

- ``related_<direction>`` for the four direction types: subsets that *together* supply the target's
  modality, area and task, none of them the target (nor sharing its exact triplet):
  fixed_modality / fixed_area / fixed_task (every member shares that element) and modality_area
  (the target's modality is tied to one area in the catalogue; one member supplies that pair with
  another task, another the task from a different pair).
- ``baseline_plus``: the same amount of data from Unrelated subsets (sharing no element);
  ``baseline``: the untrained model (no data); ``zero_overlap`` (CrossMed) is the same data as
  ``baseline_plus`` and is written as a note pointing there, not trained twice.
- scale-up arms under one total cap: all_related, all_unrelated, related_without_modality/_area/_task,
  all_data.
- limited target data: k target training records plus the Related (or Unrelated) companions.
- in_distribution: the target's own training data (upper bound).

The rule that picks a *minimal deterministic* Related set (documented because the paper does not
give one): for a fixed-X direction the set has exactly two members, because one member sharing X and
both other elements would carry the target's triplet; the member supplying the second element is
the lowest-numbered subset sharing X and that element, likewise for the third. For modality_area,
the pair member is the lowest-numbered subset of the target's (modality, area) with another task;
the task member the lowest-numbered subset with the target's task on another (modality, area) pair.

The target's own training records are split once into a *dev* split (Optuna's objective, the
paper's limited-data setting) and the rest; the test split is untouched, so the report's test
accuracy never saw the search.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import random
from pathlib import Path
from typing import Any

import pandas as pd

from medmat.catalog import Catalog, Triplet, load_catalog, parse_target
from medmat.config import ConfigError, from_dict, load_params
from medmat.io import atomic_write_json

log = logging.getLogger(__name__)

ELEMENTS = ("modality", "area", "task")
DIRECTIONS = ("fixed_modality", "fixed_area", "fixed_task", "modality_area")
# "related_without_*" (not "_wo_"): the search's warm start takes arms named related* / all_related
# and leaves out names containing "without" (the ablations answer another question).
SCALEUP_ARMS = ("all_related", "all_unrelated", "related_without_modality", "related_without_area",
                "related_without_task", "all_data")
# Fixed arm names (the DVC matrix enumerates them; a target that cannot have one gets a reason).
TABLE3_ARMS = ("baseline", "baseline_plus") + tuple(f"related_{d}" for d in DIRECTIONS)
ALL_ARMS = TABLE3_ARMS + SCALEUP_ARMS + ("limited", "zero_overlap", "in_distribution")


@dataclasses.dataclass
class DesignsConfig:
    """params.yaml `designs:` section."""

    samples_per_subset: int = 3000   # per Related / Baseline+ member (paper: 3,000)
    scaleup_total: int = 15000       # one cap for every scale-up arm (paper: 15,000)
    cap_per_subset: int = 3000       # no subset gives more than this (paper: 3,000)
    limited_k: list = dataclasses.field(default_factory=lambda: [0, 500, 1000, 2000])  # paper: 0..2,000
    dev_size: int = 100              # target train records held out as the search's dev split
    seed: int = 0                    # record selection (training seeds vary the model, not the data)

    def __post_init__(self):
        for name in ("samples_per_subset", "scaleup_total", "cap_per_subset"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dev_size < 0:
            raise ValueError(f"dev_size must be >= 0, got {self.dev_size}")
        if any(int(k) < 0 for k in self.limited_k):
            raise ValueError(f"limited_k must be non-negative, got {self.limited_k}")


class DesignError(ValueError):
    """A target whose arm cannot be built; the message names the missing element."""


@dataclasses.dataclass
class Target:
    triplet: Triplet
    subset_no: int | None

    @property
    def label(self) -> str:
        """Folder name: the zero-padded subset number, else the triplet."""
        return f"{self.subset_no:02d}" if self.subset_no is not None else str(self.triplet)


def resolve_target(text: str | int, catalog: Catalog | None = None) -> Target:
    triplet, no = parse_target(text, catalog or load_catalog())
    return Target(triplet, no)


# ---- catalogue logic (pure: no records needed) ---------------------------------------------------
def _candidates(cat: Catalog, target: Target) -> list[int]:
    """Classification subsets other than the target and its triplet twins."""
    return [no for no in cat.classification_subsets()
            if no != target.subset_no and cat.triplet_of_subset(no) != target.triplet]


def related_set(cat: Catalog, target: Target, direction: str) -> list[int]:
    """The minimal deterministic Related set of one direction type (see module docstring).

    Raises DesignError naming the missing element when the catalogue cannot supply it."""
    t = target.triplet
    cands = _candidates(cat, target)
    val = dict(zip(ELEMENTS, t))

    def share(no: int) -> set[str]:
        return cat.shared_elements(t, no)

    if direction in ("fixed_modality", "fixed_area", "fixed_task"):
        fixed = direction.removeprefix("fixed_")
        members = []
        for other in (e for e in ELEMENTS if e != fixed):
            hits = [no for no in cands if {fixed, other} <= share(no)]
            if not hits:
                raise DesignError(
                    f"{direction}: no other subset has {other} {val[other]} with {fixed} {val[fixed]}")
            members.append(hits[0])
        return sorted(set(members))
    if direction == "modality_area":
        areas = sorted({cat.triplet_of_subset(no).area for no in cat.classification_subsets()
                        if cat.triplet_of_subset(no).modality == t.modality})
        if areas != [t.area]:
            raise DesignError(f"modality_area: modality {t.modality} is not tied to one area "
                              f"(in the catalogue it appears with {', '.join(areas) or 'no area'})")
        pair = [no for no in cands if {"modality", "area"} <= share(no)]
        if not pair:
            raise DesignError(f"modality_area: no other subset has the pair {t.modality}-{t.area} with another task")
        task = [no for no in cands if "task" in share(no) and not ({"modality", "area"} <= share(no))]
        if not task:
            raise DesignError(f"modality_area: no subset outside {t.modality}-{t.area} has task {t.task}")
        return sorted({pair[0], task[0]})
    raise DesignError(f"unknown direction {direction!r}; known: {list(DIRECTIONS)}")


def scaleup_set(cat: Catalog, target: Target, arm: str) -> list[int]:
    cands = _candidates(cat, target)
    shared = {no: cat.shared_elements(target.triplet, no) for no in cands}
    if arm == "all_related":
        out = [no for no in cands if shared[no]]
    elif arm == "all_unrelated":
        out = [no for no in cands if not shared[no]]
    elif arm.startswith("related_without_"):
        element = arm.removeprefix("related_without_")
        out = [no for no in cands if shared[no] and element not in shared[no]]
    elif arm == "all_data":
        out = list(cands)
    else:
        raise DesignError(f"unknown scale-up arm {arm!r}")
    if not out:
        raise DesignError(f"{arm}: the catalogue has no such subset for target {target.triplet}")
    return out


def unrelated_pick(cat: Catalog, target: Target, k: int, seed: int) -> list[int]:
    """k Unrelated subsets for Baseline+: a seeded draw, so Baseline+ is not always the lowest
    numbers (subset 01, 02, ...) and is the same for every training seed of the target."""
    pool = [no for no in _candidates(cat, target) if not cat.shared_elements(target.triplet, no)]
    if not pool:
        raise DesignError(f"baseline_plus: every subset shares an element with {target.triplet}")
    rng = random.Random(f"{seed}-{target.label}")
    return sorted(rng.sample(pool, min(k, len(pool))))


# ---- records -------------------------------------------------------------------------------------
def _subset_col(records: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(records["subset_no"], errors="coerce")


def target_splits(records: pd.DataFrame, target: Target, dev_size: int, seed: int) -> dict[str, list[str]]:
    """record ids of the target's dev split (from its train records), its remaining train records,
    and its test split. Label-balanced dev draw; deterministic for the seed."""
    from medmat.mixture import resolve_mixture

    if target.subset_no is None:
        return {"dev": [], "train": [], "test": []}
    mine = records[_subset_col(records) == target.subset_no]
    train = mine[mine["split"] == "train"]
    test = sorted(mine.loc[mine["split"] == "test", "record_id"].astype(str))
    dev: list[str] = []
    if dev_size and len(train):
        # Never take more than half the train records: the in-distribution arm needs the rest.
        n = min(dev_size, len(train) // 2)
        _, man = resolve_mixture(train, {f"{target.subset_no:02d}": n}, seed=seed + 7919, cap_per_subset=None)
        dev = man["record_ids"]
    rest = sorted(set(train["record_id"].astype(str)) - set(dev))
    return {"dev": sorted(dev), "train": rest, "test": test}


def _even(subsets: list[int], total: int, cap: int) -> dict[str, int]:
    """`total` samples spread evenly over `subsets` (remainder to the lowest numbers), each <= cap."""
    n = len(subsets)
    base, extra = divmod(total, n)
    return {f"{no:02d}": min(cap, base + (1 if i < extra else 0)) for i, no in enumerate(sorted(subsets))}


def build_designs(records: pd.DataFrame, target: Target, cfg: DesignsConfig,
                  catalog: Catalog | None = None) -> dict[str, Any]:
    """All arms of one target: {"arms": {arm: manifest or {"status": "unavailable", "reason": ...}},
    "splits": {...}}. Each manifest is resolve_mixture's plus arm/target/members/note keys."""
    from medmat.mixture import MixtureError, resolve_mixture

    cat = catalog or load_catalog()
    splits = target_splits(records, target, cfg.dev_size, cfg.seed)
    not_dev = records[~records["record_id"].astype(str).isin(set(splits["dev"]))]
    arms: dict[str, dict[str, Any]] = {}

    def unavailable(arm: str, reason: str) -> None:
        # empty components keep the file a valid (empty) manifest for readers that glob *.json
        arms[arm] = {"arm": arm, "status": "unavailable", "reason": reason, "components": {}}

    def write(arm: str, spec: dict[str, int], **extra: Any) -> None:
        try:
            _, man = resolve_mixture(not_dev, {"components": spec}, seed=cfg.seed,
                                     cap_per_subset=cfg.cap_per_subset)
        except MixtureError as exc:
            unavailable(arm, f"{arm}: {exc}")
            return
        arms[arm] = {"arm": arm, "status": "ok", "target": target.label,
                     "triplet": str(target.triplet), **extra, **man}

    arms["baseline"] = {"arm": "baseline", "status": "ok", "target": target.label,
                        "triplet": str(target.triplet), "components": {}, "total": 0, "record_ids": [],
                        "note": "the untrained model: no training data"}
    related: dict[str, list[int]] = {}
    for d in DIRECTIONS:
        try:
            related[d] = related_set(cat, target, d)
        except DesignError as exc:
            unavailable(f"related_{d}", str(exc))
            continue
        write(f"related_{d}", {f"{no:02d}": cfg.samples_per_subset for no in related[d]},
              direction=d, members={f"{no:02d}": str(cat.triplet_of_subset(no)) for no in related[d]})
    # Baseline+ matches the Related arms' size: all are two members x samples_per_subset (the rule
    # above), so one Baseline+ serves every direction of the target.
    n_members = max((len(m) for m in related.values()), default=2)
    try:
        bp = unrelated_pick(cat, target, n_members, cfg.seed)
        write("baseline_plus", {f"{no:02d}": cfg.samples_per_subset for no in bp},
              members={f"{no:02d}": str(cat.triplet_of_subset(no)) for no in bp})
    except DesignError as exc:
        unavailable("baseline_plus", str(exc))
    arms["zero_overlap"] = {"arm": "zero_overlap", "status": "alias", "alias_of": "baseline_plus",
                            "note": "CrossMed's zero-overlap split shares no element with the target: "
                                    "the same data as baseline_plus, not trained twice"}
    for arm in SCALEUP_ARMS:
        try:
            subsets = scaleup_set(cat, target, arm)
        except DesignError as exc:
            unavailable(arm, str(exc))
            continue
        write(arm, _even(subsets, cfg.scaleup_total, cfg.cap_per_subset), cap_total=cfg.scaleup_total)

    # Limited target data: k target records + the companions of the first buildable Related arm
    # (or of Baseline+). Target records come from its train split minus the dev split.
    first = next((d for d in DIRECTIONS if d in related and arms[f"related_{d}"]["status"] == "ok"), None)
    if target.subset_no is None:
        unavailable("limited", f"limited: no subset has triplet {target.triplet}, so there is no target data")
        unavailable("in_distribution", f"in_distribution: no subset has triplet {target.triplet}")
    else:
        tkey = f"{target.subset_no:02d}"
        variants: dict[str, dict[str, Any]] = {}
        for companion, source in (("related", f"related_{first}" if first else None), ("unrelated", "baseline_plus")):
            if source is None or arms.get(source, {}).get("status") != "ok":
                continue
            comps = {k: v["requested"] for k, v in arms[source]["components"].items()}
            for k in sorted({int(x) for x in cfg.limited_k}):
                spec = dict(comps, **({tkey: k} if k else {}))
                _, man = resolve_mixture(not_dev, {"components": spec}, seed=cfg.seed,
                                         cap_per_subset=cfg.cap_per_subset)
                variants[f"{companion}_k{k}"] = {"companion": companion, "companion_arm": source, "k": k,
                                                 "k_selected": man["components"].get(tkey, {}).get("selected", 0),
                                                 **man}
        if variants:
            arms["limited"] = {"arm": "limited", "status": "ok", "target": target.label,
                               "triplet": str(target.triplet), "variants": variants}
        else:
            unavailable("limited", "limited: neither a Related nor a Baseline+ arm could be built")
        if splits["train"]:
            write("in_distribution", {tkey: len(splits["train"])},
                  note="upper bound: the target's own training data (minus its dev split)")
        else:
            unavailable("in_distribution", f"in_distribution: subset {tkey} has no train records")
    return {"target": target.label, "triplet": str(target.triplet), "subset_no": target.subset_no,
            "arms": arms, "splits": splits}


# ---- I/O -----------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic JSON write (medmat.io)."""
    return atomic_write_json(path, data, indent=1)


def write_designs(designs: list[dict[str, Any]], out_dir: str | os.PathLike, cfg: DesignsConfig) -> dict[str, Any]:
    """One folder per target: <arm>.json per arm, splits.json; plus the designs.json index."""
    out = Path(out_dir)
    index: dict[str, Any] = {"config": dataclasses.asdict(cfg), "arms": list(ALL_ARMS), "targets": {}}
    for d in designs:
        tdir = out / d["target"]
        entry = {"triplet": d["triplet"], "subset_no": d["subset_no"], "arms": {},
                 "splits": {k: len(v) for k, v in d["splits"].items()}}
        write_json(tdir / "splits.json", {"target": d["target"], "triplet": d["triplet"], **d["splits"]})
        # dev.json: the search's objective split (medmat.search reads record_ids from it)
        write_json(tdir / "dev.json", {"target": d["target"], "split": "dev", "record_ids": d["splits"]["dev"]})
        for arm, man in d["arms"].items():
            write_json(tdir / f"{arm}.json", man)
            summary = {"status": man["status"], "manifest": str((tdir / f"{arm}.json").as_posix())}
            if man["status"] == "ok" and "components" in man:
                summary["components"] = {k: v["selected"] for k, v in man["components"].items()}
                summary["total"] = man["total"]
            for key in ("reason", "alias_of", "direction", "members"):
                if key in man:
                    summary[key] = man[key]
            entry["arms"][arm] = summary
        index["targets"][d["target"]] = entry
    write_json(out / "designs.json", index)
    return index


def load_arm(designs_dir: str | os.PathLike, target_label: str, arm: str) -> dict[str, Any]:
    path = Path(designs_dir) / target_label / f"{arm}.json"
    if not path.exists():
        raise DesignError(f"{path}: no such design (run `medmat designs` for target {target_label})")
    return json.loads(path.read_text(encoding="utf-8"))


def target_label(text: str | int, catalog: Catalog | None = None) -> str:
    return resolve_target(text, catalog).label


def load_config(params_path: str | os.PathLike = "params.yaml") -> DesignsConfig:
    if not Path(params_path).exists():
        return DesignsConfig()
    return from_dict(DesignsConfig, load_params(params_path).get("designs"), where=f"{params_path}: section 'designs'")


def parse_targets(text: str) -> list[str]:
    """'3,28,6' or '[3, 28, 6]' or 'CT-Lung-COVID,6' -> list of target strings."""
    return [t.strip().strip("'\"") for t in str(text).strip().strip("[]").split(",") if t.strip()]


def _param_targets(params_path: str) -> list[str]:
    params = load_params(params_path) if Path(params_path).exists() else {}
    targets = (params.get("experiment") or {}).get("targets")
    if not targets:
        raise ConfigError(f"{params_path}: no --targets given and no experiment.targets in the params file")
    return [str(t) for t in (targets if isinstance(targets, list) else parse_targets(targets))]


# ---- CLI -----------------------------------------------------------------------------------------
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", required=True, help="records table (medmat ingest)")
    parser.add_argument("--targets", help="comma-separated subset numbers or triplets, e.g. 3,28,6 "
                        "(default: experiment.targets of --params, so `dvc exp run -S experiment.targets=[...]` works)")
    parser.add_argument("--out", required=True, help="output folder (one sub-folder per target + designs.json)")
    parser.add_argument("--params", default="params.yaml", help="params file with the `designs:` section")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.params)
        cat = load_catalog()
        texts = parse_targets(args.targets) if args.targets else _param_targets(args.params)
        targets = [resolve_target(t, cat) for t in texts]
    except (ConfigError, ValueError, LookupError) as exc:
        print(f"medmat designs: {exc}")
        return 2
    try:
        records = pd.read_parquet(args.records)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is the user's input problem
        print(f"medmat designs: cannot read records table {args.records}: {exc}")
        return 2
    designs = [build_designs(records, t, cfg, cat) for t in targets]
    index = write_designs(designs, args.out, cfg)
    for label, entry in index["targets"].items():
        ok = [a for a, s in entry["arms"].items() if s["status"] == "ok"]
        print(f"target {label} {entry['triplet']}: {len(ok)} arms; dev/train/test records "
              f"{entry['splits']['dev']}/{entry['splits']['train']}/{entry['splits']['test']}")
        for arm, s in entry["arms"].items():
            if s["status"] == "unavailable":
                print(f"  - {arm}: {s['reason']}")
    return 0

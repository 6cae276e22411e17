"""The arms of one target as mixture manifests, and the files `medmat designs` writes.

For a target (a subset), from the catalogue (`rules`) and the records table:

- the target's *dev* split (label-balanced draw from its train records; model selection reads it,
  never the test split) and its test split;
- *leakage*: every training record whose image is a dev/test image of the target (same sha256, or a
  perceptual hash within `phash_distance` bits) is dropped from every arm (`leakage.py`);
- per selected Related combination: `related` (samples_per_subset from each member) and
  `baseline_plus` at exactly the Related arm's SELECTED total, from Unrelated subsets (a seeded draw
  per target; a member short of records passes its shortfall to the others: `mixture.allocate`);
  the index says `matched: false` and by how much when even that cannot match, and which of the
  target's labels each arm's training answers name (`labels_seen`): a model whose text side starts
  untrained (the tiny one) has no name for a label it never saw answered;
- scale-up arms (the paper's Figure 4) at exactly one total `scaleup_total` each, where the data allow;
- limited target data (k target records + the companions of a Related combination or of its
  Baseline+) and in_distribution (the target's own training data: an upper bound).

Baseline (the untrained model) has no data and no manifest.

Layout (one folder per target): index.json, dev.json, <combination id>/{related,baseline_plus}.json,
scaleup/<arm>.json, limited/<variant>.json, in_distribution.json, splits.json (record ids by split).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from pathlib import Path
from typing import Any

import pandas as pd

from medmat.catalog import Catalog, load_catalog, parse_target
from medmat.catalog.tasks import TAXONOMIES
from medmat.designs import rules
from medmat.designs.leakage import leaking_records
from medmat.io import atomic_write_json
from medmat.mixture import MixtureError, resolve_mixture
from medmat.names import subset_key

# "related_without_*" (not "_wo_"): the search's warm start takes arms named related* / all_related
# and leaves out names containing "without" (the ablations answer another question).
SCALEUP_ARMS = ("all_related", "all_unrelated", "related_without_modality", "related_without_area",
                "related_without_task", "all_data")
COMBINATION_ARMS = ("related", "baseline_plus")
ALL_ARMS = ("baseline",) + COMBINATION_ARMS + SCALEUP_ARMS + ("limited", "in_distribution")


@dataclasses.dataclass
class DesignsConfig:
    """params.yaml `designs:` section."""

    samples_per_subset: int = 3000   # per Related member (paper: 3,000)
    scaleup_total: int = 15000       # exact total of every scale-up arm (paper: a 15,000 cap)
    cap_per_subset: int = 3000       # no subset gives more than this (paper: 3,000)
    limited_k: list = dataclasses.field(default_factory=lambda: [0, 500, 1000, 2000])  # paper: 0..2,000
    dev_size: int = 100              # target train records held out as the dev split (model selection)
    seed: int = 0                    # record selection (training seeds vary the model, not the data)
    task_taxonomy: str = "paper"     # paper: coarse tasks (Appendix B.1) | fine: the catalogue's task kinds
    # near-duplicate leakage: largest Hamming distance of 64-bit perceptual hashes (-1: exact copies only)
    phash_distance: int = 4
    directions: list = dataclasses.field(default_factory=lambda: list(rules.DIRECTIONS))

    def __post_init__(self):
        for name in ("samples_per_subset", "scaleup_total", "cap_per_subset"):
            if int(getattr(self, name)) <= 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.dev_size < 0:
            raise ValueError(f"dev_size must be >= 0, got {self.dev_size}")
        if any(int(k) < 0 for k in self.limited_k):
            raise ValueError(f"limited_k must be non-negative, got {self.limited_k}")
        if self.task_taxonomy not in TAXONOMIES:
            raise ValueError(f"task_taxonomy must be one of {list(TAXONOMIES)}, got {self.task_taxonomy!r}")
        if not -1 <= int(self.phash_distance) < 64:
            raise ValueError(f"phash_distance must be in 0..63 (or -1: no near-duplicate check), got {self.phash_distance}")
        bad = [d for d in self.directions if d not in rules.DIRECTIONS]
        if bad:
            raise ValueError(f"directions: unknown {bad}; known: {list(rules.DIRECTIONS)}")


class DesignError(ValueError):
    """A target or arm that cannot be built; the message names what is missing."""


@dataclasses.dataclass
class Target:
    triplet: rules.Triplet
    subset_no: int | None

    @property
    def label(self) -> str:
        """Folder name: the zero-padded subset number, else the triplet."""
        return subset_key(self.subset_no) if self.subset_no is not None else str(self.triplet)


def resolve_target(text: str | int, catalog: Catalog | None = None) -> Target:
    triplet, no = parse_target(text, catalog or load_catalog())
    return Target(triplet, no)


def target_label(text: str | int, catalog: Catalog | None = None) -> str:
    return resolve_target(text, catalog).label


# ---- combinations of a target --------------------------------------------------------------------
def combinations(target: Target, cfg: DesignsConfig, catalog: Catalog | None = None) -> list[rules.Combination]:
    """Every valid combination of `target` (cfg.directions, cfg.task_taxonomy), paper rows marked."""
    cat = catalog or load_catalog()
    view = rules.target_view(cat, target.triplet, target.subset_no, cfg.task_taxonomy)
    return rules.match_paper_rows(rules.enumerate_combinations(cat, view, cfg.task_taxonomy, tuple(cfg.directions)))


def select(combos: list[rules.Combination], selection: Any, label: str) -> list[rules.Combination]:
    """experiment.combinations: "paper" (one reading per Table 3 row), "all", or a list of ids
    ("fixed_area-04-28", or "03/fixed_area-04-28" for one target only)."""
    if selection == "paper":
        return [c for c in combos if c.paper_primary]
    if selection == "all":
        return list(combos)
    wanted = {str(s).split("/", 1)[-1] for s in selection if "/" not in str(s) or str(s).split("/", 1)[0] == label}
    return [c for c in combos if c.id in wanted]


# ---- records -------------------------------------------------------------------------------------
def _subset_col(records: pd.DataFrame) -> pd.Series:
    return pd.to_numeric(records["subset_no"], errors="coerce")


def target_splits(records: pd.DataFrame, target: Target, dev_size: int, seed: int) -> tuple[dict[str, list[str]], dict | None]:
    """({"dev", "train", "test"} record ids of the target, the dev manifest). The dev split is a
    label-balanced draw from its train records (at most half of them), deterministic for the seed."""
    if target.subset_no is None:
        return {"dev": [], "train": [], "test": []}, None
    mine = records[_subset_col(records) == target.subset_no]
    train = mine[mine["split"] == "train"]
    test = sorted(mine.loc[mine["split"] == "test", "record_id"].astype(str))
    dev, dev_manifest = [], None
    if dev_size and len(train):
        n = min(dev_size, len(train) // 2)  # the in-distribution arm needs the rest
        _, dev_manifest = resolve_mixture(train, {target.label: n}, seed=seed + 7919, cap_per_subset=None)
        dev = dev_manifest["record_ids"]
    rest = sorted(set(train["record_id"].astype(str)) - set(dev))
    return {"dev": sorted(dev), "train": rest, "test": test}, dev_manifest


def answer_labels(records: pd.DataFrame) -> dict[str, str]:
    """The labels these records ask for (their answers' texts), casefolded -> as first written."""
    if "answer_text" not in records:
        return {}
    out: dict[str, str] = {}
    for text in records["answer_text"].dropna().astype(str).str.strip():
        out.setdefault(text.casefold(), text)
    return out


def _even(members: list[int], total: int) -> dict[str, int]:
    """Equal requests summing to at least `total` (the exact total is resolve_mixture's job)."""
    return {subset_key(no): math.ceil(total / len(members)) for no in members}


@dataclasses.dataclass
class _Arms:
    """The manifests of one target as they are built: every arm resolves from the same pool (train
    records outside the target's dev split) with the same exclusions (leaking records)."""

    pool: pd.DataFrame
    exclude: set[str]
    cfg: DesignsConfig
    head: dict[str, Any]
    target_labels: dict[str, str] = dataclasses.field(default_factory=dict)  # casefolded -> as written
    files: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)
    dropped: list[dict[str, str]] = dataclasses.field(default_factory=list)

    def labels_seen(self, man: dict[str, Any]) -> list[str]:
        """The target's labels that some training record of manifest `man` has as its answer."""
        answers = answer_labels(self.pool[self.pool["record_id"].astype(str).isin(set(man["record_ids"]))])
        return sorted(text for key, text in self.target_labels.items() if key in answers)

    def resolve(self, name: str, spec: dict[str, int], exact_total: int | None = None, **extra: Any) -> dict | None:
        """The manifest of arm `name`, or None with the reason in `dropped`."""
        try:
            _, man = resolve_mixture(self.pool, {"components": spec}, seed=self.cfg.seed,
                                     cap_per_subset=self.cfg.cap_per_subset, exact_total=exact_total,
                                     exclude=self.exclude)
        except MixtureError as exc:
            self.drop(name, str(exc))
            return None
        leaked = man.pop("excluded", 0)
        return {"arm": name, **self.head, **extra, **man, "leakage_dropped": leaked}

    def drop(self, name: str, reason: str) -> None:
        self.dropped.append({"id": name, "reason": reason})


def _combination(b: _Arms, c: rules.Combination, unrelated: list[int], cat: Catalog) -> dict[str, Any] | None:
    """Related + Baseline+ of one combination; its index entry (None if it cannot be built)."""
    members = c.members(cat)
    rel = b.resolve(f"{c.id}/related", {k: b.cfg.samples_per_subset for k in members},
                    combination=c.id, direction=c.direction, members=members)
    if rel is None:
        return None
    bp_members = unrelated[:len(c.related)]
    if not bp_members:
        b.drop(f"{c.id}/baseline_plus", f"baseline_plus: no Unrelated subset of target {b.head['triplet']} "
               "(sharing no element) has training records")
        return None
    # Baseline+ at exactly the Related arm's SELECTED total (what it actually trains on)
    total = rel["total"]
    bp = b.resolve(f"{c.id}/baseline_plus", _even(bp_members, total), exact_total=total, combination=c.id,
                   members={subset_key(no): str(cat.triplet_of_subset(no)) for no in bp_members})
    if bp is None:
        return None
    b.files[f"{c.id}/related.json"], b.files[f"{c.id}/baseline_plus.json"] = rel, bp
    row = rules.paper_row(c.paper_row) if c.paper_row else None
    return {
        "id": c.id, "direction": c.direction, "related": [subset_key(n) for n in c.related], "members": members,
        "coarse_task": c.coarse_task, "coarse_tasks": list(c.roles),
        "paper_row": row.row if row else None, "paper_rows": list(c.paper_rows),
        "paper_primary": c.paper_primary, "primary_rows": list(c.primary_rows),
        "paper": ({"row": row.row, "names": row.names, "baseline": row.baseline,
                   "baseline_plus": row.baseline_plus, "trained": row.trained, "cg_helps": row.cg_helps}
                  if row else None),
        "arms": {a: f"{c.id}/{a}.json" for a in COMBINATION_ARMS},
        "selected_total": total, "baseline_plus_total": bp["total"], "matched": bool(bp["matched"]),
        "shortfall": int(bp["shortfall"]), "leakage_dropped": rel["leakage_dropped"] + bp["leakage_dropped"],
        "target_labels": sorted(b.target_labels.values()),
        "labels_seen": {"related": b.labels_seen(rel), "baseline_plus": b.labels_seen(bp)},
    }


def _scaleup_members(shares: dict[int, set[str]], arm: str) -> list[int]:
    """Figure 4's arms: Related = sharing at least one element; "without X" = Related minus those sharing X."""
    if arm == "all_related":
        return [no for no, s in shares.items() if s]
    if arm == "all_unrelated":
        return [no for no, s in shares.items() if not s]
    if arm == "all_data":
        return list(shares)
    element = arm.removeprefix("related_without_")
    return [no for no, s in shares.items() if s and element not in s]


def _limited(b: _Arms, entries: list[dict[str, Any]], tkey: str) -> tuple[dict[str, str], str | None]:
    """k target records + the companions of one combination (Related) or of its Baseline+ (Unrelated).
    The combination: the one whose paper row gained most (the paper's Figure 5 trains strong rows),
    else the first built."""
    def paper_gain(e: dict[str, Any]) -> float:
        p = e["paper"]
        return p["trained"] - max(p["baseline"], p["baseline_plus"]) if p else float("-inf")

    source = max(entries, key=paper_gain, default=None)
    if source is None:
        b.drop("limited", "limited: no Related combination of this target was selected and built")
        return {}, None
    out: dict[str, str] = {}
    for companion, arm in (("related", "related"), ("unrelated", "baseline_plus")):
        comps = {k: v["selected"] for k, v in b.files[source["arms"][arm]]["components"].items()}
        for k in sorted({int(x) for x in b.cfg.limited_k}):
            name = f"{companion}_k{k}"
            man = b.resolve(f"limited/{name}", dict(comps, **({tkey: k} if k else {})),
                            companion=companion, companion_arm=f"{source['id']}/{arm}", k=k)
            if man is not None:
                man["k_selected"] = man["components"].get(tkey, {}).get("selected", 0)
                b.files[f"limited/{name}.json"] = man
                out[name] = f"limited/{name}.json"
    return out, source["id"]


def build_target(records: pd.DataFrame, target: Target, cfg: DesignsConfig, selection: Any = "paper",
                 catalog: Catalog | None = None) -> dict[str, Any]:
    """Every arm of one target, in memory: {"index": index.json's content, "files": {relative path:
    manifest}}; `write_target` writes them."""
    cat = catalog or load_catalog()
    view = rules.target_view(cat, target.triplet, target.subset_no, cfg.task_taxonomy)
    splits, dev_manifest = target_splits(records, target, cfg.dev_size, cfg.seed)
    leaks = leaking_records(records, splits["dev"] + splits["test"], cfg.phash_distance)
    pool = records[(records["split"] == "train") & ~records["record_id"].astype(str).isin(set(splits["dev"]))]
    present = set(_subset_col(pool).dropna().astype(int))
    b = _Arms(pool, set(leaks), cfg, {"target": target.label, "triplet": str(target.triplet)},
              target_labels=answer_labels(records[records["record_id"].astype(str).isin(set(splits["test"]))]))

    # Unrelated subsets in a seeded order per target: Baseline+ takes the first k, the same for every
    # combination and training seed of the target.
    unrelated = [no for no in rules.unrelated_pool(cat, view, cfg.task_taxonomy) if no in present]
    random.Random(f"{cfg.seed}-{target.label}").shuffle(unrelated)
    combos = combinations(target, cfg, cat)
    entries = [e for c in select(combos, selection, target.label)
               if (e := _combination(b, c, unrelated, cat)) is not None]

    arms: dict[str, Any] = {}
    totals: dict[str, dict[str, Any]] = {}

    def keep(name: str, path: str, man: dict | None) -> None:
        if man is not None:
            b.files[path], arms[name] = man, path
            totals[name] = {"selected_total": man["total"], "matched": man.get("matched", True),
                            "shortfall": man.get("shortfall", 0), "leakage_dropped": man["leakage_dropped"]}

    # Scale-up: every arm at exactly scaleup_total where its subsets hold enough (else matched: false)
    shares = {no: rules.shares_any(cat, view, no, cfg.task_taxonomy) for no in rules.candidates(cat, view)}
    for arm in SCALEUP_ARMS:
        members = [no for no in _scaleup_members(shares, arm) if no in present]
        if not members:
            b.drop(f"scaleup/{arm}", f"{arm}: no such subset with training records for target {target.triplet}")
            continue
        keep(arm, f"scaleup/{arm}.json", b.resolve(f"scaleup/{arm}", _even(members, cfg.scaleup_total),
                                                   exact_total=cfg.scaleup_total, cap_total=cfg.scaleup_total))

    limited_from = None
    if target.subset_no is None:
        b.drop("limited", f"no subset has triplet {target.triplet}: no target data")
        b.drop("in_distribution", f"no subset has triplet {target.triplet}")
    else:
        limited, limited_from = _limited(b, entries, target.label)
        if limited:
            arms["limited"] = limited
        if splits["train"]:
            keep("in_distribution", "in_distribution.json",
                 b.resolve("in_distribution", {target.label: len(splits["train"])},
                           note="upper bound: the target's own training data (minus its dev split)"))
        else:
            b.drop("in_distribution", f"in_distribution: subset {target.label} has no train records")

    if dev_manifest is not None:
        b.files["dev.json"] = {"arm": "dev", "role": "dev", **b.head, **dev_manifest}
    # the target's record ids by split, for readers that predate dev.json (the search's dev split)
    b.files["splits.json"] = {**b.head, **splits}
    index = {
        **b.head, "subset_no": target.subset_no, "task_taxonomy": cfg.task_taxonomy, "roles": list(view.roles),
        "selection": selection, "valid_combinations": len(combos),
        "combinations": entries, "dropped": b.dropped, "arms": arms, "arm_totals": totals,
        "limited_combination": limited_from,
        "dev": "dev.json" if dev_manifest is not None else None,
        "dev_record_count": len(splits["dev"]), "train_record_count": len(splits["train"]),
        "test_record_count": len(splits["test"]),
        "leakage": {"exact": sum(v == "exact" for v in leaks.values()),
                    "near": sum(v == "near" for v in leaks.values()), "phash_distance": cfg.phash_distance},
    }
    return {"index": index, "files": b.files}


# ---- I/O -----------------------------------------------------------------------------------------
def write_json(path: str | os.PathLike, data: Any) -> Path:
    """Atomic JSON write (medmat.io)."""
    return atomic_write_json(path, data, indent=1)


def write_target(design: dict[str, Any], out_dir: str | os.PathLike) -> Path:
    """Write one target's manifests and its index.json under out_dir/<target>/; stale files of an
    earlier run (a combination no longer selected) are removed so no reader picks them up."""
    tdir = Path(out_dir) / design["index"]["target"]
    keep = {tdir / rel for rel in design["files"]} | {tdir / "index.json"}
    if tdir.is_dir():
        for old in tdir.rglob("*.json"):
            if old not in keep:
                old.unlink()
    for rel, man in design["files"].items():
        write_json(tdir / rel, man)
    return write_json(tdir / "index.json", design["index"])


def load_index(designs_dir: str | os.PathLike, target: str) -> dict[str, Any]:
    path = Path(designs_dir) / target / "index.json"
    if not path.exists():
        raise DesignError(f"{path}: no designs for target {target} (run `medmat designs`)")
    return json.loads(path.read_text(encoding="utf-8"))


def load_arm(designs_dir: str | os.PathLike, target_label: str, arm: str) -> dict[str, Any]:
    """The manifest of one arm path ("fixed_area-04-28/related", "scaleup/all_related", "dev", ...)."""
    path = Path(designs_dir) / target_label / f"{arm}.json"
    if not path.exists():
        raise DesignError(f"{path}: no such design (run `medmat designs` for target {target_label})")
    return json.loads(path.read_text(encoding="utf-8"))


def warm_start_mixtures(designs_dir: str | os.PathLike, target: str) -> dict[str, dict[str, int]]:
    """{arm path: {subset: selected count}} of the target's Related combinations and All Related:
    the mixtures a search may try first (not Baseline+, ablations, limited or in-distribution)."""
    index = load_index(designs_dir, target)
    out: dict[str, dict[str, int]] = {}
    paths = [c["arms"]["related"] for c in index.get("combinations", [])]
    if "all_related" in index.get("arms", {}):
        paths.append(index["arms"]["all_related"])
    for rel in paths:
        man = load_arm(designs_dir, target, rel.removesuffix(".json"))
        out[rel.removesuffix(".json")] = {k: int(v["selected"]) for k, v in man["components"].items()}
    return out

"""Med-MAT-mini, the world writer: plans one stand-in per classification dataset and writes the tree.

What the images look like (modality, area, lesion patterns, the entangled control) is medmat.data.synth;
this module decides how many records each dataset gets and writes them in the release's shape:

- `shape: release` (default), as the public Med-MAT is published: only `-train.json` files;
  `Original_Medical_Datasets/ori--NN-train.json` holds all of a dataset's records (ids 1..n), and
  `Aggregated_Subsets/Subset--NN-train.json` concatenates its datasets' records, each dataset keeping
  its own ids 1..n. Ingest derives the test splits; the world declares the share it was built with
  (`test_fraction` in MEDMAT_MINI.json: test_per_subset / (train_per_subset + test_per_subset)), so the
  derived test sets are as large as the legacy shape's written ones.
- `shape: legacy`: the older shape with `-train.json` and `-test.json` files and subset ids renumbered,
  so ingest's handling of shipped test splits stays tested.

`MEDMAT_MINI.json` at the data root marks the tree as generated ({"generator": "medmat synth", "seed",
"entangled", "shape", "test_fraction", ...}); ingest records the world ("mini" / "mini-entangled") from it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from medmat.data import qa
from medmat.data.medmat_format import relative_path
from medmat.data.synth import (
    FULL_RECORDS, PATTERN_KINDS, PATTERN_POSITIONS, PATTERN_SIZES, SIZE, Nuisance, Scene, _rng, encode_png,
    null_look, null_looks, pattern_table, subset_labels,
)

log = logging.getLogger(__name__)
SHAPES = ("release", "legacy")
# A null subset's records, times the world's per-subset counts: its test questions are the negative
# control's only independent draws (every image its own look), and at 210 a target's chance-level
# accuracy moves by ~1.7 points (binomial sd), too much for a +-5 equivalence band over a few targets.
NULL_SCALE = 4
MARKER = "MEDMAT_MINI.json"


@dataclass
class SynthParams:
    """`synth:` section of params.yaml."""

    seed: int = 0
    entangled: bool = False
    shared_normal: bool = True       # real Med-MAT shares "Normal" across tasks (a known leak)
    scale: str = "mini"              # mini | full (full also writes ~2.36M-record metadata)
    image_size: int = SIZE
    train_per_subset: int = 360      # mini training records per subset (the paper caps at 3000)
    test_per_subset: int = 210       # label-balanced test records per subset (~+-3.5 points at 200)
    full_records: int = FULL_RECORDS
    subsets: list[int] | None = None  # only these classification subsets (default: all of 01-37)
    shape: str = "release"           # release: -train.json files only (as published) | legacy: + -test.json
    # Entangled world only: every image of these subsets shows a look drawn at random from the lesion
    # patterns no (triplet, label) of the world shows, so their labels have no look at all (the
    # negative control's targets; world_params sets them to experiment.targets). None: none.
    null_subsets: list[int] | None = None

    def __post_init__(self) -> None:
        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}")
        if self.scale not in ("mini", "full"):
            raise ValueError(f"scale must be 'mini' or 'full', got {self.scale!r}")
        if self.image_size < 16:
            raise ValueError("image_size must be >= 16")
        if self.train_per_subset < 1 or self.test_per_subset < 1:
            raise ValueError("train_per_subset and test_per_subset must be >= 1")
        if self.null_subsets and not self.entangled:
            raise ValueError("null_subsets applies to the entangled world only (entangled: true)")


@dataclass(frozen=True)
class DatasetPlan:
    dataset_no: int
    subset_no: int
    modality: str
    area: str
    task: str
    folder: str
    labels: tuple[str, ...]
    n_train: int
    n_test: int


def plan_world(params: SynthParams) -> list[DatasetPlan]:
    """One plan per catalogue dataset of the classification subsets: triplet, labels, sample counts.

    A subset's training and test budgets are spread over its datasets; test sets come in whole
    label-balanced groups, at least one group per dataset. A null subset gets NULL_SCALE times both.
    """
    from medmat.catalog import load_catalog

    cat = load_catalog()
    plans = []
    chosen = cat.classification_subsets()
    if params.subsets is not None:
        unknown = sorted(set(params.subsets) - set(chosen))
        if unknown:
            raise ValueError(f"subsets {unknown} are not classification subsets (01-37)")
        chosen = sorted(set(params.subsets))
    for s in chosen:
        sub = cat.subset(s)
        labels = tuple(subset_labels(s, sub.task, params.shared_normal))
        nos = sorted(sub.dataset_nos)
        n = len(nos)
        scale = NULL_SCALE if s in (params.null_subsets or ()) else 1
        n_train_total = params.train_per_subset * scale
        groups = max(1, params.test_per_subset * scale // len(labels))
        for j, d in enumerate(nos):
            info = cat.dataset(d)
            n_train = max(len(labels), n_train_total // n + (j < n_train_total % n))
            g = max(1, groups // n + (j < groups % n))
            plans.append(DatasetPlan(d, s, info.modality, info.area, sub.task, qa.folder_name(d, info.name),
                                     labels, n_train, g * len(labels)))
    return plans


def labels_by_kind(plans: list[DatasetPlan]) -> dict[tuple[str, str, str], set[str]]:
    """{(modality, area, task): labels} over the planned datasets (the entangled look is per triplet)."""
    out: dict[tuple[str, str, str], set[str]] = {}
    for p in plans:
        out.setdefault((p.modality, p.area, p.task), set()).update(p.labels)
    return out


def generate_dataset(plan: DatasetPlan, patterns: dict, params: SynthParams,
                     null_pool: list[tuple] = ()) -> tuple[dict[str, bytes], dict[str, list[dict]]]:
    """Images (relative path -> PNG bytes) and QA records {"train": [...], "test": [...]} of one dataset.
    A dataset of a null subset draws each image's look from `null_pool`, whatever its label."""
    from medmat.catalog import load_catalog

    scene = Scene(plan.modality, plan.area, Nuisance.draw(params.seed, plan.dataset_no), params.image_size)
    sub = load_catalog().subset(plan.subset_no)
    templates = qa.make_templates(sub.modality, sub.area, sub.task)
    images: dict[str, bytes] = {}
    pairs: list[qa.Pair] = []
    counter = {lab: 0 for lab in plan.labels}
    for split, n in (("train", plan.n_train), ("test", plan.n_test)):
        for i in range(n):
            label = plan.labels[i % len(plan.labels)]   # balanced by construction
            k = counter[label]
            counter[label] += 1
            rng = _rng(params.seed, params.entangled, "img", plan.dataset_no, label, k)
            pattern = patterns[(plan.modality, plan.area, plan.task, label)]
            if plan.subset_no in (params.null_subsets or ()):
                pattern = null_look(null_pool, params.seed, plan.dataset_no, label, k)
            arr = scene.render(pattern, rng)
            rel = f"med-mat/{plan.folder}/{label.replace('/', '_')}/{k}.png"
            images[rel] = encode_png(arr)
            pairs.append(qa.Pair(rel, label, split))
    out = qa.build_dataset_qa(pairs, plan.labels, templates, plan.dataset_no, params.seed,
                              train_cap=plan.n_train, test_cap=plan.n_test)
    return images, out


def _write_bytes(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)


def _dump(path: Path, records: list[dict]) -> None:
    from medmat.data.medmat_format import write_records

    write_records(path, records)


def generate(out: str | os.PathLike, params: SynthParams, progress: bool = True) -> dict:
    """Write Med-MAT-mini under `out` (which must not exist or be empty); return a summary dict.

    The world is built in a sibling temporary folder and moved into place at the end, so a crash
    never leaves a half-written data root that later stages would take for a real one.
    """
    from tqdm import tqdm

    out = Path(out)
    if out.exists() and any(out.iterdir()):
        raise FileExistsError(f"{out}: exists and is not empty; choose a new folder or remove it")
    t0 = time.perf_counter()
    plans = plan_world(params)
    patterns = pattern_table(labels_by_kind(plans), params.seed, params.entangled)
    pool = null_looks(patterns) if params.null_subsets else []
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    by_subset: dict[int, dict[str, list[list[dict]]]] = {}
    per_dataset: dict[int, dict[str, list[dict]]] = {}
    n_images = 0
    n_bytes = 0
    try:
        for plan in tqdm(plans, desc="synth", unit="dataset", disable=not progress):
            images, recs = generate_dataset(plan, patterns, params, pool)
            for rel, data in images.items():
                _write_bytes(tmp / rel, data)
                n_bytes += len(data)
            n_images += len(images)
            per_dataset[plan.dataset_no] = recs
            for split, rs in files_of_dataset(recs, params.shape).items():
                by_subset.setdefault(plan.subset_no, {}).setdefault(split, []).append(rs)
                _dump(tmp / relative_path("dataset", plan.dataset_no, split), rs)
        for s, recs in sorted(by_subset.items()):
            for split, parts in recs.items():
                _dump(tmp / relative_path("subset", s, split), subset_file(parts, params.shape))
        full = None
        if params.scale == "full":
            from medmat.data.synth_full import write_full_metadata

            full = write_full_metadata(tmp, plans, per_dataset, params.full_records, params.shape,
                                       progress=progress)
        _write_bytes(tmp / MARKER, (json.dumps(world_card(plans, patterns, params, pool), indent=1,
                                               sort_keys=True) + "\n").encode())
        if out.exists():
            out.rmdir()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    n_records = sum(len(r) for recs in per_dataset.values() for r in recs.values())
    summary = {"datasets": len(plans), "subsets": len(by_subset), "images": n_images, "records": n_records,
               "image_mb": round(n_bytes / 2**20, 1), "seconds": round(time.perf_counter() - t0, 1)}
    if full:
        summary["full_records"] = full
    return summary


def files_of_dataset(recs: dict[str, list[dict]], shape: str) -> dict[str, list[dict]]:
    """A dataset's files by split: release = one train file with all its records, ids 1..n (the
    release's "train" is the whole source dataset); legacy = its train and test files."""
    if shape == "legacy":
        return recs
    every = recs["train"] + recs["test"]
    return {"train": [{**r, "id": i + 1} for i, r in enumerate(every)]}


def subset_file(parts: list[list[dict]], shape: str) -> list[dict]:
    """A subset file from its datasets' files: release = concatenated, each dataset keeping its own ids
    (as published); legacy = concatenated and renumbered 1..n."""
    rows = [r for part in parts for r in part]
    return rows if shape == "release" else [{**r, "id": i + 1} for i, r in enumerate(rows)]


def test_fraction(plans: list[DatasetPlan]) -> float:
    """The share of test records the world was built with (ingest derives release-shape splits at it)."""
    total = sum(p.n_train + p.n_test for p in plans)
    return round(sum(p.n_test for p in plans) / total, 4) if total else 0.1


def world_card(plans: list[DatasetPlan], patterns: dict, params: SynthParams, null_pool: list[tuple] = ()) -> dict:
    """What the world is (written as MEDMAT_MINI.json): parameters, labels, lesion pattern per label and
    the looks the null subsets' images draw from."""
    def name(pat: tuple | None) -> str | None:
        return None if pat is None else f"{PATTERN_KINDS[pat[0]]}/{PATTERN_SIZES[pat[1]]}/{PATTERN_POSITIONS[pat[2]]}"

    return {
        "generator": "medmat synth", "seed": params.seed, "entangled": params.entangled,
        "shape": params.shape, "test_fraction": test_fraction(plans),
        # null_subsets only where set: a world without them keeps the card (and its DVC hash) it had
        "params": {k: getattr(params, k) for k in params.__dataclass_fields__
                   if k != "null_subsets" or params.null_subsets},
        "datasets": {str(p.dataset_no): {"subset": p.subset_no, "triplet": f"{p.modality}-{p.area}-{p.task}",
                                         "folder": p.folder, "labels": list(p.labels),
                                         "train": p.n_train, "test": p.n_test} for p in plans},
        # "modality|area|task|label" (the keys of synth.pattern_table) -> kind/size/position
        "patterns": {"|".join(key): name(pat) for key, pat in sorted(patterns.items())},
        **({"null_looks": [name(pat) for pat in null_pool]} if null_pool else {}),
    }


# ------------------------------------------------------------------------------------------- CLI
def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="data root to create (must not exist or be empty)")
    parser.add_argument("--params", type=Path, default=Path("params.yaml"),
                        help="params file whose `synth:` section gives the defaults (if it exists)")
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--entangled", action="store_true", default=None,
                        help="negative control: lesion look depends on the modality")
    parser.add_argument("--null-subsets", type=int, nargs="+", default=None, metavar="N",
                        help="with --entangled: every image of these subsets draws its look at random from "
                             "the looks no other subset shows (the negative control's targets)")
    parser.add_argument("--scale", choices=("mini", "full"), default=None,
                        help="full: also write ~2.36M-record metadata over the mini images")
    parser.add_argument("--no-shared-normal", dest="shared_normal", action="store_false", default=None,
                        help="give every task kind its own negative label instead of a shared 'Normal'")
    parser.add_argument("--train-per-subset", type=int, default=None)
    parser.add_argument("--test-per-subset", type=int, default=None)
    parser.add_argument("--full-records", type=int, default=None, help="records of the full-scale metadata")
    parser.add_argument("--legacy-shape", dest="shape", action="store_const", const="legacy", default=None,
                        help="the older shape: -train and -test files, subset ids renumbered "
                             "(default: params synth.shape, else the release's shape)")


def params_from_args(args: argparse.Namespace) -> SynthParams:
    from medmat.config import from_dict, load_params

    values = dict(load_params(args.params).get("synth") or {}) if args.params.exists() else {}
    for key in ("seed", "entangled", "scale", "shared_normal", "train_per_subset", "test_per_subset", "full_records",
                "shape", "null_subsets"):
        if getattr(args, key, None) is not None:
            values[key] = getattr(args, key)
    return from_dict(SynthParams, values, where=f"{args.params}: section 'synth'")


def world_params(params: str | os.PathLike = "params.yaml", entangled: bool | None = None) -> SynthParams:
    """The `synth:` section of a params file; `entangled` overrides it. The negative control's world is
    the main world's params with entangled looks, and its null subsets are the study's targets
    (`experiment.targets`)."""
    from medmat.config import load_section
    from medmat.experiment import ExperimentConfig

    synth = load_section(SynthParams, "synth", params)
    if entangled is not None:
        synth = dataclasses.replace(synth, entangled=entangled)
    if synth.entangled:
        targets = load_section(ExperimentConfig, "experiment", params).targets
        synth = dataclasses.replace(synth, null_subsets=[int(t) for t in targets])
    return synth


def regenerate_missing(records: str | os.PathLike, params: str | os.PathLike = "params.yaml") -> bool:
    """Regenerate the generated world a records table was ingested from when its folder is gone, with
    the `synth:` section of `params` (entangled as the table's world says), and check every image
    against the table's sha256. For worlds a stage writes but DVC does not store (the negative
    control's, see medmat.control). A present world is trusted, and a real release is never touched.
    Returns whether it regenerated; ValueError when the regenerated images differ from the table."""
    import pyarrow.parquet as pq

    from medmat.data.images import sha256_file
    from medmat.data.records import data_root_of, world_of

    world = world_of(records)
    root = data_root_of(records)
    if world not in ("mini", "mini-entangled") or (root.exists() and any(root.iterdir())):
        return False
    log.info("%s: the %s world's images are missing; regenerating them from %s", root, world, params)
    generate(root, world_params(params, entangled=world == "mini-entangled"), progress=False)
    table = pq.read_table(records, columns=["image", "image_sha256"]).to_pandas().drop_duplicates("image")
    bad = [img for img, sha in zip(table["image"], table["image_sha256"])
           if sha and (not (root / img).is_file() or sha256_file(root / img) != sha)]
    if bad:
        raise ValueError(f"{root}: {len(bad)} regenerated images differ from {records} (first: {bad[0]}): the "
                         f"code or the synth params changed since the table was ingested; rerun the stage that wrote it")
    return True


def run(args: argparse.Namespace) -> int:
    from medmat.config import ConfigError

    try:
        params = params_from_args(args)
        summary = generate(args.out, params)
    except (ConfigError, FileExistsError, KeyError, ValueError) as exc:
        log.error("synth: %s", exc)
        return 1
    print(f"Med-MAT-mini ({'entangled' if params.entangled else 'default'} world, seed {params.seed}) -> "
          f"{args.out} ({params.shape} shape): {summary['datasets']} datasets, {summary['subsets']} subsets, {summary['images']} images "
          f"({summary['image_mb']} MB), {summary['records']} records"
          + (f", {summary['full_records']} full-scale records" if "full_records" in summary else "")
          + f", {summary['seconds']} s")
    return 0

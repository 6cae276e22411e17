"""QA construction: raw image-label pairs -> Med-MAT single-choice records, as the paper built them.

The rules (Cai et al. 2025, appendix; Med-MAT data card):
- 6 hand-written instructions per subset, written from its modality, area and task;
- each image-label pair becomes one single-choice question with at most 4 options; the distractors are
  drawn at random from the *other labels of the same subset*;
- answer letters balanced over the available positions (A-D as far as the option count allows), so a
  model cannot score by always answering "A";
- training sets capped per subset (3,000) and label-balanced where possible; test sets label-balanced.

The core (`make_templates`, `balanced_select`, `balanced_test`, `build_records`) is pure: pairs in,
records out, deterministic for a seed. `run` is the thin `medmat build-qa` CLI that reads a folder per
class (optionally under train/ and test/) or a CSV with columns image,label[,split], copies the images
under `<out>/med-mat/<dataset folder>/` and writes `ori--NN-{train,test}.json`.
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import logging
import os
import random
import shutil
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

log = logging.getLogger(__name__)

MAX_OPTIONS = 4
DEFAULT_TRAIN_CAP = 3000  # per subset (paper, section 3)
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".dcm"}

# How a question names each canonical modality and area ("Review this kidney CT scan ...").
MODALITY_PHRASE = {
    "CT": "CT scan", "Co": "colposcopy image", "Der": "dermoscopy image", "DP": "dental photograph",
    "End": "endoscopy image", "FP": "fundus photograph", "Mic": "microscopy image", "MRI": "MRI scan",
    "OCT": "OCT scan", "US": "ultrasound image", "X-ray": "X-ray image",
}
AREA_PHRASE = {
    "Bladder": "bladder", "Bones": "bone", "Brain": "brain", "Breast": "breast", "Cell": "cell",
    "Cervix": "cervix", "Chest": "chest", "Fundus": "fundus", "Intestine": "intestine", "Kidney": "kidney",
    "Liver": "liver", "Lung": "lung", "Mouth": "oral", "Retina": "retina", "Skin": "skin lesion",
    "Thyroid": "thyroid",
}
# What the question asks for, by task kind (the Task element of the triplet).
TASK_NOUN = {
    "Quality": "image quality", "Level": "level", "Cancer Degree": "cancer grade",
    "Cell Type": "cell type", "COVID": "condition", "Cancer": "tumour type",
}

# Six instruction patterns; {m}=modality phrase, {a}=area phrase, {t}=task noun.
TEMPLATE_PATTERNS = (
    "Review this {a} {m} and determine the possible {t} it represents.",
    "What {t} is shown in this {a} {m}?",
    "Based on this {a} {m}, which {t} is most likely?",
    "Examine the {m} of the {a} and identify the {t}.",
    "Which of the following best describes the {t} in this {a} {m}?",
    "Look at this {a} {m}. What is the {t}?",
)


class QAError(ValueError):
    """Bad QA input (missing file, unknown label column ...), with the file in the message."""


@dataclass(frozen=True)
class Pair:
    """One raw image-label pair. `image` is the path the record will carry (relative to the data root)."""

    image: str
    label: str
    split: str | None = None  # "train" / "test" when the source dataset has its own split


def make_templates(modality: str, area: str, task: str) -> list[str]:
    """The subset's 6 instructions, written from its canonical triplet."""
    m = MODALITY_PHRASE.get(modality, f"{modality} image")
    a = AREA_PHRASE.get(area, area.lower())
    t = TASK_NOUN.get(task, "condition" if task else "condition")
    return [p.format(m=m, a=a, t=t) for p in TEMPLATE_PATTERNS]


def _rng(seed: int, *keys: object) -> random.Random:
    """A generator keyed by seed and names, independent of call order (sha256, not hash(): stable)."""
    digest = hashlib.sha256(repr((seed,) + keys).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def _by_label(pairs: Iterable[Pair]) -> dict[str, list[Pair]]:
    groups: dict[str, list[Pair]] = defaultdict(list)
    for p in pairs:
        groups[p.label].append(p)
    return dict(sorted(groups.items()))


def balanced_select(pairs: Sequence[Pair], cap: int | None, seed: int, key: object = "") -> list[Pair]:
    """At most `cap` pairs, label-balanced where possible (round-robin over labels; a label that runs
    out leaves its share to the others). Order of the result: label-interleaved, deterministic."""
    groups = _by_label(pairs)
    rng = _rng(seed, "select", key)
    queues = []
    for label, items in groups.items():
        items = sorted(items, key=lambda p: p.image)
        rng.shuffle(items)
        queues.append(items)
    out: list[Pair] = []
    limit = len(pairs) if cap is None else min(cap, len(pairs))
    i = 0
    while len(out) < limit:
        progressed = False
        for q in queues:
            if i < len(q) and len(out) < limit:
                out.append(q[i])
                progressed = True
        if not progressed:
            break
        i += 1
    return out


def balanced_test(pairs: Sequence[Pair], seed: int, key: object = "", cap: int | None = None) -> list[Pair]:
    """Label-balanced test set: the same number of pairs per label (the smallest label's count,
    or fewer under `cap`)."""
    groups = _by_label(pairs)
    if not groups:
        return []
    per_label = min(len(v) for v in groups.values())
    if cap is not None:
        per_label = min(per_label, max(1, cap // len(groups)))
    return balanced_select(pairs, per_label * len(groups), seed, ("test", key))


def split_pairs(pairs: Sequence[Pair], seed: int, test_fraction: float = 0.1, key: object = "") -> tuple[list[Pair], list[Pair]]:
    """Use the pairs' own split where given, else a deterministic stratified 9:1 split.
    One image never lands in both splits (pairs sharing an image path go to the same side)."""
    if any(p.split for p in pairs):
        bad = sorted({p.split for p in pairs if p.split not in ("train", "test")}, key=str)
        if bad:
            raise QAError(f"split must be 'train' or 'test', got {bad}")
        return [p for p in pairs if p.split == "train"], [p for p in pairs if p.split == "test"]
    train, test = [], []
    for label, items in _by_label(pairs).items():
        images = sorted({p.image for p in items})
        _rng(seed, "split", key, label).shuffle(images)
        n_test = int(round(len(images) * test_fraction)) if len(images) > 1 else 0
        test_images = set(images[:n_test])
        for p in items:
            (test if p.image in test_images else train).append(p)
    return train, test


def build_records(
    pairs: Sequence[Pair],
    labels: Sequence[str],
    templates: Sequence[str],
    data_no: int | str,
    seed: int,
    key: object = "",
    start_id: int = 1,
) -> list[dict]:
    """One Med-MAT record per pair, in the given order.

    `labels` is the subset's label set (distractors come from it); each record gets min(4, len(labels))
    options. Answer positions are dealt from shuffled blocks holding every position once, so letters
    stay balanced to within one across the file, independent of label order.
    """
    from medmat.data.medmat_format import make_record

    label_set = sorted(set(labels))
    if len(label_set) < 2:
        raise QAError(f"data-no {data_no}: a single-choice question needs >= 2 labels, got {label_set}")
    unknown = sorted({p.label for p in pairs} - set(label_set))
    if unknown:
        raise QAError(f"data-no {data_no}: labels {unknown} are not in the subset's label set {label_set}")
    if len(templates) < 1:
        raise QAError(f"data-no {data_no}: no instruction templates")
    k = min(MAX_OPTIONS, len(label_set))
    rng = _rng(seed, "records", key, str(data_no))
    positions: list[int] = []
    records = []
    for i, pair in enumerate(pairs):
        if not positions:
            positions = list(range(k))
            rng.shuffle(positions)
        pos = positions.pop()
        others = [lab for lab in label_set if lab != pair.label]
        distractors = rng.sample(others, k - 1)
        options = distractors[:pos] + [pair.label] + distractors[pos:]
        question = templates[rng.randrange(len(templates))]
        records.append(make_record(id=start_id + i, caption=pair.label, image=pair.image, question=question,
                                   options=options, answer_index=pos, data_no=data_no))
    return records


def build_dataset_qa(
    pairs: Sequence[Pair],
    labels: Sequence[str],
    templates: Sequence[str],
    data_no: int,
    seed: int,
    train_cap: int | None = DEFAULT_TRAIN_CAP,
    test_cap: int | None = None,
) -> dict[str, list[dict]]:
    """Pairs of one dataset -> {"train": records, "test": records} (split, cap, balance, QA)."""
    train, test = split_pairs(pairs, seed, key=data_no)
    train = balanced_select(train, train_cap, seed, key=("train", data_no))
    test = balanced_test(test, seed, key=data_no, cap=test_cap)
    return {
        "train": build_records(train, labels, templates, data_no, seed, key="train"),
        "test": build_records(test, labels, templates, data_no, seed, key="test"),
    }


# ---------------------------------------------------------------- reading raw pairs (CLI side)

def read_pairs(source: Path) -> list[tuple[Path, str, str | None]]:
    """(absolute image file, label, split or None) from a folder per class or a CSV image,label[,split].

    Folder layouts: SRC/<label>/<image> or SRC/{train,test}/<label>/<image>.
    CSV: image paths relative to the CSV's folder (or absolute).
    """
    source = Path(source)
    if not source.exists():
        raise QAError(f"{source}: no such file or folder")
    out: list[tuple[Path, str, str | None]] = []
    if source.is_file():
        try:
            with source.open(encoding="utf-8", newline="") as fh:
                reader = csv.DictReader(fh)
                cols = set(reader.fieldnames or [])
                if not {"image", "label"} <= cols:
                    raise QAError(f"{source}: CSV needs columns image,label (has {sorted(cols)})")
                for row_no, row in enumerate(reader, start=2):
                    img, label = (row.get("image") or "").strip(), (row.get("label") or "").strip()
                    split = (row.get("split") or "").strip() or None
                    if not img or not label:
                        raise QAError(f"{source}: line {row_no}: empty image or label")
                    path = Path(img) if os.path.isabs(img) else source.parent / img
                    if not path.is_file():
                        raise QAError(f"{source}: line {row_no}: image {img!r} not found")
                    out.append((path, label, split))
        except UnicodeDecodeError as exc:
            raise QAError(f"{source}: not UTF-8 text ({exc.reason})") from exc
        return out
    subdirs = sorted(d for d in source.iterdir() if d.is_dir())
    split_dirs = [d for d in subdirs if d.name in ("train", "test")]
    roots = [(d, d.name) for d in split_dirs] if split_dirs else [(source, None)]
    for root, split in roots:
        for label_dir in sorted(d for d in root.iterdir() if d.is_dir()):
            for f in sorted(label_dir.rglob("*")):
                if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES:
                    out.append((f, label_dir.name, split))
    if not out:
        raise QAError(f"{source}: no images found (expected <label>/<image> folders or a CSV)")
    return out


def dataset_folder(data_no: int) -> str:
    """Folder of a dataset under med-mat/: its catalogue name, made path-safe and unique by number."""
    from medmat.catalog import load_catalog

    return folder_name(data_no, load_catalog().dataset(data_no).name)


def folder_name(data_no: int, name: str) -> str:
    """'CT Kindney Dataset' (2) -> '002_CT_Kindney_Dataset' (names repeat in the catalogue; numbers don't)."""
    slug = "".join(c if c.isalnum() else "_" for c in name).strip("_")
    while "__" in slug:
        slug = slug.replace("__", "_")
    return f"{data_no:03d}_{slug}"


def _place_image(src: Path, dst: Path) -> None:
    """Hard-link where possible (no copy of big datasets), else copy; atomic via a temp name."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(dst.name + ".tmp")
    if tmp.exists():
        tmp.unlink()
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--pairs", required=True, type=Path,
                        help="folder per class (optionally under train/ and test/) or CSV image,label[,split]")
    parser.add_argument("--subset", required=True, type=int, help="subset number the dataset belongs to")
    parser.add_argument("--dataset", required=True, type=int, help="dataset number (data-no)")
    parser.add_argument("--out", required=True, type=Path, help="data root to write into (public layout)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-cap", type=int, default=DEFAULT_TRAIN_CAP,
                        help="training records per subset at most (paper: 3000)")
    parser.add_argument("--labels", default=None,
                        help="comma-separated label set of the subset (default: the labels found)")


def run(args: argparse.Namespace) -> int:
    from medmat.catalog import load_catalog
    from medmat.data.medmat_format import relative_path, write_records

    try:
        cat = load_catalog()
        sub = cat.subset(args.subset)
        ds = cat.dataset(args.dataset)
        if ds.subset_no != args.subset:
            raise QAError(f"dataset {args.dataset} belongs to subset {ds.subset_no}, not {args.subset}")
        raw = read_pairs(args.pairs)
        folder = dataset_folder(args.dataset)
        pairs, sources = [], {}
        for path, label, split in raw:
            rel = f"med-mat/{folder}/{label}/{path.name}"
            if rel in sources and sources[rel] != path:
                rel = f"med-mat/{folder}/{label}/{hashlib.sha256(str(path).encode()).hexdigest()[:8]}_{path.name}"
            sources[rel] = path
            pairs.append(Pair(rel, label, split))
        labels = args.labels.split(",") if args.labels else sorted({p.label for p in pairs})
        templates = make_templates(sub.modality, sub.area, sub.task)
        out = build_dataset_qa(pairs, labels, templates, args.dataset, args.seed, train_cap=args.train_cap)
    except (QAError, KeyError, LookupError) as exc:
        log.error("build-qa: %s", exc)
        return 1
    used = {r["image"] for recs in out.values() for r in recs}
    for rel in sorted(used):
        _place_image(sources[rel], args.out / rel)
    for split, recs in out.items():
        if recs:
            write_records(args.out / relative_path("dataset", args.dataset, split), recs)
    log.info("build-qa: dataset %d (subset %02d): %d train, %d test records, %d images -> %s",
             args.dataset, args.subset, len(out["train"]), len(out["test"]), len(used), args.out)
    return 0

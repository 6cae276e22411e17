"""The MAT catalogue: Med-MAT's datasets and aggregated subsets with canonical triplets.

Package data: `medmat_datasets.csv` (109 rows) and `medmat_subsets.csv` (53 rows) copied verbatim from
the public tables, plus `canonical.yaml` (canonical modality/area names with their synonyms, and the
curated task *kind* of each subset). Raw values are never edited: canonical columns sit beside them and
`Catalog.check()` reports the public tables' known faults.

    cat = load_catalog()
    cat.triplet_of_dataset(2)          # Triplet('CT', 'Kidney', 'Kidney Diseases')
    str(cat.triplet_of_subset(3))      # 'CT-Lung-COVID'
    cat.related_subsets(cat.triplet_of_subset(3))
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from importlib import resources
from typing import NamedTuple

import pandas as pd
import yaml

ELEMENTS = ("modality", "area", "task")
CLASSIFICATION_KIND = "classification"


class CatalogError(LookupError, ValueError):
    """A look-up the catalogue cannot answer (unknown dataset or subset number, unparsable target).

    Both a LookupError (an unknown key) and a ValueError (a bad value), so callers may catch either.
    """


class UnknownVocabulary(CatalogError):
    """A modality, area or task name that is neither canonical nor a known synonym."""

    def __init__(self, element: str, value: object, known: list[str]):
        self.element, self.value = element, value
        super().__init__(f"unknown {element} {value!r}; known: {', '.join(known)}")


class Triplet(NamedTuple):
    """A MAT triplet of canonical names. str() is the paper's notation, e.g. 'CT-Lung-COVID'."""

    modality: str
    area: str
    task: str

    def __str__(self) -> str:
        return f"{self.modality}-{self.area}-{self.task}"


class DatasetInfo(NamedTuple):
    no: int
    name: str
    modality: str            # canonical
    area: str                # canonical
    task: str | None         # the task kind of its subset; None when the dataset is in no subset
    subset_no: int | None
    qa_released: bool
    raw_modality: str
    raw_area: str
    raw_task: str            # the dataset table's free-text task description
    source_url: str
    subset_assignment: str
    note: str

    @property
    def triplet(self) -> Triplet | None:
        return None if self.task is None else Triplet(self.modality, self.area, self.task)


class SubsetInfo(NamedTuple):
    no: int
    modality: str            # canonical
    area: str                # canonical
    task: str                # curated task kind (canonical.yaml: subset_tasks)
    task_name: str           # the public table's full task name
    kind: str                # classification | detection_segmentation
    qa_released: bool
    dataset_nos: tuple[int, ...]        # datasets the catalogue assigns to it (dataset table)
    paper_dataset_nos: tuple[int, ...]  # datasets the paper's table 17 lists under it (raw)
    raw_modality: str
    raw_area: str

    @property
    def triplet(self) -> Triplet:
        return Triplet(self.modality, self.area, self.task)


@dataclass(frozen=True)
class CatalogFault:
    """One known fault of the public tables. `kind` is a short machine name, `message` reads as prose."""

    kind: str
    message: str
    datasets: tuple[int, ...] = ()
    subsets: tuple[int, ...] = ()

    def __str__(self) -> str:
        return f"[{self.kind}] {self.message}"


def parse_number_list(text: object) -> tuple[int, ...]:
    """'33,36-38,44' -> (33, 36, 37, 38, 44); empty or NaN -> ()."""
    if text is None or (isinstance(text, float) and pd.isna(text)):
        return ()
    out: list[int] = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = (int(x) for x in part.split("-", 1))
            out.extend(range(lo, hi + 1))
        else:
            out.append(int(part))
    return tuple(out)


@dataclass
class Catalog:
    datasets: pd.DataFrame
    subsets: pd.DataFrame
    modality_synonyms: dict[str, list[str]]
    area_synonyms: dict[str, list[str]]
    subset_tasks: dict[int, str]
    _modality_lookup: dict[str, str] = field(default_factory=dict, repr=False)
    _area_lookup: dict[str, str] = field(default_factory=dict, repr=False)
    _task_lookup: dict[str, str] = field(default_factory=dict, repr=False)

    # ---- vocabulary -------------------------------------------------------------------------------
    @property
    def modalities(self) -> list[str]:
        return sorted(self.modality_synonyms)

    @property
    def areas(self) -> list[str]:
        return sorted(self.area_synonyms)

    @property
    def tasks(self) -> list[str]:
        return sorted(set(self.subset_tasks.values()))

    @staticmethod
    def _lookup(table: dict[str, str], element: str, value: object, known: list[str]) -> str:
        if isinstance(value, str):
            hit = table.get(value) or table.get(value.strip().casefold())
            if hit is not None:
                return hit
        raise UnknownVocabulary(element, value, known)

    def canonical_modality(self, value: str) -> str:
        return self._lookup(self._modality_lookup, "modality", value, self.modalities)

    def canonical_area(self, value: str) -> str:
        return self._lookup(self._area_lookup, "area", value, self.areas)

    def canonical_task(self, value: str) -> str:
        return self._lookup(self._task_lookup, "task", value, self.tasks)

    # ---- look-ups ---------------------------------------------------------------------------------
    def dataset(self, no: int | str) -> DatasetInfo:
        n = _as_number(no, "dataset")
        if n not in self.datasets.index:
            raise CatalogError(f"unknown dataset number {n} (catalogue has 1..{self.datasets.index.max()})")
        r = self.datasets.loc[n]
        sub = None if pd.isna(r["subset_no"]) else int(r["subset_no"])
        return DatasetInfo(
            no=n, name=r["name"], modality=r["modality"], area=r["area"],
            task=None if pd.isna(r["task"]) else r["task"], subset_no=sub,
            qa_released=bool(r["qa_released"]), raw_modality=r["raw_modality"], raw_area=r["raw_area"],
            raw_task=r["raw_task"], source_url=r["source_url"],
            subset_assignment=r["subset_assignment"], note=r["note"],
        )

    def subset(self, no: int | str) -> SubsetInfo:
        n = _as_number(no, "subset")
        if n not in self.subsets.index:
            raise CatalogError(f"unknown subset number {n} (catalogue has 1..{self.subsets.index.max()})")
        r = self.subsets.loc[n]
        return SubsetInfo(
            no=n, modality=r["modality"], area=r["area"], task=r["task"], task_name=r["task_name"],
            kind=r["kind"], qa_released=bool(r["qa_released"]), dataset_nos=r["dataset_nos"],
            paper_dataset_nos=r["paper_dataset_nos"], raw_modality=r["raw_modality"],
            raw_area=r["raw_area"],
        )

    def triplet_of_dataset(self, no: int | str) -> Triplet:
        info = self.dataset(no)
        if info.triplet is None:
            raise CatalogError(f"dataset {info.no} ({info.name}) belongs to no subset, so it has no task element")
        return info.triplet

    def triplet_of_subset(self, no: int | str) -> Triplet:
        return self.subset(no).triplet

    def classification_subsets(self) -> list[int]:
        s = self.subsets
        return sorted(s.index[(s["kind"] == CLASSIFICATION_KIND) & s["qa_released"]].tolist())

    def subsets_with_triplet(self, triplet: Triplet) -> list[int]:
        t = self.triplet(triplet)
        return sorted(no for no in self.subsets.index if self.triplet_of_subset(no) == t)

    def triplet(self, value: Triplet | tuple[str, str, str]) -> Triplet:
        """Canonicalise a (modality, area, task) tuple; raises UnknownVocabulary."""
        m, a, t = value
        return Triplet(self.canonical_modality(m), self.canonical_area(a), self.canonical_task(t))

    # ---- relations --------------------------------------------------------------------------------
    def shared_elements(self, triplet: Triplet, subset_no: int) -> set[str]:
        t, other = self.triplet(triplet), self.triplet_of_subset(subset_no)
        return {name for name, x, y in zip(ELEMENTS, t, other) if x == y}

    def related_subsets(self, triplet: Triplet) -> list[int]:
        """Classification subsets sharing at least one element with `triplet`.

        Subsets with the very same triplet are the target itself (or its twin), not companions for
        it, so they are left out: Related data must teach the target's elements without its type.
        """
        return [no for no in self.classification_subsets() if 1 <= len(self.shared_elements(triplet, no)) < 3]

    def unrelated_subsets(self, triplet: Triplet) -> list[int]:
        """Classification subsets sharing no element with `triplet` (the paper's Baseline+ pool)."""
        return [no for no in self.classification_subsets() if not self.shared_elements(triplet, no)]

    # ---- faults -----------------------------------------------------------------------------------
    def check(self) -> list[CatalogFault]:
        """Known faults of the public tables (medmat.catalog.faults), reported, never fixed."""
        from medmat.catalog.faults import check_catalog

        return check_catalog(self)


def _as_number(no: int | str, what: str) -> int:
    try:
        return int(str(no).strip())
    except ValueError:
        raise CatalogError(f"{what} number must be an integer, got {no!r}") from None


def _synonym_lookup(synonyms: dict[str, list[str]]) -> dict[str, str]:
    lookup: dict[str, str] = {}
    for canon, names in synonyms.items():
        for name in [canon, *names]:
            lookup[name] = canon
            lookup[name.strip().casefold()] = canon
    return lookup


@functools.lru_cache(maxsize=1)
def load_catalog() -> Catalog:
    """The catalogue from package data (cached: every caller shares one read-only instance)."""
    pkg = resources.files(__package__)
    canon = yaml.safe_load(pkg.joinpath("canonical.yaml").read_text(encoding="utf-8"))
    mod_syn = {str(k): [str(x) for x in v] for k, v in canon["modalities"].items()}
    area_syn = {str(k): [str(x) for x in v] for k, v in canon["areas"].items()}
    subset_tasks = {int(k): str(v) for k, v in canon["subset_tasks"].items()}
    mod_lookup, area_lookup = _synonym_lookup(mod_syn), _synonym_lookup(area_syn)
    task_lookup = _synonym_lookup({t: [] for t in subset_tasks.values()})

    with pkg.joinpath("medmat_subsets.csv").open(encoding="utf-8") as fh:
        sub = pd.read_csv(fh, dtype=str, keep_default_na=False)
    with pkg.joinpath("medmat_datasets.csv").open(encoding="utf-8") as fh:
        ds = pd.read_csv(fh, dtype=str, keep_default_na=False)

    sub_no = sub["subset_no"].astype(int)
    ds_no = ds["dataset_no"].astype(int)
    ds_subset = pd.array([int(x) if x.strip() else pd.NA for x in ds["subset_no"]], dtype="Int64")
    subsets = pd.DataFrame({
        "subset_no": sub_no,
        "raw_modality": sub["modality"], "raw_area": sub["area"],
        "modality": [mod_lookup[x] for x in sub["modality"]],
        "area": [area_lookup[x] for x in sub["area"]],
        "task": [subset_tasks[n] for n in sub_no],
        "task_name": sub["task"], "kind": sub["kind"],
        "qa_released": sub["qa_released"].str.lower() == "true",
        "paper_dataset_nos": [parse_number_list(x) for x in sub["datasets_in_paper_table17"]],
        "dataset_nos": [tuple(ds_no[ds_subset == n].tolist()) for n in sub_no],
        "datasets_in_paper_table17": sub["datasets_in_paper_table17"],
    }).set_index("subset_no", drop=False)
    subsets.index.name = None
    datasets = pd.DataFrame({
        "dataset_no": ds_no, "name": ds["name"], "source_url": ds["source_url"],
        "raw_modality": ds["modality"], "raw_area": ds["area"], "raw_task": ds["task"],
        "modality": [mod_lookup[x] for x in ds["modality"]],
        "area": [area_lookup[x] for x in ds["area"]],
        "task": pd.array([None if pd.isna(n) else subset_tasks[int(n)] for n in ds_subset], dtype=object),
        "subset_no": ds_subset, "subset_assignment": ds["subset_assignment"],
        "qa_released": ds["qa_released"].str.lower() == "true", "note": ds["note"],
    }).set_index("dataset_no", drop=False)
    datasets.index.name = None
    return Catalog(datasets, subsets, mod_syn, area_syn, subset_tasks, mod_lookup, area_lookup, task_lookup)


def parse_target(text: str | int, catalog: Catalog | None = None) -> tuple[Triplet, int | None]:
    """A target given as a subset number ('3', '03', 3) or a triplet ('CT-Lung-COVID').

    Returns the canonical triplet and the subset number (None when a triplet names no subset or
    several). Modality names contain hyphens ('X-ray'), so the triplet is split against the
    vocabulary rather than on '-'.
    """
    cat = catalog or load_catalog()
    s = str(text).strip()
    if re.fullmatch(r"\d+", s):
        no = int(s)
        return cat.triplet_of_subset(no), no
    for mod_name in sorted(cat._modality_lookup, key=len, reverse=True):
        if not s.casefold().startswith(mod_name.casefold() + "-"):
            continue
        rest = s[len(mod_name) + 1:]
        for area_name in sorted(cat._area_lookup, key=len, reverse=True):
            if rest.casefold().startswith(area_name.casefold() + "-"):
                task = rest[len(area_name) + 1:]
                try:
                    t = cat.triplet((mod_name, area_name, task))
                except UnknownVocabulary:
                    continue
                matches = cat.subsets_with_triplet(t)
                return t, (matches[0] if len(matches) == 1 else None)
    raise CatalogError(
        f"cannot read target {text!r}: give a subset number (e.g. 3) or a triplet Modality-Area-Task "
        f"(e.g. CT-Lung-COVID) with modality in {cat.modalities}, area in {cat.areas}, task in {cat.tasks}")


__all__ = [
    "Catalog", "CatalogError", "CatalogFault", "DatasetInfo", "SubsetInfo", "Triplet", "UnknownVocabulary",
    "load_catalog", "parse_target", "parse_number_list",
]

"""Known faults of the public Med-MAT tables, found from the tables themselves where they can show them.

Raw values are never edited: each fault is reported (`medmat catalog --check`) as a published fact, and
the catalogue's canonical columns sit beside the raw ones.
"""

from __future__ import annotations

import re

import pandas as pd

from medmat.catalog import Catalog, CatalogFault

# Task kinds that name one condition (COVID, Tuberculosis ...), as opposed to families ("Skin Diseases",
# "Quality", "Level", "Cell Type", detection tasks): only a single-condition kind can be contradicted
# by a dataset naming another condition.
_FAMILY_WORDS = ("diseases", "quality", "level", "type", "degree", "condition", "det/seg")


def check_catalog(cat: Catalog) -> list[CatalogFault]:
    """The public tables' faults, found from the data where the data can show them."""
    faults: list[CatalogFault] = []
    ds, sub = cat.datasets, cat.subsets
    # 1. Non-canonical spellings (X-Ray vs X-ray, Ultrasound vs US, Teeth vs Mouth).
    for table, label, key in ((ds, "dataset", "dataset_no"), (sub, "subset", "subset_no")):
        for element in ("modality", "area"):
            odd = table[table[f"raw_{element}"] != table[element]]
            for (raw, canon), grp in odd.groupby([f"raw_{element}", element], sort=True):
                nos = tuple(int(x) for x in grp[key])
                faults.append(CatalogFault(
                    "spelling_variant",
                    f"{label}s {_ranges(nos)} spell {element} {raw!r}; canonical is {canon!r}",
                    datasets=nos if label == "dataset" else (), subsets=nos if label == "subset" else ()))
    # 2. Paper table 17: datasets listed under several subsets, or under none.
    listed: dict[int, list[int]] = {}
    for s_no, nos in zip(sub["subset_no"], sub["paper_dataset_nos"]):
        for d in nos:
            listed.setdefault(int(d), []).append(int(s_no))
    for d, s_nos in sorted(listed.items()):
        if len(s_nos) > 1:
            assigned = ds.loc[d, "subset_no"]
            faults.append(CatalogFault(
                "multiple_subsets",
                f"dataset {d} ({ds.loc[d, 'name']}, {ds.loc[d, 'raw_modality']}/{ds.loc[d, 'raw_area']}) is "
                f"listed under subsets {', '.join(map(str, s_nos))} in the paper's table; the catalogue "
                f"assigns it to {assigned}", datasets=(d,), subsets=tuple(s_nos)))
    for d in ds["dataset_no"]:
        if int(d) not in listed:
            s = ds.loc[d, "subset_no"]
            where = "it belongs to no subset" if pd.isna(s) else f"the catalogue infers subset {int(s)}"
            faults.append(CatalogFault(
                "no_subset_in_paper",
                f"dataset {d} ({ds.loc[d, 'name']}) is in no subset of the paper's table; {where}",
                datasets=(int(d),), subsets=() if pd.isna(s) else (int(s),)))
    # 3. A dataset's canonical modality/area disagreeing with its subset's.
    for d in ds["dataset_no"]:
        s = ds.loc[d, "subset_no"]
        if pd.isna(s):
            continue
        s = int(s)
        for element in ("modality", "area"):
            if ds.loc[d, element] != sub.loc[s, element]:
                faults.append(CatalogFault(
                    "triplet_mismatch",
                    f"dataset {d} ({ds.loc[d, 'name']}) has {element} {ds.loc[d, element]!r} but its subset "
                    f"{s} says {sub.loc[s, element]!r}", datasets=(int(d),), subsets=(s,)))
    # 4. One name for datasets of different triplets (row 46 copies row 41's name).
    seen_name: dict[str, int] = {}
    for d in ds["dataset_no"]:
        name = ds.loc[d, "name"]
        first = seen_name.setdefault(name, int(d))
        if first != d and _mod_area(ds, first) != _mod_area(ds, d):
            faults.append(CatalogFault(
                "name_conflict",
                f"dataset {d} is named {name!r} like dataset {first}, but its modality/area "
                f"{'/'.join(_mod_area(ds, d))} differ from {'/'.join(_mod_area(ds, first))}",
                datasets=(first, int(d))))
    # 5. One link for datasets of different names and triplets (row 50 points at row 63's dataset).
    by_url: dict[str, list[int]] = {}
    for d in ds["dataset_no"]:
        by_url.setdefault(ds.loc[d, "source_url"], []).append(int(d))
    for url, nos in by_url.items():
        if len({_mod_area(ds, d) for d in nos}) > 1 and len({ds.loc[d, "name"] for d in nos}) > 1:
            faults.append(CatalogFault(
                "link_conflict",
                f"datasets {', '.join(map(str, nos))} ({'; '.join(ds.loc[d, 'name'] for d in nos)}) share "
                f"the link {url} though they are different datasets", datasets=tuple(nos)))
    # 6. A dataset filed under a single-condition task whose name or source names another condition
    #    (dataset 54, the Shenzhen tuberculosis set, is filed under COVID in subset 28).
    faults.extend(_condition_conflicts(cat))
    # 7. Task text copied from a dataset of another task kind (dataset 103's text is dataset 94's).
    faults.extend(_copied_task_texts(cat))
    # 8. Faults only a reader of the source tables can see (e.g. row 57 has no number), kept as notes.
    covered = {d for f in faults for d in f.datasets if f.kind != "spelling_variant"}
    for d in ds["dataset_no"]:
        note = ds.loc[d, "note"]
        if note and int(d) not in covered:
            faults.append(CatalogFault("noted", f"dataset {d} ({ds.loc[d, 'name']}): {note}", datasets=(int(d),)))
    return faults


def _mod_area(ds: pd.DataFrame, d: int) -> tuple[str, str]:
    return ds.loc[d, "modality"], ds.loc[d, "area"]


def _ranges(nos: tuple[int, ...]) -> str:
    """(49, 50, 51, 53) -> '49-51, 53'."""
    out, run = [], []
    for n in sorted(nos):
        if run and n == run[-1] + 1:
            run.append(n)
            continue
        if run:
            out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
        run = [n]
    if run:
        out.append(f"{run[0]}-{run[-1]}" if len(run) > 1 else str(run[0]))
    return ", ".join(out)


def _single_condition(kind: str) -> bool:
    k = kind.casefold()
    return not any(w in k for w in _FAMILY_WORDS)


def _condition_conflicts(cat: Catalog) -> list[CatalogFault]:
    ds = cat.datasets
    conditions = sorted({k for k in cat.subset_tasks.values() if _single_condition(k)})
    out = []
    for d in ds["dataset_no"]:
        s = ds.loc[d, "subset_no"]
        if pd.isna(s):
            continue
        own = cat.subset_tasks[int(s)]
        if not _single_condition(own):
            continue
        text = f"{ds.loc[d, 'name']} {ds.loc[d, 'source_url']}".casefold()
        named = [c for c in conditions if c != own and re.search(rf"\b{re.escape(c.casefold())}\b", text)]
        if named and not re.search(rf"\b{re.escape(own.casefold())}", text):
            out.append(CatalogFault(
                "task_conflict",
                f"dataset {d} ({ds.loc[d, 'name']}) is filed under subset {int(s)} ({own}) but its name or "
                f"source names {', '.join(named)}, not {own} (kept as published)",
                datasets=(int(d),), subsets=(int(s),)))
    return out


def _words(text: str) -> set[str]:
    return {w for w in re.split(r"[^a-z0-9]+", text.casefold()) if len(w) > 3}


def _copied_task_texts(cat: Catalog) -> list[CatalogFault]:
    """A task text shared by datasets of different subset task kinds that names the other dataset's kind
    and not its own: copied from that row. Generic shared texts ("Multi Classification") name neither."""
    ds = cat.datasets
    out = []
    for text, grp in ds.groupby("raw_task", sort=True):
        if len(grp) < 2:
            continue
        rows = [(int(d), cat.subset_tasks[int(s)]) for d, s in zip(grp["dataset_no"], grp["subset_no"])
                if not pd.isna(s)]
        words = _words(text)
        for d, kind in rows:
            if words & _words(kind):
                continue
            for first, other in rows:
                if first < d and other != kind and words & _words(other):
                    out.append(CatalogFault(
                        "task_text_copied",
                        f"dataset {d} ({ds.loc[d, 'name']}, subset {int(ds.loc[d, 'subset_no'])}: {kind}) has the "
                        f"task text {text!r} of dataset {first} ({ds.loc[first, 'name']}: {other}); kept as "
                        "published", datasets=(first, d)))
                    break
    return out

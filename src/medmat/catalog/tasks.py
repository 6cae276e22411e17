"""The Task element at two granularities: the paper's coarse tasks, or the catalogue's fine task kinds.

The Med-MAT paper composes targets from *coarse* tasks (Appendix B.1; `coarse_tasks.yaml`): COVID,
Cancer, State, Level, Diseases, Recognition, Quality, where COVID and Cancer are also State. A subset
therefore has one or more tasks it can play (03 CT-Lung-COVID plays COVID and State). The *fine*
taxonomy is the catalogue's one curated task kind per subset (`canonical.yaml`: subset_tasks), one each.

    subset_tasks(3)                   # ('COVID', 'State')
    subset_tasks(3, taxonomy="fine")  # ('COVID',)
"""

from __future__ import annotations

import functools
from importlib import resources

import yaml

from medmat.catalog import Catalog, CatalogError, load_catalog

TAXONOMIES = ("paper", "fine")


@functools.lru_cache(maxsize=1)
def coarse_tasks() -> dict[int, tuple[str, ...]]:
    """subset number -> its coarse tasks, own first, then the implied ones (COVID/Cancer -> State)."""
    data = yaml.safe_load(resources.files("medmat.catalog").joinpath("coarse_tasks.yaml").read_text(encoding="utf-8"))
    known = [str(t) for t in data["tasks"]]
    implies = {str(k): [str(x) for x in v] for k, v in (data.get("implies") or {}).items()}
    out: dict[int, tuple[str, ...]] = {}
    for no, own in data["subsets"].items():
        tasks: list[str] = []
        for t in [str(x) for x in own]:
            if t not in known:
                raise CatalogError(f"coarse_tasks.yaml: subset {no}: unknown coarse task {t!r}; known: {known}")
            for x in [t, *implies.get(t, [])]:
                if x not in tasks:
                    tasks.append(x)
        out[int(no)] = tuple(tasks)
    return out


def subset_tasks(no: int, taxonomy: str = "paper", catalog: Catalog | None = None) -> tuple[str, ...]:
    """The task(s) subset `no` can play under `taxonomy` ("paper": coarse, "fine": the catalogue's kind)."""
    if taxonomy == "fine":
        return ((catalog or load_catalog()).subset(no).task,)
    if taxonomy != "paper":
        raise CatalogError(f"unknown task taxonomy {taxonomy!r}; known: {list(TAXONOMIES)}")
    try:
        return coarse_tasks()[int(no)]
    except KeyError:
        raise CatalogError(f"subset {no} has no coarse task in coarse_tasks.yaml (classification subsets 1-37 do)") from None


__all__ = ["TAXONOMIES", "coarse_tasks", "subset_tasks"]

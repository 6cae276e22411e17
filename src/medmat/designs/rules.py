"""Which Related combinations are valid for a target: the Med-MAT paper's design rules (pure catalogue).

A target is a subset (its MAT triplet) playing one of its tasks, its *role* (under the paper's coarse
taxonomy 03 CT-Lung-COVID plays COVID or State; `medmat.catalog.tasks`). A Related subset also plays
one of its tasks, and *shares* an element with the target when it has the same modality, the same
area, or plays the target's role. Every combination has one member per *slot*, and each slot says
exactly which elements its member shares (the Med-MAT paper, Table 3 and Appendix A.4):

- fixed_modality / fixed_area / fixed_task: two members, each sharing exactly two elements with the
  target, the fixed one included, so that between them they supply the two other elements;
- modality_area (only where the target's modality is tied to one area in the catalogue, e.g.
  dermoscopy-skin): one member shares the modality-area pair (with another task), the other only the task;
- three_element (Appendix A.4): three members, each sharing exactly one element.

"Exactly" excludes the target's own triplet (a member sharing all three). A member counts for a slot
when ANY task it can play gives that share pattern (04 CT-Lung-Cancer supplies CT+Lung to target
03 as State by playing Cancer: the paper's row 2). Only classification subsets (01-37) take part;
twins of the target (same catalogue triplet) never do. Unrelated subsets share no element under any
role: other modality, other area, and no task in common.

`paper_rows()` reads the paper's Table 3 (package data) and `match_paper_rows` marks each combination
with the rows it reproduces; nothing here knows a row by its number.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import re
from importlib import resources

import pandas as pd

from medmat.catalog import Catalog, Triplet, load_catalog
from medmat.catalog.tasks import subset_tasks
from medmat.names import subset_key

ELEMENTS = ("modality", "area", "task")
# direction -> the exact share pattern of each member slot
SLOTS: dict[str, tuple[frozenset, ...]] = {
    "fixed_modality": (frozenset({"modality", "area"}), frozenset({"modality", "task"})),
    "fixed_area": (frozenset({"area", "modality"}), frozenset({"area", "task"})),
    "fixed_task": (frozenset({"task", "modality"}), frozenset({"task", "area"})),
    "modality_area": (frozenset({"modality", "area"}), frozenset({"task"})),
    "three_element": (frozenset({"modality"}), frozenset({"area"}), frozenset({"task"})),
}
DIRECTIONS = tuple(SLOTS)
# Table 3's direction names
PAPER_DIRECTIONS = {"fixed modality": "fixed_modality", "fixed area": "fixed_area", "fixed task": "fixed_task",
                    "modality-area": "modality_area"}


@dataclasses.dataclass(frozen=True)
class TargetView:
    """What the rules need of a target: modality, area, the tasks it can play, and who it is."""

    modality: str
    area: str
    roles: tuple[str, ...]
    subset_no: int | None
    triplet: Triplet  # the catalogue triplet (fine task): its twins are excluded


@dataclasses.dataclass
class Combination:
    """One valid set of Related subsets for one target and direction type."""

    target: int | None
    direction: str
    related: tuple[int, ...]                 # sorted subset numbers
    roles: tuple[str, ...]                   # target tasks under which it is valid (first = shown)
    plays: dict[str, tuple[str, ...]]        # role -> task each member plays (order of `related`)
    paper_rows: tuple[int, ...] = ()         # Table 3 rows it reproduces
    primary_rows: tuple[int, ...] = ()       # rows it is THE reading of, run by `combinations: paper`

    @property
    def paper_primary(self) -> bool:
        return bool(self.primary_rows)

    @property
    def paper_row(self) -> int | None:
        """The Table 3 row it stands for: the row it is run for, else the first it can be read as."""
        return (self.primary_rows or self.paper_rows or (None,))[0]

    @property
    def id(self) -> str:
        """File-safe id: <direction>-<a>-<b>[-<c>]."""
        return "-".join([self.direction, *(subset_key(n) for n in self.related)])

    @property
    def coarse_task(self) -> str:
        return self.roles[0]

    def members(self, catalog: Catalog) -> dict[str, str]:
        """'04' -> 'CT-Lung-Cancer': each member's triplet with the task it plays for `coarse_task`."""
        out = {}
        for no, task in zip(self.related, self.plays[self.coarse_task]):
            t = catalog.triplet_of_subset(no)
            out[subset_key(no)] = str(Triplet(t.modality, t.area, task))
        return out


def target_view(catalog: Catalog, triplet: Triplet, subset_no: int | None, taxonomy: str) -> TargetView:
    """The roles of a target. A triplet naming no subset plays the tasks of the first subset with its
    (fine) task, so `CT-Brain-COVID` plays COVID and State like 03."""
    if subset_no is not None:
        roles = subset_tasks(subset_no, taxonomy, catalog)
    else:
        same = [no for no in catalog.classification_subsets() if catalog.triplet_of_subset(no).task == triplet.task]
        roles = subset_tasks(same[0], taxonomy, catalog) if same else (triplet.task,)
    return TargetView(triplet.modality, triplet.area, roles, subset_no, triplet)


def candidates(catalog: Catalog, target: TargetView) -> list[int]:
    """Classification subsets other than the target and its twins (same catalogue triplet)."""
    return [no for no in catalog.classification_subsets()
            if no != target.subset_no and catalog.triplet_of_subset(no) != target.triplet]


def share_options(catalog: Catalog, target: TargetView, role: str, no: int, taxonomy: str) -> dict[frozenset, str]:
    """share pattern -> the task subset `no` plays to give it (first such task), for target `role`."""
    t = catalog.triplet_of_subset(no)
    base = {e for e, same in (("modality", t.modality == target.modality), ("area", t.area == target.area)) if same}
    out: dict[frozenset, str] = {}
    for task in subset_tasks(no, taxonomy, catalog):
        out.setdefault(frozenset(base | ({"task"} if task == role else set())), task)
    return out


def modality_tied_area(catalog: Catalog, modality: str) -> str | None:
    """The one area the classification subsets of `modality` all have, else None."""
    areas = {catalog.triplet_of_subset(no).area for no in catalog.classification_subsets()
             if catalog.triplet_of_subset(no).modality == modality}
    return areas.pop() if len(areas) == 1 else None


def enumerate_combinations(catalog: Catalog, target: TargetView, taxonomy: str = "paper",
                           directions: tuple[str, ...] = DIRECTIONS) -> list[Combination]:
    """Every valid combination of `target`, one per (direction, member set), in id order."""
    cands = candidates(catalog, target)
    tied = modality_tied_area(catalog, target.modality) == target.area
    found: dict[tuple, Combination] = {}
    for role in target.roles:
        options = {no: share_options(catalog, target, role, no, taxonomy) for no in cands}
        for direction in directions:
            if direction == "modality_area" and not tied:
                continue
            slots = [[(no, opts[pattern]) for no, opts in options.items() if pattern in opts]
                     for pattern in SLOTS[direction]]
            for picks in itertools.product(*slots):
                nos = [no for no, _ in picks]
                if len(set(nos)) != len(nos):
                    continue
                order = sorted(range(len(picks)), key=lambda i: nos[i])
                related = tuple(nos[i] for i in order)
                plays = tuple(picks[i][1] for i in order)
                combo = found.setdefault((direction, related), Combination(
                    target.subset_no, direction, related, (), {}))
                if role not in combo.roles:
                    combo.roles += (role,)
                    combo.plays[role] = plays
    return sorted(found.values(), key=lambda c: (DIRECTIONS.index(c.direction), c.related))


def why_none(catalog: Catalog, target: TargetView, direction: str, taxonomy: str = "paper") -> str:
    """A sentence saying why `direction` has no combination for `target` (the first empty slot)."""
    if direction == "modality_area" and modality_tied_area(catalog, target.modality) != target.area:
        return (f"modality_area: modality {target.modality} is not tied to one area in the catalogue "
                f"(the direction needs a modality-area pair like dermoscopy-skin)")
    cands = candidates(catalog, target)
    val = {"modality": target.modality, "area": target.area, "task": "/".join(target.roles)}
    for pattern in SLOTS[direction]:
        if not any(pattern in share_options(catalog, target, role, no, taxonomy)
                   for role in target.roles for no in cands):
            want = " and ".join(f"{e} {val[e]}" for e in ELEMENTS if e in pattern)
            other = [f"another {e}" for e in ELEMENTS if e not in pattern]
            return f"{direction}: no other classification subset has {want} with {' and '.join(other)}"
    return f"{direction}: no set of distinct subsets fills every slot"


# ---- pools of the other arms ---------------------------------------------------------------------
def shares_any(catalog: Catalog, target: TargetView, no: int, taxonomy: str) -> set[str]:
    """Elements subset `no` shares with the target under some role (task: any task in common)."""
    t = catalog.triplet_of_subset(no)
    out = {e for e, same in (("modality", t.modality == target.modality), ("area", t.area == target.area)) if same}
    if set(subset_tasks(no, taxonomy, catalog)) & set(target.roles):
        out.add("task")
    return out


def related_pool(catalog: Catalog, target: TargetView, taxonomy: str) -> list[int]:
    """Subsets sharing at least one element with the target (All Related, the search's candidates)."""
    return [no for no in candidates(catalog, target) if shares_any(catalog, target, no, taxonomy)]


def unrelated_pool(catalog: Catalog, target: TargetView, taxonomy: str) -> list[int]:
    """Subsets sharing no element with the target (Baseline+ and All Unrelated)."""
    return [no for no in candidates(catalog, target) if not shares_any(catalog, target, no, taxonomy)]


# ---- the paper's Table 3 -------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class PaperRow:
    row: int
    direction: str
    related: tuple[tuple[int, ...], ...]   # per member, the subsets it may be (in the order written)
    targets: tuple[int, ...]               # () = unresolved
    names: str                             # "Lung COVID + Brain Cancer -> Lung Cancer"
    baseline: float
    baseline_plus: float
    trained: float
    cg_helps: str
    note: str                              # how the subsets were read, when not plainly


@functools.lru_cache(maxsize=1)
def paper_rows() -> tuple[PaperRow, ...]:
    """Table 3 of the Med-MAT paper from package data (catalog/paper_table3.csv), subsets resolved.

    `subsets_inferred` reads like "CT: 03,06→04", "X-ray: 25/35, 28/30→26" (a/b = either subset),
    "18,(16/34/17)→19"; a target written "17?" is uncertain and may be any subset with its modality
    and area that plays the task the target's name ends with; "→?" is unresolved (no target)."""
    cat = load_catalog()
    with resources.files("medmat.catalog").joinpath("paper_table3.csv").open(encoding="utf-8") as fh:
        table = pd.read_csv(fh, comment="#", dtype=str, keep_default_na=False)
    rows = []
    for r in table.itertuples(index=False):
        text = re.sub(r"^[A-Za-z-]+:\s*", "", r.subsets_inferred)
        left, right = text.split("→", 1)
        related = tuple(tuple(int(x) for x in re.findall(r"\d+", part)) for part in left.split(","))
        m = re.match(r"\s*(\d+)(\?)?", right)
        note = ""
        if m is None:
            targets: tuple[int, ...] = ()
            note = "target unresolved: " + right.strip()
        elif m.group(2):
            first = int(m.group(1))
            role = r.target.split()[-1].strip("()")
            t = cat.triplet_of_subset(first)
            alike = [no for no in cat.classification_subsets() if no != first
                     and cat.triplet_of_subset(no)[:2] == t[:2] and role in subset_tasks(no, "paper", cat)]
            targets = (first, *alike)
            note = (f"target uncertain ({m.group(0).strip()}): also read as a {t.modality}-{t.area} subset "
                    f"playing {role}: {', '.join(f'{n:02d}' for n in alike) or 'none'}")
        else:
            targets = (int(m.group(1)),)
        rows.append(PaperRow(int(r.row), PAPER_DIRECTIONS[r.direction], related, targets,
                             f"{r.related_1} + {r.related_2} -> {r.target}", float(r.baseline),
                             float(r.baseline_plus), float(r.trained), r.cg_helps, note))
    return tuple(rows)


def row_matches(row: PaperRow, combo: Combination) -> bool:
    """The combination is a reading of the row: same direction and target, members drawn from the row's
    alternatives (in either order)."""
    if row.direction != combo.direction or combo.target not in row.targets or len(row.related) != len(combo.related):
        return False
    return any(all(no in alts for no, alts in zip(perm, row.related))
               for perm in itertools.permutations(combo.related))


def _reading_rank(row: PaperRow, combo: Combination) -> tuple:
    """Lower = closer to the row as written (first alternatives, first target)."""
    best = min(sum(alts.index(no) for no, alts in zip(perm, row.related))
               for perm in itertools.permutations(combo.related)
               if all(no in alts for no, alts in zip(perm, row.related)))
    return (row.targets.index(combo.target), best, combo.related)


def match_paper_rows(combos: list[Combination]) -> list[Combination]:
    """Set paper_rows on each combination of one target, and paper_primary on one reading per row:
    the closest to the row as written, but a reading another row already runs only when the row has no
    other (rows 16 and 17 both allow 03+30 -> 28; 17 also allows 04+30, so it runs that)."""
    for row in paper_rows():
        hits = [c for c in combos if row_matches(row, c)]
        for c in hits:
            c.paper_rows += (row.row,)
        if hits:
            best = min(hits, key=lambda c: (c.paper_primary, _reading_rank(row, c)))
            best.primary_rows += (row.row,)
    return combos


def paper_row(number: int) -> PaperRow:
    return next(r for r in paper_rows() if r.row == number)

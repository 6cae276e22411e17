"""Finding a Med-MAT release's JSON files under a data root, in every layout the release has used.

The release's files moved and changed spelling over its history: `Original_Medical_Datasets/ori--NN`,
`Ori--NN` (the README's tree), `Aggregated_Subsets/Subset--NN`, the misspelled early folder
`Aggrregated_Subsets/`, and `Subset-04-train.json` (one hyphen) at the root. So files are matched by
name pattern (medmat_format.FILE_PATTERNS) anywhere under the root, never by folder name; only the
image folders (`med-mat/`) and hidden folders (`.git`, `.dvc`) are not searched.

Everything else met on the way is listed as ignored with the reason, so a user sees why a file was
not read: not JSON, a JSON file whose name is not a release file's, a directory named like one, a
FIFO or device (never opened: it would block), a Git LFS pointer stub (hint: `git lfs pull`), or a
second path to a file already found.
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from medmat.data.json_records import LFS_MAGIC
from medmat.data.release_files import FILE_PATTERNS, SPLITS, SourceFile

IMAGE_DIRS = {"med-mat"}   # casefolded names of folders holding images only


@dataclass(frozen=True)
class Ignored:
    """A path under the data root that is not read, with why. `check` names an ingest problem when
    the path looks like a release file that cannot be used (else None: simply not ours)."""

    rel: str
    reason: str
    check: str | None = None


@dataclass
class Discovery:
    files: list[SourceFile] = field(default_factory=list)
    ignored: list[Ignored] = field(default_factory=list)

    def lines(self, limit: int = 5) -> list[str]:
        """What was found and ignored, for the ingest log: counts, then a few examples per reason."""
        out = []
        by_place: dict[str, int] = {}
        for f in self.files:
            folder = f.rel.rsplit("/", 1)[0] if "/" in f.rel else "(data root)"
            by_place[folder] = by_place.get(folder, 0) + 1
        where = ", ".join(f"{n} in {d}" for d, n in sorted(by_place.items()))
        out.append(f"found {len(self.files)} Med-MAT JSON files" + (f" ({where})" if where else ""))
        by_reason: dict[str, list[str]] = {}
        for i in self.ignored:
            by_reason.setdefault(i.reason, []).append(i.rel)
        for reason, rels in sorted(by_reason.items(), key=lambda kv: (-len(kv[1]), kv[0])):
            shown = ", ".join(ascii(r)[1:-1] if not r.isprintable() else r for r in rels[:limit])
            more = f", ... {len(rels) - limit} more" if len(rels) > limit else ""
            out.append(f"ignored {len(rels)}: {reason}: {shown}{more}")
        return out


def match(name: str) -> tuple[str, int, str] | None:
    """(kind, number, split) of a release file name, else None."""
    for kind, pattern in FILE_PATTERNS.items():
        m = pattern.match(name)
        if m:
            return kind, int(m.group(1)), m.group(2).lower()
    return None


def discover(data_root: str | os.PathLike) -> Discovery:
    """Every release JSON file under `data_root`, sorted by (kind, number, split, path)."""
    root = Path(data_root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: data root is not a directory")
    found = Discovery()
    seen: dict[tuple[int, int], str] = {}
    for folder, dirs, files in os.walk(root, followlinks=False):
        here = Path(folder)
        rel_dir = here.relative_to(root).as_posix()
        prefix = "" if rel_dir == "." else rel_dir + "/"
        keep = []
        for d in sorted(dirs):
            if d.casefold() in IMAGE_DIRS or d.startswith("."):
                continue
            if match(d):
                found.ignored.append(Ignored(prefix + d, "a directory named like a release file", "not_a_file"))
                continue
            if (here / d).is_symlink():   # os.walk does not follow links to folders: say so
                found.ignored.append(Ignored(prefix + d, "a link to a folder (not followed)"))
                continue
            keep.append(d)
        dirs[:] = keep
        for name in sorted(files):
            _file(root, here / name, prefix + name, found, seen)
    order = {"dataset": 0, "subset": 1}
    found.files.sort(key=lambda s: (order[s.kind], s.number, SPLITS.index(s.split), s.rel))
    return found


def _file(root: Path, path: Path, rel: str, found: Discovery, seen: dict) -> None:
    hit = match(path.name)
    if hit is None:
        if path.name.startswith("."):
            return
        why = ("JSON, but not named like a release file (ori--NN-train.json, Subset--NN-train.json)"
               if path.suffix.casefold() == ".json" else "not a JSON file")
        found.ignored.append(Ignored(rel, why))
        return
    try:
        st = os.stat(path)       # follows links (DVC's cache links data files); never opens a FIFO
    except OSError as exc:
        found.ignored.append(Ignored(rel, f"cannot be read ({exc.strerror or exc})", "file_unreadable"))
        return
    if not stat.S_ISREG(st.st_mode):
        kind = "a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device or socket"
        found.ignored.append(Ignored(rel, f"{kind}, not a file (never opened: reading it could block)",
                                     "not_a_file"))
        return
    first = seen.setdefault((st.st_dev, st.st_ino), rel)
    if first != rel:
        found.ignored.append(Ignored(rel, f"the same file as {first} (a link)"))
        return
    try:  # non-blocking: a FIFO swapped in after the stat must not block discovery either
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            head = fh.read(len(LFS_MAGIC)) if stat.S_ISREG(os.fstat(fd).st_mode) else b""
    except OSError as exc:
        found.ignored.append(Ignored(rel, f"cannot be read ({exc.strerror or exc})", "file_unreadable"))
        return
    if head == LFS_MAGIC:
        found.ignored.append(Ignored(rel, "a Git LFS pointer, not the data: run `git lfs pull`", "lfs_pointer"))
        return
    kind, number, split = hit
    found.files.append(SourceFile(path.resolve(), rel, kind, number, split))

"""Image paths that are links into DVC's cache: accepted, while links anywhere else still escape.

With DVC's `cache.type` set to `symlink` or `hardlink`, every file of a tracked data root is a link
into the cache of the repository holding it (`<repo>/.dvc/cache`, or the `cache.dir` of its config).
A hardlink resolves inside the root already; a symlink resolves into the cache, outside the root, and
is accepted only there.
"""

from __future__ import annotations

import configparser
import functools
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

from medmat.data.images import PathEscapeError, UnsafePathError, resolve_image_path


@functools.lru_cache(maxsize=32)
def dvc_cache_dirs(data_root: str | os.PathLike) -> tuple[Path, ...]:
    """The cache folder(s) of the DVC repository holding `data_root` (walking up to the folder with
    `.dvc/`), resolved; () when the root is in no DVC repository."""
    here = Path(data_root).resolve()
    for folder in (here, *here.parents):
        dvc = folder / ".dvc"
        if dvc.is_dir():
            dirs = [dvc / "cache"]
            for name in ("config", "config.local"):
                cfg = configparser.ConfigParser(strict=False, interpolation=None)
                try:
                    cfg.read(dvc / name, encoding="utf-8")
                except (configparser.Error, OSError, UnicodeDecodeError):
                    continue
                configured = cfg.get("cache", "dir", fallback=None)
                if configured:
                    p = Path(configured.strip().strip("'\""))
                    dirs.append(p if p.is_absolute() else dvc / p)
            return tuple(dict.fromkeys(d.resolve() for d in dirs))
    return ()


def _lexically_outside(rel: str) -> bool:
    win = PureWindowsPath(rel)
    return (PurePosixPath(rel).is_absolute() or win.is_absolute() or bool(win.drive)
            or rel.startswith(("\\", "/")) or ".." in rel.replace("\\", "/").split("/"))


def resolve_record_image(data_root: Path, rel: str, allowed: tuple[Path, ...] = ()) -> Path:
    """resolve_image_path, except that a path which is inside the root as written and only leaves it
    through a link into one of `allowed` (DVC's cache) is accepted; returns the file to read."""
    try:
        return resolve_image_path(data_root, rel)
    except UnsafePathError:
        raise
    except PathEscapeError:
        if not allowed or not isinstance(rel, str) or not rel.strip() or _lexically_outside(rel):
            raise
        try:
            target = (data_root / rel).resolve()
        except (OSError, RuntimeError):
            raise
        if any(target == a or a in target.parents for a in allowed):
            return target
        raise

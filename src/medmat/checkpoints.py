"""Run folders on disk: complete checkpoints and folders swapped into place whole.

A checkpoint (model, optimiser, scheduler and RNG states written by `Accelerator.save_state`, plus the
trainer's own STATE_FILE) is written into a temp folder, fsynced, then renamed to `step-N`, so a
reader (a resumed run) sees a complete checkpoint or none. The final model folder is swapped the same
way.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from medmat.io import fsync_path

STATE_FILE = "trainer_state.json"


def fsync_tree(root: Path) -> None:
    for dirpath, _, files in os.walk(root):
        for name in files:
            fsync_path(os.path.join(dirpath, name))
        fsync_path(dirpath)


def replace_dir(tmp: Path, final: Path) -> None:
    """Put folder `tmp` at `final` atomically enough: a reader sees the old or the new, never half."""
    fsync_tree(tmp)
    old = final.with_name(f".{final.name}.old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)
    fsync_path(final.parent)


def checkpoints(out_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under RUN_DIR/checkpoints, oldest first (temp folders are ignored)."""
    root = Path(out_dir) / "checkpoints"
    found = []
    for p in root.glob("step-*") if root.is_dir() else []:
        if (p / STATE_FILE).is_file() and p.name[5:].isdigit():
            found.append((int(p.name[5:]), p))
    return [p for _, p in sorted(found)]

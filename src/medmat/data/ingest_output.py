"""Writing the records table: one file, locked, atomic, durable.

- The table and the problems of the run that wrote it are one unit: problems live in the parquet
  metadata, and the file appears in one rename. A reader sees both old or both new, never a mix.
- Files are fsynced before the rename and the folder after it, so a power cut cannot leave a name
  pointing at unwritten blocks.
- Two ingests of one output exclude each other through `.<name>.lock` (fcntl.flock, non-blocking: the
  second one says who holds it and stops). The kernel drops the lock when its holder dies, so a
  killed ingest never leaves a stale lock.
- Temp files are `.<name>.<pid>.tmp` / `.stage` beside the output. A SIGKILL cannot clean up, so the
  next ingest, once it holds the lock (no live writer can own them then), removes what is left.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import contextmanager
from pathlib import Path

from medmat.io import default_file_mode


class OutputLocked(RuntimeError):
    """Another ingest is writing the same output."""


def lock_path(out: Path) -> Path:
    return out.with_name(f".{out.name}.lock")


@contextmanager
def output_lock(out: Path):
    """Hold the output's lock for the block; OutputLocked (naming the holder) if another process has it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    path = lock_path(out)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            raise OutputLocked(f"{out} is being written by another ingest ({holder}); wait for it to finish, "
                               "or stop it") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}, since "
                      f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)   # releases the lock; the (empty of meaning) lock file stays for the next run


def temp_names(out: Path) -> tuple[Path, Path]:
    """(stage file, final temp file) of this process."""
    pid = os.getpid()
    return out.with_name(f".{out.name}.{pid}.stage"), out.with_name(f".{out.name}.{pid}.tmp")


def clean_stale_temps(out: Path) -> list[Path]:
    """Remove temp files of earlier (dead) writers of `out`. Call only while holding the lock."""
    removed = []
    if not out.parent.is_dir():
        return removed
    for p in out.parent.iterdir():
        if p.name.startswith(f".{out.name}.") and p.name.endswith((".tmp", ".stage")):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, out: Path) -> None:
    """fsync `tmp`, rename it over `out` in one step, fsync the folder (the rename itself durable)."""
    os.chmod(tmp, default_file_mode())
    fsync_path(tmp)
    os.replace(tmp, out)
    fsync_path(out.parent)

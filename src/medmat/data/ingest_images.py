"""The images a records table points at, as ingest checks them: each path once, each content once.

A record's image path is checked once per distinct path (control characters, escapes from the data root
other than links into DVC's cache, absent files, files that are not regular) and hashed (SHA-256) once
per file; the perceptual hash is computed once per distinct content, at the end.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from medmat.data.images import NotAFileError, PathEscapeError, sha256_file
from medmat.data.links import dvc_cache_dirs, resolve_record_image

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
# Perceptual hashes of image files at least this large are computed in threads (see ImageLedger.phashes).
THREADED_IMAGE_BYTES = 128 * 1024


class ImageLedger:
    def __init__(self, root: Path, phash=None):
        self.root = root
        self.phash = phash
        self.allowed = dvc_cache_dirs(root)
        self.known: dict[str, tuple[str, str | None]] = {}   # path as written -> check()
        self._hash_of_file: dict[str, str] = {}
        self._path_of_digest: dict[str, str] = {}

    @property
    def unique(self) -> int:
        """Distinct image files read."""
        return len(self._hash_of_file)

    def check(self, rel: str) -> tuple[str, str | None]:
        """('ok', sha256) | ('missing', None) | (check, message): once per distinct path."""
        hit = self.known.get(rel)
        if hit is not None:
            return hit
        m = _CONTROL.search(rel)
        if m:
            hit = ("path_control_character", f"image path {rel!r} contains the control character "
                   f"U+{ord(m.group()):04X}")
        else:
            try:
                path = str(resolve_record_image(self.root, rel, self.allowed))
            except PathEscapeError as exc:
                hit = ("path_escape", str(exc))
            else:
                hit = self._hash(path, rel)
        self.known[rel] = hit
        return hit

    def _hash(self, path: str, rel: str) -> tuple[str, str | None]:
        digest = self._hash_of_file.get(path)
        if digest is not None:
            return ("ok", digest)
        try:
            digest = sha256_file(path)
        except (FileNotFoundError, NotADirectoryError):
            return ("missing", None)
        except NotAFileError:
            return ("image_not_a_file", f"image path {rel!r} is not a regular file (a directory, FIFO or device)")
        except OSError as exc:
            return ("image_unreadable", f"image {rel!r} cannot be read ({exc.strerror or exc})")
        self._hash_of_file[path] = digest
        self._path_of_digest.setdefault(digest, path)
        return ("ok", digest)

    def phashes(self, workers: int | None = None) -> dict[str, str]:
        """Perceptual hash of every distinct image content, once per content ("" if it does not decode:
        validate says why). Large files in threads: their decoding releases the GIL (~3x on 4 threads),
        and images.py bounds the pixels decoded at once, so memory does not grow with the thread count.
        Small files in this thread: Python overhead, not decoding, is their cost, and threads contending
        for the GIL multiply it (3,500 64x64 PNGs: 2.3 s CPU in a pool of 8, 0.9 s in one thread)."""
        if self.phash is None or not self._path_of_digest:
            return {}
        from concurrent.futures import ThreadPoolExecutor

        def one(path: str) -> str:
            try:
                return self.phash(path)
            except (ValueError, OSError):
                return ""

        def size(path: str) -> int:
            try:
                return os.stat(path).st_size
            except OSError:
                return 0

        large = {d: p for d, p in self._path_of_digest.items() if size(p) >= THREADED_IMAGE_BYTES}
        out = {d: one(p) for d, p in self._path_of_digest.items() if d not in large}
        if large:
            with ThreadPoolExecutor(workers or min(8, os.cpu_count() or 1)) as pool:
                out.update(zip(large, pool.map(one, large.values())))
        return out

"""Per-record image columns for validation: link escapes, whether the file is there and decodes, and
its perceptual hash where the table has none.

Each distinct image is looked at once: the release repeats one image across many records, and the
full-scale benchmark cycles ~21k images through ~2.4M records.
"""

from __future__ import annotations

import os
import stat
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd

OK, NOT_CHECKED, ABSENT = "ok", "not checked", "absent"
LEXICAL_ESCAPE = r"^(?:[/\\]|[A-Za-z]:)|(?:^|[/\\])\.\.(?:[/\\]|$)"


def _paths(uniques: np.ndarray, data_root: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[str | None]]:
    """(absolute or '..', escapes through a link, resolved path or None) per distinct image path.

    Resolves each directory once and only the files that are links themselves: resolve_image_path
    resolves the root and every component per call (~0.6 ms an image, minutes at the release's ~1M
    images); this is the same rule. Absolute and '..' paths are left to the regex expectation."""
    escapes = np.zeros(len(uniques), dtype=bool)
    paths: list[str | None] = []
    lexical = pd.Series(uniques, dtype=object).str.contains(LEXICAL_ESCAPE, regex=True).to_numpy()
    root_real = os.path.realpath(data_root)
    dirs: dict[str, str] = {}
    for i, rel in enumerate(uniques):
        if lexical[i] or not rel or "\x00" in rel:
            paths.append(None)
            continue
        full = os.path.join(root_real, rel)
        head, tail = os.path.split(full)
        real_dir = dirs.get(head)
        if real_dir is None:
            real_dir = dirs[head] = os.path.realpath(head)
        real = os.path.realpath(full) if os.path.islink(full) else os.path.join(real_dir, tail)
        if not real.startswith(root_real + os.sep):
            escapes[i] = True
            paths.append(None)
        else:
            paths.append(real)
    return lexical.astype(bool), escapes, paths


def _exists(p: str) -> str:
    """Status from a stat only (`validate.images: exists`): absent, not a file, empty, or ok."""
    try:
        st = os.stat(p)
    except FileNotFoundError:
        return ABSENT
    except OSError as exc:
        return f"image file cannot be read ({exc.strerror or exc})"
    if not stat.S_ISREG(st.st_mode):
        return "is not a regular file (a directory, FIFO or device)"
    return OK if st.st_size > 0 else "image file is empty (0 bytes)"


def image_columns(images: pd.Series, sha: pd.Series, phash: pd.Series | None, data_root: str | os.PathLike,
                  mode: str, workers: int, progress: bool = False
                  ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(code per record, then per distinct image path: absolute or '..', link escapes, status, perceptual hash).

    status: OK, NOT_CHECKED (mode skip), ABSENT (no file at the path) or what is wrong with the image.
    The perceptual hash is the table's `image_phash` where it has one, else computed from the image
    decoded for the status (mode decode), else "". Per distinct path, not per record: 2.4M records
    share ~21k images at full scale; index with the codes where a per-record column is needed.
    """
    from medmat.data.images import ImageError, load_image, phash_of_image

    codes, uniques = codes_of(images)
    lexical, escapes, paths = _paths(uniques, data_root)
    status = np.full(len(uniques), NOT_CHECKED, dtype=object)
    hashes = np.full(len(uniques), "", dtype=object)
    if phash is not None:
        hashes[codes[::-1]] = _per_record(phash)[::-1]
    if mode != "skip":
        # Key by the ingest's sha256 where known: paths sharing a hash share bytes. A missing file has
        # no hash, so it is keyed by path.
        first_sha = np.full(len(uniques), "", dtype=object)
        first_sha[codes[::-1]] = _per_record(sha)[::-1]
        by_key: dict[str, list[int]] = {}
        for i, p in enumerate(paths):
            if p is not None:
                by_key.setdefault(first_sha[i] or f"path:{p}", []).append(i)

        def probe(i: int) -> tuple[str, str]:
            p = paths[i]
            if mode == "exists":
                return _exists(p), hashes[i]
            try:
                im = load_image(p)
            except ImageError as exc:
                if not os.path.lexists(p):
                    return ABSENT, ""
                return str(exc).replace(f"{p}: ", "", 1), ""
            return OK, hashes[i] or phash_of_image(im)

        reps = [v[0] for v in by_key.values()]
        from tqdm import tqdm
        # Threads overlap file reads with decoding; decode memory stays bounded whatever their number
        # (medmat.data.images.DECODE_BUDGET).
        with ThreadPoolExecutor(max_workers=workers or os.cpu_count() or 1) as pool:
            results = list(tqdm(pool.map(probe, reps, chunksize=64), total=len(reps), desc="images",
                                unit="img", disable=not progress))
        for members, (result, h) in zip(by_key.values(), results):
            for i in members:
                status[i] = result
                hashes[i] = hashes[i] or h
    return codes, lexical, escapes, status, hashes


def codes_of(values: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """(int64 code per row, distinct values as an object array, "" for missing): cheap on categoricals."""
    codes, uniques = pd.factorize(values, use_na_sentinel=True)
    uniques = np.append(np.asarray(uniques, dtype=object), "")
    codes = np.where(codes < 0, len(uniques) - 1, codes).astype(np.int64)
    return codes, uniques


def _per_record(values: pd.Series) -> np.ndarray:
    """Object array of the values ("" for missing), sharing one string object per distinct value."""
    codes, uniques = codes_of(values)
    return uniques[codes]

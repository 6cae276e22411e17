"""Safe image access: paths confined to the data root, one loader for PNG/JPEG and DICOM, content hashes.

Record paths come from JSON files we did not write, so a path is trusted only after it resolves
(symlinks included) to a file inside the data root.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}


class ImageError(ValueError):
    """An image that cannot be used: empty, truncated, undecodable. The message names the path."""


class PathEscapeError(ImageError):
    """A record's image path that points outside the data root (`..`, absolute, or an escaping link)."""


def resolve_image_path(data_root: str | os.PathLike, rel: str) -> Path:
    """The absolute path of `rel` inside `data_root`, refusing anything that escapes the root.

    Refused: empty paths, absolute paths (POSIX or Windows, drive letters included), any `..`
    component, and paths that leave the root once symlinks are resolved. The file need not exist
    (a missing image is the validator's finding, not a path error).
    """
    if not isinstance(rel, str) or not rel.strip():
        raise PathEscapeError(f"image path {rel!r} is empty or not a string")
    win = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or win.is_absolute() or win.drive or rel.startswith(("\\", "/")):
        raise PathEscapeError(f"image path {rel!r} is absolute; it must be relative to the data root")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathEscapeError(f"image path {rel!r} contains '..'; it must stay inside the data root")
    root = Path(data_root).resolve()
    resolved = (root / rel).resolve()
    if resolved != root and root not in resolved.parents:
        raise PathEscapeError(f"image path {rel!r} resolves to {resolved}, outside the data root {root} "
                              "(a symbolic link escapes it)")
    return resolved


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (streamed, so large DICOM series do not fill memory)."""
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def _is_dicom(path: Path) -> bool:
    if path.suffix.lower() in DICOM_SUFFIXES:
        return True
    with path.open("rb") as fh:  # DICOM Part 10: 128-byte preamble then 'DICM'
        head = fh.read(132)
    return len(head) == 132 and head[128:132] == b"DICM"


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as an RGB PIL image; DICOM is rescaled and windowed to 8 bits.

    Raises ImageError naming the path for a missing, empty, truncated or undecodable file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image ({exc.strerror or exc})") from None
    if size == 0:
        raise ImageError(f"{path}: image file is empty (0 bytes)")
    if _is_dicom(path):
        return _load_dicom(path)
    try:
        with Image.open(path) as im:
            im.load()  # decode now: a truncated file fails here, not later in a training batch
            return im.convert("RGB")
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageError(f"{path}: image cannot be decoded ({exc})") from None


def _load_dicom(path: Path) -> Image.Image:
    import pydicom  # imported lazily: most datasets are PNG/JPEG
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(path)
        arr = ds.pixel_array.astype(np.float64)
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, EOFError, TypeError) as exc:
        raise ImageError(f"{path}: DICOM cannot be decoded ({exc})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and getattr(ds, "SamplesPerPixel", 1) > 1:
        # Colour DICOM (e.g. secondary capture): already display values; just scale to 8 bits.
        return Image.fromarray(_minmax_u8(arr[..., :3]), "RGB")
    if arr.ndim == 3:  # multi-frame: the middle frame is the representative one
        arr = arr[arr.shape[0] // 2]
    # Stored values -> modality units (e.g. Hounsfield for CT).
    arr = arr * float(getattr(ds, "RescaleSlope", 1) or 1) + float(getattr(ds, "RescaleIntercept", 0) or 0)
    center, width = _first(getattr(ds, "WindowCenter", None)), _first(getattr(ds, "WindowWidth", None))
    if center is not None and width is not None and width > 1:
        # Linear VOI window as in DICOM PS3.3 C.11.2.1.2.
        lo, hi = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
        out = np.clip((arr - lo) / (hi - lo), 0.0, 1.0) * 255.0
        u8 = np.round(out).astype(np.uint8)
    else:
        u8 = _minmax_u8(arr)
    if getattr(ds, "PhotometricInterpretation", "") == "MONOCHROME1":  # 0 = white in MONOCHROME1
        u8 = 255 - u8
    return Image.fromarray(u8, "L").convert("RGB")


def _first(value: object) -> float | None:
    """WindowCenter/Width may be multi-valued; the first pair is the default view."""
    if value is None:
        return None
    try:
        if isinstance(value, (list, tuple)) or hasattr(value, "__len__") and not isinstance(value, str):
            value = list(value)[0]
        return float(value)
    except (TypeError, ValueError, IndexError):
        return None


def _minmax_u8(arr: np.ndarray) -> np.ndarray:
    lo, hi = float(np.min(arr)), float(np.max(arr))
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    return np.round((arr - lo) / (hi - lo) * 255.0).astype(np.uint8)

"""Safe image access: paths confined to the data root, one loader for PNG/JPEG/TIFF and DICOM, content
and perceptual hashes.

Record paths come from JSON files we did not write, so a path is trusted only after it resolves
(symlinks included) to a file inside the data root, and a file is read only once it is known to be a
regular file (a FIFO would block the reader, a device would never end) whose header announces a size
we are willing to decode (a small PNG can announce gigapixels: a decompression bomb).

Every refusal is an `ImageError` (a ValueError) whose message names the path; the classes below say
which kind of refusal it was, so callers can report each under its own name.
"""

from __future__ import annotations

import hashlib
import os
import re
import stat
import threading
from contextlib import contextmanager
from pathlib import Path, PurePosixPath, PureWindowsPath

import numpy as np
from PIL import Image, UnidentifiedImageError

DICOM_SUFFIXES = {".dcm", ".dicom"}

# Largest image decoded, in pixels: Pillow's own decompression-bomb threshold (~89 Mpx, a 9459 x 9459
# image), checked from the header before any pixel is decoded. Med-MAT's images are far smaller.
MAX_PIXELS = Image.MAX_IMAGE_PIXELS
# Pixels decoded at once across all threads. Decoding holds ~10 bytes a pixel (decoded mode, 8-bit
# copy, RGB result), so this caps decode memory near 320 MB whatever the thread count; an image larger
# than the budget decodes alone.
DECODE_BUDGET_PIXELS = 32 * 2**20
# Modes with more than 8 bits a sample: rescaled to 8 bits by their actual range (Pillow's own
# convert("RGB") clips them, so a 16-bit PNG became white).
HIGH_BIT_MODES = {"I;16", "I;16B", "I;16L", "I;16N", "I;16S", "I;32", "I;32B", "I", "F"}
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class ImageError(ValueError):
    """An image that cannot be used: empty, truncated, undecodable. The message names the path."""


class PathEscapeError(ImageError):
    """A record's image path that points outside the data root (`..`, absolute, or an escaping link)."""


class UnsafePathError(PathEscapeError):
    """A path refused for what it is made of (control characters, a symlink loop), before anything is
    opened. A subclass of PathEscapeError because callers treat both alike: the path is never used."""


class NotAFileError(ImageError, OSError):
    """The path exists but is a directory, FIFO, socket or device, not a file. Also an OSError, so code
    that treats unreadable files as OSError (hashing in ingest) keeps working without blocking on it."""


class ImageBombError(ImageError):
    """The header announces more pixels than MAX_PIXELS: refused before decoding (bounded memory)."""


def check_path_characters(path: str) -> None:
    """Raise UnsafePathError if `path` holds a control character (NUL, newline, ESC, C1 ...): such a
    path cannot be opened (NUL) or corrupts every log and report that prints it."""
    m = _CONTROL.search(path)
    if m:
        raise UnsafePathError(f"image path {path!r} contains the control character U+{ord(m.group()):04X}")


def resolve_image_path(data_root: str | os.PathLike, rel: str) -> Path:
    """The absolute path of `rel` inside `data_root`, refusing anything that escapes the root.

    Refused: empty paths, control characters, absolute paths (POSIX or Windows, drive letters
    included), any `..` component, and paths that leave the root once symlinks are resolved. The file
    need not exist (a missing image is the validator's finding, not a path error).
    """
    if not isinstance(rel, str) or not rel.strip():
        raise PathEscapeError(f"image path {rel!r} is empty or not a string")
    check_path_characters(rel)
    win = PureWindowsPath(rel)
    if PurePosixPath(rel).is_absolute() or win.is_absolute() or win.drive or rel.startswith(("\\", "/")):
        raise PathEscapeError(f"image path {rel!r} is absolute; it must be relative to the data root")
    parts = rel.replace("\\", "/").split("/")
    if ".." in parts:
        raise PathEscapeError(f"image path {rel!r} contains '..'; it must stay inside the data root")
    root = Path(data_root).resolve()
    try:
        resolved = (root / rel).resolve()
    except (OSError, RuntimeError) as exc:   # a symlink loop (RuntimeError before Python 3.13)
        raise UnsafePathError(f"image path {rel!r} cannot be resolved ({exc})") from None
    if resolved != root and root not in resolved.parents:
        raise PathEscapeError(f"image path {rel!r} resolves to {resolved}, outside the data root {root} "
                              "(a symbolic link escapes it)")
    return resolved


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device")):
        if test(mode):
            return name
    return "not a regular file"


@contextmanager
def open_regular(path: str | os.PathLike):
    """A binary file object for `path`, only if it is a regular file (NotAFileError otherwise).

    Opened non-blocking, then checked on the open descriptor: a FIFO put in place after a stat could
    otherwise block the reader forever; O_NONBLOCK changes nothing for a regular file.
    """
    name = os.fspath(path)
    check_path_characters(str(name))
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise NotAFileError(f"{name}: is a directory, not an image file") from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise NotAFileError(f"{name}: is {_kind(mode)}, not an image file")
        fh = os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise
    with fh:
        yield fh


def sha256_file(path: str | os.PathLike) -> str:
    """Hex SHA-256 of a file's bytes (streamed, so large DICOM series do not fill memory).

    Raises OSError for a missing or unreadable file, NotAFileError (an OSError too) for anything that
    is not a regular file, without blocking on it."""
    with open_regular(path) as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


_DIGESTS: dict[tuple[str, int, int], str] = {}


def sha256_file_cached(path: str | os.PathLike) -> str:
    """`sha256_file`, remembered within the process by (path, size, mtime): a study fingerprints the
    same records table, manifests and start weights for every one of its units."""
    st = os.stat(path)
    key = (str(Path(path).resolve()), st.st_size, st.st_mtime_ns)
    if key not in _DIGESTS:
        _DIGESTS[key] = sha256_file(path)
    return _DIGESTS[key]


class PixelBudget:
    """Pixels being decoded at once, across threads: a thread waits while its image would take the
    total over the limit (an image over the limit on its own waits until it is alone). `peak` is the
    most ever in flight, for tests and benchmarks."""

    def __init__(self, limit: int):
        self.limit = limit
        self.in_flight = 0
        self.peak = 0
        self._cond = threading.Condition()

    @contextmanager
    def hold(self, pixels: int):
        with self._cond:
            self._cond.wait_for(lambda: self.in_flight == 0 or self.in_flight + pixels <= self.limit)
            self.in_flight += pixels
            self.peak = max(self.peak, self.in_flight)
        try:
            yield
        finally:
            with self._cond:
                self.in_flight -= pixels
                self._cond.notify_all()


DECODE_BUDGET = PixelBudget(DECODE_BUDGET_PIXELS)


def _is_dicom(path: Path, head: bytes) -> bool:
    # DICOM Part 10: 128-byte preamble then 'DICM'
    return path.suffix.lower() in DICOM_SUFFIXES or (len(head) >= 132 and head[128:132] == b"DICM")


def load_image(path: str | os.PathLike) -> Image.Image:
    """The image at `path` as an RGB PIL image: DICOM rescaled and windowed to 8 bits, images of more
    than 8 bits a sample (16-bit PNG/TIFF, 32-bit integer or float TIFF) rescaled by their range.

    Raises ImageError naming the path: NotAFileError (directory, FIFO, device), ImageBombError (header
    over MAX_PIXELS), UnsafePathError (control characters), else a missing, empty, truncated or
    undecodable file.
    """
    path = Path(path)
    try:
        with open_regular(path) as fh:
            head = fh.read(132)
            if not head:
                raise ImageError(f"{path}: image file is empty (0 bytes)")
            fh.seek(0)
            if _is_dicom(path, head):
                return _load_dicom(path, fh)
            return _load_pil(path, fh)
    except ImageError:
        raise
    except OSError as exc:
        raise ImageError(f"{path}: cannot read image ({exc.strerror or exc})") from None


def _load_pil(path: Path, fh) -> Image.Image:
    try:
        with Image.open(fh) as im:   # reads the header only
            pixels = im.size[0] * im.size[1]
            if pixels > MAX_PIXELS:
                raise ImageBombError(f"{path}: image header announces {im.size[0]} x {im.size[1]} pixels, "
                                     f"over the limit of {MAX_PIXELS:,} (a decompression bomb?); not decoded")
            with DECODE_BUDGET.hold(pixels):
                im.load()  # decode now: a truncated file fails here, not later in a training batch
                if im.mode in HIGH_BIT_MODES:
                    arr = np.asarray(im)
                    if arr.ndim == 3:   # multi-band high-bit images: one grey view of them
                        arr = arr.mean(axis=-1)
                    return Image.fromarray(_range_u8(arr), "L").convert("RGB")
                return im.convert("RGB")
    except Image.DecompressionBombError as exc:   # Pillow's own check in open (over twice its limit)
        raise ImageBombError(f"{path}: {exc}; not decoded") from None
    except UnidentifiedImageError:
        raise ImageError(f"{path}: not a readable image (unknown or corrupt format)") from None
    except ImageError:
        raise
    except (OSError, SyntaxError, ValueError, MemoryError) as exc:
        raise ImageError(f"{path}: image cannot be decoded ({exc})") from None


def _load_dicom(path: Path, fh) -> Image.Image:
    import pydicom  # imported lazily: most datasets are PNG/JPEG
    from pydicom.errors import InvalidDicomError

    try:
        ds = pydicom.dcmread(fh, stop_before_pixels=True)
        rows, cols = int(getattr(ds, "Rows", 0) or 0), int(getattr(ds, "Columns", 0) or 0)
        frames = int(getattr(ds, "NumberOfFrames", 1) or 1)
        if rows * cols * frames > MAX_PIXELS:
            raise ImageBombError(f"{path}: DICOM header announces {frames} frame(s) of {cols} x {rows} pixels, "
                                 f"over the limit of {MAX_PIXELS:,}; not decoded")
        fh.seek(0)
        with DECODE_BUDGET.hold(rows * cols * frames):
            ds = pydicom.dcmread(fh)
            arr = ds.pixel_array.astype(np.float64)
    except ImageError:
        raise
    except (InvalidDicomError, AttributeError, KeyError, ValueError, OSError, EOFError, TypeError) as exc:
        raise ImageError(f"{path}: DICOM cannot be decoded ({exc})") from None
    if arr.ndim == 3 and arr.shape[-1] in (3, 4) and getattr(ds, "SamplesPerPixel", 1) > 1:
        # Colour DICOM (e.g. secondary capture): already display values; just scale to 8 bits.
        return Image.fromarray(_range_u8(arr[..., :3]), "RGB")
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
        u8 = _range_u8(arr)
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


def _range_u8(arr: np.ndarray) -> np.ndarray:
    """8-bit image of `arr` scaled by its actual range (min -> 0, max -> 255); a constant image is 0.

    Non-finite values (float TIFFs) take the nearest end of the finite range."""
    arr = np.asarray(arr, dtype=np.float64 if arr.dtype == np.float64 else np.float32)
    finite = np.isfinite(arr)
    if not finite.any():
        return np.zeros(arr.shape, dtype=np.uint8)
    lo, hi = float(arr[finite].min()), float(arr[finite].max())
    if hi <= lo:
        return np.zeros(arr.shape, dtype=np.uint8)
    arr = np.nan_to_num(arr, nan=lo, posinf=hi, neginf=lo)
    return np.round((arr - lo) * (255.0 / (hi - lo))).clip(0, 255).astype(np.uint8)


# ---- perceptual hashes ---------------------------------------------------------------------------
def phash_of_image(im: Image.Image) -> str:
    """64-bit perceptual hash (DCT hash of the `imagehash` library) as 16 hex digits. Re-encoding or
    resizing an image moves it by a few bits; unrelated images differ in ~32 of 64."""
    import imagehash  # lazily: it imports scipy

    return str(imagehash.phash(im, hash_size=8))


def perceptual_hash(path: str | os.PathLike) -> str:
    """The perceptual hash (16 hex digits) of the image at `path`, decoded as `load_image` does.
    Raises ImageError naming the path when the image cannot be decoded."""
    return phash_of_image(load_image(path))


def phash_distance(a: str, b: str) -> int:
    """Hamming distance (bits) between two perceptual hashes in hex."""
    return (int(a, 16) ^ int(b, 16)).bit_count()

"""Image access: path confinement, PNG/JPEG/DICOM loading (pydicom's real CT and MR), bad files."""

from __future__ import annotations

import hashlib
import io
import os

import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom.data import get_testdata_file

from medmat.data.images import (ImageError, PathEscapeError, load_image, resolve_image_path, sha256_file,
                                sha256_file_cached)


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "data"
    (r / "med-mat" / "ds").mkdir(parents=True)
    return r


def test_resolve_inside_root(root):
    p = resolve_image_path(root, "med-mat/ds/a.png")
    assert p == (root / "med-mat" / "ds" / "a.png").resolve()


@pytest.mark.parametrize("rel, why", [
    ("../outside.png", r"'\.\.'"),
    ("med-mat/../../outside.png", r"'\.\.'"),
    ("med-mat\\..\\..\\outside.png", r"'\.\.'"),
    ("/etc/passwd", "absolute"),
    ("C:\\images\\a.png", "absolute"),
    ("", "empty"),
])
def test_resolve_refuses_escapes(root, rel, why):
    with pytest.raises(PathEscapeError, match=why) as err:
        resolve_image_path(root, rel)
    if rel:
        assert repr(rel) in str(err.value)  # the message names the offending path


def test_resolve_refuses_symlink_escaping_root(root, tmp_path):
    outside = tmp_path / "secret"
    outside.mkdir()
    (outside / "x.png").write_bytes(b"not really")
    os.symlink(outside, root / "med-mat" / "link")
    with pytest.raises(PathEscapeError, match="outside the data root"):
        resolve_image_path(root, "med-mat/link/x.png")
    # A link that stays inside the root is fine.
    os.symlink(root / "med-mat" / "ds", root / "med-mat" / "alias")
    assert resolve_image_path(root, "med-mat/alias/a.png") == (root / "med-mat" / "ds" / "a.png").resolve()


def test_load_png_and_jpeg_as_rgb(tmp_path):
    grey = tmp_path / "g.png"
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8), "L").save(grey)
    im = load_image(grey)
    assert im.mode == "RGB" and im.size == (8, 8)
    assert np.asarray(im)[0, 1].tolist() == [1, 1, 1]
    jpg = tmp_path / "c.jpg"
    Image.new("RGB", (10, 6), (200, 10, 10)).save(jpg, "JPEG")
    im = load_image(jpg)
    assert im.mode == "RGB" and im.size == (10, 6)
    assert np.asarray(im)[3, 5, 0] > 150


def test_load_real_ct_dicom():
    path = get_testdata_file("CT_small.dcm")
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (128, 128)
    arr = np.asarray(im)
    assert arr.dtype == np.uint8 and arr.min() == 0 and arr.max() == 255  # no window: min-max of HU
    ds = pydicom.dcmread(path)
    hu = ds.pixel_array * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    expected = np.round((hu - hu.min()) / (hu.max() - hu.min()) * 255).astype(np.uint8)
    assert np.array_equal(arr[..., 0], expected)


def test_load_real_mr_dicom_applies_window():
    path = get_testdata_file("MR_small.dcm")
    ds = pydicom.dcmread(path)
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    im = load_image(path)
    assert im.mode == "RGB" and im.size == (64, 64)
    arr = np.asarray(im)[..., 0].astype(int)
    raw = ds.pixel_array.astype(float)
    lo = center - 0.5 - (width - 1) / 2
    expected = np.round(np.clip((raw - lo) / (width - 1), 0, 1) * 255)
    assert np.abs(arr - expected).max() <= 1
    # The window saturates the brightest tissue, which a plain min-max scaling would not.
    assert (raw > lo + width).sum() > 0 and (arr[raw > lo + width] == 255).all()
    minmax = np.round((raw - raw.min()) / (raw.max() - raw.min()) * 255)
    assert np.abs(arr - minmax).max() > 20


def test_zero_byte_image(tmp_path):
    p = tmp_path / "empty.png"
    p.write_bytes(b"")
    with pytest.raises(ImageError, match=r"empty.png: image file is empty"):
        load_image(p)


def test_truncated_png(tmp_path):
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(buf, "PNG")
    p = tmp_path / "cut.png"
    p.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageError, match="cut.png"):
        load_image(p)


def test_undecodable_files(tmp_path):
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image at all")
    with pytest.raises(ImageError, match="junk.jpg: not a readable image"):
        load_image(junk)
    fake = tmp_path / "fake.dcm"
    fake.write_bytes(b"\0" * 128 + b"DICM" + b"garbage")
    with pytest.raises(ImageError, match="fake.dcm: DICOM cannot be decoded"):
        load_image(fake)
    with pytest.raises(ImageError, match="missing.png: cannot read image"):
        load_image(tmp_path / "missing.png")


def test_sha256_file(tmp_path):
    p = tmp_path / "b.bin"
    p.write_bytes(b"abc" * 1000)
    assert sha256_file(p) == hashlib.sha256(b"abc" * 1000).hexdigest()


def test_sha256_file_cached_sees_a_rewritten_file(tmp_path):
    """The cache is keyed by (path, size, mtime): a new tower or manifest under the same path is rehashed."""
    p = tmp_path / "tower.bin"
    p.write_bytes(b"old")
    assert sha256_file_cached(p) == hashlib.sha256(b"old").hexdigest()
    p.write_bytes(b"newer")
    assert sha256_file_cached(p) == hashlib.sha256(b"newer").hexdigest()


# ---- faithful decoding: more than 8 bits a sample -------------------------------------------------
def _expected_u8(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    return np.round((a - a.min()) / (a.max() - a.min()) * 255).astype(np.uint8)


def test_16bit_png_is_rescaled_by_its_range_not_clipped(tmp_path):
    # A 12-bit CT-like range stored in a 16-bit PNG: Pillow's own convert("RGB") clips it to white.
    a = (np.arange(64 * 64, dtype=np.uint16).reshape(64, 64) % 4000 + 1000).astype(np.uint16)
    p = tmp_path / "ct16.png"
    Image.fromarray(a).save(p)
    assert Image.open(p).mode == "I;16"
    assert np.asarray(Image.open(p).convert("RGB")).min() == 255   # the bug this guards against
    arr = np.asarray(load_image(p))
    assert arr.shape == (64, 64, 3) and arr.min() == 0 and arr.max() == 255
    assert np.array_equal(arr[..., 0], _expected_u8(a))


@pytest.mark.parametrize("dtype", [np.uint16, np.int32, np.float32])
def test_high_bit_tiff_is_rescaled(tmp_path, dtype):
    a = (np.arange(32 * 32).reshape(32, 32) * 37 - 5000).astype(dtype) if dtype != np.uint16 else \
        (np.arange(32 * 32).reshape(32, 32) * 37).astype(dtype)
    p = tmp_path / "x.tif"
    Image.fromarray(a).save(p)
    arr = np.asarray(load_image(p))[..., 0]
    assert np.abs(arr.astype(int) - _expected_u8(a).astype(int)).max() <= 1


def test_float_tiff_with_nan_and_inf(tmp_path):
    a = np.linspace(-1, 1, 16 * 16, dtype=np.float32).reshape(16, 16)
    a[0, 0], a[0, 1], a[0, 2] = np.nan, np.inf, -np.inf
    p = tmp_path / "f.tif"
    Image.fromarray(a).save(p)
    arr = np.asarray(load_image(p))[..., 0]
    assert arr[0, 1] == 255 and arr[0, 2] == 0 and arr[0, 0] == 0 and arr[-1, -1] == 255


# ---- input that fights back ---------------------------------------------------------------------------
def _bomb_png(path, side: int) -> None:
    """A real, valid PNG of side x side black pixels: a few hundred kB that decode to side^2 bytes."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row, parts = zlib.compressobj(9), b"\0" * (side + 1), []
    for _ in range(side):
        parts.append(comp.compress(row))
    parts.append(comp.flush())
    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)   # 8-bit greyscale
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"".join(parts))
                     + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # Pillow warns, we refuse
def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    import subprocess
    import sys

    from medmat.data.images import MAX_PIXELS

    over = tmp_path / "bomb.png"            # just over our limit (Pillow itself only warns here)
    _bomb_png(over, int(MAX_PIXELS ** 0.5) + 50)
    far = tmp_path / "bigbomb.png"          # over twice the limit: Pillow's own error, renamed
    _bomb_png(far, int((2 * MAX_PIXELS) ** 0.5) + 50)
    assert over.stat().st_size < 1_000_000
    # In a child process, so its peak memory is the decode's alone: decoding would take > 89 MB (L) and
    # 268 MB (RGB); refusing from the header takes nothing beyond the interpreter.
    # VmHWM, not ru_maxrss: Linux carries ru_maxrss over exec from the (large) forking test process.
    code = ("import sys\nfrom medmat.data.images import ImageBombError, load_image\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n        load_image(p)\n    except ImageBombError as e:\n        print('BOMB', e)\n"
            "hwm = [ln for ln in open('/proc/self/status') if ln.startswith('VmHWM')][0]\n"
            "print('MB', int(hwm.split()[1]) // 1024)\n")
    out = subprocess.run([sys.executable, "-c", code, str(over), str(far)], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    assert out.count("BOMB") == 2 and "bomb.png" in out and "bigbomb.png" in out
    assert int(out.rsplit("MB", 1)[1]) < 150, out


def test_directory_fifo_and_device_are_named_not_opened(tmp_path):
    from medmat.data.images import NotAFileError

    d = tmp_path / "dir.png"
    d.mkdir()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)   # nobody writes to it: opening it for reading would block forever
    for p, kind in ((d, "directory"), (fifo, "FIFO")):
        with pytest.raises(NotAFileError, match=rf"{p.name}: is a {kind}"):
            load_image(p)
        with pytest.raises(NotAFileError):
            sha256_file(p)
        with pytest.raises(OSError):   # what ingest's hashing catches: no traceback, no block there
            sha256_file(p)
    with pytest.raises(NotAFileError, match="character device"):
        load_image("/dev/zero")       # would never end if read


@pytest.mark.parametrize("rel", ["med-mat/ds/a\nb.png", "med-mat/ds/a\x00.png", "med-mat/\x1b[2Jx.png",
                                 "med-mat/ds/\x85.png"])
def test_control_characters_in_paths(root, rel):
    from medmat.data.images import UnsafePathError

    with pytest.raises(UnsafePathError, match="control character U\\+00"):
        resolve_image_path(root, rel)
    with pytest.raises(UnsafePathError):
        load_image(root / rel)
    assert issubclass(UnsafePathError, PathEscapeError)   # callers that refuse escapes refuse these too


def test_symlink_loop_is_a_named_error(root):
    from medmat.data.images import UnsafePathError

    os.symlink(root / "med-mat" / "loop", root / "med-mat" / "loop")
    with pytest.raises(PathEscapeError, match="loop"):
        resolve_image_path(root, "med-mat/loop/x.png")
    with pytest.raises(ImageError, match="loop"):
        load_image(root / "med-mat" / "loop")
    assert UnsafePathError


def test_decode_memory_is_bounded_whatever_the_thread_count(tmp_path, monkeypatch):
    """At most DECODE_BUDGET pixels decode at once: 8 threads decoding 4-Mpx images under a 9-Mpx
    budget never hold more than two, though they all run at once."""
    from concurrent.futures import ThreadPoolExecutor

    from medmat.data import images

    budget = images.PixelBudget(9 * 2**20)
    monkeypatch.setattr(images, "DECODE_BUDGET", budget)
    paths = []
    for i in range(12):
        p = tmp_path / f"big{i}.png"
        Image.fromarray(np.full((2048, 2048), i, dtype=np.uint8)).save(p, compress_level=1)
        paths.append(p)
    with ThreadPoolExecutor(max_workers=8) as pool:
        sizes = list(pool.map(lambda p: load_image(p).size, paths))
    assert sizes == [(2048, 2048)] * 12
    assert 2 * 2048 * 2048 <= budget.peak <= 9 * 2**20 and budget.in_flight == 0
    # One image over the whole budget still decodes, alone.
    small = images.PixelBudget(1000)
    monkeypatch.setattr(images, "DECODE_BUDGET", small)
    assert load_image(paths[0]).size == (2048, 2048) and small.peak == 2048 * 2048


# ---- perceptual hashes ----------------------------------------------------------------------------------
def _scene(seed: int, size: int = 128) -> Image.Image:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:size, 0:size] / size
    arr = np.zeros((size, size))
    for _ in range(6):   # a few soft blobs: structure at the scales a DCT hash sees
        cy, cx, r, w = rng.random(4)
        arr += (w + 0.2) * np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (0.02 + 0.05 * r))
    return Image.fromarray(np.uint8(255 * arr / arr.max()), "L")


def test_perceptual_hash_sees_copies_not_strangers(tmp_path):
    from medmat.data.images import perceptual_hash, phash_distance

    orig = tmp_path / "a.png"
    _scene(1).save(orig)
    _scene(1).resize((97, 97), Image.LANCZOS).save(tmp_path / "a_small.jpg", quality=70)
    _scene(1).convert("RGB").save(tmp_path / "a.jpg", quality=60)
    h = perceptual_hash(orig)
    assert len(h) == 16 and int(h, 16) >= 0
    for copy in ("a_small.jpg", "a.jpg"):
        assert phash_distance(h, perceptual_hash(tmp_path / copy)) <= 4
    for seed in range(2, 8):
        other = tmp_path / f"o{seed}.png"
        _scene(seed).save(other)
        assert phash_distance(h, perceptual_hash(other)) > 8
    with pytest.raises(ImageError, match="missing.png"):
        perceptual_hash(tmp_path / "missing.png")

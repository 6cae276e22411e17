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

from medmat.data.images import ImageError, PathEscapeError, load_image, resolve_image_path, sha256_file


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

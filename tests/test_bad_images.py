"""Bad image input through the real `medmat ingest` and `medmat validate` CLIs: each case ends in an exit
code and a problem naming the file and the record, never a traceback or a blocked reader, and every good
record of the same run is still in the table.

Images that are not files (directory, FIFO, device) or whose path holds a control character are refused
by ingest (the record is left out, a critical `ingest.<check>`); a decompression bomb is a file that
ingest keeps and validate refuses to decode (`image_readable`); a 16-bit PNG is no fault at all.
"""

from __future__ import annotations

import os
import stat

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from validate_world import (  # noqa: F401 - clean_world and world are fixtures
    ORI2_TRAIN, PER_LABEL, WORLD, _write, assert_names, clean_world, failing, pipeline, read, world,
)

TOTAL = sum(len(v) * sum(PER_LABEL.values()) for v in WORLD.values())
RID, REC_ID = "ori02-train-5", 5      # the record broken in each case (index 4 of ori--02-train.json)


def _image_of(world) -> str:
    return read(world, 2, "train")[4]["image"]


def _run(world, capsys) -> tuple[int, dict]:
    code, report = pipeline(world)
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return code, report


def _table_ids(world) -> set[str]:
    return set(pq.read_table(world.parent / "work" / "records.parquet", columns=["record_id"])
               .column("record_id").to_pylist())


@pytest.mark.timeout(120)   # a FIFO opened for reading with no writer would block here forever
@pytest.mark.parametrize("kind", ["directory", "fifo", "device"])
def test_image_that_is_not_a_file(world, capsys, kind):
    path = world / _image_of(world)
    path.unlink()
    if kind == "directory":
        path.mkdir()
    elif kind == "fifo":
        os.mkfifo(path)
    else:
        try:
            os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 5))   # like /dev/zero: never ends if read
        except PermissionError:
            pytest.skip("creating a device node needs CAP_MKNOD")
    code, report = _run(world, capsys)
    assert code == 1
    hit = assert_names(report, "ingest.image_not_a_file", ORI2_TRAIN, REC_ID)
    assert "not a regular file" in hit["message"]
    assert report["records"] == TOTAL - 1 and RID not in _table_ids(world)


@pytest.mark.parametrize("bad", ["a\nb.png", "a\x00b.png", "\x1b[31mred.png", "tab\there.png"])
def test_control_character_in_image_path(world, capsys, bad):
    recs = read(world, 2, "train")
    recs[4]["image"] = f"med-mat/d2/train/{bad}"
    _write(world, 2, "train", recs)
    code, report = _run(world, capsys)
    assert code == 1
    hit = assert_names(report, "ingest.path_control_character", ORI2_TRAIN, REC_ID)
    assert "control character U+00" in hit["message"]
    assert report["records"] == TOTAL - 1 and RID not in _table_ids(world)


def _bomb_png(path, side: int) -> None:
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    comp, row = zlib.compressobj(9), b"\0" * (side + 1)
    body = b"".join(comp.compress(row) for _ in range(side)) + comp.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", body) + chunk(b"IEND", b""))


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")   # Pillow warns, we refuse
def test_decompression_bomb(world, capsys):
    from medmat.data.images import MAX_PIXELS

    _bomb_png(world / _image_of(world), int(MAX_PIXELS ** 0.5) + 50)   # ~100 kB announcing ~90 Mpx
    code, report = _run(world, capsys)
    assert code == 1
    hit = assert_names(report, "image_readable", ORI2_TRAIN, RID)
    assert "decompression bomb" in hit["message"] and "not decoded" in hit["message"]
    assert report["records"] == TOTAL   # the record stays in the table, named; the others are fine
    assert set(failing(report)) == {"image_readable"}


def test_16bit_png_is_a_good_image(world, capsys):
    from medmat.data.images import load_image

    a = (np.arange(12 * 12, dtype=np.uint16).reshape(12, 12) * 300 + 1000).astype(np.uint16)
    path = world / _image_of(world)
    Image.fromarray(a).save(path)
    code, report = _run(world, capsys)
    assert code == 0, failing(report)
    arr = np.asarray(load_image(path))
    assert arr.min() == 0 and arr.max() == 255      # its range, not a white square
    table = pq.read_table(world.parent / "work" / "records.parquet").to_pandas()
    row = table[table["record_id"] == RID].iloc[0]
    assert len(row["image_phash"]) == 16            # hashed from the faithful decode

"""Writing the records table: one file, locked, atomic, durable.

- The table and the problems of the run that wrote it are one unit: problems live in the parquet
  metadata, and the file appears in one rename. A reader sees both old or both new, never a mix.
- Files are fsynced before the rename and the folder after it, so a power cut cannot leave a name
  pointing at unwritten blocks.
- Two ingests of one output exclude each other through `.<name>.lock` (fcntl.flock, non-blocking: the
  second one says who holds it and stops). The kernel drops the lock when its holder dies, so a
  killed ingest never leaves a stale lock.
- Rows are staged file by file (Arrow IPC with LZ4, `.stage`: written and read back at memory speed)
  until the derived splits are known, then the table is written once, one row group per staged file.
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

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from medmat.data.records import SCHEMA
from medmat.data.release_files import SourceFile
from medmat.io import default_file_mode, fsync_path


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


def publish(tmp: Path, out: Path) -> None:
    """fsync `tmp`, rename it over `out` in one step, fsync the folder (the rename itself durable)."""
    os.chmod(tmp, default_file_mode())
    fsync_path(tmp)
    os.replace(tmp, out)
    fsync_path(out.parent)


# ---- the table's rows ---------------------------------------------------------------------------
def rows_table(sf: SourceFile, rows: dict, infos: dict[int, tuple]) -> pa.Table:
    """Arrow table of one file's rows (columns from medmat.data.ingest_core; `infos`: dataset ->
    (no, subset, modality, area, task, name)). Values that repeat (a dataset's modality, a prompt's
    options) are converted once per distinct value and gathered with `take`."""
    n, ds_nos = len(rows["index"]), rows["dataset_no"]
    per_ds = _Distinct(ds_nos)
    per_qc = _Distinct(rows["question_choice"])
    ds = [infos[d] for d in per_ds.values]
    parsed = dict(zip(rows["question_choice"], rows["parsed"]))
    prompts = [parsed[q] for q in per_qc.values]
    cols = {
        "record_id": rows["table_id"], "source_file": _same(sf.rel, n), "source_index": rows["index"],
        "dataset_no": ds_nos,
        "subset_no": per_ds.take([i[1] for i in ds], pa.int64()) if sf.kind == "dataset" else
        _same(sf.number, n, pa.int64()),
        "modality": per_ds.take([i[2] for i in ds]), "area": per_ds.take([i[3] for i in ds]),
        "task": per_ds.take([i[4] for i in ds]),
        "split": _same(sf.split, n), "image": rows["image"],
        "image_sha256": rows["sha"], "image_phash": _same("", n),   # filled in by write_table
        "question": per_qc.take([p[0] for p in prompts]), "question_choice": per_qc.take(per_qc.values),
        "options": per_qc.take([p[1] for p in prompts], pa.list_(pa.string())),
        "answer_letter": rows["letter"], "answer_text": rows["answer"], "caption": rows["caption"],
    }
    return pa.table(cols, schema=SCHEMA)


class _Distinct:
    """Positions of a column's values among its distinct values (first-seen order)."""

    def __init__(self, column: list):
        pos = dict.fromkeys(column)
        for i, k in enumerate(pos):
            pos[k] = i
        self.values = list(pos)
        self.index = pa.array(list(map(pos.__getitem__, column)), pa.int32())

    def take(self, values: list, type: pa.DataType = pa.string()) -> pa.Array:
        """The column of which `values` are the distinct entries' values."""
        return pa.array(values, type).take(self.index)


def _same(value: object, n: int, type: pa.DataType = pa.string()) -> pa.Array:
    """`value` n times (10x faster than converting a list of n references to it)."""
    return pa.repeat(pa.scalar(value, type), n)


def stage_writer(stage: Path):
    """Writer (context manager) of the stage file: `.write_table(table)` per file's rows. LZ4 buffers:
    the stage is 5x smaller (prompts repeat) and written and read back faster than uncompressed."""
    sink = pa.OSFile(str(stage), "wb")
    return _Closing(pa.ipc.new_file(sink, SCHEMA, options=pa.ipc.IpcWriteOptions(compression="lz4")), sink)


class _Closing:
    def __init__(self, writer, sink):
        self.writer, self.sink = writer, sink

    def __enter__(self):
        return self.writer

    def __exit__(self, *exc):
        try:
            self.writer.close()
        finally:
            self.sink.close()


def write_table(stage: Path, tmp: Path, is_test: np.ndarray, phashes: dict[str, str], metadata: dict) -> None:
    """Write the table `tmp` from the stage, one row group per staged file, with the derived splits
    and the perceptual hashes (by content hash) filled in, and `metadata` (problems, summary)."""
    schema = SCHEMA.with_metadata(metadata)
    col, ph_col = SCHEMA.get_field_index("split"), SCHEMA.get_field_index("image_phash")
    split_names = pa.array(["train", "test"], pa.string())
    digests = pa.array(list(phashes), pa.string())
    hashes = pa.array(list(phashes.values()), pa.string())
    offset = 0
    with pa.OSFile(str(stage), "rb") as source, pq.ParquetWriter(tmp, schema, compression="zstd") as writer:
        staged = pa.ipc.open_file(source)   # read, not memory-mapped: mapped pages would count as ours
        for b in range(staged.num_record_batches):
            t = pa.Table.from_batches([staged.get_batch(b)])
            n = t.num_rows
            t = t.set_column(col, "split", split_names.take(is_test[offset:offset + n].view(np.uint8)))
            where = pc.index_in(t.column("image_sha256").combine_chunks(), value_set=digests)
            t = t.set_column(ph_col, "image_phash", hashes.take(where).fill_null(""))
            writer.write_table(t.replace_schema_metadata(metadata))
            offset += n
        if staged.num_record_batches == 0:
            writer.write_table(schema.empty_table())

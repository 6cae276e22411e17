"""Reading one Med-MAT JSON file of records, tolerant of input that fights back.

A release file is a JSON list of flat objects. Whatever a file holds, one bad record must not cost the
good ones beside it, and no input may end in a traceback:

- the whole file is parsed by orjson first (fast); when that succeeds and the count of object keys in
  the raw bytes (counted with numpy, ~15% of orjson's own time) equals the keys parsed, no key was
  duplicated and the list is returned as is;
- otherwise the top-level list is cut into its elements by a byte scanner that knows strings and
  brackets (no recursion, so nesting thousands deep cannot overflow the stack), and each element is
  parsed on its own. An element that cannot be used becomes a `BadRecord` (check, message, record id)
  at its position: malformed or truncated JSON, bytes that are not UTF-8, nesting deeper than
  MAX_DEPTH, or a key given twice (never silently "last value wins").

Faults of the file as a whole (unreadable, not a list, a Git LFS pointer) raise FormatError.
"""

from __future__ import annotations

import json
import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from medmat.data.release_files import FormatError

# Records are flat objects (one level); anything nested deeper than this is not a record.
MAX_DEPTH = 32
LFS_MAGIC = b"version https://git-lfs.github.com/spec/"
# Tokens of the scanner: a whole string (an unterminated one runs to the end), or a structural byte.
_TOKEN = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*(?:"|\Z)|[\[\]{},]', re.S)
_ID = re.compile(rb'"id"\s*:\s*(-?\d+|"[^"\\]{0,80}")')


@dataclass(frozen=True)
class BadRecord:
    """An element of the list that is not a usable record, kept at its position for the report."""

    check: str
    message: str
    record_id: object = None


def read_file_bytes(path: str | os.PathLike, name: str) -> bytes:
    """The bytes of a regular file (FormatError for anything else, checked before opening: a FIFO
    would block the reader) without a UTF-8 BOM. An LFS pointer stub is a FormatError with the hint."""
    try:
        st = os.stat(path)
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", name, check="file_unreadable") from None
    if not stat.S_ISREG(st.st_mode):
        raise FormatError("is not a regular file (a directory, FIFO or device)", name, check="not_a_file")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as fh:
            if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):   # swapped after the stat
                raise FormatError("is not a regular file", name, check="not_a_file")
            raw = fh.read()
    except OSError as exc:
        raise FormatError(f"cannot read file: {exc.strerror or exc}", name, check="file_unreadable") from None
    if raw.startswith(LFS_MAGIC):
        raise FormatError("is a Git LFS pointer, not the data (fetched without LFS): run `git lfs pull` in the "
                          "dataset's repository", name, check="lfs_pointer")
    return raw[3:] if raw.startswith(b"\xef\xbb\xbf") else raw


def load_records(path: str | os.PathLike, display: str | None = None) -> list:
    """The elements of one file's top-level list: records (dicts, or whatever JSON value an element
    is) and BadRecord entries where an element could not be parsed. Raises FormatError for the file."""
    name = display or str(path)
    raw = read_file_bytes(path, name)
    data = _fast_loads(raw)
    if data is not _FAILED:
        if not isinstance(data, list):
            raise FormatError(f"expected a JSON list of records, got {type(data).__name__}", name,
                              check="file_structure")
        if _keys_all_parsed(raw, data):
            return data
    return _one_by_one(raw, name)


def _keys_all_parsed(raw: bytes, data: list) -> bool:
    """True when every key in the bytes is a key of a parsed record, i.e. none was given twice.

    In valid JSON a key is a string followed by optional whitespace and ':'; a string value never is,
    and inside a string a quote is escaped (so `\\" :` there only adds to the count). The count of
    such sequences is therefore at least the number of keys at every level, and equals the count of
    top-level keys parsed only when no record nests objects and no key was given twice (a duplicate
    adds a key to the bytes that the parsed dict lacks)."""
    if data and set(map(type, data)) != {dict}:
        return False
    return _key_count(raw) == sum(map(len, data))


def _key_count(raw: bytes, step: int = 1 << 20) -> int:
    """Occurrences of '"' followed by optional JSON whitespace and ':' in `raw`. numpy over the quote
    positions, a megabyte at a time (kept in the CPU cache: 1.6x faster than all at once); bytes.count
    or `in` are slower, because the quote they start from is so frequent."""
    a = np.frombuffer(raw, np.uint8)
    size, n = a.size, 0
    for start in range(0, size - 1, step):
        at = np.flatnonzero(a[start:min(start + step, size - 1)] == 0x22) + (start + 1)   # byte after a quote
        nxt = a[at]
        n += int(np.count_nonzero(nxt == 0x3A))
        while at.size:                              # quotes followed by whitespace: step over it
            at = at[(nxt == 0x20) | (nxt == 0x0A) | (nxt == 0x0D) | (nxt == 0x09)] + 1
            at = at[at < size]
            nxt = a[at]
            n += int(np.count_nonzero(nxt == 0x3A))
    return n


def _one_by_one(raw: bytes, name: str) -> list:
    start = len(raw) - len(raw.lstrip())
    if start == len(raw):
        raise FormatError("file is empty", name, check="json")
    if raw[start:start + 1] != b"[":
        _raise_top_level(raw, name)
    out: list = []
    depth, max_depth, elem_start = 0, 0, start + 1
    closed_at = None
    for m in _TOKEN.finditer(raw, start):
        c = raw[m.start()]
        if c == 0x22:                      # a string: brackets inside it are text
            continue
        if c in (0x5B, 0x7B):              # [ {
            depth += 1
            max_depth = max(max_depth, depth - 1)
        elif c in (0x5D, 0x7D):            # ] }
            depth -= 1
            if depth == 0:
                _element(raw, elem_start, m.start(), max_depth, name, out, last=True)
                closed_at = m.end()
                break
        elif depth == 1:                   # a comma between two records
            _element(raw, elem_start, m.start(), max_depth, name, out, last=False)
            elem_start, max_depth = m.end(), 0
    if closed_at is None:                  # the list never closes: the file was cut short
        tail = raw[elem_start:].strip()
        if tail:
            out.append(BadRecord("truncated", f"file ends inside this record (byte {len(raw)}): the file is "
                                 "truncated", _record_id(tail)))
        elif not out:
            out.append(BadRecord("truncated", "file ends before its list closes: the file is truncated"))
    elif raw[closed_at:].strip():
        out.append(BadRecord("json", f"data after the end of the list (byte {closed_at}) ignored"))
    return out


def _element(raw: bytes, a: int, b: int, depth: int, name: str, out: list, last: bool) -> None:
    piece = raw[a:b]
    a += len(piece) - len(piece.lstrip())          # where the element's text begins
    chunk = piece.strip()
    if not chunk:
        if last and not out:              # "[]": an empty list
            return
        line = raw.count(b"\n", 0, b) + 1
        out.append(BadRecord("json", f"empty element at line {line} (a stray comma)"))
        return
    rid = _record_id(chunk)
    if depth > MAX_DEPTH:
        out.append(BadRecord("too_deep", f"element nested {depth} levels deep (a record is a flat object; "
                             f"limit {MAX_DEPTH}): not read", rid))
        return
    try:
        text = chunk.decode("utf-8")
    except UnicodeDecodeError as exc:
        out.append(BadRecord("encoding", f"not UTF-8 text (byte {a + exc.start}: "
                             f"{chunk[exc.start:exc.start + 1]!r})", rid))
        return
    dups: list[str] = []

    def pairs(items: list) -> dict:
        d = dict(items)
        if len(d) != len(items):
            seen: set = set()
            dups.extend(k for k, _ in items if k in seen or seen.add(k))
        return d

    try:
        value = json.loads(text, object_pairs_hook=pairs)
    except json.JSONDecodeError as exc:
        line = raw.count(b"\n", 0, a) + exc.lineno
        out.append(BadRecord("json", f"malformed JSON at line {line}: {exc.msg}", rid))
        return
    except RecursionError:  # pragma: no cover - MAX_DEPTH keeps far below the interpreter's limit
        out.append(BadRecord("too_deep", "element nested too deep to read", rid))
        return
    if dups:
        if isinstance(value, dict) and type(value.get("id")) in (int, str):
            rid = value["id"]
        out.append(BadRecord("duplicate_key", f"key(s) {sorted(set(dups))} given more than once in this record; "
                             "which value is meant is unknown, so the record is not used", rid))
        return
    out.append(value)


def _record_id(chunk: bytes) -> object:
    """The record's `id` as far as it can be read from broken bytes, to name it in a report."""
    m = _ID.search(chunk)
    if not m:
        return None
    v = m.group(1).decode("utf-8", "replace")
    return int(v) if not v.startswith('"') else v.strip('"')


def _raise_top_level(raw: bytes, name: str) -> None:
    try:
        data = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise FormatError(f"not UTF-8 text (byte {exc.start})", name, check="encoding") from None
    except json.JSONDecodeError as exc:
        raise FormatError(f"malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}", name,
                          check="json") from None
    except RecursionError:
        raise FormatError("nested too deep to read", name, check="too_deep") from None
    raise FormatError(f"expected a JSON list of records, got {type(data).__name__}", name, check="file_structure")


_FAILED = object()
try:  # orjson (pinned through DVC) parses ~1.6x faster than json; ingest reads ~2.4M records
    import orjson as _orjson

    def _fast_loads(raw: bytes) -> object:
        try:
            return _orjson.loads(raw)
        except _orjson.JSONDecodeError:
            return _FAILED
except ImportError:  # pragma: no cover - orjson is in constraints.txt
    def _fast_loads(raw: bytes) -> object:
        return _FAILED


def load_records_strict(path: str | os.PathLike, display: str | None = None) -> list[dict]:
    """All elements of a file, raising FormatError at the first one that could not be parsed."""
    name = display or str(path)
    records = load_records(Path(path), name)
    for i, r in enumerate(records):
        if isinstance(r, BadRecord):
            raise FormatError(r.message, name, index=i, record_id=r.record_id, check=r.check)
    return records

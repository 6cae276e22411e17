"""The records table (`records.parquet`, written by `medmat ingest`): its schema and its readers.

The table is relocatable: it holds no absolute path. Column `image` is the path relative to the data
root; the data root itself is in the parquet metadata (`medmat.data_root`), relative to the table's
own folder, so the same data gives the same bytes in every checkout (and the same `dvc.lock`).
`read_records` adds the absolute `image_path` in memory.

The table and the problems ingest found are one unit: the problems sit in the same file's metadata
(`medmat.problems`), so a reader can never see a new table beside the problems of another run.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

DATA_ROOT_KEY = b"medmat.data_root"      # data root, relative to the table's folder
WORLD_KEY = b"medmat.world"              # mini | mini-entangled | medmat
PROBLEMS_KEY = b"medmat.problems"        # JSON list of ingest problem entries
SUMMARY_KEY = b"medmat.ingest"           # JSON summary of the ingest run (deterministic: no timings)

COLUMNS: list[tuple[str, pa.DataType]] = [
    ("record_id", pa.string()), ("source_file", pa.string()), ("source_index", pa.int64()),
    ("dataset_no", pa.int64()), ("subset_no", pa.int64()),
    ("modality", pa.string()), ("area", pa.string()), ("task", pa.string()), ("split", pa.string()),
    ("image", pa.string()), ("image_sha256", pa.string()), ("image_phash", pa.string()),
    ("question", pa.string()), ("question_choice", pa.string()), ("options", pa.list_(pa.string())),
    ("answer_letter", pa.string()), ("answer_text", pa.string()), ("caption", pa.string()),
]


def _schema() -> pa.Schema:
    """Arrow schema with pandas metadata, so pandas reads subset_no back as nullable Int64."""
    base = pa.schema(COLUMNS)
    template = base.empty_table().to_pandas()
    template["subset_no"] = template["subset_no"].astype("Int64")
    meta = pa.Schema.from_pandas(template, preserve_index=False).metadata
    return base.with_metadata(meta)


SCHEMA = _schema()


def _meta(path: str | os.PathLike) -> dict[bytes, bytes]:
    return pq.read_schema(path).metadata or {}


def data_root_of(path: str | os.PathLike) -> Path:
    """The absolute data root of a records table (stored relative to the table's folder)."""
    rel = _meta(path).get(DATA_ROOT_KEY)
    if rel is None:
        raise ValueError(f"{path}: records table has no {DATA_ROOT_KEY.decode()} metadata (written by an old "
                         "ingest? rerun `medmat ingest`)")
    root = Path(rel.decode())
    return root if root.is_absolute() else (Path(path).resolve().parent / root).resolve()


def world_of(path: str | os.PathLike) -> str:
    """'mini', 'mini-entangled' or 'medmat' (the real release)."""
    return _meta(path).get(WORLD_KEY, b"medmat").decode()


def read_problems(records_path: str | os.PathLike) -> list[dict]:
    """The ingest problems stored with the table (the same run's, by construction)."""
    raw = _meta(records_path).get(PROBLEMS_KEY)
    return [] if raw is None else json.loads(raw)


def read_summary(records_path: str | os.PathLike) -> dict:
    raw = _meta(records_path).get(SUMMARY_KEY)
    return {} if raw is None else json.loads(raw)


def image_paths(images: pd.Series | list, root: Path) -> list[str]:
    """Absolute paths of record image paths under `root` (already checked by ingest to stay inside)."""
    base = str(root)
    return [os.path.normpath(os.path.join(base, rel)) for rel in images]


def read_records(path: str | os.PathLike, columns: list[str] | None = None) -> pd.DataFrame:
    """The records table as a DataFrame with the in-memory column `image_path` (absolute) added.
    df.attrs: data_root (absolute, str), world."""
    wanted = None
    if columns is not None:
        wanted = [c for c in dict.fromkeys([*columns, "image"]) if c != "image_path"]
    table = pq.read_table(path, columns=wanted)
    df = table.to_pandas()
    root = data_root_of(path)
    if columns is None or "image_path" in columns:
        df["image_path"] = image_paths(df["image"], root)
    if columns is not None and "image" not in columns:
        df = df.drop(columns=["image"])
    df.attrs["data_root"] = str(root)
    df.attrs["world"] = world_of(path)
    return df


def world_of_root(root: Path) -> tuple[str, dict]:
    """('mini' | 'mini-entangled' | 'medmat', marker) from the MEDMAT_MINI.json marker synth writes."""
    marker = root / "MEDMAT_MINI.json"
    try:
        if not marker.is_file():
            return "medmat", {}
        card = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return "medmat", {}
    if not isinstance(card, dict):
        return "medmat", {}
    return ("mini-entangled" if card.get("entangled") else "mini"), card


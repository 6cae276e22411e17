"""A small Med-MAT world in the public layout (real PNGs) and the real `medmat ingest` / `medmat validate`
CLIs around it, shared by the validation tests (test_validate, test_bad_images, test_leakage_check)."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image

from medmat.cli import main
from medmat.data.medmat_format import format_question_choice, relative_path

# dataset -> labels of its subset (2: CT kidney; 3 and 4: CT lung COVID, one subset of two datasets)
WORLD = {2: ["Cyst", "Normal", "Stone", "Tumor"], 3: ["COVID-19", "Non-COVID", "Normal"],
         4: ["COVID-19", "Non-COVID", "Normal"]}
PER_LABEL = {"train": 3, "test": 2}
SAMPLE = Path(__file__).parent / "fixtures" / "medmat_sample_record.json"


def _png(path: Path, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 255, (12, 12), dtype=np.uint8)
    Image.fromarray(arr).save(path)


def _write(root: Path, dataset: int, split: str, records: list) -> Path:
    path = root / relative_path("dataset", dataset, split)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(records, indent=1), encoding="utf-8")
    return path


def _record(i: int, dataset: int, label: str, labels: list[str], image: str) -> dict:
    # Rotate the options so answer letters vary; every label is a distractor somewhere.
    options = labels[i % len(labels):] + labels[: i % len(labels)]
    return {"id": i, "caption": label, "image": image, "Question": "Which condition?", "Answer": label,
            "Question-choice": format_question_choice("Which condition?", options),
            "Answer-choice": "ABCD"[options.index(label)], "data-no": str(dataset)}


def build_world(root: Path) -> Path:
    seed = 0
    for dataset, labels in WORLD.items():
        for split, per in PER_LABEL.items():
            recs = []
            for label in labels:
                for _ in range(per):
                    seed += 1
                    image = f"med-mat/d{dataset}/{split}/{seed}.png"
                    _png(root / image, seed)
                    recs.append(_record(len(recs) + 1, dataset, label, labels, image))
            _write(root, dataset, split, recs)
    return root


def read(root: Path, dataset: int, split: str) -> list:
    return json.loads((root / relative_path("dataset", dataset, split)).read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def clean_world(tmp_path_factory) -> Path:
    return build_world(tmp_path_factory.mktemp("clean") / "data")


@pytest.fixture
def world(clean_world, tmp_path) -> Path:
    root = tmp_path / "data"
    shutil.copytree(clean_world, root)
    return root


def ingest(root: Path) -> Path:
    out = root.parent / "work" / "records.parquet"
    main(["ingest", "--data", str(root), "--out", str(out), "--params", str(root.parent / "none.yaml")])
    return out


def validate(root: Path, records: Path | None = None, params: dict | None = None) -> tuple[int, dict]:
    records = records or root.parent / "work" / "records.parquet"
    params_file = root.parent / "params.yaml"
    params_file.write_text(json.dumps({"validate": params or {}}), encoding="utf-8")
    report = root.parent / "work" / "validation.json"
    code = main(["validate", "--data", str(root), "--records", str(records), "--report", str(report),
                 "--params", str(params_file)])
    return code, json.loads(report.read_text(encoding="utf-8"))


def pipeline(root: Path, params: dict | None = None) -> tuple[int, dict]:
    ingest(root)
    return validate(root, params=params)


def failing(report: dict) -> dict[str, dict]:
    return {c["check"]: c for c in report["checks"] if not c["ok"]}


def assert_names(report: dict, check: str, file: str, record_id: str | None) -> dict:
    """The check failed and one listed failure names this file and record, with a message."""
    bad = failing(report)
    assert check in bad, f"{check} did not fail; failing: {sorted(bad)}"
    hits = [f for f in bad[check]["failures"] if f["file"] == file and f["record_id"] == record_id]
    assert hits, f"{check}: no failure names {file} / {record_id}: {bad[check]['failures'][:3]}"
    assert hits[0]["message"] and hits[0]["expectation"]
    return hits[0]


def tamper(records: Path, fn) -> None:
    """Rewrite the records table in place (as another tool might), keeping schema and metadata."""
    table = pq.read_table(records)
    df = table.to_pandas()
    fn(df)
    import pyarrow as pa
    pq.write_table(pa.Table.from_pandas(df, schema=table.schema, preserve_index=False), records)


def set_cell(df, record_id: str, column: str, value) -> None:
    df.loc[df.index[df["record_id"] == record_id][0], column] = value


ORI2_TRAIN = relative_path("dataset", 2, "train")
ORI3_TEST = relative_path("dataset", 3, "test")



"""Full-scale Med-MAT-mini metadata: ~2.36M records (the public viewer's count) over the mini images.

A benchmark input for ingest and validate, JSON only: records cycle over each dataset's mini records
(same images, options and answers) with fresh ids, in the world's shape (medmat.data.synth_world).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from medmat.data.medmat_format import relative_path


def write_full_metadata(root: Path, plans: list, per_dataset: dict[int, dict[str, list[dict]]],
                        total: int, shape: str = "release", progress: bool = True) -> int:
    """Replace the per-dataset and per-subset JSON files by full-scale ones (`total` records in all,
    spread over the datasets in proportion to their mini size; legacy shape: train:test as in mini,
    release shape: one train file per dataset).

    Records cycle over the dataset's mini records (same images, options and answers) with fresh ids,
    so image paths stay inside a bounded pool of real files. Written as text from pre-serialised
    record bodies: a benchmark input has to be quick to make (~2.4M records in well under a minute).
    """
    from tqdm import tqdm

    mini_total = sum(len(r) for recs in per_dataset.values() for r in recs.values())
    written = 0
    subset_chunks: dict[tuple[int, str], list[Path]] = {}
    for j, plan in enumerate(tqdm(plans, desc="full-scale metadata", unit="dataset", disable=not progress)):
        recs = per_dataset[plan.dataset_no]
        pools = recs if shape == "legacy" else {"train": recs["train"] + recs["test"]}
        last_split = list(pools)[-1]
        for split, pool in pools.items():
            if not pool:
                continue
            if j == len(plans) - 1 and split == last_split:
                n = max(1, total - written)
            else:
                n = max(1, round(total * len(pool) / mini_total))
            # Serialise each pool record once, without its id; a full record is then '{"id": N, ' + body.
            bodies = [json.dumps({k: v for k, v in r.items() if k != "id"}, ensure_ascii=False, indent=None)[1:]
                      for r in pool]
            path = root / relative_path("dataset", plan.dataset_no, split)
            _write_text_records(path, (f'{{"id": {i + 1}, {bodies[i % len(bodies)]}' for i in range(n)))
            subset_chunks.setdefault((plan.subset_no, split), []).append(path)
            written += n
    # Subset files repeat the per-dataset records: release shape with each dataset's own ids, legacy
    # shape renumbered per file.
    for (s, split), paths in sorted(subset_chunks.items()):
        def lines(paths=paths):
            i = 0
            for p in paths:
                with p.open(encoding="utf-8") as fh:
                    for line in fh:
                        line = line.rstrip("\n").rstrip(",")
                        if line in ("[", "]"):
                            continue
                        i += 1
                        yield line if shape == "release" else f'{{"id": {i}, ' + line.split(", ", 1)[1]
        _write_text_records(root / relative_path("subset", s, split), lines())
    return written


def _write_text_records(path: Path, records) -> None:
    """A JSON list, one pre-serialised record per line, written atomically.

    Streamed to the temp file rather than through medmat.io: at full scale one subset file is ~1 GB,
    which should not be held in memory as a string.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        fh.write("[\n")
        first = True
        for rec in records:
            if not first:
                fh.write(",\n")
            fh.write(rec)
            first = False
        fh.write("\n]\n")
    os.replace(tmp, path)

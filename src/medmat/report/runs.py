"""Reading what the pipeline left: designs indexes, run folders (per-seed metrics and predictions),
search outputs. Nothing here computes a statistic.

Layout (the pipeline's contract):
    <designs>/<target>/index.json
    <runs>/<target>/<arm path>/seed<k>/{metrics.json, predictions.jsonl}
    <search>/<target>/{history.csv, best_mixture.json}
"""

from __future__ import annotations

import csv
import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from medmat.names import norm_target

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Arm:
    """One arm's seeds: outcomes (record_id -> correct), predicted letters and metrics per seed."""

    path: str
    outcomes: dict[int, dict[str, bool]]
    predictions: dict[int, list[dict[str, Any]]]
    metrics: dict[int, dict[str, Any]]

    @property
    def n_options(self) -> int | None:
        """k of the target's questions (their answer letters are balanced: the largest letter used)."""
        letters = {p.get("answer_letter") for ps in self.predictions.values() for p in ps}
        letters.discard(None)
        return (max(ord(str(x)) - ord("A") for x in letters) + 1) if letters else None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        log.warning("%s: unreadable (%s); left out", path, exc)
        return None


def read_arm(runs_root: str | os.PathLike, target: str, arm: str) -> Arm | None:
    """The arm's finished seeds (a seed folder without predictions is left out, with a warning)."""
    folder = Path(runs_root) / target / arm
    if not folder.is_dir():
        return None
    out = Arm(arm, {}, {}, {})
    for seed_dir in sorted(folder.glob("seed*")):
        try:
            seed = int(seed_dir.name[4:])
        except ValueError:
            continue
        preds_file = seed_dir / "predictions.jsonl"
        metrics = _read_json(seed_dir / "metrics.json") if (seed_dir / "metrics.json").exists() else None
        if metrics is None or not preds_file.exists():
            log.warning("%s: no metrics.json/predictions.jsonl; seed left out", seed_dir)
            continue
        try:
            preds = [json.loads(line) for line in preds_file.read_text(encoding="utf-8").splitlines() if line.strip()]
        except ValueError as exc:
            log.warning("%s: bad line (%s); seed left out", preds_file, exc)
            continue
        out.metrics[seed] = metrics
        out.predictions[seed] = preds
        out.outcomes[seed] = {str(p["record_id"]): bool(p["correct"]) for p in preds}
    return out if out.outcomes else None


def read_world(runs_root: str | os.PathLike, designs_dir: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """{target: {"index": index.json, "arms": {arm path: Arm}}} for every target with a designs index."""
    world: dict[str, dict[str, Any]] = {}
    root = Path(designs_dir)
    if not root.is_dir():
        return world
    for index_file in sorted(root.glob("*/index.json")):
        index = _read_json(index_file)
        if not index:
            continue
        target = norm_target(index.get("target", index_file.parent.name))
        paths = ["baseline", "in_distribution", "search_best"]
        for combo in index.get("combinations", []):
            paths += [f"{combo['id']}/{arm}" for arm in combo.get("arms", {})]
        for name, rel in (index.get("arms") or {}).items():
            if name == "limited" and isinstance(rel, dict):
                paths += [f"limited/{v}" for v in rel]
            elif name != "in_distribution":
                paths.append(f"scaleup/{name}")
        arms = {p: a for p in dict.fromkeys(paths) if (a := read_arm(runs_root, target, p)) is not None}
        world[target] = {"index": index, "arms": arms}
    return world


def load_search(search_dir: str | os.PathLike | None) -> dict[str, dict[str, Any]]:
    """{target: {"best": best_mixture.json, "history": [rows]}} (targets without output left out)."""
    out: dict[str, dict[str, Any]] = {}
    if not search_dir or not Path(search_dir).is_dir():
        return out
    for tdir in sorted(p for p in Path(search_dir).iterdir() if p.is_dir()):
        best = _read_json(tdir / "best_mixture.json") if (tdir / "best_mixture.json").exists() else None
        rows = []
        if (tdir / "history.csv").exists():
            with (tdir / "history.csv").open(encoding="utf-8") as fh:
                rows = list(csv.DictReader(fh))
        if best or rows:
            out[norm_target(tdir.name)] = {"best": best, "history": rows}
    return out

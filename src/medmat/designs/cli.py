"""`medmat designs`: write every target's arms (`arms.py`), or `--list` its valid combinations.

    medmat designs --records work/records.parquet --out work/designs      # targets/combinations from params
    medmat designs --list --targets 3,28                                  # no records needed

Reads `designs:` (DesignsConfig) and `experiment.targets` / `experiment.combinations` ("paper" when
the key is absent) from the params file; `--targets` / `--combinations` override them.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any, Mapping

import pandas as pd

from medmat.catalog import Catalog, load_catalog
from medmat.config import ConfigError, from_dict, load_params
from medmat.designs import rules
from medmat.designs.arms import (DesignsConfig, Target, answer_labels, build_target, combinations, load_index,
                                 resolve_target, select, write_json, write_target)

# Columns the designs read (the rest of the table, question text included, is never loaded).
COLUMNS = ("record_id", "subset_no", "split", "answer_text", "image_sha256", "image_phash")


def load_config(params: str | os.PathLike | Mapping | None = "params.yaml") -> DesignsConfig:
    raw = _params(params)
    return from_dict(DesignsConfig, raw.get("designs"), where=f"{_where(params)}: section 'designs'")


def _params(params: str | os.PathLike | Mapping | None) -> dict[str, Any]:
    if params is None:
        return {}
    if isinstance(params, Mapping):
        return dict(params)
    return load_params(params) if Path(params).exists() else {}


def _where(params: Any) -> str:
    return "params" if params is None or isinstance(params, Mapping) else str(params)


def parse_targets(text: str) -> list[str]:
    """'3,28,6' or '[3, 28, 6]' or 'CT-Lung-COVID,6' -> list of target strings."""
    return [t.strip().strip("'\"") for t in str(text).strip().strip("[]").split(",") if t.strip()]


def experiment_choice(params: Any, targets: str | None = None, combos: str | None = None) -> tuple[list[str], Any]:
    """(target texts, combination selection) from the command line, else params' experiment section."""
    exp = _params(params).get("experiment") or {}
    texts = parse_targets(targets) if targets else exp.get("targets")
    if not texts:
        raise ConfigError(f"{_where(params)}: no --targets given and no experiment.targets in the params")
    texts = [str(t) for t in (texts if isinstance(texts, list) else parse_targets(texts))]
    selection: Any = combos if combos is not None else exp.get("combinations", "paper")
    if isinstance(selection, str) and selection not in ("paper", "all"):
        selection = parse_targets(selection)
    if not (selection in ("paper", "all") or isinstance(selection, list)):
        raise ConfigError(f"experiment.combinations must be 'paper', 'all' or a list of ids, got {selection!r}")
    return texts, selection


def check_selection(selection: Any, targets: list[Target], cfg: DesignsConfig, cat: Catalog) -> None:
    """An explicit id that no target has is a typo: stop with its name."""
    if not isinstance(selection, list):
        return
    valid = {c.id for t in targets for c in combinations(t, cfg, cat)}
    valid |= {f"{t.label}/{c.id}" for t in targets for c in combinations(t, cfg, cat)}
    unknown = [s for s in map(str, selection) if s not in valid]
    if unknown:
        raise ConfigError(f"experiment.combinations: {unknown} is no valid combination of targets "
                          f"{[t.label for t in targets]} (see `medmat designs --list`)")


def read_table(path: str | os.PathLike) -> pd.DataFrame:
    """The columns designs need (image_phash only where the table has it)."""
    import pyarrow.parquet as pq

    names = set(pq.read_schema(path).names)
    return pd.read_parquet(path, columns=[c for c in COLUMNS if c in names])


def design_targets(records: str | os.PathLike | pd.DataFrame, out: str | os.PathLike, params: Any = "params.yaml",
                   targets: str | None = None, combos: str | None = None) -> dict[str, Any]:
    """Build and write every target's designs plus designs.json; returns designs.json's content."""
    cfg = load_config(params)
    cat = load_catalog()
    texts, selection = experiment_choice(params, targets, combos)
    resolved = [resolve_target(t, cat) for t in texts]
    check_selection(selection, resolved, cfg, cat)
    table = records if isinstance(records, pd.DataFrame) else read_table(records)
    summary: dict[str, Any] = {"config": dataclasses.asdict(cfg), "task_taxonomy": cfg.task_taxonomy,
                               "combinations": selection, "targets": {}}
    for t in resolved:
        design = build_target(table, t, cfg, selection, cat)
        write_target(design, out)
        idx = design["index"]
        summary["targets"][t.label] = {
            "triplet": idx["triplet"], "subset_no": idx["subset_no"], "index": f"{t.label}/index.json",
            "combinations": [c["id"] for c in idx["combinations"]], "dropped": len(idx["dropped"]),
            "unmatched": [c["id"] for c in idx["combinations"] if not c["matched"]]
            + [a for a, s in idx["arm_totals"].items() if not s["matched"]],
            "leakage_dropped": idx["leakage"]["exact"] + idx["leakage"]["near"]}
    write_json(Path(out) / "designs.json", summary)
    return summary


def list_lines(targets: list[Target], cfg: DesignsConfig, selection: Any, cat: Catalog,
               table: pd.DataFrame | None = None) -> list[str]:
    """`--list`: every valid combination per target; '*' marks those `selection` writes. With the records
    `table`, how many of the target's labels (its test answers) the members' training records answer: a
    model whose text side starts untrained has no name for the others."""
    lines = [f"task taxonomy: {cfg.task_taxonomy}; selection: {selection}; * = written"]
    labels = _labels_by_subset(table) if table is not None else None
    for t in targets:
        combos = combinations(t, cfg, cat)
        chosen = {c.id for c in select(combos, selection, t.label)}
        roles = rules.target_view(cat, t.triplet, t.subset_no, cfg.task_taxonomy).roles
        lines.append(f"target {t.label} {t.triplet} (plays {', '.join(roles)}): {len(combos)} combinations")
        for d in cfg.directions:
            mine = [c for c in combos if c.direction == d]
            if not mine:
                view = rules.target_view(cat, t.triplet, t.subset_no, cfg.task_taxonomy)
                lines.append(f"   {d}: none ({rules.why_none(cat, view, d, cfg.task_taxonomy)})")
            for c in mine:
                members = " + ".join(f"{k} {v}" for k, v in c.members(cat).items())
                paper = ""
                for r in c.paper_rows:
                    row = rules.paper_row(r)
                    paper += (f"  paper row {r}: Baseline {row.baseline:g} / Baseline+ {row.baseline_plus:g} / "
                              f"Trained {row.trained:g}")
                named = ""
                if labels is not None:
                    wanted = labels.get((t.subset_no, "test"), {})
                    have = set().union(*(labels.get((no, "train"), {}).keys() for no in c.related))
                    named = f"  names {len(wanted.keys() & have)}/{len(wanted)} target labels"
                lines.append(f" {'*' if c.id in chosen else ' '} {c.id:<28} [{'/'.join(c.roles)}] {members}{named}{paper}")
    return lines


def _labels_by_subset(table: pd.DataFrame) -> dict[tuple[int, str], dict[str, str]]:
    """(subset number, split) -> the labels its records answer (medmat.designs.arms.answer_labels)."""
    subset = pd.to_numeric(table["subset_no"], errors="coerce")
    return {(int(no), str(split)): answer_labels(group)
            for (no, split), group in table.groupby([subset, table["split"]]) if pd.notna(no)}


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--records", help="records table (medmat ingest); with --list: also how many of each "
                        "target's labels the combination's training records answer")
    parser.add_argument("--targets", help="comma-separated subset numbers or triplets, e.g. 3,28,6 "
                        "(default: experiment.targets of --params, so `dvc exp run -S experiment.targets=[...]` works)")
    parser.add_argument("--combinations", help="paper | all | comma-separated ids (default: experiment.combinations, "
                        "else paper)")
    parser.add_argument("--out", help="output folder (one sub-folder per target + designs.json)")
    parser.add_argument("--params", default="params.yaml", help="params file with the `designs:` section")
    parser.add_argument("--list", action="store_true", help="print every valid combination per target and exit")


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.params)
        cat = load_catalog()
        texts, selection = experiment_choice(args.params, args.targets, getattr(args, "combinations", None))
        targets = [resolve_target(t, cat) for t in texts]
        check_selection(selection, targets, cfg, cat)
    except (ConfigError, ValueError, LookupError) as exc:
        print(f"medmat designs: {exc}")
        return 2
    if getattr(args, "list", False):
        try:
            table = read_table(args.records) if args.records else None
        except Exception as exc:  # noqa: BLE001 - any unreadable table is the user's input problem
            print(f"medmat designs: cannot read records table {args.records}: {exc}")
            return 2
        print("\n".join(list_lines(targets, cfg, selection, cat, table)))
        return 0
    if not args.records or not args.out:
        print("medmat designs: --records and --out are required (unless --list)")
        return 2
    try:
        table = read_table(args.records)
    except Exception as exc:  # noqa: BLE001 - any unreadable table is the user's input problem
        print(f"medmat designs: cannot read records table {args.records}: {exc}")
        return 2
    summary = design_targets(table, args.out, args.params, args.targets, getattr(args, "combinations", None))
    for label, entry in summary["targets"].items():
        names = entry["combinations"]
        shown = ", ".join(names[:8]) + (f", ... (+{len(names) - 8})" if len(names) > 8 else "")
        print(f"target {label} {entry['triplet']}: {len(names)} combinations ({shown or 'none'}); "
              f"{entry['dropped']} arms dropped; "
              f"leaking training records dropped: {entry['leakage_dropped']}"
              + (f"; NOT at equal size: {', '.join(entry['unmatched'])}" if entry["unmatched"] else ""))
        for dropped in load_index(args.out, label)["dropped"]:  # e.g. a subset whose images are absent
            print(f"  dropped {dropped['id']}: {dropped['reason']}")
    return 0

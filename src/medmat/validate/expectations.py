"""The Great Expectations side of validation: one expectation per rule over the prepared frame
(medmat.validate.checks), how a failing row is described, and the engine that counts and lists them.

GX lists failing rows slowly (hundreds of microseconds per row), so it runs twice: once over the whole
table for every expectation's exact count (BASIC), then COMPLETE, with the rows named by
record_id/source_file, only over as many leading rows as the listing cap needs.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pandas as pd

from medmat.validate.checks import NOT_CHECKED, OK, ValidateParams
from medmat.validate.leakage import group_name

INDEX_COLUMNS = ["record_id", "source_file", "_row"]


@dataclass
class Rule:
    """One GX expectation under a named check, and how to say what a failing row means."""

    check: str
    expectation: Any
    message: Callable[[pd.Series], str]
    frame: str = "records"                               # records | balance
    candidates: Callable[[pd.DataFrame], np.ndarray] | None = None   # rows that can fail (non-row-local rules)


def rules(vocab: dict[str, list[str]], params: ValidateParams, frame: pd.DataFrame) -> list[Rule]:
    """Every rule; messages that name a second record (a duplicate's partner) read it from `frame`."""
    import great_expectations.expectations as gxe

    def other(row: int) -> str:
        return (f"record {frame['record_id'].iat[row]} ({frame['source_file'].iat[row]}, "
                f"{group_name(frame['_group'].iat[row])}, {frame['split'].iat[row]}, image {frame['image'].iat[row]!r})")

    def vocab_msg(col):
        return lambda r: f"{col} {r[col]!r} is not in the canonical vocabulary ({', '.join(vocab[col])})"

    return [
        Rule("modality_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="modality", value_set=vocab["modality"]),
             vocab_msg("modality")),
        Rule("area_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="area", value_set=vocab["area"]),
             vocab_msg("area")),
        Rule("task_vocabulary", gxe.ExpectColumnValuesToBeInSet(column="task", value_set=vocab["task"]),
             vocab_msg("task")),
        Rule("triplet_matches_dataset",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="triplet", column_B="dataset_triplet",
                                                 ignore_row_if="either_value_is_missing"),
             lambda r: f"record triplet {r['triplet']} differs from dataset {r['dataset_no']}'s catalogue "
                       f"triplet {r['dataset_triplet']}"),
        Rule("triplet_matches_subset",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="triplet", column_B="subset_triplet",
                                                 ignore_row_if="either_value_is_missing"),
             lambda r: f"record triplet {r['triplet']} differs from subset {r['subset_no']}'s catalogue "
                       f"triplet {r['subset_triplet']}"),
        Rule("dataset_single_triplet",
             gxe.ExpectColumnValuesToBeBetween(column="dataset_triplet_count", min_value=0, max_value=1),
             lambda r: f"dataset {r['dataset_no']} carries {r['dataset_triplet_count']} different triplets "
                       f"(this record: {r['triplet']})"),
        Rule("answer_letter_in_options", gxe.ExpectColumnValuesToNotBeNull(column="answer_option"),
             lambda r: f"answer letter {r['answer_letter']!r} names none of the record's {r['n_options']} options"),
        Rule("answer_matches_option",
             gxe.ExpectColumnValuesToBeInSet(column="answer_matches_option", value_set=[True]),
             lambda r: f"answer {r['answer_text']!r} differs from option {r['answer_letter']} "
                       f"{r['answer_option']!r}"),
        Rule("option_count",
             gxe.ExpectColumnValuesToBeBetween(column="n_options", min_value=2, max_value=4),
             lambda r: f"record has {r['n_options']} options; a Med-MAT question has 2 to 4"),
        Rule("options_distinct",
             gxe.ExpectColumnPairValuesToBeEqual(column_A="n_options", column_B="n_distinct_options"),
             lambda r: f"record repeats an option ({r['n_distinct_options']} distinct of {r['n_options']})"),
        Rule("answer_in_label_set",
             gxe.ExpectColumnValuesToBeInSet(column="answer_in_label_set", value_set=[True]),
             lambda r: f"answer {r['answer_text']!r} is offered as an option by no other record of "
                       f"{group_name(r['_group'])} ({r['_group_size']} records): not one of its labels"),
        Rule("record_id_unique", gxe.ExpectColumnValuesToBeInSet(column="record_id_count", value_set=[1]),
             lambda r: f"record id {r['record_id']!r} occurs {r['record_id_count']} times",
             candidates=lambda f: f["record_id_count"].to_numpy() > 1),
        Rule("image_path_confined",
             gxe.ExpectColumnValuesToBeInSet(column="image_lexical_escape", value_set=[False]),
             lambda r: f"image path {r['image']!r} is absolute or contains '..'; it must stay inside the data root"),
        Rule("image_path_confined",
             gxe.ExpectColumnValuesToBeInSet(column="image_link_escapes", value_set=[False]),
             lambda r: f"image path {r['image']!r} leaves the data root through a symbolic link"),
        Rule("image_present", gxe.ExpectColumnValuesToBeInSet(column="image_present", value_set=[True]),
             lambda r: f"image {r['image']!r} is absent (dataset {r['dataset_no']}); run `medmat ingest` again: "
                       "it leaves out records whose images are absent, with one warning per dataset"),
        Rule("image_readable",
             gxe.ExpectColumnValuesToBeInSet(column="image_status", value_set=[OK, NOT_CHECKED]),
             lambda r: f"image {r['image']!r}: {r['image_status']}"),
        Rule("train_test_leakage", gxe.ExpectColumnValuesToBeInSet(column="leaks", value_set=[False]),
             lambda r: f"image {r['image']!r} (sha256 {r['image_sha256'][:12]}...) is in both train and test "
                       f"of {group_name(r['_group'])}; this record is in {r['split']}"),
        Rule("cross_subset_duplicate", gxe.ExpectColumnValuesToBeInSet(column="dup_partner", value_set=[-1]),
             lambda r: f"image {r['image']!r} ({group_name(r['_group'])}, {r['split']}) has the same bytes "
                       f"(sha256 {r['image_sha256'][:12]}...) as {other(int(r['dup_partner']))}",
             candidates=lambda f: f["dup_partner"].to_numpy() >= 0),
        Rule("near_duplicate", gxe.ExpectColumnValuesToBeInSet(column="near_partner", value_set=[-1]),
             lambda r: f"image {r['image']!r} ({group_name(r['_group'])}, {r['split']}) is within "
                       f"{r['near_distance']} of 64 bits of perceptual hash (limit {params.phash_distance}) of "
                       f"{other(int(r['near_partner']))}: a re-encoded or resized copy?",
             candidates=lambda f: f["near_partner"].to_numpy() >= 0),
        Rule("test_label_balance",
             gxe.ExpectColumnValuesToBeBetween(column="imbalance_ratio", min_value=1.0,
                                               max_value=params.balance_max_ratio),
             lambda r: f"test set of {group_name(r['_group'])} is unbalanced: {r['counts']} "
                       f"(largest/smallest {r['imbalance_ratio']:.2f} > {params.balance_max_ratio})",  # inf: a label is absent
             frame="balance"),
    ]


def balance_frame(f: pd.DataFrame, labels: dict[int, list[str]]) -> pd.DataFrame:
    """One row per test set (subset, or dataset without one): label counts and largest/smallest ratio."""
    test = f.loc[(f["split"] == "test").to_numpy(), ["_group", "answer_text", "source_file"]]
    rows = []
    for group, g in test.groupby("_group", sort=True):
        answers = g["answer_text"].astype(object)
        counts = answers.value_counts().reindex(sorted(set(labels.get(int(group), [])) | set(answers)), fill_value=0)
        rows.append({"record_id": None, "source_file": ", ".join(sorted(g["source_file"].unique())),
                     "_group": int(group), "counts": {str(k): int(v) for k, v in counts.items()},
                     # a label with no test record at all is the worst imbalance: infinite
                     "imbalance_ratio": float(counts.max() / counts.min()) if counts.min() else math.inf})
    out = pd.DataFrame(rows, columns=["record_id", "source_file", "_group", "counts", "imbalance_ratio"])
    out["_row"] = np.arange(len(out))
    return out


# ---- GX engine ----------------------------------------------------------------------------------
class GXEngine:
    def __init__(self) -> None:
        # GX logs its set-up at INFO (closures, temp doc sites): noise beside our summary. Quiet its
        # loggers during the import and again after it (the import configures some of them).
        quiet = logging.getLogger("great_expectations")
        quiet.setLevel(logging.WARNING)
        import great_expectations as gx
        from great_expectations.data_context.types.base import ProgressBarsConfig

        for name in [quiet.name, *(n for n in logging.root.manager.loggerDict if n.startswith("great_expectations"))]:
            logging.getLogger(name).setLevel(logging.WARNING)

        self.gx = gx
        self.ctx = gx.get_context(mode="ephemeral")
        # GX prints a tqdm bar per validation otherwise; we validate many small slices.
        self.ctx.variables.progress_bars = ProgressBarsConfig(globally=False, metric_calculations=False)
        self.asset = self.ctx.data_sources.add_pandas("medmat").add_dataframe_asset("table")
        self.batches = self.asset.add_batch_definition_whole_dataframe("whole")
        self._n = 0

    def batch(self, df: pd.DataFrame):
        return self.batches.get_batch(batch_parameters={"dataframe": df})

    def counts(self, df: pd.DataFrame, rules: list[Rule]) -> list[tuple[bool, int, int]]:
        """(success, unexpected count, element count) per rule, over the whole frame.

        One rule at a time, on only the columns it reads: GX keeps every metric of a suite until the
        suite is done and copies the domain of some (a pair expectation drops the rows it ignores), so
        at 2.4M rows a suite of all rules held ~750 MB more than one rule does (~100 MB)."""
        out = []
        for rule in rules:
            kw = rule.expectation.configuration.kwargs
            columns = list(dict.fromkeys(kw[k] for k in ("column", "column_A", "column_B") if k in kw))
            res = self.batch(df[columns]).validate(rule.expectation, result_format="BASIC")
            r = res.result or {}
            out.append((bool(res.success), int(r.get("unexpected_count") or 0), int(r.get("element_count") or len(df))))
        return out

    def listed_rows(self, df: pd.DataFrame, rule: Rule, unexpected: int, cap: int) -> list[int]:
        """Positions (`_row`) of up to `cap` failing rows, named by GX (COMPLETE, index columns)."""
        pick = None
        if rule.candidates is not None:   # only the rows that can fail, and only as many as needed
            pick = np.flatnonzero(rule.candidates(df))
        n = len(df) if pick is None else len(pick)
        rate = max(unexpected / max(n, 1), 1e-12)
        size = min(n, max(1000, math.ceil(cap / rate * 1.5)))
        while True:
            part = df.iloc[:size] if pick is None else df.iloc[pick[:size]]
            res = self.batch(part).validate(
                rule.expectation, result_format={"result_format": "COMPLETE",
                                                 "unexpected_index_column_names": INDEX_COLUMNS,
                                                 "partial_unexpected_count": 0,
                                                 "return_unexpected_index_query": False})
            rows = [int(item["_row"]) for item in res.result.get("unexpected_index_list") or []]
            if len(rows) >= min(cap, unexpected) or size >= n:
                return rows[:cap]
            size = min(n, size * 4)

"""The `tiny` model's text side: words, hashed character n-grams (fastText-style), base text weights,
and a batch's texts as EmbeddingBag inputs (a record's encoding, the batch's option bank).

A text becomes a bag of ids: each word's vocabulary id (when the training records had it) plus the
buckets of its character n-grams, which sit after the vocabulary in one embedding table. A word the
model never saw is still its n-grams, so an unseen option is scored by its text, not as one UNK.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Collection
from typing import NamedTuple

import torch

PAD, UNK = "<pad>", "<unk>"
UNK_ID = 1  # every vocabulary starts [PAD, UNK]: PAD is id 0, UNK id 1
_WORD = re.compile(r"[a-z0-9]+")
# The Med-MAT prompt's last line is the same in every record: it carries no information.
_INSTRUCTION = "answer with the option's letter from the given choices directly"


def tokenize(text: str) -> list[str]:
    return _WORD.findall(str(text).lower().replace(_INSTRUCTION, " "))


def char_ngrams(word: str, lo: int, hi: int) -> list[str]:
    """fastText's n-grams of "<word>" (the brackets mark the word's edges: "<co" is a prefix)."""
    w = f"<{word}>"
    return [w[i : i + n] for n in range(lo, hi + 1) for i in range(len(w) - n + 1)]


def text_ids(text: str, word_index: dict[str, int], buckets: int, lo: int, hi: int) -> list[int]:
    """Word ids, plus each word's hashed n-gram buckets (ids after the vocabulary). A word outside
    the vocabulary is its n-grams alone (UNK only in the word-only model, `buckets` = 0)."""
    base, ids = len(word_index), []
    for w in tokenize(text):
        wid = word_index.get(w)
        if not buckets:
            ids.append(UNK_ID if wid is None else wid)
            continue
        if wid is not None:
            ids.append(wid)
        # crc32, not hash(): Python salts str hashes per process, buckets must survive save/load
        ids += [base + zlib.crc32(g.encode()) % buckets for g in char_ngrams(w, lo, hi)]
    return ids or [UNK_ID]  # an empty bag would embed to zero; UNK at least is learned


def fixed_text_table(vocab: list[str], buckets: int, dim: int, std: float, seed: int) -> torch.Tensor:
    """Base text weights: each row a function of (seed, its word or bucket), not of its position."""
    table = torch.empty(len(vocab) + buckets, dim)
    table[len(vocab):] = torch.randn(buckets, dim, generator=torch.Generator().manual_seed(seed)) * std
    for i, word in enumerate(vocab):
        g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(word.encode()))
        table[i] = torch.randn(dim, generator=g) * std
    table[0] = 0.0  # padding
    return table


class Encoded(NamedTuple):
    """A record's ids: the question's, each option's (and as tuples, keys: same text, same key), and
    the answer's index or -100 (no answer given). Built once per (question, options, answer)."""

    question: torch.Tensor
    options: list[torch.Tensor]
    label: int
    option_keys: tuple


def bag_offsets(bags: list[torch.Tensor]) -> torch.Tensor:
    """EmbeddingBag offsets: where each bag starts in the concatenation of `bags`."""
    lengths = torch.tensor([len(t) for t in bags], dtype=torch.long)
    return torch.cumsum(lengths, 0) - lengths


def option_bank(encs: list[Encoded]) -> dict[str, torch.Tensor]:
    """The batch's distinct option texts and where each answer sits among them (keys made once per
    record: converting each option's tensor to a tuple every step took 1.6 ms of a ~13 ms step)."""
    bank: dict[tuple, int] = {}
    bags: list[torch.Tensor] = []
    for e in encs:
        for key, ids in zip(e.option_keys, e.options):
            if key not in bank:
                bank[key] = len(bags)
                bags.append(ids)
    answers = [bank[e.option_keys[e.label]] if e.label >= 0 else -100 for e in encs]
    return {"bank_ids": torch.cat(bags), "bank_offsets": bag_offsets(bags), "bank_labels": torch.tensor(answers)}


def row_options(row: dict) -> list[str]:
    """A record's option texts."""
    opts = row.get("options")
    if opts is None:
        raise ValueError(f"record {row.get('record_id', '?')}: no options")
    return [str(o) for o in list(opts)]


def answer_index(row: dict) -> int:
    """The position of a record's answer among its options (ValueError naming the record if none)."""
    letter = str(row.get("answer_letter", "")).strip().upper()
    idx = ord(letter) - ord("A") if len(letter) == 1 else -1
    if not 0 <= idx < len(row_options(row)):
        raise ValueError(
            f"record {row.get('record_id', '?')}: answer letter {letter!r} is not one of its "
            f"{len(row_options(row))} options"
        )
    return idx


def row_question(row: dict) -> str:
    """A record's question: `question`, else the first line of `question_choice`."""
    q = row.get("question")
    return str(q) if q is not None and str(q) else str(row.get("question_choice", "")).split("\n", 1)[0]


def unknown_name(option: str, option_words: Collection[str]) -> bool:
    """An option holding no word of a training option: a name the model never met as an answer."""
    return not any(w in option_words for w in tokenize(option))


def tie_unknown_options(scores: torch.Tensor, options: list[list[str]], option_words: Collection[str]) -> torch.Tensor:
    """`scores` (B, K) with the options that hold no word of a training option set to their mean.

    Such an option is a name the model never met in training: what tells two of them apart is the
    random start of hashed n-gram buckets and their collisions with trained words, not anything learned.
    Tied, they go to the evaluation's seeded random tie-break instead (a Baseline+ that knew none of a
    target's names answered the one the hash favoured for every image: 'Malignant' for all of 06's
    questions, 'Normal' for all of 03's). Names it met keep their scores, and so does one unknown name
    beside them (elimination). Only option words count: a word met only in questions was learned as
    context, not as an answer ("lung" of "this lung X-ray" made "Lung Opacity" the answer to every
    Pneumonia image of 28 on all three seeds of a Related arm that named neither). A word of any
    option does count: "benign" of "Benign Naevus" makes "Benign" known, though in Med-MAT-mini a look
    belongs to a whole label name. A model trained with hidden names (`unknown_option_p`) encodes such
    options as UNK alone, so they already score the same; the mean keeps the tie exact for the draw."""
    scores = scores.clone()
    for i, opts in enumerate(options):
        unknown = [j for j, o in enumerate(opts) if unknown_name(o, option_words)]
        if len(unknown) > 1:
            scores[i, unknown] = scores[i, unknown].mean()
    return scores

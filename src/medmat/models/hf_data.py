"""Prompts and batches of the `hf` backend: a record becomes the chat prompt its checkpoint expects, its
image, and answer-only labels.

    batch = collate(processor, rows, data_root=root, max_length=2048)
    # input_ids / attention_mask / labels (-100 but on the answer letter + end token), padded; the
    # processor's image tensors (LLaVA pixel_values; Qwen2-VL pixel_values + image_grid_thw) in row order

Kept apart from medmat.models.hf (loading, LoRA, scoring, saving): this is the part that differs
between model families, and the part a new family is most likely to need changed.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch


def load_row_image(row: dict, data_root: str | os.PathLike | None, size: int | None = None):
    """The record's image as RGB (resized to a `size` square if given). `image_path` is absolute in the
    records table; without it the relative `image` is resolved inside data_root (refusing paths that
    escape it). Errors name the record."""
    from medmat.data.images import ImageError, load_image, resolve_image_path

    try:
        path = row.get("image_path") or ""
        if not path:
            if data_root is None:
                raise ImageError(f"no image_path, and no data root to resolve image {row.get('image')!r}")
            path = resolve_image_path(data_root, row.get("image"))
        elif not Path(path).is_absolute() and data_root is not None:
            path = resolve_image_path(data_root, path)
        img = load_image(path)
    except ImageError as exc:
        raise ImageError(f"record {row.get('record_id', '?')}: {exc}") from None
    return img.resize((size, size)) if size else img


def prompt_text(processor, row: dict) -> str:
    """The record's Question-choice as one user turn with the image, ending at the answer slot."""
    question = str(row["question_choice"]).strip()
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    tokenizer = processor.tokenizer
    if getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None):
        return processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    # No chat template (a base model): the image token, the question, then an answer cue.
    return f"{processor.image_token}\n{question}\nAnswer:"


def answer_ids(tokenizer, letter: str, with_eos: bool = True) -> list[int]:
    """Token ids of an answer letter (+ the end token: the model learns to stop after it)."""
    ids = tokenizer(letter, add_special_tokens=False)["input_ids"]
    if with_eos and tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def _is_per_token(key: str, value: torch.Tensor, prompt_len: int) -> bool:
    """A processor output aligned with the prompt's tokens (shape (1, prompt_len, ...))."""
    return (not key.startswith("pixel") and value.ndim >= 2 and value.shape[0] == 1
            and value.shape[1] == prompt_len)


def collate(processor, rows: list[dict], *, data_root: str | os.PathLike | None, max_length: int,
            image_size: int | None = None, answers: list[str] | None = None, with_eos: bool = True,
            padding_side: str = "right") -> dict[str, torch.Tensor]:
    """Prompt (+ answer) token ids, image tensors and answer-only labels for a list of records.

    `answers=None` uses each record's answer letter; `answers=[""]*n` builds prompts only.
    Each record's prompt is encoded by the processor on its own (it expands the image placeholder
    into the right number of image tokens), then the answer ids are appended: tokenising prompt and
    answer separately keeps the answer's tokens identical whatever the template ends with.
    """
    tokenizer = processor.tokenizer
    answers = [r["answer_letter"] for r in rows] if answers is None else answers
    seqs, images = [], []
    for row, ans in zip(rows, answers):
        enc = processor(text=[prompt_text(processor, row)], images=[load_row_image(row, data_root, image_size)],
                        return_tensors="pt")
        enc = {k: v for k, v in enc.items() if isinstance(v, torch.Tensor)}
        prompt = enc.pop("input_ids")[0]
        enc.pop("attention_mask", None)
        ans_ids = torch.tensor(answer_ids(tokenizer, ans, with_eos) if ans else [], dtype=torch.long)
        ids = torch.cat([prompt, ans_ids])
        if len(ids) > max_length:
            raise ValueError(f"record {row.get('record_id', '?')}: {len(ids)} tokens > model.hf.max_length "
                             f"{max_length} (raise max_length or set image_size)")
        # Per-token tensors besides input_ids (Qwen2-VL mm_token_type_ids; token_type_ids or
        # cross_attention_mask in other families) are extended over the answer with their last
        # value: answer tokens are text that sees the image like the prompt's last token does.
        per_token = {k: v[0] for k, v in enc.items() if _is_per_token(k, v, len(prompt))}
        for k in per_token:
            enc.pop(k)
        per_token = {k: torch.cat([v, v[-1:].expand(len(ans_ids), *v.shape[1:])]) for k, v in per_token.items()}
        seqs.append({"input_ids": ids, "attention_mask": torch.ones_like(ids),
                     "labels": torch.cat([torch.full_like(prompt, -100), ans_ids]), **per_token})
        images.append(enc)
    width = max(len(s["input_ids"]) for s in seqs)
    pad_values = {"input_ids": tokenizer.pad_token_id, "labels": -100}
    batch: dict[str, torch.Tensor] = {}
    for key in seqs[0]:
        padded = []
        for s in seqs:
            t = s[key]
            fill = t.new_full((width - len(t), *t.shape[1:]), pad_values.get(key, 0))
            padded.append(torch.cat([t, fill] if padding_side == "right" else [fill, t]))
        batch[key] = torch.stack(padded)
    # Image tensors: LLaVA (1, 3, H, W) per image; Qwen2-VL (patches, dim) + grid (1, 3) — all
    # concatenate along the first axis in record order.
    for key in images[0]:
        batch[key] = torch.cat([e[key] for e in images])
    return batch

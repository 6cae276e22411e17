"""`tiny`: a small vision-language model trained on the CPU, its vision tower pretrained on generic shapes.

Image side: a 3-stage CNN. Text side (medmat.models.tiny_text): a word vocabulary built from the
training records plus hashed character n-grams (fastText-style, a fixed number of buckets),
bag-of-ids embeddings of the question and of each option. The image+question vector is matched
against every option's embedding; the loss is cross-entropy over the options (the answer only), and
`generate` returns the best option's letter.

Why these pieces:
- Reading an unseen modality needs invariance to each modality's intensity convention, so training
  augments with random intensity inversion and colour/grey jitter, and every input image is
  instance-normalised.
- Options are scored through shared text embeddings, so a label learned on one subset (say "covid" in
  X-ray) is the same vector when it appears in another subset's options (CT) - the compositional path.
- An option is scored by its text, n-grams included ("tumor" in "Kidney Tumor"). A name holding no
  word of a training option is UNK, and several such names tie for the seeded tie-break
  (tiny_text.tie_unknown_options has the why). `unknown_option_p`: training shows that share of option
  names as UNK, so UNK learns "the answer is a name I don't know" and loses where the image fits a
  known name. Scored against the mean of hashed-n-gram noise instead, the one name a Baseline+ knew
  won every question on one seed (28's "Normal", 208 of 208).
- The untrained model (the paper's Baseline) has no preference: the head's last layer and the option
  prior start at zero, every option scores the same and the seeded tie-break guesses (a random network
  had one favourite label for every question: exactly 1/k on a label-balanced test, every seed).
- Text embeddings start small (`text_init_std`); every seed starts from the same base weights
  (`init_seed`), as the paper's three runs fine-tune one checkpoint: the seed varies data order and
  augmentation (with the init drawn per seed, answers for a label never seen were drawn anew: 28 from
  04 + 32, seed sd 10.6; shared: 1.0). A word's base vector depends on the word, not its vocab slot.
- `vision_init`: the vision tower (cnn, img_proj) starts from generic-shape pretraining (medmat.pretrain
  has the figures), as LLaVA's CLIP saw general images first. From scratch, Baseline+ answered one label
  for a whole unseen modality, and seeds parted on where a lesion starts to count.
- `batch_negatives`: the answer must also beat the batch's other option texts (other subsets' labels,
  CLIP-style), at 0.3 of the loss. Against its own options alone "Malignant" vs "Normal" is learned as
  "any lesion" (world seed 1: Mic-Cell-Cancer answered inverted, mean Table-3 gap -4.6 / -6.8 / -4.7 on
  base weights 0 / 1 / 2; at 0.3, +9.2 / +7.1 / +8.1). At 1.0 the batch's other modalities taught "CT
  never says COVID" (default world's gap +12, from +34).
- `norm: group` (GroupNorm) is kept as an option; instance norm transferred better across modalities
  on Med-MAT-mini (Related on CT-Lung-COVID, 3 seeds: 91 vs 86 %).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from medmat.config import ConfigError, from_dict
from medmat.models.tiny_text import (PAD, UNK, UNK_ID, Encoded, answer_index, bag_offsets, fixed_text_table,
                                     option_bank, row_options, row_question, text_ids, tie_unknown_options,
                                     tokenize, unknown_name)


@dataclasses.dataclass
class TinyConfig:
    """params.yaml `model.tiny`."""

    image_size: int = 32  # images are resized to image_size x image_size RGB
    channels: tuple = (16, 32, 64)  # CNN widths, one stride-2 stage each
    embed_dim: int = 64  # word and joint embedding width
    hidden: int = 128
    min_word_count: int = 1  # words seen fewer times in training map to UNK
    augment: bool = True  # train-time inversion + colour/grey jitter (modality invariance)
    invert_p: float = 0.5
    grey_p: float = 0.3
    jitter: float = 0.3  # per-channel gain / contrast range +-jitter
    ngram_buckets: int = 2048  # hashed character n-gram buckets; 0 = whole words only (unseen -> UNK)
    ngram_min: int = 3
    ngram_max: int = 5
    text_init_std: float = 0.02  # text embeddings start small: text no training touched stays near neutral
    norm: str = "instance"  # CNN feature-map normalisation: instance | group
    init_seed: int | None = 0  # the base weights every training seed starts from; None: the training seed draws them
    batch_negatives: float = 0.3  # weight of the loss against every option text in the batch (0 = off)
    unknown_option_p: float = 0.15  # train-time share of option names shown as UNK ("a name I don't know")
    vision_init: str | None = None  # the pretrained vision tower every training run starts from (medmat.pretrain)

    def __post_init__(self):
        self.channels = tuple(int(c) for c in self.channels)
        if self.image_size < 8 or not self.channels or self.embed_dim < 1:
            raise ValueError("image_size >= 8, channels non-empty and embed_dim >= 1 required")
        if self.ngram_buckets < 0 or not 1 <= self.ngram_min <= self.ngram_max:
            raise ValueError("ngram_buckets >= 0 and 1 <= ngram_min <= ngram_max required")
        if self.norm not in ("group", "instance"):
            raise ValueError(f"norm must be group or instance, got {self.norm!r}")
        if self.text_init_std <= 0:
            raise ValueError("text_init_std must be > 0")
        if not 0.0 <= self.unknown_option_p < 1.0:
            raise ValueError(f"unknown_option_p must be in [0, 1), got {self.unknown_option_p}")


# Saved configs without these keys come from the word-only model, or (`unknown_option_p` alone) from
# before names were hidden in training: they load as they were trained.
LEGACY = {"ngram_buckets": 0, "norm": "instance", "text_init_std": 1.0, "init_seed": None, "unknown_option_p": 0.0}


def _norm_layer(kind: str, c: int) -> nn.Module:
    if kind == "instance":
        return nn.InstanceNorm2d(c, affine=True)
    return nn.GroupNorm(math.gcd(4, c), c)


class TinyVLM(nn.Module):
    def __init__(self, cfg: TinyConfig, vocab: list[str]):
        super().__init__()
        fixed = cfg.init_seed is not None
        with torch.random.fork_rng(devices=[], enabled=fixed):  # the training seed's stream stays as it was
            if fixed:
                torch.manual_seed(cfg.init_seed)
            self._build(cfg, vocab)

    def _build(self, cfg: TinyConfig, vocab: list[str]) -> None:
        layers, c_in = [], 3
        for c in cfg.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), _norm_layer(cfg.norm, c), nn.GELU()]
            c_in = c
        self.cnn = nn.Sequential(*layers)
        self.img_proj = nn.Linear(c_in, cfg.embed_dim)
        # One table for questions and options (words, then n-gram buckets): a word means the same on
        # both sides.
        self.words = nn.EmbeddingBag(len(vocab) + cfg.ngram_buckets, cfg.embed_dim, mode="mean", padding_idx=0)
        self.joint = nn.Sequential(
            nn.Linear(3 * cfg.embed_dim, cfg.hidden), nn.GELU(), nn.Linear(cfg.hidden, cfg.embed_dim)
        )
        self.opt_bias = nn.Linear(cfg.embed_dim, 1)  # a per-option prior (label frequency)
        self.cfg = cfg
        if cfg.ngram_buckets:  # the text model (LEGACY keeps the word-only model's init)
            with torch.no_grad():
                if cfg.init_seed is None:
                    self.words.weight.normal_(0.0, cfg.text_init_std)
                    self.words.weight[0].zero_()  # padding
                else:
                    self.words.weight.copy_(fixed_text_table(vocab, cfg.ngram_buckets, cfg.embed_dim,
                                                             cfg.text_init_std, cfg.init_seed))
                # An untrained model has no preference: with the head's last layer and the option
                # prior at zero every option scores the same, and the seeded tie-break guesses. A
                # random network instead gave one favourite label for every question (exactly 1/k on
                # a label-balanced test, every seed). Training moves both off zero at the first step.
                self.joint[-1].weight.zero_()
                self.joint[-1].bias.zero_()
                self.opt_bias.weight.zero_()

    def augment(self, x: torch.Tensor) -> torch.Tensor:
        """Per-sample intensity inversion, greyscale and colour/contrast jitter (x in [0, 1])."""
        cfg, b = self.cfg, x.shape[0]
        dev = x.device
        inv = (torch.rand(b, 1, 1, 1, device=dev) < cfg.invert_p).to(x.dtype)
        x = inv * (1 - x) + (1 - inv) * x
        grey = (torch.rand(b, 1, 1, 1, device=dev) < cfg.grey_p).to(x.dtype)
        x = grey * x.mean(1, keepdim=True).expand_as(x) + (1 - grey) * x
        gain = 1 + cfg.jitter * (2 * torch.rand(b, 3, 1, 1, device=dev) - 1)
        contrast = 1 + cfg.jitter * (2 * torch.rand(b, 1, 1, 1, device=dev) - 1)
        mean = x.mean((1, 2, 3), keepdim=True)
        return ((x * gain - mean) * contrast + mean).clamp(0, 1)

    def forward(self, images, q_ids, q_offsets, o_ids, o_offsets, o_mask, bank_ids=None, bank_offsets=None):
        """Scores of each record's options (B, K), -inf where missing; with a bank, also of every bank
        text (B, N). One forward for both: under DistributedDataParallel only forward() syncs gradients."""
        h = self.query(images, q_ids, q_offsets).unsqueeze(1)  # (B, 1, D)
        b, k = o_mask.shape
        scores = self._match(h, self.words(o_ids, o_offsets).view(b, k, -1)).masked_fill(~o_mask, float("-inf"))
        return scores if bank_ids is None else (scores, self._match(h, self.words(bank_ids, bank_offsets)[None]))

    def _match(self, h: torch.Tensor, o: torch.Tensor) -> torch.Tensor:
        """(B, 1, D) queries against (B or 1, K, D) option embeddings -> (B, K), plus each option's prior."""
        return (h * o).sum(-1) / math.sqrt(h.shape[-1]) + self.opt_bias(o).squeeze(-1)

    def query(self, images, q_ids, q_offsets) -> torch.Tensor:
        """The image+question vector (B, D) that every option's embedding is matched against."""
        x = images.float() / 255.0
        if self.training and self.cfg.augment:
            x = self.augment(x)
        # Instance-normalise the input too: each modality's overall brightness/contrast is removed.
        x = (x - x.mean((2, 3), keepdim=True)) / (x.std((2, 3), keepdim=True) + 1e-3)
        img = self.img_proj(self.cnn(x).mean((2, 3)))
        q = self.words(q_ids, q_offsets)
        return self.joint(torch.cat([img, q, img * q], dim=1))


class TinyBackend:
    """The `tiny` backend (interface in medmat.models)."""

    name = "tiny"

    def __init__(self, cfg: TinyConfig, data_root: str | os.PathLike | None = None, vocab: list[str] | None = None,
                 option_words: Iterable[str] | None = None):
        self.cfg = cfg
        self.data_root = Path(data_root) if data_root else None
        self.vocab = list(vocab) if vocab else [PAD, UNK]
        self.word_index = {w: i for i, w in enumerate(self.vocab)}
        self.option_words = frozenset(option_words if option_words is not None else self.vocab)  # tie_unknown_options
        self.model = TinyVLM(cfg, self.vocab)
        # Decoded, resized images as uint8 (3, S, S), loaded once per run: every epoch reads the same PNGs.
        self._images: dict[str, torch.Tensor] = {}
        # (question, options, answer) -> its Encoded ids (tiny_text.Encoded): a record's words are
        # tokenised once, not every epoch (this was a fifth of a training step's time). Keyed by the
        # text itself, not record_id: pyfunc inputs reuse ids like "input-0" for different questions.
        self._encoded: dict[tuple, Encoded] = {}

    # -- vocabulary -------------------------------------------------------------------------------
    def prepare_training(self, train_df, decode_images: bool = True) -> None:
        """Build the word vocabulary from the training records and a fresh model sized to it; with
        `decode_images`, decode the training images now (the untrained Baseline never trains: no need)."""
        counts: Counter[str] = Counter()
        option_words: set[str] = set()
        for row in _iter_rows(train_df):
            in_options = [t for o in row_options(row) for t in tokenize(o)]
            option_words.update(in_options)
            counts.update(tokenize(row_question(row)) + in_options)
        words = sorted(w for w, n in counts.items() if n >= self.cfg.min_word_count)
        self.vocab = [PAD, UNK] + words
        self.word_index = {w: i for i, w in enumerate(self.vocab)}
        self.option_words = frozenset(option_words & set(words))
        self.model = TinyVLM(self.cfg, self.vocab)
        if self.cfg.vision_init:
            load_vision_tower(self.model, self.cfg.vision_init)
        self._encoded.clear()  # ids depend on the vocabulary just built
        for row in _iter_rows(train_df) if decode_images else ():  # now, not inside the training loop
            self.image_tensor(row)

    def _ids(self, text: str) -> list[int]:
        return text_ids(text, self.word_index, self.cfg.ngram_buckets, self.cfg.ngram_min, self.cfg.ngram_max)

    def _option_ids(self, text: str) -> list[int]:
        """An option's ids; a name with no word of a training option is UNK, the learned "a name I
        don't know" (when training taught it: `unknown_option_p` > 0)."""
        if self.cfg.unknown_option_p and unknown_name(text, self.option_words):
            return [UNK_ID]
        return self._ids(text)

    # -- images -----------------------------------------------------------------------------------
    def _image_path(self, row: dict) -> str:
        p = row.get("image_path")
        if p is not None and str(p):
            return str(p)
        if self.data_root is None:
            raise ValueError(f"record {row.get('record_id', '?')}: no image_path and no data_root to resolve 'image'")
        return str(self.data_root / str(row["image"]))

    def image_tensor(self, row: dict) -> torch.Tensor:
        path = self._image_path(row)
        try:  # the file's identity is part of the key: a rewritten file at the same path is re-read
            st = os.stat(path)
            key = f"{path}|{st.st_mtime_ns}|{st.st_size}"
        except OSError:
            key = path  # unreadable: load_image below reports it, naming the record
        img = self._images.get(key)
        if img is None:
            from medmat.data.images import load_image

            try:
                pil = load_image(path)
            except Exception as exc:
                raise ValueError(f"record {row.get('record_id', '?')}: cannot read image {path}: {exc}") from exc
            s = self.cfg.image_size
            pil = pil.convert("RGB").resize((s, s), resample=2)  # 2 = bilinear
            img = torch.from_numpy(np.asarray(pil, dtype=np.uint8).copy()).permute(2, 0, 1).contiguous()
            self._images[key] = img
        return img

    # -- interface --------------------------------------------------------------------------------
    def _encode(self, row: dict) -> Encoded:
        """The record's ids as tensors (and its options' keys), built once per text."""
        question, options = row_question(row), row_options(row)
        key = (question, tuple(options), row.get("answer_letter"))
        enc = self._encoded.get(key)
        if enc is None:
            label = answer_index(row) if row.get("answer_letter") not in (None, "") else -100
            ids = [self._ids(question)] + [self._option_ids(t) for t in options]
            tensors = [torch.tensor(i, dtype=torch.long) for i in ids]
            enc = self._encoded[key] = Encoded(tensors[0], tensors[1:], label, tuple(tuple(i) for i in ids[1:]))
        return enc

    def collate(self, rows: Iterable[dict]) -> dict[str, torch.Tensor]:
        rows = list(rows)
        encs = [self._encode(r) for r in rows]
        k = max(len(e.options) for e in encs)
        pad = torch.zeros(1, dtype=torch.long)  # a missing option: PAD alone (masked out below)
        questions = [e.question for e in encs]
        options = [e.options[j] if j < len(e.options) else pad for e in encs for j in range(k)]
        if self.model.training and self.cfg.unknown_option_p:  # names shown as UNK, drawn anew each step
            hidden = (torch.rand(len(options)) < self.cfg.unknown_option_p).tolist()  # PAD stays masked
            options = [torch.tensor([UNK_ID]) if h else o for o, h in zip(options, hidden)]
        return {  # one concatenation per field, in C: per-row Python lists cost a sixth of a training step
            "images": torch.stack([self.image_tensor(r) for r in rows]),
            "q_ids": torch.cat(questions),
            "q_offsets": bag_offsets(questions),
            "o_ids": torch.cat(options),
            "o_offsets": bag_offsets(options),
            "o_mask": torch.tensor([[j < len(e.options) for j in range(k)] for e in encs], dtype=torch.bool),
            "labels": torch.tensor([e.label for e in encs]),
            **(option_bank(encs) if self.cfg.batch_negatives else {}),
        }

    def _scores(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(*(batch[k] for k in ("images", "q_ids", "q_offsets", "o_ids", "o_offsets", "o_mask")))

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Cross-entropy over the options: the loss falls on the answer only. With `batch_negatives`,
        plus that weight times the cross-entropy of the answer against every option text in the batch."""
        if not self.cfg.batch_negatives:
            return F.cross_entropy(self._scores(batch), batch["labels"], ignore_index=-100)
        scores, bank = self.model(batch["images"], batch["q_ids"], batch["q_offsets"], batch["o_ids"],
                                  batch["o_offsets"], batch["o_mask"], batch["bank_ids"], batch["bank_offsets"])
        loss = F.cross_entropy(scores, batch["labels"], ignore_index=-100)
        loss = loss + self.cfg.batch_negatives * F.cross_entropy(bank, batch["bank_labels"], ignore_index=-100)
        return loss

    @torch.no_grad()
    def score_options(self, rows: Iterable[dict]) -> list[list[float]]:
        rows = list(rows)
        was = self.model.training
        self.model.eval()
        try:
            logp = torch.log_softmax(tie_unknown_options(self._scores(self.collate(rows)), [row_options(r) for r in rows],
                                                         self.option_words), dim=1)
        finally:
            self.model.train(was)
        return [logp[i, : len(row_options(r))].tolist() for i, r in enumerate(rows)]

    def generate(self, rows: Iterable[dict]) -> list[str]:
        return [chr(ord("A") + int(np.argmax(s))) for s in self.score_options(rows)]

    # -- persistence ------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        from safetensors.torch import save_file

        from medmat.models import write_backend_file

        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in self.model.state_dict().items()}
        save_file(state, str(out / "model.safetensors"))
        (out / "vocab.json").write_text(json.dumps(self.vocab), encoding="utf-8")
        (out / "option_words.json").write_text(json.dumps(sorted(self.option_words)), encoding="utf-8")
        cfg = dataclasses.asdict(self.cfg)
        cfg["channels"] = list(cfg["channels"])
        write_backend_file(out, "tiny", tiny=cfg)  # written last: its presence marks a complete save


VISION_TOWER = ("cnn.", "img_proj.")  # the image side: what medmat.pretrain trains and every run starts from


def vision_tower(model: TinyVLM) -> dict[str, torch.Tensor]:
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(VISION_TOWER)}


def load_vision_tower(model: TinyVLM, path: str) -> None:
    """Start `model`'s vision tower from `path` (safetensors); the text side and the head stay as built."""
    from safetensors.torch import load_file

    from medmat.models import require_start_weights
    require_start_weights(path)
    state, want = load_file(path), vision_tower(model)
    if {k: tuple(v.shape) for k, v in state.items()} != {k: tuple(v.shape) for k, v in want.items()}:
        raise ConfigError(f"model.tiny.vision_init: {path} is for other model.tiny channels; `dvc repro pretrain`")
    model.load_state_dict(state, strict=False)


def _iter_rows(df) -> Iterable[dict]:
    if hasattr(df, "to_dict"):
        return df.to_dict("records")
    return df


def build(cfg: dict | TinyConfig, data_root=None) -> TinyBackend:
    if not isinstance(cfg, TinyConfig):
        cfg = from_dict(TinyConfig, cfg, where="model.tiny")
    return TinyBackend(cfg, data_root=data_root)


def load(model_dir: str | os.PathLike, data_root=None) -> TinyBackend:
    from safetensors.torch import load_file

    from medmat.models import read_backend_file

    info = read_backend_file(model_dir)
    saved = dict(info.get("tiny") or {})
    cfg = from_dict(TinyConfig, {**LEGACY, **saved} if "ngram_buckets" not in saved else
                    {"unknown_option_p": 0.0, **saved},
                    where=f"{model_dir}: tiny config")
    try:
        vocab = json.loads((Path(model_dir) / "vocab.json").read_text(encoding="utf-8"))
        state = load_file(str(Path(model_dir) / "model.safetensors"))
    except FileNotFoundError as exc:
        raise ConfigError(f"{model_dir}: incomplete tiny model ({exc.filename} missing)") from None
    words = Path(model_dir) / "option_words.json"  # saved before it: every vocabulary word counts
    option_words = json.loads(words.read_text(encoding="utf-8")) if words.exists() else None
    backend = TinyBackend(cfg, data_root=data_root, vocab=vocab, option_words=option_words)
    backend.model.load_state_dict(state)
    backend.model.eval()
    return backend

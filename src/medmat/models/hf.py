"""The `hf` backend: a local Hugging Face image-text-to-text checkpoint, LoRA (PEFT) or full fine-tuning.

    backend = build_hf({"path": "/models/llava-1.5-7b-hf", "lora": {"r": 16}}, data_root)
    backend.collate(rows) -> batch     # prompt = the record's Question-choice as a chat turn with its image;
                                       # labels are -100 everywhere but the answer letter (+ end token)
    backend.loss(batch)                # answer-only cross-entropy, through self.model(...)
    backend.score_options(rows)        # log-likelihood of each option's letter as the answer
    backend.generate(rows)             # greedy decoding, decoded text
    backend.save(dir); load_hf(dir)    # LoRA: adapter + a reference to the base checkpoint; full: the model

Loaded through AutoModelForImageTextToText + AutoProcessor, so LLaVA-1.5, Qwen2-VL and other families
with a chat template work the same way. The path is checked before transformers sees it (a missing
directory makes transformers try the Hub) and every load passes local_files_only=True. Prompts and
batches are built in medmat.models.hf_data, device and precision decided in medmat.models.hf_precision.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForImageTextToText, AutoProcessor, Qwen2VLProcessor

from medmat.config import ConfigError, from_dict
from medmat.models.hf_data import collate
from medmat.models.hf_precision import (autocast_forward, resolve_device, resolve_dtype, resolve_mixed_precision,
                                         upcast_trainable)
from medmat.names import LETTERS

log = logging.getLogger(__name__)

# LoRA on the language model's attention and MLP projections only. The vision towers of LLaVA (CLIP) and
# others also have modules named q_proj/k_proj/..., so a plain name list would adapt them too; PEFT
# full-matches a string target_modules as a regex against the module's dotted name.
DEFAULT_TARGET_MODULES = r".*language_model.*\.(q_proj|k_proj|v_proj|o_proj|gate_proj|up_proj|down_proj)"

# Names of the vision tower and of the vision->text projector across the families we support
# (LLaVA: vision_tower / multi_modal_projector; Qwen2-VL: visual, whose `merger` is the projector).
VISION_MARKERS = ("vision_tower", "vision_model", "visual.")
PROJECTOR_MARKERS = ("multi_modal_projector", "visual.merger")


class ModelPathError(ConfigError):
    """The configured checkpoint directory does not exist or is not a checkpoint."""


@dataclasses.dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    target_modules: str | list[str] = DEFAULT_TARGET_MODULES

    def __post_init__(self):
        if self.r <= 0:
            raise ValueError(f"lora.r must be positive, got {self.r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"lora.dropout must be in [0, 1), got {self.dropout}")


@dataclasses.dataclass
class HFConfig:
    """params.yaml `model.hf` section."""

    path: str = ""  # local checkpoint directory (config, weights, tokenizer, image processor)
    lora: dict | LoraConfig = dataclasses.field(default_factory=dict)
    full_finetune: bool = False  # True: train all (unfrozen) weights; lora is ignored
    freeze_vision: bool = True  # vision tower frozen (full fine-tuning; LoRA never adapts it by default)
    freeze_projector: bool = False  # False: projector trained too (LoRA: saved beside the adapter)
    gradient_checkpointing: bool = False
    # Storage dtype of the loaded (frozen) weights; trainable weights are always float32 master weights.
    # auto: fp32 on CPU; on CUDA bf16 under LoRA, fp32 for full fine-tuning. Or float32/bfloat16/float16.
    dtype: str = "auto"
    # torch.autocast of every forward (accelerate's mixed_precision in training, the same in evaluation):
    # auto = bf16 on CUDA or when dtype is half precision, else no; or no / bf16 / fp16.
    mixed_precision: str = "auto"
    device: str = "auto"  # auto = cuda:LOCAL_RANK when CUDA is there, else cpu
    max_length: int = 2048  # a longer prompt + answer is an error naming the record (never silently cut)
    image_size: int | None = None  # resize images to this square first (None: the processor decides)
    max_new_tokens: int = 8  # generate scorer: enough for "B", "(B)", "The answer is B"
    attn_implementation: str | None = None  # e.g. "sdpa", "flash_attention_2"; None = transformers default
    trust_remote_code: bool = False

    def __post_init__(self):
        if isinstance(self.lora, dict):
            self.lora = from_dict(LoraConfig, self.lora, where="model.hf.lora")
        if self.dtype not in ("auto", "float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be auto, float32, bfloat16 or float16, got {self.dtype!r}")
        if self.mixed_precision not in ("auto", "no", "bf16", "fp16"):
            raise ValueError(f"mixed_precision must be auto, no, bf16 or fp16, got {self.mixed_precision!r}")
        if self.max_length < 16:
            raise ValueError(f"max_length must be >= 16, got {self.max_length}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class Qwen2VLImageOnlyProcessor(Qwen2VLProcessor):
    """Qwen2-VL's processor without its video processor.

    The stock processor loads a video processor, which imports torchvision; we only feed images, and
    torchvision is not part of this stack (its CPU build breaks transformers' AutoProcessor here).
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)


def check_model_path(path: str | os.PathLike) -> Path:
    """The checkpoint directory, or ModelPathError naming it (never a Hub download)."""
    if not path:
        raise ModelPathError("model.hf.path is empty: set it to a local checkpoint directory")
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ModelPathError(f"model.hf.path {str(p)!r} does not exist or is not a directory "
                             "(only local checkpoints are loaded; nothing is downloaded)")
    if not (p / "config.json").is_file():
        raise ModelPathError(f"model.hf.path {str(p)!r} has no config.json: not a Hugging Face checkpoint")
    return p.resolve()


def mixed_precision_of(hf_values: dict | HFConfig) -> str:
    """The trainer's Accelerator(mixed_precision=...) for a `model.hf` section (before the model is built)."""
    cfg = hf_values if isinstance(hf_values, HFConfig) else from_dict(HFConfig, hf_values, where="model.hf")
    return resolve_mixed_precision(cfg, resolve_device(cfg.device))


def load_processor(path: Path, model_type: str, trust_remote_code: bool = False):
    if model_type == "qwen2_vl":
        return Qwen2VLImageOnlyProcessor.from_pretrained(path, local_files_only=True)
    return AutoProcessor.from_pretrained(path, local_files_only=True, trust_remote_code=trust_remote_code)


def projector_module_names(model) -> list[str]:
    """Short names of the vision->text projector modules present in `model` (for PEFT modules_to_save)."""
    names = set()
    for name, _ in model.named_modules():
        for marker in PROJECTOR_MARKERS:
            if name.endswith(marker):
                names.add(marker.split(".")[-1])
    return sorted(names)


def wrap_lora(model, lora: LoraConfig, train_projector: bool = True):
    """`model` with LoRA adapters (PEFT) on `lora.target_modules`; everything else frozen except, when
    `train_projector`, the projector (trained in full and saved beside the adapter)."""
    import peft

    modules_to_save = (projector_module_names(model) or None) if train_projector else None
    pcfg = peft.LoraConfig(
        r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, target_modules=lora.target_modules,
        modules_to_save=modules_to_save, task_type=None,
    )
    return peft.get_peft_model(model, pcfg)


class HFBackend:
    """A local image-text-to-text checkpoint behind the medmat backend interface."""

    name = "hf"

    def __init__(self, cfg: HFConfig, data_root: str | os.PathLike | None = None,
                 adapter_dir: str | os.PathLike | None = None, model_dir: str | os.PathLike | None = None):
        self.cfg = cfg
        self.data_root = data_root
        base = check_model_path(cfg.path)
        weights_dir = Path(model_dir) if model_dir is not None else base
        self.device = resolve_device(cfg.device)
        self.dtype = resolve_dtype(cfg.dtype, self.device, cfg.full_finetune)
        self.mixed_precision = resolve_mixed_precision(cfg, self.device)
        kwargs: dict[str, Any] = dict(dtype=self.dtype, local_files_only=True, trust_remote_code=cfg.trust_remote_code)
        if cfg.attn_implementation:
            kwargs["attn_implementation"] = cfg.attn_implementation
        if self.device.type == "cuda":
            # Load the shards straight onto this process's GPU: no host-RAM copy of the whole model per
            # process (8 processes x 14 GB for a 7B model would otherwise pass through host memory).
            kwargs["device_map"] = {"": str(self.device)}
        model = AutoModelForImageTextToText.from_pretrained(weights_dir, **kwargs)
        self.model_type = model.config.model_type
        self.processor = load_processor(weights_dir if model_dir is not None else base, self.model_type,
                                        cfg.trust_remote_code)
        self.tokenizer = self.processor.tokenizer
        if self.tokenizer.pad_token_id is None:  # LLaMA-family tokenizers ship without one
            self.tokenizer.pad_token = self.tokenizer.eos_token or self.tokenizer.unk_token
        # Training needs no KV cache (and gradient checkpointing refuses one); generate() asks for it.
        for c in (model.config, getattr(model.config, "text_config", None)):
            if c is not None:
                c.use_cache = False
        if cfg.gradient_checkpointing:
            # Non-reentrant checkpointing works with frozen embeddings (LoRA) without input-grad hacks.
            if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if cfg.full_finetune:
            self._freeze_for_full(model)
        else:
            model = self._wrap_lora(model, adapter_dir)
        upcast_trainable(model)
        autocast_forward(model, self.mixed_precision, self.device)
        self.model = model.to(self.device)
        self._letter_ids = self._single_token_letters()
        trainable, total = self.trainable_parameters()
        log.info("hf: %s (%s) on %s, %s; %.1fM of %.1fM parameters trainable", weights_dir, self.model_type,
                 self.device, "full fine-tuning" if cfg.full_finetune else "LoRA", trainable / 1e6, total / 1e6)

    # -- model set-up -----------------------------------------------------------------------------
    def _freeze_for_full(self, model) -> None:
        for name, p in model.named_parameters():
            if self.cfg.freeze_projector and any(m in name for m in PROJECTOR_MARKERS):
                p.requires_grad_(False)
            elif self.cfg.freeze_vision and any(m in name for m in VISION_MARKERS) and not any(
                m in name for m in PROJECTOR_MARKERS
            ):
                p.requires_grad_(False)

    def _wrap_lora(self, model, adapter_dir):
        if adapter_dir is not None:
            import peft

            return peft.PeftModel.from_pretrained(model, adapter_dir, is_trainable=True)
        try:
            return wrap_lora(model, self.cfg.lora, train_projector=not self.cfg.freeze_projector)
        except ValueError as exc:  # PEFT: "Target modules ... not found in the base model"
            raise ConfigError(f"model.hf.lora.target_modules {self.cfg.lora.target_modules!r} matched no module "
                              f"of {self.cfg.path}: {exc}") from None

    def _unwrapped(self):
        """self.model without the DDP wrapper the trainer may have put around it (DDP has no generate)."""
        model = self.model
        return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model

    def trainable_parameters(self) -> tuple[int, int]:
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        total = sum(p.numel() for p in self.model.parameters())
        return trainable, total

    # -- prompts and batches (medmat.models.hf_data) ---------------------------------------------
    def collate(self, rows: list[dict], answers: list[str] | None = None, with_eos: bool = True,
                padding_side: str = "right") -> dict[str, torch.Tensor]:
        """Prompt (+ answer) ids, image tensors and answer-only labels; `answers=[""] * n`: prompts only."""
        return collate(self.processor, rows, data_root=self.data_root, max_length=self.cfg.max_length,
                       image_size=self.cfg.image_size, answers=answers, with_eos=with_eos,
                       padding_side=padding_side)

    def _to_device(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        device = next(self.model.parameters()).device
        return {k: (v.to(device, self.dtype) if v.is_floating_point() else v.to(device)) for k, v in batch.items()}

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**self._to_device(batch)).loss

    # -- evaluation -------------------------------------------------------------------------------
    def _single_token_letters(self) -> list[int] | None:
        ids = [self.tokenizer(c, add_special_tokens=False)["input_ids"] for c in LETTERS]
        return [i[0] for i in ids] if all(len(i) == 1 for i in ids) else None

    @torch.no_grad()
    def score_options(self, rows: list[dict]) -> list[list[float]]:
        """Log-likelihood of each option's letter (without the end token) as the answer."""
        was_training = self.model.training
        self.model.eval()
        try:
            if self._letter_ids is not None:
                return self._score_single_token(rows)
            return self._score_teacher_forced(rows)
        finally:
            self.model.train(was_training)

    def _score_single_token(self, rows):
        # Every letter is one token: one forward per batch, read the next-token distribution at the
        # last prompt position.
        batch = self._to_device(self.collate(rows, answers=[""] * len(rows)))
        batch.pop("labels")
        logits = self.model(**batch).logits
        last = batch["attention_mask"].sum(1) - 1
        logp = torch.log_softmax(logits[torch.arange(len(rows)), last].float(), dim=-1)
        return [[float(logp[i, self._letter_ids[j]]) for j in range(len(r["options"]))] for i, r in enumerate(rows)]

    def _score_teacher_forced(self, rows):
        flat_rows, flat_ans, owner = [], [], []
        for i, r in enumerate(rows):
            for j in range(len(r["options"])):
                flat_rows.append(r)
                flat_ans.append(LETTERS[j])
                owner.append(i)
        batch = self._to_device(self.collate(flat_rows, answers=flat_ans, with_eos=False))
        labels = batch.pop("labels")
        logits = self.model(**batch).logits[:, :-1].float()
        target = labels[:, 1:]
        logp = torch.log_softmax(logits, -1).gather(-1, target.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        seq = (logp * (target != -100)).sum(1).tolist()
        scores: list[list[float]] = [[] for _ in rows]
        for i, s in zip(owner, seq):
            scores[i].append(float(s))
        return scores

    @torch.no_grad()
    def generate(self, rows: list[dict]) -> list[str]:
        was_training = self.model.training
        self.model.eval()
        try:
            batch = self._to_device(self.collate(rows, answers=[""] * len(rows), padding_side="left"))
            batch.pop("labels")
            out = self._unwrapped().generate(
                **batch, max_new_tokens=self.cfg.max_new_tokens, do_sample=False, use_cache=True,
                pad_token_id=self.tokenizer.pad_token_id,
            )
            new = out[:, batch["input_ids"].shape[1]:]
            return [t.strip() for t in self.tokenizer.batch_decode(new, skip_special_tokens=True)]
        finally:
            self.model.train(was_training)

    # -- persistence ------------------------------------------------------------------------------
    def save(self, out_dir: str | os.PathLike) -> None:
        """LoRA: adapter/ + processor/ + the base path; full: model/ + processor/. Written atomically."""
        from medmat.models import write_backend_file

        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
        try:
            model = self._unwrapped()
            if self.cfg.full_finetune:
                model.save_pretrained(tmp / "model")
                self.processor.save_pretrained(tmp / "model")
                mode = "full"
            else:
                model.save_pretrained(tmp / "adapter")
                self.processor.save_pretrained(tmp / "processor")
                mode = "lora"
            cfg = self.cfg.to_dict()
            write_backend_file(tmp, "hf", mode=mode, base_path=str(check_model_path(self.cfg.path)),
                               model_type=self.model_type, hf=cfg)
            if out.exists():
                old = out.with_name(f".{out.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                os.replace(out, old)
                os.replace(tmp, out)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, out)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise


def build_hf(hf_cfg: dict | HFConfig, data_root: str | os.PathLike | None = None) -> HFBackend:
    cfg = hf_cfg if isinstance(hf_cfg, HFConfig) else from_dict(HFConfig, hf_cfg, where="model.hf")
    return HFBackend(cfg, data_root=data_root)


def load_hf(model_dir: str | os.PathLike, data_root: str | os.PathLike | None = None,
            **overrides: Any) -> HFBackend:
    """Rebuild a saved backend: the base checkpoint + adapter (LoRA) or the saved full model.

    `overrides` replace saved HFConfig values (e.g. device="cpu", dtype="float32" to read a GPU run).
    """
    from medmat.models import read_backend_file

    d = Path(model_dir)
    info = read_backend_file(d)
    values = {**info.get("hf", {}), **overrides}
    cfg = from_dict(HFConfig, values, where=f"{d}/medmat_backend.json: hf")
    if info.get("mode") == "full":
        return HFBackend(cfg, data_root=data_root, model_dir=d / "model")
    cfg.path = info.get("base_path", cfg.path)
    return HFBackend(cfg, data_root=data_root, adapter_dir=d / "adapter")


# Names medmat.models.build / load dispatch to.
build = build_hf
load = load_hf

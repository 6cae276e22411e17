"""Where the `hf` backend's weights live and in what precision: device, storage dtype, autocast.

The policy: every trainable weight is an fp32 master weight (`upcast_trainable`); frozen weights may be
stored in half precision (`resolve_dtype`), and every forward runs under the autocast that accelerate
uses in training (`resolve_mixed_precision`, `autocast_forward`), in evaluation too.
"""

from __future__ import annotations

import os

import torch

from medmat.config import ConfigError


def resolve_dtype(name: str, device: torch.device, full_finetune: bool = False) -> torch.dtype:
    """Storage dtype of the loaded weights. `auto` keeps full fine-tuning in fp32 on every device: at
    the paper's lr 5e-6 an Adam update (~lr per weight) is far below bf16's resolution (~0.4% of the
    weight), so bf16 weights would not move; LoRA's frozen base on CUDA is stored in bf16 (half the
    memory, never updated)."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" and not full_finetune else torch.float32
    return getattr(torch, name)


AUTOCAST_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_mixed_precision(cfg, device: torch.device) -> str:
    """accelerate's `mixed_precision` for `cfg` (an HFConfig) on `device`: "no", "bf16" or "fp16".

    Trainable weights are kept in fp32 (upcast_trainable), so half-precision frozen weights need
    autocast for the two to meet in one matmul; `no` with a half-precision dtype is a config error."""
    weights = resolve_dtype(cfg.dtype, device, cfg.full_finetune)
    mixed = cfg.mixed_precision
    if mixed == "auto":
        half = "fp16" if weights == torch.float16 else "bf16"
        mixed = half if device.type == "cuda" or weights != torch.float32 else "no"
    if mixed == "no" and weights != torch.float32:
        raise ConfigError(f"model.hf.dtype {cfg.dtype!r} stores weights in {weights} while trainable weights stay "
                          "float32: set model.hf.mixed_precision to bf16 or fp16 (autocast), not 'no'")
    return mixed


def upcast_trainable(model) -> int:
    """Every trainable parameter in fp32 (full fine-tuning's weights, LoRA's adapters, the projector
    copy PEFT keeps in modules_to_save): the optimiser updates fp32 master weights, whatever dtype the
    frozen weights are stored in. Returns how many tensors were cast."""
    cast = 0
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()
            cast += 1
    return cast


def autocast_forward(model, mixed_precision: str, device: torch.device) -> None:
    """Run the transformers model's forward under torch.autocast, as accelerate's prepare() does in
    training, so evaluation and generation (outside the trainer) see the same precision, and fp32
    trainable modules meet half-precision frozen ones. Patched on the innermost model: PEFT's
    wrappers and generate() all call it."""
    if mixed_precision == "no":
        return
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    inner.forward = torch.autocast(device_type=device.type, dtype=AUTOCAST_DTYPES[mixed_precision])(inner.forward)


def resolve_device(name: str) -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        # Under `accelerate launch` each process owns GPU LOCAL_RANK; loading all of them on cuda:0
        # first would put N copies of a 7B model on one card.
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return torch.device("cpu")

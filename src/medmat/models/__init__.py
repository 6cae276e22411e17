"""Model backends behind one interface: `tiny` (a small CPU VLM trained from scratch) and `hf` (a local
Hugging Face image-text-to-text checkpoint, full or LoRA fine-tuning).

    backend = build(model_cfg, data_root)       # ModelConfig from params.yaml `model:`
    backend.model                               # torch.nn.Module the trainer optimises
    backend.collate(rows) -> batch              # rows: records-table rows as dicts
    backend.loss(batch) -> Tensor               # answer-only loss; must go through self.model(...)
    backend.score_options(rows) -> list[list[float]]
    backend.generate(rows) -> list[str]
    backend.save(dir) ; load(dir) -> backend    # dir holds BACKEND_FILE naming the backend

Optional hook: `backend.prepare_training(train_df, decode_images=True)` is called by the trainer before
the optimiser is built (the tiny backend builds its word vocabulary there and decodes the training
images once; `build_untrained` asks for the vocabulary only).

The trainer may swap `backend.model` for a distributed wrapper (DDP under `accelerate launch`) while
training, which is why `loss` must call `self.model(...)` rather than a bound module captured earlier.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

from medmat.config import ConfigError, from_dict
from medmat.io import atomic_write_text

# The small JSON file in every saved model directory that says which backend wrote it.
BACKEND_FILE = "medmat_backend.json"

# backend name -> module; imported lazily so `tiny` never pays for transformers/PEFT start-up.
BACKENDS = {"tiny": "medmat.models.tiny", "hf": "medmat.models.hf"}


@dataclasses.dataclass
class ModelConfig:
    """params.yaml `model:` section."""

    backend: str = "tiny"
    tiny: dict = dataclasses.field(default_factory=dict)  # -> medmat.models.tiny.TinyConfig
    hf: dict = dataclasses.field(default_factory=dict)  # -> medmat.models.hf.HFConfig

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {self.backend!r}")


@runtime_checkable
class Backend(Protocol):
    model: Any

    def collate(self, rows: list[dict]) -> Any: ...
    def loss(self, batch: Any) -> Any: ...
    def score_options(self, rows: list[dict]) -> list[list[float]]: ...
    def generate(self, rows: list[dict]) -> list[str]: ...
    def save(self, out_dir: str | os.PathLike) -> None: ...


def model_config(values: dict | ModelConfig | None, where: str = "model") -> ModelConfig:
    if isinstance(values, ModelConfig):
        return values
    return from_dict(ModelConfig, values, where=where)


def start_weights_sha256(model_cfg: ModelConfig | dict) -> str | None:
    """sha256 of the file a fresh model's weights start from (tiny's `vision_init`), or None: a unit's
    result and a checkpoint's resume depend on those bytes, not only on the path in params."""
    from medmat.data.images import sha256_file_cached

    cfg = model_config(model_cfg)
    path = cfg.tiny.get("vision_init") if cfg.backend == "tiny" else None
    if not path:
        return None
    require_start_weights(path)
    return sha256_file_cached(path)


def require_start_weights(path: str | os.PathLike) -> None:
    """ConfigError naming `path` and the stage that writes it, when the start weights are missing
    (checked by the fingerprint before a model is built, and by the tiny backend when it loads them)."""
    if not Path(path).is_file():
        raise ConfigError(f"model.tiny.vision_init: {path} does not exist (`dvc repro pretrain` writes it)")


def build(model_cfg: ModelConfig | dict, data_root: str | os.PathLike | None = None) -> Backend:
    """A fresh (untrained) backend; `data_root` resolves record image paths that are not absolute."""
    cfg = model_config(model_cfg)
    if cfg.backend == "tiny":
        from medmat.models.tiny import TinyBackend, TinyConfig

        return TinyBackend(from_dict(TinyConfig, cfg.tiny, where="model.tiny"), data_root=data_root)
    module = importlib.import_module(BACKENDS[cfg.backend])  # hf: transformers imported only now
    builder = getattr(module, "build", None) or getattr(module, f"build_{cfg.backend}", None)
    if builder is not None:
        return builder(getattr(cfg, cfg.backend), data_root)
    hf_cfg = from_dict(module.HFConfig, cfg.hf, where="model.hf")
    return module.HFBackend(hf_cfg, data_root=data_root)


def write_backend_file(out_dir: str | os.PathLike, backend: str, **extra: Any) -> Path:
    """Write BACKEND_FILE atomically; every backend's save() calls this."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    # No trailing newline (as before), hence atomic_write_text rather than atomic_write_json.
    return atomic_write_text(out / BACKEND_FILE, json.dumps({"backend": backend, **extra}, indent=1, sort_keys=True))


def read_backend_file(model_dir: str | os.PathLike) -> dict[str, Any]:
    path = Path(model_dir) / BACKEND_FILE
    if not path.is_file():
        raise ConfigError(f"{model_dir}: not a saved medmat model (no {BACKEND_FILE})")
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: not valid JSON ({exc})") from None
    if info.get("backend") not in BACKENDS:
        raise ConfigError(f"{path}: unknown backend {info.get('backend')!r}; known: {sorted(BACKENDS)}")
    return info


def load(model_dir: str | os.PathLike, data_root: str | os.PathLike | None = None) -> Backend:
    """Load a model saved by `backend.save(dir)`; the backend is named in BACKEND_FILE."""
    info = read_backend_file(model_dir)
    module = importlib.import_module(BACKENDS[info["backend"]])
    loader = getattr(module, "load", None) or getattr(module, f"load_{info['backend']}", None)
    if loader is not None:
        return loader(model_dir, data_root=data_root)
    cls = module.HFBackend
    return cls.load(model_dir, data_root=data_root) if hasattr(cls, "load") else cls.from_pretrained(model_dir)


def build_untrained(model_cfg: ModelConfig | dict, records, seed: int,
                    data_root: str | os.PathLike | None = None) -> Backend:
    """The paper's Baseline: the model of the same architecture, prepared as training would prepare it
    (the tiny backend's text encoder sees the training records' words) and then not trained."""
    import random

    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    backend = build(model_cfg, data_root)
    if hasattr(backend, "prepare_training"):
        train = records[records["split"] == "train"]
        backend.prepare_training(train if len(train) else records, decode_images=False)
    return backend

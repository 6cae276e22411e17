"""Precision that learns: configs/gpu.yaml's settings (the paper's full fine-tuning at lr 5e-6) train.

Trainable weights are fp32 master weights, forwards run under bf16 autocast (accelerate's
mixed_precision in training, the same autocast in evaluation). On a CPU the tiny LLaVA and Qwen2-VL
checkpoints train under exactly those settings at exactly that learning rate, and their loss falls;
kept in bf16 instead, almost every weight would ignore an update of that size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from medmat.models.hf import HFConfig, build_hf, mixed_precision_of, resolve_dtype, resolve_mixed_precision
from medmat.models.tiny_hf import BUILDERS
from medmat.train import TrainConfig, train_model
from test_hf_backend import world  # noqa: F401  (module fixture: 12 image questions)

GPU_YAML = Path(__file__).resolve().parents[1] / "configs" / "gpu.yaml"
PRECISION_KEYS = ("full_finetune", "freeze_vision", "freeze_projector", "gradient_checkpointing", "dtype",
                  "mixed_precision", "attn_implementation")


def _gpu_settings() -> tuple[dict, float, float]:
    cfg = yaml.safe_load(GPU_YAML.read_text())
    hf = {k: cfg["model"]["hf"][k] for k in PRECISION_KEYS}
    return hf, float(cfg["train"]["lr"]), float(cfg["train"]["weight_decay"])


def _mean_loss(backend, rows) -> float:
    with torch.no_grad():
        backend.model.eval()
        return float(backend.loss(backend.collate(rows)))


def test_gpu_yaml_is_full_finetuning_with_fp32_master_weights_and_bf16_autocast():
    hf, lr, _ = _gpu_settings()
    cfg = HFConfig(path="unused", **hf)
    cuda = torch.device("cuda", 0)
    assert hf["full_finetune"] and lr == 5e-6  # the paper's recipe
    assert resolve_dtype(cfg.dtype, cuda, cfg.full_finetune) == torch.float32
    assert resolve_mixed_precision(cfg, cuda) == "bf16"
    assert resolve_mixed_precision(cfg, torch.device("cpu")) == "bf16"  # exactly the same on this CPU
    # auto: full fine-tuning keeps fp32 weights on a GPU too; LoRA's frozen base goes bf16 with autocast
    auto_full = HFConfig(path="unused", full_finetune=True)
    assert resolve_dtype("auto", cuda, True) == torch.float32 and resolve_mixed_precision(auto_full, cuda) == "bf16"
    assert resolve_dtype("auto", cuda, False) == torch.bfloat16
    assert mixed_precision_of({"path": "x", "device": "cpu"}) == "no"  # plain fp32 on a CPU by default


def test_half_precision_weights_without_autocast_is_a_named_error():
    from medmat.config import ConfigError

    with pytest.raises(ConfigError, match="mixed_precision"):
        resolve_mixed_precision(HFConfig(path="x", dtype="bfloat16", mixed_precision="no"), torch.device("cpu"))


@pytest.mark.parametrize("family", ["llava", "qwen2vl"])
def test_loss_falls_under_the_gpu_yaml_precision_at_its_learning_rate(family, world, tmp_path):  # noqa: F811
    root, df = world
    hf, lr, wd = _gpu_settings()
    hf = {**hf, "path": str(BUILDERS[family](tmp_path / "ckpt")), "device": "cpu"}
    rows = df.to_dict("records")
    before = _mean_loss(build_hf(hf, data_root=root), rows)
    steps = 30
    cfg = TrainConfig(max_steps=steps, lr=lr, weight_decay=wd, batch_size=4, warmup_steps=0, eval_every=0,
                      checkpoint_every=0, progress=False, num_threads=1)
    result = train_model(cfg, {"backend": "hf", "hf": hf}, df, data_root=root)
    backend = result.backend
    trainable = [p for p in backend.model.parameters() if p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable)  # fp32 master weights
    after = _mean_loss(backend, rows)
    print(f"{family}: mean loss over the 12 questions {before:.4f} -> {after:.4f} after {steps} steps at lr {lr:g} "
          f"(fp32 weights, bf16 autocast); last train loss {result.final_train_loss:.4f}")
    assert after < before - 0.01, (before, after)
    # the bf16 autocast reaches evaluation too: scores are finite and the model still answers
    assert np.isfinite(backend.score_options(rows[:2])).all()


def test_lora_on_a_bf16_base_updates_adapter_and_projector_in_fp32(world, tmp_path):  # noqa: F811
    root, df = world
    hf = {"path": str(BUILDERS["llava"](tmp_path / "ckpt")), "device": "cpu", "dtype": "bfloat16",
          "full_finetune": False, "freeze_projector": False}
    backend = build_hf(hf, data_root=root)
    dtypes = {n: p.dtype for n, p in backend.model.named_parameters()}
    trained = {n for n, p in backend.model.named_parameters() if p.requires_grad}
    assert any("modules_to_save" in n and "multi_modal_projector" in n for n in trained)  # the projector copy
    assert all(dtypes[n] == torch.float32 for n in trained)
    assert any(d == torch.bfloat16 for n, d in dtypes.items() if n not in trained)  # frozen base stays bf16
    assert backend.mixed_precision == "bf16"
    cfg = TrainConfig(max_steps=3, lr=1e-3, batch_size=4, warmup_steps=0, eval_every=0, checkpoint_every=0,
                      progress=False, num_threads=1)
    result = train_model(cfg, {"backend": "hf", "hf": hf}, df, data_root=root)
    assert np.isfinite(result.final_train_loss)
    assert np.isfinite(result.backend.score_options(df.to_dict("records")[:2])).all()


def test_an_update_of_lr_5e6_is_lost_on_bf16_weights_and_kept_on_fp32():
    """Why fp32 master weights: one Adam step moves each weight by about lr."""
    w = torch.randn(10_000, generator=torch.Generator().manual_seed(0)) * 0.02  # a typical init scale
    step = torch.full_like(w, 5e-6)
    lost = ((w.bfloat16() - step.bfloat16()) == w.bfloat16()).float().mean().item()
    kept = ((w - step) != w).float().mean().item()
    assert lost > 0.9 and kept == 1.0


def test_gpu_benchmark_smoke_times_the_bare_loop_and_ours_side_by_side(tmp_path):
    """bench/gpu_lora_qwen2vl.py --smoke (CPU, tiny shape): both loops on the same model and batches,
    and their ratio, in one run. (On a GPU the same script gives the figures of docs/scale-out.md.)"""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location(
        "gpu_bench", Path(__file__).resolve().parents[1] / "bench" / "gpu_lora_qwen2vl.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "smoke.json"
    assert bench.main(["--smoke", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["params"]["lora_trainable"] > 0
    loops = {r["loop"]: r for r in report["results"]}
    assert set(loops) == {"bare", "medmat"}
    assert all(r["samples_per_s"] > 0 and r["tokens_per_s"] > 0 and np.isfinite(r["final_loss"])
               for r in loops.values())
    (ratio,) = report["ratio_medmat_over_bare"]
    assert ratio["batch_size"] == 2 and ratio["samples_per_s"] > 0

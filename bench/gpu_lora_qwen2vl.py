"""GPU benchmark: LoRA training steps of a random-initialised model with Qwen2-VL-2B's real shape, bf16.

    python bench/gpu_lora_qwen2vl.py                      # one CUDA GPU; ~2-4 min on an H100
    python bench/gpu_lora_qwen2vl.py --batch-sizes 8,16 --steps 30 --json out.json
    python bench/gpu_lora_qwen2vl.py --smoke              # tiny shape on the CPU: checks the script only

Why random weights: no download is possible (or wanted); speed and memory depend on the shape, not on
the values. The shape is Qwen2-VL-2B-Instruct's config.json, written out below. LoRA is applied with the
`hf` backend's own `wrap_lora` and default target regex (language-model attention + MLP projections;
projector trained in full), so what is timed is what `medmat train` runs with `model.backend: hf`.

Each step is one synthetic Med-MAT-shaped batch: a 448x448 image (1,024 patches of 14 px -> 256 image
tokens after the 2x2 merge) followed by ~96 text tokens of question and options, loss on the last 2
tokens (answer letter + end token), as the backend's collate builds them.

Two training loops run side by side on the same model and the same batches, and the report gives
their ratio (medmat / bare) per batch size:
  * `bare`: the plain Hugging Face + torch loop, the reference: model(**batch).loss, backward, clip,
    AdamW; the weights as built (bf16; PEFT keeps the LoRA matrices fp32, the trained merger is bf16).
  * `medmat`: the inner step of medmat.train on the same model: accelerate-prepared model, optimiser
    and scheduler, accelerator.backward / clip_grad_norm_, and the hf backend's precision policy
    (every trainable weight fp32 via `upcast_trainable`, forward under bf16 autocast via accelerate's
    mixed_precision). All bare batch sizes run first: accelerate patches the model's forward in place.

MFU (model FLOPs utilisation) = counted model FLOPs per second / the GPU's peak dense bf16 FLOPs.
FLOPs per step are counted with the standard matmul approximation (2 FLOPs per weight per token in
the forward pass, 2 more for the gradient w.r.t. the input, 2 more for the gradient w.r.t. the weight;
the "6N" of Kaplan et al. 2020 / PaLM appendix B for fully trained weights):
  * frozen language-model weights (attention + MLP, and the tied lm_head V x d, which runs on every
    position): 4 FLOPs per weight per token (forward + input gradient; no weight gradient);
  * trainable weights (LoRA A/B, projector/merger): 6 per weight per token (per merged token for
    the merger);
  * frozen vision tower: 2 per weight per patch (forward only: nothing before it needs a gradient);
  * attention scores and values: 4 * layers * seq * d per token forward (PaLM convention, causal mask
    not discounted), x3 for the language model (forward + backward), x1 for the vision tower.
Recomputation from gradient checkpointing is NOT counted (that would be hardware FLOPs utilisation).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time

# Qwen2-VL-2B-Instruct config.json (Hugging Face Hub, Qwen/Qwen2-VL-2B-Instruct): the LLM is Qwen2-1.5B.
QWEN2VL_2B = dict(
    text_config=dict(
        vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
        num_attention_heads=12, num_key_value_heads=2, hidden_act="silu", max_position_embeddings=32768,
        rms_norm_eps=1e-6, use_sliding_window=False, sliding_window=32768, max_window_layers=28,
        rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]},
        bos_token_id=151643, eos_token_id=151645,
    ),
    vision_config=dict(depth=32, embed_dim=1280, hidden_size=1536, hidden_act="quick_gelu", mlp_ratio=4,
                       num_heads=16, in_channels=3, patch_size=14, spatial_merge_size=2, temporal_patch_size=2),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=True,
)
# The same family at test size (for --smoke on a CPU).
QWEN2VL_SMOKE = dict(
    text_config=dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]},
        bos_token_id=None, eos_token_id=2,
    ),
    vision_config=dict(depth=1, embed_dim=32, hidden_size=64, num_heads=2, patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, in_channels=3),
    image_token_id=5, video_token_id=6, vision_start_token_id=3, vision_end_token_id=4, tie_word_embeddings=True,
)

# Peak dense bf16 tensor-core FLOP/s (NVIDIA data sheets, without sparsity).
PEAK_BF16 = [("H200", 989e12), ("GH200", 989e12), ("H100 PCIe", 756e12), ("H100 NVL", 835e12),
             ("H100", 989e12), ("H800", 989e12), ("A100", 312e12), ("A800", 312e12), ("L40S", 362e12),
             ("B200", 2250e12)]


def peak_flops(device_name: str) -> float | None:
    for key, value in PEAK_BF16:
        if key in device_name:
            return value
    return None


def machine_info(torch) -> dict:
    import peft
    import transformers

    info = {
        "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
        "peft": peft.__version__, "host": platform.node(), "cpu_count": os.cpu_count(),
    }
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2**30, 1), cuda=torch.version.cuda,
                    gpu_count=torch.cuda.device_count(), cudnn=torch.backends.cudnn.version())
    return info


def synthetic_batch(torch, cfg, batch: int, image_px: int, text_tokens: int, device, dtype, gen):
    """input_ids with a vision block then text, pixel_values, grid, mm_token_type_ids, answer-only labels."""
    v = cfg.vision_config
    grid = image_px // v.patch_size
    patches = grid * grid
    image_tokens = patches // v.spatial_merge_size**2
    text_vocab = min(cfg.text_config.vocab_size, 151643)  # ordinary tokens sit below the special ones
    low = 16
    ids, mm = [], []
    for _ in range(batch):
        text = torch.randint(low, text_vocab, (text_tokens,), generator=gen)
        seq = torch.cat([text[:4], torch.tensor([cfg.vision_start_token_id]),
                         torch.full((image_tokens,), cfg.image_token_id), torch.tensor([cfg.vision_end_token_id]),
                         text[4:]])
        ids.append(seq)
        mm.append((seq == cfg.image_token_id).long())
    input_ids = torch.stack(ids)
    labels = torch.full_like(input_ids, -100)
    labels[:, -2:] = input_ids[:, -2:]  # answer letter + end token
    channels = v.in_channels * v.temporal_patch_size * v.patch_size**2
    pixel_values = torch.randn(batch * patches, channels, generator=gen)
    return {
        "input_ids": input_ids.to(device), "attention_mask": torch.ones_like(input_ids).to(device),
        "labels": labels.to(device), "mm_token_type_ids": torch.stack(mm).to(device),
        "pixel_values": pixel_values.to(device, dtype),
        "image_grid_thw": torch.tensor([[1, grid, grid]] * batch, device=device),
    }


def count_params(model) -> dict[str, int]:
    """Parameter counts by role (see the module docstring for how each is charged)."""
    out = {"vision_frozen": 0, "projector_trainable": 0, "llm_frozen": 0, "lora_trainable": 0, "embed": 0,
           "other_trainable": 0}
    for name, p in model.named_parameters():
        n = p.numel()
        if "original_module" in name:  # PEFT keeps the untouched projector beside its trained copy; unused
            continue
        if "embed_tokens" in name:
            out["embed"] += n
        elif "merger" in name:
            out["projector_trainable" if p.requires_grad else "vision_frozen"] += n
        elif "visual" in name:
            out["vision_frozen"] += n
        elif "lora_" in name:
            out["lora_trainable"] += n
        elif p.requires_grad:
            out["other_trainable"] += n
        elif "language_model" in name or "lm_head" in name:
            out["llm_frozen"] += n
    return out


def flops_per_step(cfg, counts: dict[str, int], batch: int, seq: int, patches: int) -> float:
    t, v = cfg.text_config, cfg.vision_config
    tokens = batch * seq
    merged = batch * patches // v.spatial_merge_size**2
    lm_head = t.vocab_size * t.hidden_size  # tied to the embedding, but a matmul on every position
    f = 4 * (counts["llm_frozen"] + lm_head) * tokens
    f += 6 * (counts["lora_trainable"] + counts["other_trainable"]) * tokens
    f += 6 * counts["projector_trainable"] * merged
    f += 2 * counts["vision_frozen"] * batch * patches
    f += 3 * 4 * t.num_hidden_layers * seq * t.hidden_size * tokens
    f += 4 * v.depth * patches * v.embed_dim * batch * patches
    return float(f)


def bare_loop(torch, model, params, device):
    """The reference: Hugging Face model + plain torch optimiser loop, nothing of ours."""
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")

    def step(batch):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def medmat_loop(torch, model, params, device):
    """medmat.train's inner step: accelerate-prepared model/optimiser/scheduler under the hf backend's
    mixed precision (fp32 trainable weights, bf16 autocast)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state()  # accelerate keeps one precision per process; this loop sets its own
    accel = Accelerator(step_scheduler_with_optimizer=False, cpu=device.type != "cuda", mixed_precision="bf16")
    opt = torch.optim.AdamW(params, lr=1e-4, weight_decay=0.0, fused=device.type == "cuda")
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    prepared, opt, sched = accel.prepare(model, opt, sched)

    def step(batch):
        loss = prepared(**batch).loss
        accel.backward(loss)
        accel.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        return loss.detach()

    return step, opt


def run_one(torch, model, cfg, args, batch: int, device, dtype, loop: str = "bare") -> dict:
    gen = torch.Generator().manual_seed(0)
    text_tokens = args.text_tokens
    batches = [synthetic_batch(torch, cfg, batch, args.image_px, text_tokens, device, dtype, gen) for _ in range(2)]
    params = [p for p in model.parameters() if p.requires_grad]
    model.train()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    make = {"bare": bare_loop, "medmat": medmat_loop}[loop]
    one_step, opt = make(torch, model, params, device)

    def step(i):
        return one_step(batches[i % 2])

    for i in range(args.warmup):
        step(i)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    t0 = time.perf_counter()
    for i in range(args.steps):
        loss = step(i)
    sync()
    elapsed = time.perf_counter() - t0
    seq = batches[0]["input_ids"].shape[1]
    patches = (args.image_px // cfg.vision_config.patch_size) ** 2
    counts = count_params(model)
    flops = flops_per_step(cfg, counts, batch, seq, patches) * args.steps
    res = {
        "loop": loop, "batch_size": batch, "seq_len": seq, "image_px": args.image_px, "steps": args.steps,
        "seconds": round(elapsed, 3), "samples_per_s": round(batch * args.steps / elapsed, 2),
        "tokens_per_s": round(batch * seq * args.steps / elapsed, 1),
        "model_tflops_per_s": round(flops / elapsed / 1e12, 2), "final_loss": round(float(loss), 4),
    }
    if device.type == "cuda":
        res["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
        res["peak_reserved_gib"] = round(torch.cuda.max_memory_reserved() / 2**30, 2)
        peak = args.peak_tflops * 1e12 if args.peak_tflops else peak_flops(torch.cuda.get_device_name(0))
        res["mfu"] = round(flops / elapsed / peak, 4) if peak else None
    del opt
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--smoke", action="store_true", help="tiny shape, CPU allowed: checks the script runs")
    ap.add_argument("--batch-sizes", default="4,8,16", help="comma-separated batch sizes to time (default 4,8,16)")
    ap.add_argument("--steps", type=int, default=20, help="timed steps per batch size")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first (CUDA kernels, allocator)")
    ap.add_argument("--image-px", type=int, default=448, help="square image side in pixels (multiple of 28)")
    ap.add_argument("--text-tokens", type=int, default=96, help="question + options + answer tokens")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--gradient-checkpointing", action="store_true")
    ap.add_argument("--attn", default="sdpa", help="attn_implementation (sdpa, eager, flash_attention_2)")
    ap.add_argument("--peak-tflops", type=float, default=None, help="peak bf16 TFLOP/s when the GPU is not known")
    ap.add_argument("--loops", choices=["both", "bare", "medmat"], default="both",
                    help="training loops to time (default both, side by side)")
    ap.add_argument("--json", default=None, help="also write the results here")
    args = ap.parse_args(argv)

    import torch

    if not args.smoke and not torch.cuda.is_available():
        print("gpu_lora_qwen2vl: no CUDA GPU visible (torch.cuda.is_available() is False). This benchmark "
              "needs one NVIDIA GPU; use --smoke to check the script on a CPU.", file=sys.stderr)
        return 2
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration

    try:
        from medmat.models.hf import LoraConfig, upcast_trainable, wrap_lora
    except ImportError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "src"))
        from medmat.models.hf import LoraConfig, upcast_trainable, wrap_lora

    if args.smoke:
        device, dtype, shape = torch.device("cpu"), torch.float32, QWEN2VL_SMOKE
        args.image_px, args.text_tokens = min(args.image_px, 56), min(args.text_tokens, 24)
        args.steps, args.warmup = min(args.steps, 2), min(args.warmup, 1)
        sizes = [2]
    else:
        device, dtype, shape = torch.device("cuda", 0), torch.bfloat16, QWEN2VL_2B
        torch.backends.cuda.matmul.allow_tf32 = True
        sizes = [int(b) for b in args.batch_sizes.split(",") if b.strip()]
    if args.image_px % 28:
        ap.error("--image-px must be a multiple of 28 (patch 14 x merge 2)")

    info = machine_info(torch)
    print(json.dumps({"machine": info}, indent=1), flush=True)
    t0 = time.perf_counter()
    cfg = Qwen2VLConfig(**shape)
    cfg.text_config.use_cache = False
    torch.manual_seed(0)
    with torch.device(device):  # initialise straight on the GPU: 2.2B params in seconds, no host copy
        model = Qwen2VLForConditionalGeneration._from_config(cfg, dtype=dtype, attn_implementation=args.attn)
    if args.gradient_checkpointing:
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    model = wrap_lora(model, LoraConfig(r=args.lora_r, alpha=2 * args.lora_r, dropout=0.05), train_projector=True)
    counts = count_params(model)
    print(json.dumps({"build_seconds": round(time.perf_counter() - t0, 1), "params": counts,
                      "total_params": sum(p.numel() for p in model.parameters())}), flush=True)

    results = []
    loops = ["bare", "medmat"] if args.loops == "both" else [args.loops]
    for loop in loops:
        if loop == "medmat":
            upcast_trainable(model)  # the backend's policy: fp32 master weights for what is trained
        for b in sizes:
            try:
                r = run_one(torch, model, cfg, args, b, device, dtype, loop=loop)
            except torch.OutOfMemoryError:
                r = {"loop": loop, "batch_size": b, "error": "out of memory"}
                torch.cuda.empty_cache()
            results.append(r)
            print(json.dumps(r), flush=True)
    ratios = []
    by = {(r["loop"], r["batch_size"]): r for r in results if "error" not in r}
    for b in sizes:
        bare, ours = by.get(("bare", b)), by.get(("medmat", b))
        if bare and ours:
            ratios.append({"batch_size": b,
                           "samples_per_s": round(ours["samples_per_s"] / bare["samples_per_s"], 3),
                           "peak_memory": (round(ours["peak_memory_gib"] / bare["peak_memory_gib"], 3)
                                           if bare.get("peak_memory_gib") else None)})

    report = {"benchmark": "gpu_lora_qwen2vl", "shape": "smoke" if args.smoke else "Qwen2-VL-2B-Instruct",
              "dtype": str(dtype).replace("torch.", ""), "lora_r": args.lora_r,
              "gradient_checkpointing": args.gradient_checkpointing, "attn": args.attn, "machine": info,
              "params": counts, "results": results, "ratio_medmat_over_bare": ratios,
              "flops_note": "4/weight/token frozen LLM + lm_head, 6 trainable (LoRA, merger), 2 frozen vision "
                            "per patch, + attention; recompute not counted"}
    ok = [r for r in results if "error" not in r]
    print("\n loop    batch  seq  samples/s  tokens/s  TFLOP/s   MFU  peak GiB")
    for r in ok:
        mfu = r.get("mfu")
        print(f" {r['loop']:7s} {r['batch_size']:5d} {r['seq_len']:4d} {r['samples_per_s']:10.2f} "
              f"{r['tokens_per_s']:9.0f} {r['model_tflops_per_s']:8.2f} "
              f"{('%.1f%%' % (100 * mfu)) if mfu else '  n/a':>6} {r.get('peak_memory_gib', float('nan')):8.2f}")
    for q in ratios:
        mem = f"{q['peak_memory']:.2f}" if q["peak_memory"] else "n/a"
        print(f" medmat/bare at batch {q['batch_size']}: samples/s x{q['samples_per_s']:.2f}, peak memory x{mem}")
    if args.json:
        tmp = args.json + ".tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(report, fh, indent=1)
        os.replace(tmp, args.json)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

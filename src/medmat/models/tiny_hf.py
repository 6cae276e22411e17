"""Tiny random-initialised LLaVA and Qwen2-VL checkpoints, built from configs, for tests and benchmarks.

A user's real checkpoint (LLaVA-1.5-7B, Qwen2-VL-7B-Instruct) is a directory holding a config, weights,
a tokenizer and an image processor. These builders write a directory of exactly that shape, only
tiny (hidden size 32-64, one or two layers, 28-56 px images), so the `hf` backend's real code path —
load by path, LoRA-train, evaluate, save, reload — runs on a laptop CPU in seconds and without any
download. The tokenizer is a byte-level BPE trained with the `tokenizers` library on Med-MAT prompt
words, so every string (any option text) still encodes.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

# Words a Med-MAT prompt is made of; the BPE merges them into few tokens so sequences stay short.
_CORPUS = [
    "What is the diagnosis shown in this image?",
    "Which disease does this CT image show? Which modality, which organ, which finding?",
    "A: Normal\nB: COVID-19\nC: Pneumonia\nD: Tumor",
    "A: benign B: malignant C: glioma D: meningioma E: pituitary",
    "Answer with the option's letter from the given choices directly.",
    "The answer is A. The answer is B. The answer is C. The answer is D.",
    "X-ray MRI CT Ultrasound Dermoscopy Fundus OCT Endoscopy Microscopy Lung Brain Breast Skin Eye Cell",
    "Level grade stage lesion cancer polyp nodule fracture cataract glaucoma retinopathy",
    "USER: ASSISTANT: user assistant system You are a helpful assistant.",
    "A B C D A: B: C: D: (A) (B) (C) (D) 0 1 2 3 4 5 6 7 8 9",
]

# Chat templates shaped like the real checkpoints' ones (LLaVA-1.5-hf: "USER: <image>\n... ASSISTANT:";
# Qwen2-VL-Instruct: <|im_start|> turns with <|vision_start|><|image_pad|><|vision_end|>), minus the
# system prompt, so the backend's apply_chat_template path is the one real checkpoints take.
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}USER: "
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>\n"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %} "
    "{% elif message['role'] == 'assistant' %}ASSISTANT: "
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}"
    "</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}ASSISTANT:{% endif %}"
)
QWEN2VL_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}"
    "{% else %}{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}{% endfor %}{% endif %}"
    "<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def train_tokenizer(special_tokens: list[str], vocab_size: int = 400):
    """A byte-level BPE (GPT-2 style, like Qwen's) trained on `_CORPUS`; special tokens get ids 0..n-1."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=special_tokens,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS * 4, trainer=trainer)
    return tok


def _fast_tokenizer(tok, **special):
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast(tokenizer_object=tok, **special)


def build_tiny_llava(out_dir: str | os.PathLike, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny random LLaVA(-1.5 shaped) checkpoint + processor to `out_dir`; returns the path."""
    from transformers import (
        CLIPImageProcessorPil,
        CLIPVisionConfig,
        LlamaConfig,
        LlavaConfig,
        LlavaForConditionalGeneration,
        LlavaProcessor,
    )

    out = Path(out_dir)
    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"]
    tok = _fast_tokenizer(
        train_tokenizer(specials),
        unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>",
        extra_special_tokens={"image_token": "<image>"},
    )
    image_size, patch = 28, 14  # 2x2 patches (+CLS, dropped by the "default" feature strategy) = 4 tokens
    vision = CLIPVisionConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
        image_size=image_size, patch_size=patch, projection_dim=32,
    )
    text = LlamaConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
    )
    config = LlavaConfig(
        vision_config=vision, text_config=text, image_token_index=tok.convert_tokens_to_ids("<image>"),
        image_seq_length=(image_size // patch) ** 2, vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    image_processor = CLIPImageProcessorPil(
        size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size},
    )
    processor = LlavaProcessor(
        image_processor=image_processor, tokenizer=tok, patch_size=patch,
        vision_feature_select_strategy="default", num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    return out


def build_tiny_qwen2vl(out_dir: str | os.PathLike, seed: int = 0, hidden: int = 64, layers: int = 2) -> Path:
    """Write a tiny random Qwen2-VL checkpoint + processor (no video processor) to `out_dir`."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLImageProcessorPil

    from medmat.models.hf import Qwen2VLImageOnlyProcessor

    out = Path(out_dir)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                "<|image_pad|>", "<|video_pad|>"]
    tok = _fast_tokenizer(
        train_tokenizer(specials), eos_token="<|im_end|>", pad_token="<|endoftext|>",
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
    )
    heads = 4
    head_dim = hidden // heads
    # mrope splits the rotary half-dimension between time, height and width (Qwen2-VL-7B: 16/24/24 of 64).
    half = head_dim // 2
    mrope = [half - 2 * (half * 3 // 8), half * 3 // 8, half * 3 // 8]
    config = Qwen2VLConfig(
        text_config=dict(
            vocab_size=len(tok), hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
            num_attention_heads=heads, num_key_value_heads=2, max_position_embeddings=512,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": mrope},
            bos_token_id=None, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        ),
        vision_config=dict(depth=1, embed_dim=32, hidden_size=hidden, num_heads=2, patch_size=14,
                           spatial_merge_size=2, temporal_patch_size=2, in_channels=3),
        image_token_id=tok.convert_tokens_to_ids("<|image_pad|>"),
        video_token_id=tok.convert_tokens_to_ids("<|video_pad|>"),
        vision_start_token_id=tok.convert_tokens_to_ids("<|vision_start|>"),
        vision_end_token_id=tok.convert_tokens_to_ids("<|vision_end|>"),
    )
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(config)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    # 56x56 px -> 4x4 patches of 14 -> 2x2 merged = 4 image tokens per image.
    pixels = 56 * 56
    image_processor = Qwen2VLImageProcessorPil(
        size={"shortest_edge": pixels, "longest_edge": pixels}, patch_size=14, merge_size=2, temporal_patch_size=2,
    )
    processor = Qwen2VLImageOnlyProcessor(
        image_processor=image_processor, tokenizer=tok, chat_template=QWEN2VL_CHAT_TEMPLATE,
    )
    processor.save_pretrained(out)
    _name_stock_processor(out, "Qwen2VLProcessor")
    return out


def _name_stock_processor(out: Path, name: str) -> None:
    """Write the stock processor class name, as in a real Qwen2-VL checkpoint, so tests load the same
    files a user has (our image-only subclass is a loading detail, not part of the checkpoint)."""
    import json

    for fname in ("processor_config.json", "tokenizer_config.json"):
        path = out / fname
        data = json.loads(path.read_text(encoding="utf-8"))
        if "processor_class" in data:
            data["processor_class"] = name
            path.write_text(json.dumps(data, indent=2), encoding="utf-8")


BUILDERS = {"llava": build_tiny_llava, "qwen2vl": build_tiny_qwen2vl}

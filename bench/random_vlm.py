"""Random-weight vision-language model directories, in the layout mlx-vlm loads.

    python -m bench.random_model tiny-vl TOKENIZER_DIR OUT         (Qwen2.5-VL)
    python -m bench.random_model tiny-gemma3-vl TOKENIZER_DIR OUT  (Gemma 3, SigLIP)
    python -m bench.random_model qwen2.5-vl-3b TOKENIZER_DIR OUT --dtype bfloat16
                                     (Qwen2.5-VL-3B's sizes, for the GPU: bench/vision.py)

The text side speaks SmolLM2's vocabulary (TOKENIZER_DIR) with the family's
image tokens added after it, and the family's chat template; the processor
configs are the real ones' (Qwen's dynamic resolution: 14-pixel patches merged
2x2; Gemma's fixed square with a few tokens an image), so an image becomes as
many tokens as it would for the real model of that family at that size. The
weights are random: a few megabytes, loaded in a fraction of a second.

mlx-vlm reads a Qwen2.5-VL's text settings from the top level of its
``config.json`` (a nested ``text_config`` is overwritten) and a Gemma 3's
from its ``text_config``; a Gemma 3's top-level ``hidden_size`` scales the
image features and must be the text's. A Qwen's language model's weights
are scaled up (``spread``): at their initial scale its every greedy answer is
one token repeated, whatever the image, and tests that compare outputs would
compare nothing (a Gemma's norms and embedding scale make it varied as drawn).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, cast

QWEN_TOKENS = [
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
]
QWEN_TEMPLATE = (
    "{% for m in messages %}"
    "{% if loop.first and m['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' or 'image' in part or 'image_url' in part %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif 'text' in part %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
GEMMA_TOKENS = [
    "<start_of_turn>",
    "<end_of_turn>",
    "<start_of_image>",
    "<end_of_image>",
    "<image_soft_token>",
]
GEMMA_TEMPLATE = (
    "{% for m in messages %}"
    "<start_of_turn>{{ 'model' if m['role'] == 'assistant' else m['role'] }}\n"
    "{% if m['content'] is string %}{{ m['content'] }}"
    "{% else %}{% for part in m['content'] %}"
    "{% if part['type'] == 'image' %}<start_of_image>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<end_of_turn>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"
)
GEMMA_IMAGE_TOKENS = 4  # an image's tokens (the real models: 256)
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]
TEXT = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 4096,
}

QWEN_VISION = {  # the tests' tower
    "depth": 2,
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_heads": 2,
    "fullatt_block_indexes": [1],
}
QWEN_3B: dict[str, dict[str, Any]] = {  # Qwen2.5-VL-3B's sizes
    "text": {
        "hidden_size": 2048,
        "intermediate_size": 11008,
        "num_hidden_layers": 36,
        "num_attention_heads": 16,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
    },
    "vision": {
        "depth": 32,
        "hidden_size": 1280,
        "intermediate_size": 3420,
        "num_heads": 16,
        "fullatt_block_indexes": [7, 15, 23, 31],
    },
}

SHAPES = ("tiny-vl", "tiny-gemma3-vl", "qwen2.5-vl-3b")


def write(shape: str, tokenizer_dir: Path, out: Path, seed: int = 0, dtype: str = "") -> Path:
    """The model directory; ``dtype`` (a name in ``mlx.core``) for its
    floating-point weights, or as drawn (float32)."""
    import mlx.core as mx

    mx.random.seed(seed)  # the models' initial weights are drawn from it
    out.mkdir(parents=True, exist_ok=True)
    if shape == "tiny-vl":
        _qwen(tokenizer_dir, out, TEXT, QWEN_VISION, spread=4.0, dtype=dtype)
    elif shape == "qwen2.5-vl-3b":
        _qwen(tokenizer_dir, out, QWEN_3B["text"], QWEN_3B["vision"], spread=1.0, dtype=dtype)
    elif shape == "tiny-gemma3-vl":
        _gemma(tokenizer_dir, out, dtype)
    else:
        raise ValueError(f"no vision shape {shape!r}")
    return out


def _tokenizer(src: Path, out: Path, added: list[str], config: dict[str, Any]) -> dict[str, int]:
    """SmolLM2's tokenizer with ``added`` as special tokens; their ids."""
    from tokenizers import AddedToken, Tokenizer

    tok = Tokenizer.from_file(str(src / "tokenizer.json"))
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in added])
    tok.save(str(out / "tokenizer.json"))
    base = json.loads((src / "tokenizer_config.json").read_text())
    base.update({"tokenizer_class": "PreTrainedTokenizerFast", "add_bos_token": False, **config})
    (out / "tokenizer_config.json").write_text(json.dumps(base, indent=2))
    ids = {t: tok.token_to_id(t) for t in [*added, "<|im_start|>", "<|im_end|>", "<|endoftext|>"]}
    return {t: i for t, i in ids.items() if i is not None}


def _qwen(
    src: Path,
    out: Path,
    text: dict[str, Any],
    vision: dict[str, Any],
    spread: float,
    dtype: str,
) -> None:
    from mlx_vlm.models import qwen2_5_vl

    ids = _tokenizer(
        src,
        out,
        QWEN_TOKENS,
        {
            "bos_token": None,
            "eos_token": "<|im_end|>",
            "pad_token": "<|endoftext|>",
            "chat_template": QWEN_TEMPLATE,
            "extra_special_tokens": {
                "image_token": "<|image_pad|>",
                "video_token": "<|video_pad|>",
                "vision_start_token": "<|vision_start|>",
                "vision_end_token": "<|vision_end|>",
            },
        },
    )
    head = text["hidden_size"] // text["num_attention_heads"]
    sections = [2, 3, 3] if head < 128 else [16, 24, 24]  # half a head's width
    config = {
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "model_type": "qwen2_5_vl",
        **text,
        "rms_norm_eps": 1e-6,
        "rope_theta": 1_000_000.0,
        "rope_scaling": {"type": "mrope", "mrope_section": sections},
        "vocab_size": 49152 + 64,
        "tie_word_embeddings": True,
        "bos_token_id": ids["<|im_start|>"],
        "eos_token_id": ids["<|im_end|>"],
        "vision_start_token_id": ids["<|vision_start|>"],
        "vision_end_token_id": ids["<|vision_end|>"],
        "vision_token_id": ids["<|vision_pad|>"],
        "image_token_id": ids["<|image_pad|>"],
        "video_token_id": ids["<|video_pad|>"],
        "vision_config": {
            "model_type": "qwen2_5_vl",
            **vision,
            "out_hidden_size": text["hidden_size"],
            "in_channels": 3,
            "in_chans": 3,
            "patch_size": 14,
            "spatial_patch_size": 14,
            "spatial_merge_size": 2,
            "temporal_patch_size": 2,
            "window_size": 112,
            "tokens_per_second": 2,
        },
    }
    processor = {
        "image_processor_type": "Qwen2VLImageProcessor",
        "processor_class": "Qwen2_5_VLProcessor",
        "do_resize": True,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "do_convert_rgb": True,
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "patch_size": 14,
        "temporal_patch_size": 2,
        "merge_size": 2,
        "min_pixels": 56 * 56,
        "max_pixels": 14 * 14 * 4 * 16384,
    }
    model_config = qwen2_5_vl.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = qwen2_5_vl.TextConfig.from_dict(model_config.text_config)
    model_config.vision_config = qwen2_5_vl.VisionConfig.from_dict(config["vision_config"])
    _save(qwen2_5_vl.Model(model_config), out, config, processor, spread, dtype)


def _gemma(src: Path, out: Path, dtype: str) -> None:
    from mlx_vlm.models import gemma3

    ids = _tokenizer(
        src,
        out,
        GEMMA_TOKENS,
        {
            "bos_token": "<|im_start|>",
            "eos_token": "<end_of_turn>",
            "pad_token": "<|endoftext|>",
            "chat_template": GEMMA_TEMPLATE,
            "extra_special_tokens": {
                "image_token": "<image_soft_token>",
                "boi_token": "<start_of_image>",
                "eoi_token": "<end_of_image>",
            },
        },
    )
    text = {
        "model_type": "gemma3_text",
        **TEXT,
        "head_dim": 16,
        "query_pre_attn_scalar": 16,
        "rms_norm_eps": 1e-6,
        "vocab_size": 49152 + 64,
        "sliding_window": 512,
        "sliding_window_pattern": 2,
        "rope_global_base_freq": 1_000_000.0,
        "rope_local_base_freq": 10_000.0,
        "mm_tokens_per_image": GEMMA_IMAGE_TOKENS,
    }
    config = {
        "architectures": ["Gemma3ForConditionalGeneration"],
        "model_type": "gemma3",
        "hidden_size": TEXT["hidden_size"],
        "image_token_index": ids["<image_soft_token>"],
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "mm_tokens_per_image": GEMMA_IMAGE_TOKENS,
        "pad_token_id": 0,
        "eos_token_id": [ids["<end_of_turn>"]],
        "text_config": text,
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "patch_size": 14,
            "image_size": 56,  # 4x4 patches, pooled to GEMMA_IMAGE_TOKENS
            "num_channels": 3,
            "layer_norm_eps": 1e-6,
        },
    }
    processor = {
        "image_processor_type": "Gemma3ImageProcessor",
        "processor_class": "Gemma3Processor",
        "do_resize": True,
        "size": {"height": 56, "width": 56},
        "resample": 2,
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "do_convert_rgb": True,
        "do_pan_and_scan": False,
    }
    (out / "processor_config.json").write_text(
        json.dumps({"image_seq_length": GEMMA_IMAGE_TOKENS, "processor_class": "Gemma3Processor"})
    )
    model_config = gemma3.ModelConfig.from_dict(json.loads(json.dumps(config)))
    model_config.text_config = gemma3.TextConfig.from_dict(text)
    model_config.vision_config = gemma3.VisionConfig.from_dict(config["vision_config"])
    _save(gemma3.Model(model_config), out, config, processor, 1.0, dtype)


def _save(
    model: Any,
    out: Path,
    config: dict[str, Any],
    processor: dict[str, Any],
    spread: float,
    dtype: str,
) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    if dtype:
        model.set_dtype(getattr(mx, dtype))
    weights: dict[str, mx.array] = {
        name: w * spread if name.startswith("language_model.") and w.ndim == 2 else w
        for name, w in cast("list[tuple[str, mx.array]]", tree_flatten(model.parameters()))
    }
    mx.eval(weights)
    mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
    (out / "config.json").write_text(json.dumps(config, indent=2))
    (out / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))

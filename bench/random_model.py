"""Write a random-weight llama model directory in a given shape.

    python -m bench.random_model SHAPE TOKENIZER_DIR OUT [--bits 4] [--dtype bfloat16] [--seed 0]

The vision-language shapes (``tiny-vl``, ``tiny-gemma3-vl``) are mlx-vlm's
layout instead: ``bench/random_vlm.py``.

The tokenizer files come from TOKENIZER_DIR (the converted SmolLM2), so the
model speaks that vocabulary and chat template. Its text is gibberish, but it
loads and decodes exactly as fast as a trained model of the same shape, which
is what tests (``tiny``) and benchmarks on machines without the real weights
need. ``--dtype bfloat16`` gives the weights (and a quantized model's scales)
the dtype of the models people download; float32, the default, is what MLX's
CPU backend runs fastest.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path
from typing import Any

from bench import random_vlm

SHAPES: dict[str, dict[str, Any]] = {
    "tiny": {
        "hidden_size": 64,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
    },
    "smollm2-135m": {
        "hidden_size": 576,
        "num_hidden_layers": 30,
        "intermediate_size": 1536,
        "num_attention_heads": 9,
        "num_key_value_heads": 3,
        "max_position_embeddings": 8192,
    },
    "llama-1b": {
        "hidden_size": 2048,
        "num_hidden_layers": 16,
        "intermediate_size": 8192,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 8192,
    },
    "qwen3-0.6b": {  # Qwen3-0.6B's sizes in a llama (no q/k norms)
        "hidden_size": 1024,
        "num_hidden_layers": 28,
        "intermediate_size": 3072,
        "num_attention_heads": 16,
        "num_key_value_heads": 8,
        "head_dim": 128,
        "max_position_embeddings": 40960,
    },
    "llama-8b": {  # Llama-3.1-8B's sizes
        "hidden_size": 4096,
        "num_hidden_layers": 32,
        "intermediate_size": 14336,
        "num_attention_heads": 32,
        "num_key_value_heads": 8,
        "max_position_embeddings": 32768,
    },
}


def write(
    shape: str,
    tokenizer_dir: Path,
    out: Path,
    bits: int | None = None,
    seed: int = 0,
    dtype: str = "float32",
) -> Path:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    mx.random.seed(seed)
    vocab = json.loads((tokenizer_dir / "config.json").read_text())["vocab_size"]
    config: dict[str, Any] = {
        "model_type": "llama",
        "rms_norm_eps": 1e-5,
        "vocab_size": vocab,
        "rope_theta": 10000.0,
        "tie_word_embeddings": True,
        "eos_token_id": 2,
        **SHAPES[shape],
    }
    model = llama.Model(llama.ModelArgs.from_dict(config))
    model.set_dtype(getattr(mx, dtype))
    if bits is not None:
        nn.quantize(model, group_size=64, bits=bits)
        config["quantization"] = {"group_size": 64, "bits": bits}
    mx.eval(model.parameters())
    out.mkdir(parents=True, exist_ok=True)
    mx.save_safetensors(str(out / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (out / "config.json").write_text(json.dumps(config, indent=2))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("shape", choices=sorted(SHAPES) + list(random_vlm.SHAPES))
    parser.add_argument("tokenizer_dir", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--bits", type=int, choices=[4, 8])
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    if args.shape in random_vlm.SHAPES:
        dtype = args.dtype if args.dtype != "float32" else ""
        random_vlm.write(args.shape, args.tokenizer_dir, args.out, args.seed, dtype)
        return
    write(args.shape, args.tokenizer_dir, args.out, args.bits, args.seed, args.dtype)


if __name__ == "__main__":
    main()

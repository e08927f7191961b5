"""Convert a llama-architecture GGUF file into an MLX model directory.

This is how the bundled SmolLM2-135M-Instruct becomes a model mlx-lm can load,
with no torch and no model hub:

1. ``mx.load`` reads the GGUF; its quantized tensors arrive as MLX affine
   triples (``weight``/``scales``/``biases``), group size 32.
2. Tensors are renamed from llama.cpp's names to mlx-lm's llama names.
3. llama.cpp stores the Q and K projections with their rows permuted (it
   interleaves the two rotary halves of each head); the permutation is undone.
   Rows are whole in the packed layout, so this works on quantized tensors too.
4. ``tokenizer.json`` is rebuilt from the metadata's vocabulary and merges with
   the ``tokenizers`` library, and ``tokenizer_config.json`` carries the chat
   template, so the daemon can tokenize without MLX.

On a CPU the quantized matmul is slow, so there the weights are dequantized to
float32 (which a system BLAS then speeds up); elsewhere they stay quantized.

Run as ``python -m runner.gguf GGUF OUT_DIR``; it writes into a temporary
directory beside OUT_DIR and renames it into place, so a crash never leaves a
half-written model behind.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_TOP_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_CONTROL = 3  # llama.cpp's token type for control tokens


def _scalar(meta: dict[str, Any], key: str) -> Any:
    value = meta[key]
    return value.item() if hasattr(value, "item") else value


def _rename(name: str) -> str:
    stem, _, suffix = name.rpartition(".")
    if stem.startswith("blk."):
        _, index, part = stem.split(".", 2)
        return f"model.layers.{index}.{_LAYER_NAMES[part]}.{suffix}"
    return f"{_TOP_NAMES[stem]}.{suffix}"


def _unpermute(w: Any, n_head: int) -> Any:
    """Undo llama.cpp's interleaving of the rotary halves of each head's rows."""
    rows = w.shape[0]
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def model_config(meta: dict[str, Any]) -> dict[str, Any]:
    arch = meta["general.architecture"]
    if arch != "llama":
        raise ValueError(f"only llama GGUF files are supported, not {arch!r}")
    n_head = _scalar(meta, "llama.attention.head_count")
    hidden = _scalar(meta, "llama.embedding_length")
    return {
        "model_type": "llama",
        "hidden_size": hidden,
        "num_hidden_layers": _scalar(meta, "llama.block_count"),
        "intermediate_size": _scalar(meta, "llama.feed_forward_length"),
        "num_attention_heads": n_head,
        "num_key_value_heads": _scalar(meta, "llama.attention.head_count_kv"),
        "head_dim": hidden // n_head,
        "rms_norm_eps": _scalar(meta, "llama.attention.layer_norm_rms_epsilon"),
        "rope_theta": _scalar(meta, "llama.rope.freq_base"),
        "vocab_size": len(meta["tokenizer.ggml.tokens"]),
        "max_position_embeddings": _scalar(meta, "llama.context_length"),
        "bos_token_id": _scalar(meta, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _scalar(meta, "tokenizer.ggml.eos_token_id"),
        "tie_word_embeddings": True,
    }


def convert_weights(
    weights: dict[str, Any], config: dict[str, Any], dequantize: bool
) -> dict[str, Any]:
    import mlx.core as mx

    n_head = config["num_attention_heads"]
    n_kv = config["num_key_value_heads"]
    out = {}
    for name, tensor in weights.items():
        if ".attn_q." in name:
            tensor = _unpermute(tensor, n_head)
        elif ".attn_k." in name:
            tensor = _unpermute(tensor, n_kv)
        out[_rename(name)] = tensor
    if "lm_head.weight" in out:
        config["tie_word_embeddings"] = False
    if not dequantize:
        return out
    dense = {}
    for name, tensor in out.items():
        if name.endswith((".scales", ".biases")):
            continue
        stem = name.removesuffix(".weight")
        if f"{stem}.scales" in out:
            tensor = mx.dequantize(
                tensor,
                out[f"{stem}.scales"],
                out[f"{stem}.biases"],
                group_size=32,
                bits=32 * tensor.shape[-1] // (32 * out[f"{stem}.scales"].shape[-1]),
            )
        dense[name] = tensor.astype(mx.float32)
    return dense


def tokenizer_files(meta: dict[str, Any]) -> tuple[Any, dict[str, Any]]:
    """Build a byte-level BPE tokenizer and its config from GGUF metadata."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    tokens: list[str] = meta["tokenizer.ggml.tokens"]
    merges = [tuple(m.split(" ", 1)) for m in meta["tokenizer.ggml.merges"]]
    if meta.get("tokenizer.ggml.model") != "gpt2":
        raise ValueError("only byte-level BPE (gpt2) tokenizers are supported")
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    types = meta["tokenizer.ggml.token_type"].tolist()
    specials = [t for t, kind in zip(tokens, types, strict=True) if kind == _CONTROL]
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = tokens[_scalar(meta, "tokenizer.ggml.bos_token_id")]
    eos = tokens[_scalar(meta, "tokenizer.ggml.eos_token_id")]
    pad_id = meta.get("tokenizer.ggml.padding_token_id")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": bos,
        "eos_token": eos,
        "pad_token": tokens[int(pad_id.item())] if pad_id is not None else eos,
        "add_bos_token": bool(_scalar(meta, "tokenizer.ggml.add_bos_token"))
        if "tokenizer.ggml.add_bos_token" in meta
        else False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": _scalar(meta, "llama.context_length"),
        "chat_template": meta.get("tokenizer.chat_template"),
    }
    return tok, config


def convert(gguf: Path, out_dir: Path, dequantize: bool | None = None) -> Path:
    """Write an MLX model directory for ``gguf`` at ``out_dir`` and return it."""
    import mlx.core as mx

    if dequantize is None:
        dequantize = mx.default_device() == mx.cpu
    loaded: Any = mx.load(str(gguf), return_metadata=True)
    weights, meta = loaded
    config = model_config(meta)
    weights = convert_weights(weights, config, dequantize)
    if not dequantize:
        config["quantization"] = {"group_size": 32, "bits": 4}
    tokenizer, tokenizer_config = tokenizer_files(meta)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}-", dir=out_dir.parent))
    tmp.chmod(0o755)
    try:
        mx.save_safetensors(str(tmp / "model.safetensors"), weights, metadata={"format": "mlx"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2))
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out_dir


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m runner.gguf GGUF OUT_DIR")
    convert(Path(sys.argv[1]), Path(sys.argv[2]))

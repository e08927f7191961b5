"""The memory budget, and what a model will cost before it is loaded.

The daemon itself never runs MLX work. It imports MLX only through mlx-lm's
tokenizer wrapper (``api/texts.py``), which starts no device: on the CUDA
host ``nvidia-smi --query-compute-apps=pid`` lists the runners and never the
daemon, so all the device memory in use is the runners', in the ledger. On a
Mac it asks Metal for the recommended working-set size, which is what MLX
itself treats as the memory it can use without the system swapping.
"""

from __future__ import annotations

import json
import os
import struct
import sys
from pathlib import Path
from typing import Any

import attrs

from config.settings import ModelConfig
from scheduler.kinds import kind_of

RAM_FRACTION = 0.75  # default budget where Metal gives no figure
PREFILL_CHUNK = 2048  # mlx-lm's prefill step: the activations held at once
EMBED_BATCH_TOKENS = 4096  # padded tokens an embedding runner reads at once (runner/embedder.py)
IMAGE_FEATURES = 128 * 1024 * 1024  # a vision model's cache of image features (runner/vision.py)
_DTYPE_BYTES = {"F32": 4, "F16": 2, "BF16": 2, "F64": 8}


def device_memory() -> tuple[int, str]:
    """The memory a budget is a fraction of, and where the figure came from."""
    if sys.platform == "darwin":
        import mlx.core as mx

        info = mx.device_info()
        if "max_recommended_working_set_size" in info:
            return int(info["max_recommended_working_set_size"]), "Metal working set"
    ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return ram, "RAM"


def resolve_budget(setting: int | float | None) -> tuple[int, str]:
    """Bytes from the ``memory_budget`` setting: bytes as given, a fraction of
    the device's memory, or (unset) Metal's working set or 75% of RAM."""
    if isinstance(setting, int):
        return setting, "configured"
    total, where = device_memory()
    if setting is None:
        fraction = 1.0 if where.startswith("Metal") else RAM_FRACTION
    else:
        fraction = setting
    return int(total * fraction), f"{fraction:g} of {where}"


@attrs.frozen
class Size:
    """What a model costs: ``bytes`` while resident (weights and working
    memory), and ``kv_per_token`` for each token a request holds."""

    bytes: int
    kv_per_token: int
    weights: int = 0  # of ``bytes``
    images: int = 0  # of ``bytes``: its cache of image features (a vision model's)

    @property
    def working(self) -> int:
        """What it may use beyond its weights and image features (and the KV
        cache its requests reserve): its runner keeps MLX's cache of freed
        buffers within this."""
        return self.bytes - self.weights - self.images


MAX_HEADER = 100 * 1024 * 1024  # the safetensors format's limit on a header


def estimate(model_dir: Path, model: ModelConfig) -> Size:
    """The model's size from its files: weights, working memory for
    ``max_concurrency`` sequences (logits, activations of one prefill chunk,
    a tenth of the weights for the rest), and KV bytes per token. A request's
    KV is charged as it runs (``scheduler/policy.py``), not here."""
    files = sorted(model_dir.glob("*.safetensors"))
    weights = sum(f.stat().st_size for f in files)
    whole = json.loads((model_dir / "config.json").read_text())
    config = whole.get("text_config", whole)
    act = _activation_bytes(files[0]) if files else 2
    heads = config.get("num_attention_heads", 1)
    kv_heads = config.get("num_key_value_heads", heads)
    head_dim = config.get("head_dim") or config.get("hidden_size", 0) // max(heads, 1)
    layers = config.get("num_hidden_layers", 0)
    hidden = config.get("hidden_size", 0)
    inter = config.get("intermediate_size", 4 * hidden)
    vocab = config.get("vocab_size", 0)
    if kind_of(model, model_dir) == "embed":
        longest = min(config.get("max_position_embeddings", 512), EMBED_BATCH_TOKENS)
        rows = EMBED_BATCH_TOKENS * ((4 * hidden + 3 * inter) * act + heads * longest * 4)
        return Size(int(weights + rows + weights // 10), 0, weights)
    work = model.max_concurrency * vocab * 4 + PREFILL_CHUNK * (4 * hidden + 3 * inter) * act
    kv = 2 * layers * kv_heads * head_dim * act
    if "vision_config" not in whole:
        return Size(int(weights + work + weights // 10), kv, weights)
    work += _tower_bytes(whole["vision_config"], model_dir)
    return Size(int(weights + work + weights // 10 + IMAGE_FEATURES), kv, weights, IMAGE_FEATURES)


def _tower_bytes(vision: dict[str, Any], model_dir: Path) -> int:
    """A vision tower's working memory for the largest image its processor
    makes (Qwen's: ``max_pixels``; a fixed-size tower's: its ``image_size``),
    read one image at a time (``runner/vision.py``): each patch's
    activations through one layer, in float32."""
    try:
        processor = json.loads((model_dir / "preprocessor_config.json").read_text())
    except (OSError, ValueError):
        processor = {}
    patch = vision.get("patch_size", 14)
    size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
    pixels = processor.get("max_pixels") or size.get("longest_edge")
    if not isinstance(pixels, int):
        pixels = vision.get("image_size", 896) ** 2
    hidden = vision.get("hidden_size", 1024)
    inter = vision.get("intermediate_size", 4 * hidden)
    return int(pixels // (patch * patch) * (6 * hidden + 3 * inter) * 4)


def _activation_bytes(path: Path) -> int:
    """The width of the model's unquantized tensors (its norms), which is what
    its activations and KV cache are computed in."""
    with path.open("rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        if size > min(os.fstat(f.fileno()).st_size - 8, MAX_HEADER):
            raise ValueError(f"{path.name} is not a safetensors file (a {size}-byte header)")
        header: dict[str, Any] = json.loads(f.read(size))
    for name, info in header.items():
        if name.lower().endswith("norm.weight"):  # BERT's are "LayerNorm.weight"
            return _DTYPE_BYTES.get(info.get("dtype", ""), 2)
    return 2

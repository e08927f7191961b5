"""A vision-language model in a runner: mlx-vlm's model, driven the way the
engine drives a text model, and the images of a prompt turned into what its
language model reads.

The engine calls a model as ``model(tokens, cache=...)`` and gets logits;
``Vision`` answers that call for mlx-vlm's language model, which returns an
object and, for Qwen's multimodal rotary positions (M-RoPE), keeps the
positions of the last prompt it saw on the model itself. Shared by every
sequence of a batch, that state would give one request's positions to
another, so ``Vision`` always passes positions explicitly: a token's index in
its sequence plus its sequence's ``delta`` (after an image, Qwen's positions
run behind the index by the image's tokens less its grid's longest side).

A prompt with images is read from embeddings (``see``): its text tokens'
embeddings with each image's features in place of its image tokens, and, for
M-RoPE, the positions of every token of it. The engine reads such a prompt
on the sequence's own cache, all but its last token (``Engine._prefill``), so
the batch and the single path only ever feed tokens.

Image tokens are keyed by the image's content (``keyed``): the prefix cache
sees ids derived from the image's bytes where the prompt has the one image
token repeated, so two different images never share a cached prefix and the
same image, sent again on a later turn, does.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from runner.protocol import Picture

KEY_SPACE = 1 << 30  # keyed image tokens are -1 .. -KEY_SPACE: never a real id


def is_vision(model_dir: Path) -> bool:
    """Whether a model directory is a vision-language model's (its config
    has a vision tower)."""
    try:
        config = json.loads((model_dir / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(config, dict) and "vision_config" in config


def keyed(prompt: Sequence[int], pictures: Sequence[Picture]) -> list[int]:
    """The prompt with each picture's tokens replaced by ids derived from its
    bytes: what the prefix cache keys it by."""
    tokens = list(prompt)
    for pic in pictures:
        base = int.from_bytes(hashlib.sha256(pic.data).digest()[:8], "big")
        for i in range(pic.tokens):
            tokens[pic.at + i] = -1 - (base + i) % KEY_SPACE
    return tokens


@attrs.frozen
class Seen:
    """What a prompt with images gives the language model."""

    embeddings: mx.array  # (1, L, D): every token's input
    positions: mx.array | None  # (3, 1, L) M-RoPE positions; None: the tokens' indices
    delta: int  # the positions of the tokens after the prompt: index + delta


class Vision:
    def __init__(self, model: Any, processor: Any) -> None:
        self.vlm = model
        self.language = model.language_model
        self.processor = processor
        self.mrope = hasattr(self.language, "get_rope_index")
        self.encoded = 0  # images run through the vision tower

    @classmethod
    def load(cls, model_dir: Path) -> Vision:
        from mlx_vlm.utils import load

        model, processor = load(str(model_dir), lazy=True)
        return cls(model, processor)

    @property
    def layers(self) -> Any:
        return self.language.model.layers

    def parameters(self) -> Any:
        return self.vlm.parameters()

    def make_cache(self) -> list[Any]:
        """mlx-lm's caches in the language model's layout (Gemma's sliding
        window layers rotate), since mlx-lm's are the ones a batch merges."""
        from mlx_lm.models.cache import KVCache, RotatingKVCache

        if not hasattr(self.language, "make_cache"):
            return [KVCache() for _ in self.layers]
        caches: list[Any] = []
        for c in self.language.make_cache():
            if type(c).__name__ == "RotatingKVCache":
                caches.append(RotatingKVCache(max_size=c.max_size, keep=c.keep))
            elif type(c).__name__ == "KVCache":
                caches.append(KVCache())
            else:
                raise ValueError(f"mlxd cannot batch a {type(c).__name__} (its model's cache)")
        return caches

    def __call__(
        self,
        inputs: mx.array,
        cache: list[Any] | None = None,
        input_embeddings: mx.array | None = None,
        deltas: mx.array | int = 0,
        positions: mx.array | None = None,
    ) -> mx.array:
        """Logits for ``inputs`` (B, L), or for ``input_embeddings`` in their
        place; ``deltas`` (one per row, or one for all) places them unless
        ``positions`` are given."""
        kwargs: dict[str, Any] = {}
        if self.mrope:
            if positions is None:
                positions = self._positions(inputs.shape, cache, deltas)
            kwargs["position_ids"] = positions
        out = self.language(inputs, inputs_embeds=input_embeddings, cache=cache, **kwargs)
        logits: mx.array = out.logits
        return logits

    def _positions(self, shape: tuple[int, ...], cache: list[Any] | None, deltas: Any) -> mx.array:
        batch, length = shape[0], shape[1]
        offset = cache[0].offset if cache else 0
        start = mx.maximum(offset, 0) if isinstance(offset, mx.array) else mx.array(offset)
        start = mx.broadcast_to(start.reshape(-1, 1) + mx.array(deltas).reshape(-1, 1), (batch, 1))
        index = (start + mx.arange(length)[None]).astype(mx.int32)
        return mx.broadcast_to(index[None], (3, batch, length))

    def see(self, prompt: Sequence[int], pictures: Sequence[Picture], tower: bool = True) -> Seen:
        """The embeddings (and positions) of a prompt whose pictures' tokens
        are where ``pictures`` say. Without the ``tower`` (every picture's
        tokens are cached already, so only the text after them is read), a
        Qwen's images are only measured, for the positions of what follows."""
        from PIL import Image

        images = [Image.open(io.BytesIO(p.data)).convert("RGB") for p in pictures]
        pixels = self.processor.image_processor(images=images, return_tensors="np")
        ids = mx.array([list(prompt)])
        grid = (
            mx.array(np.asarray(pixels["image_grid_thw"])) if "image_grid_thw" in pixels else None
        )
        if not tower and self.mrope:
            positions, deltas = self.language.get_rope_index(ids, grid, None, mx.ones_like(ids))
            embeddings = self.language.model.embed_tokens(ids)  # the text's; images' unread
            return Seen(embeddings, positions, int(deltas.reshape(-1)[0]))
        self.encoded += len(pictures)
        extra = {"image_grid_thw": grid} if grid is not None else {}
        seen = self.vlm.get_input_embeddings(
            ids, mx.array(np.asarray(pixels["pixel_values"])), mask=mx.ones_like(ids), **extra
        )
        if not self.mrope:
            return Seen(seen.inputs_embeds, None, 0)
        return Seen(seen.inputs_embeds, seen.position_ids, int(seen.rope_deltas.reshape(-1)[0]))

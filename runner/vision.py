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

The families mlxd knows (Qwen2-VL and 2.5-VL, Gemma 3) have their images
encoded one at a time, each image's features kept in a small cache keyed by
its bytes (``Features``, within the bytes the pool charges for it): the same
screenshot in another conversation, or after its prefix left the cache, is
not encoded again, and the vision tower's working memory is one image's.
Other families hand all of a prompt's images to mlx-vlm at once, uncached.
"""

from __future__ import annotations

import io
import json
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs
import mlx.core as mx
import numpy as np

from runner.errors import BadInput
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
        base = int.from_bytes(pic.digest[:8], "big")
        for i in range(pic.tokens):
            tokens[pic.at + i] = -1 - (base + i) % KEY_SPACE
    return tokens


@attrs.frozen
class Seen:
    """What a prompt with images gives the language model."""

    embeddings: mx.array  # (1, L, D): every token's input
    positions: mx.array | None  # (3, 1, L) M-RoPE positions; None: the tokens' indices
    delta: int  # the positions of the tokens after the prompt: index + delta


@attrs.frozen
class Encoded:
    """One image as its language model reads it: its ``features`` (None
    where only its size was needed) and, for Qwen, its patch grid (t, h, w)."""

    features: mx.array | None
    grid: np.ndarray | None


class Features:
    """Images' features by the digest of their files, the least recently
    used dropped beyond ``limit`` bytes."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.bytes = 0
        self._kept: OrderedDict[bytes, Encoded] = OrderedDict()

    def get(self, key: bytes) -> Encoded | None:
        found = self._kept.get(key)
        if found is not None:
            self._kept.move_to_end(key)
        return found

    def put(self, key: bytes, image: Encoded) -> None:
        size = image.features.nbytes if image.features is not None else 0
        if size > self.limit or key in self._kept:
            return
        self._kept[key] = image
        self.bytes += size
        while self.bytes > self.limit:
            _, old = self._kept.popitem(last=False)
            self.bytes -= old.features.nbytes if old.features is not None else 0


class Vision:
    def __init__(self, model: Any, processor: Any, feature_bytes: int = 0) -> None:
        self.vlm = model
        self.language = model.language_model
        self.processor = processor
        self.mrope = hasattr(self.language, "get_rope_index")
        self.encoded = 0  # images run through the vision tower
        self.reused = 0  # images whose features came from ``features`` instead
        self.features = Features(feature_bytes)
        family = getattr(model.config, "model_type", "")
        self._encode = {
            "qwen2_vl": self._qwen,
            "qwen2_5_vl": self._qwen,
            "gemma3": self._gemma,
        }.get(family)

    @classmethod
    def load(cls, model_dir: Path, feature_bytes: int = 0) -> Vision:
        from mlx_vlm.utils import load

        model, processor = load(str(model_dir), lazy=True)
        return cls(model, processor, feature_bytes)

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
        ids = mx.array([list(prompt)])
        if self._encode is not None:
            return self._see_each(ids, pictures, tower)

        images = [_opened(p, n) for n, p in enumerate(pictures)]
        pixels = self.processor.image_processor(images=images, return_tensors="np")
        grid = (
            mx.array(np.asarray(pixels["image_grid_thw"])) if "image_grid_thw" in pixels else None
        )
        if not tower and self.mrope:
            return self._unread(ids, grid)
        self.encoded += len(pictures)
        extra = {"image_grid_thw": grid} if grid is not None else {}
        return self._seen(
            self.vlm.get_input_embeddings(
                ids, mx.array(np.asarray(pixels["pixel_values"])), mask=mx.ones_like(ids), **extra
            )
        )

    def _see_each(self, ids: mx.array, pictures: Sequence[Picture], tower: bool) -> Seen:
        """``see`` for a family whose images are encoded one at a time."""
        if not tower and not self.mrope:  # nothing of its images is needed
            return self._unread(ids, None)
        images = [self._image(p, n, tower) for n, p in enumerate(pictures)]
        grid = None
        if images[0].grid is not None:
            grid = mx.array(np.concatenate([i.grid for i in images if i.grid is not None]))
        if not tower:
            return self._unread(ids, grid)
        features = mx.concatenate([i.features for i in images if i.features is not None])
        extra = {"image_grid_thw": grid} if grid is not None else {}
        return self._seen(
            self.vlm.get_input_embeddings(
                ids, mx.zeros((1,)), mask=mx.ones_like(ids), cached_image_features=features, **extra
            )
        )

    def _unread(self, ids: mx.array, grid: mx.array | None) -> Seen:
        """A prompt whose images' tokens are all cached (only the text after
        them is read): the text's embeddings and, for Qwen, the positions
        its images give what follows."""
        embeddings = self.language.model.embed_tokens(ids)
        if not self.mrope:
            return Seen(embeddings, None, 0)
        positions, deltas = self.language.get_rope_index(ids, grid, None, mx.ones_like(ids))
        return Seen(embeddings, positions, int(deltas.reshape(-1)[0]))

    def _seen(self, seen: Any) -> Seen:
        """mlx-vlm's input embeddings as the engine takes them."""
        if not self.mrope:
            return Seen(seen.inputs_embeds, None, 0)
        return Seen(seen.inputs_embeds, seen.position_ids, int(seen.rope_deltas.reshape(-1)[0]))

    def _image(self, picture: Picture, n: int, tower: bool) -> Encoded:
        """One picture's features (from the cache, or encoded and kept), or,
        without the ``tower``, its grid alone."""
        if (found := self.features.get(picture.digest)) is not None:
            self.reused += tower
            return found
        image = _opened(picture, n)
        pixels = self.processor.image_processor(images=[image], return_tensors="np")
        grid = np.asarray(pixels["image_grid_thw"]) if "image_grid_thw" in pixels else None
        if not tower:
            return Encoded(None, grid)
        assert self._encode is not None
        features = self._encode(mx.array(np.asarray(pixels["pixel_values"])), grid)
        mx.eval(features)
        self.encoded += 1
        encoded = Encoded(features, grid)
        self.features.put(picture.digest, encoded)
        return encoded

    def _qwen(self, pixels: mx.array, grid: np.ndarray | None) -> mx.array:
        tower = self.vlm.vision_tower
        dtype = tower.patch_embed.proj.weight.dtype
        assert grid is not None  # Qwen's processor gives every image its grid
        features: mx.array = tower(pixels.astype(dtype), mx.array(grid), output_hidden_states=False)
        return features

    def _gemma(self, pixels: mx.array, grid: np.ndarray | None) -> mx.array:
        dtype = self.language.model.embed_tokens.weight.dtype
        hidden, _, _ = self.vlm.vision_tower(
            pixels.transpose(0, 2, 3, 1).astype(dtype), output_hidden_states=True
        )
        features: mx.array = self.vlm.multi_modal_projector(hidden)
        return features


def _opened(picture: Picture, n: int) -> Any:
    """Picture ``n``'s image, decoded; ``BadInput`` if it does not decode
    (the daemon read only its header)."""
    from PIL import Image

    data = picture.data()
    try:
        with Image.open(io.BytesIO(data)) as image:
            return image.convert("RGB")
    except (OSError, SyntaxError, ValueError) as e:
        what = f"image {n + 1} of the request"
        raise BadInput(f"{what} could not be read as an image ({e})") from None

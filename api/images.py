"""Images in chat requests: read from the request, checked, and turned into
the prompt tokens a vision-language model reads them as.

An image comes inline, as a ``data:`` URI of its file in base64; mlxd never
fetches a URL. Its file is opened off the event loop (``check``, in a worker
thread) and refused, as the sender's 400, if it is not a PNG, JPEG, WebP, GIF
or BMP, if it does not decode, or if it has more pixels than ``MAX_PIXELS``
(a small file can claim a huge size: decoding is bounded by refusing those
before any pixel is read).

The chat template writes one image token where each image goes; the model's
processor makes it as many as the image is worth, and so does ``Sizing``
without loading the processor (it would import transformers, and with it
PyTorch where that is installed): Qwen's vision models cut the image, resized
to a multiple of 28 pixels within the processor's pixel bounds, into 14-pixel
patches and merge them 2 by 2, one token each.
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from runner.protocol import Picture
from scheduler.errors import InvalidRequest

MAX_IMAGE_BYTES = 20 << 20  # an image file, decoded from base64
MAX_IMAGES = 16  # in one request
MAX_PIXELS = 25_000_000  # width x height, checked before decoding
FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


def from_url(url: Any, param: str) -> bytes:
    """The file an ``image_url``'s URL holds (a ``data:`` URI, base64)."""
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}' must be a string", param=param)
    if url.startswith(("http://", "https://")):
        raise InvalidRequest(
            "mlxd does not fetch image URLs: send the image in the request, "
            "as a data: URI (data:image/png;base64,...)",
            param=param,
        )
    head, comma, payload = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma):
        raise InvalidRequest(
            "an image must be a data: URI of its file in base64 (data:image/png;base64,...)",
            param=param,
        )
    if len(payload) > MAX_IMAGE_BYTES * 4 // 3 + 4:
        raise InvalidRequest(f"an image may be at most {MAX_IMAGE_BYTES >> 20} MiB", param=param)
    try:
        return base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest("the image's base64 does not decode", param=param) from None


@attrs.frozen
class Checked:
    data: bytes
    width: int
    height: int


def check(data: bytes, n: int) -> Checked:
    """Open image ``n``'s file and decode it (blocking: a worker thread's)."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {n + 1} of the request"
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format not in FORMATS:
                raise InvalidRequest(
                    f"{what} is {image.format or 'of no known format'}; mlxd reads "
                    f"{', '.join(sorted(FORMATS))}"
                )
            width, height = image.size
            if width * height > MAX_PIXELS:
                raise InvalidRequest(
                    f"{what} has {width}x{height} pixels; at most {MAX_PIXELS:,} are read"
                )
            image.load()
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InvalidRequest(f"{what} could not be read as an image ({e})") from None
    return Checked(data, width, height)


@attrs.frozen
class Sizing:
    """How a model's processor turns an image into tokens (Qwen's vision
    models: a dynamic grid of merged patches)."""

    image_token: int
    patch: int = 14
    merge: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

    @classmethod
    def of(cls, model_dir: Path) -> Sizing | None:
        """The sizing of a vision-language model's directory; None for a
        text model (or a family mlxd cannot size)."""
        try:
            config = json.loads((model_dir / "config.json").read_text())
            processor = json.loads((model_dir / "preprocessor_config.json").read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(config, dict) or "vision_config" not in config:
            return None
        token = config.get("image_token_id")
        if not isinstance(token, int) or processor.get("merge_size") is None:
            return None
        size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
        return cls(
            token,
            int(processor.get("patch_size", 14)),
            int(processor["merge_size"]),
            int(processor.get("min_pixels", size.get("shortest_edge", 56 * 56))),
            int(processor.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
        )

    def tokens(self, width: int, height: int) -> int:
        """An image's tokens: its size rounded to whole merged patches,
        scaled into the processor's pixel bounds, keeping its shape."""
        factor = self.patch * self.merge
        h = max(factor, round(height / factor) * factor)
        w = max(factor, round(width / factor) * factor)
        if h * w > self.max_pixels:
            beta = math.sqrt(height * width / self.max_pixels)
            h = max(factor, math.floor(height / beta / factor) * factor)
            w = max(factor, math.floor(width / beta / factor) * factor)
        elif h * w < self.min_pixels:
            beta = math.sqrt(self.min_pixels / (height * width))
            h = math.ceil(height * beta / factor) * factor
            w = math.ceil(width * beta / factor) * factor
        return (h // self.patch) * (w // self.patch) // (self.merge * self.merge)

    def expand(
        self, prompt: list[int], images: Sequence[Checked]
    ) -> tuple[list[int], tuple[Picture, ...]]:
        """The prompt with each image token the template wrote (one an image,
        in order) made as many as its image is worth."""
        places = [i for i, t in enumerate(prompt) if t == self.image_token]
        if len(places) != len(images):
            raise InvalidRequest(
                f"the chat template placed {len(places)} images for the request's {len(images)}"
            )
        out: list[int] = []
        pictures = []
        start = 0
        for place, image in zip(places, images, strict=True):
            out += prompt[start:place]
            n = self.tokens(image.width, image.height)
            pictures.append(Picture(image.data, len(out), n))
            out += [self.image_token] * n
            start = place + 1
        out += prompt[start:]
        return out, tuple(pictures)

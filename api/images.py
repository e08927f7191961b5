"""Images in chat requests: read from the request, checked, and turned into
the prompt tokens a vision-language model reads them as.

An image comes inline, as a ``data:`` URI of its file in base64, or as an
``http(s)`` URL that ``api/image_urls.py`` fetches where the config allows
it; no other scheme is read. Its header is read off the event loop
(``check``, in a worker thread) and the image refused, as the sender's 400,
if it is not a PNG, JPEG, WebP, GIF or BMP or if it is over the configured
``Limits``: bytes, or pixels (a small file can claim a huge size: decoding is
bounded by refusing those before any pixel is read). Its base64 goes to the
runner as the request sent it, and its pixels are decoded there, once; one
that does not decode is the sender's 400 too (``runner.errors.BadInput``).

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

FORMATS = frozenset({"PNG", "JPEG", "WEBP", "GIF", "BMP"})


@attrs.frozen
class Limits:
    """What a request's images may be (the settings ``max_images``,
    ``max_image_size``, ``max_image_pixels``)."""

    images: int = 16
    bytes: int = 20 << 20  # an image's file
    pixels: int = 25_000_000  # width x height
    url_hosts: tuple[str, ...] = ()  # hosts image URLs are fetched from (none: no URL)
    url_timeout_s: float = 10.0  # a fetch's time, redirects included


@attrs.frozen
class Remote:
    """An image the request names by URL (``api/image_urls.py`` fetches
    it), and where in the request it is."""

    url: str
    param: str


def from_url(url: Any, param: str) -> str | Remote:
    """The file an ``image_url``'s URL holds, in base64 (a ``data:`` URI's
    payload, as sent), or the URL to fetch it from (``http(s)``)."""
    if not isinstance(url, str):
        raise InvalidRequest(f"'{param}' must be a string", param=param)
    if url[:8].lower().startswith(("http://", "https://")):
        return Remote(url, param)
    head, comma, payload = url.partition(",")
    if not (head.startswith("data:") and head.endswith(";base64") and comma):
        raise InvalidRequest(
            "an image must be a data: URI of its file in base64 (data:image/png;base64,...) "
            "or an http(s) URL",
            param=param,
        )
    return payload


HEAD = 1 << 18  # base64 characters read for an image's header (192 KiB of its file)


@attrs.frozen
class Checked:
    encoded: str  # the file, in base64
    width: int
    height: int


def check(encoded: str, n: int, limits: Limits) -> Checked:
    """Read image ``n``'s header (a worker thread's): its format, its size,
    the bytes its file takes. Its pixels are decoded once, by the runner,
    which refuses an image that does not decode as the sender's error too."""
    from PIL import Image, UnidentifiedImageError

    what = f"image {n + 1} of the request"
    size = len(encoded) * 3 // 4 - encoded[-2:].count("=")
    if size > limits.bytes:
        raise InvalidRequest(
            f"{what} is {size:,} bytes; at most {limits.bytes:,} are read (max_image_size)"
        )
    try:
        head = base64.b64decode(encoded[:HEAD], validate=True)
    except (binascii.Error, ValueError):
        raise InvalidRequest(f"the base64 of {what} does not decode") from None
    try:
        try:
            image = Image.open(io.BytesIO(head))
        except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
            if len(encoded) <= HEAD:
                raise
            # a header past the first HEAD characters (a JPEG's large metadata)
            image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        with image:
            kind, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, binascii.Error) as e:
        raise InvalidRequest(f"{what} could not be read as an image ({e})") from None
    if kind not in FORMATS:
        raise InvalidRequest(
            f"{what} is {kind or 'of no known format'}; mlxd reads {', '.join(sorted(FORMATS))}"
        )
    if width * height > limits.pixels:
        raise InvalidRequest(
            f"{what} has {width}x{height} pixels; at most {limits.pixels:,} are read "
            "(max_image_pixels)"
        )
    return Checked(encoded, width, height)


@attrs.frozen
class Grid:
    """Qwen's vision models: an image resized to whole merged patches within
    the processor's pixel bounds, a token for each."""

    patch: int = 14
    merge: int = 2
    min_pixels: int = 56 * 56
    max_pixels: int = 28 * 28 * 1280

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


@attrs.frozen
class Sizing:
    """How a model's processor turns the image token its chat template
    writes into an image's tokens: Qwen's (``grid``) makes the one token as
    many as the image's size is worth; Gemma 3's writes, in place of the
    ``marker`` text, a fixed run of them between its begin and end markers
    (``expansion``), whatever the size."""

    image_token: int
    grid: Grid | None = None
    marker: str = ""
    expansion: str = ""

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
        if isinstance(config.get("image_token_id"), int) and "merge_size" in processor:
            size = processor.get("size") if isinstance(processor.get("size"), dict) else {}
            grid = Grid(
                int(processor.get("patch_size", 14)),
                int(processor["merge_size"]),
                int(processor.get("min_pixels", size.get("shortest_edge", 56 * 56))),
                int(processor.get("max_pixels", size.get("longest_edge", 28 * 28 * 1280))),
            )
            return cls(config["image_token_id"], grid)
        if config.get("model_type") == "gemma3":
            return _gemma(model_dir, config)
        return None

    def expand_text(self, text: str) -> str:
        """The rendered prompt with each image's marker written out (Gemma's)."""
        return text.replace(self.marker, self.expansion) if self.marker else text

    def expand(
        self, prompt: list[int], images: Sequence[Checked]
    ) -> tuple[list[int], tuple[Picture, ...]]:
        """The tokenized prompt with each image's tokens as many as the
        processor makes them (Qwen's: the template wrote one an image), and
        where each image's run of them is."""
        if self.grid is not None:
            sizes = iter([self.grid.tokens(i.width, i.height) for i in images])
            grown: list[int] = []
            for token in prompt:
                grown += [token] * next(sizes, 1) if token == self.image_token else [token]
            prompt = grown
        runs = _runs(prompt, self.image_token)
        if len(runs) != len(images):
            raise InvalidRequest(
                f"the chat template placed {len(runs)} images for the request's {len(images)}"
            )
        pictures = (
            Picture(image.encoded, at, n) for (at, n), image in zip(runs, images, strict=True)
        )
        return prompt, tuple(pictures)


def _runs(prompt: list[int], token: int) -> list[tuple[int, int]]:
    """Where each run of ``token`` starts in ``prompt``, and how long it is."""
    runs: list[tuple[int, int]] = []
    for i, t in enumerate(prompt):
        if t != token:
            continue
        if i and prompt[i - 1] == token:
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    return runs


def _gemma(model_dir: Path, config: dict[str, Any]) -> Sizing | None:
    from tokenizers import Tokenizer

    ids = [config.get(k) for k in ("image_token_index", "boi_token_index", "eoi_token_index")]
    count = config.get("mm_tokens_per_image")
    known = [i for i in ids if isinstance(i, int)]
    if len(known) != 3 or not isinstance(count, int):
        return None
    try:
        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    except Exception:  # the tokenizers library raises its own kind
        return None
    image, begin, end = (tokenizer.id_to_token(i) for i in known)
    if not (image and begin and end):
        return None
    return Sizing(known[0], marker=begin, expansion=f"\n\n{begin}{image * count}{end}\n\n")

"""The tiny random vision-language models (``bench/random_vlm.py``) that the
image tests stand on: mlx-vlm loads them without a network, an
image becomes as many tokens as the real family makes of it, and what the
model answers depends on the image (a model that ignored it would let every
image test pass)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from runner.__main__ import preload_blas

preload_blas()  # before MLX is imported

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

ASK = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is it?"}]}]


@pytest.fixture(params=[("tiny-vl", "tiny_vl_dir"), ("tiny-gemma3-vl", "tiny_gemma_vl_dir")])
def vlm(request: pytest.FixtureRequest) -> tuple[str, Path]:
    """A shape, and its model as ``bench.random_model`` makes it (``conftest``)."""
    shape, fixture = request.param
    return shape, request.getfixturevalue(fixture)


def test_a_tiny_vision_model_sees_its_image(vlm: tuple[str, Path]) -> None:
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import load

    shape, path = vlm
    model, loaded = load(str(path))
    processor: Any = loaded  # transformers' processor: its attributes are its config's
    tokenizer = processor.tokenizer
    prompt = tokenizer.apply_chat_template(ASK, tokenize=False, add_generation_prompt=True)
    red = Image.new("RGB", (120, 90), "red")
    noise = Image.fromarray((np.random.default_rng(0).random((90, 120, 3)) * 255).astype(np.uint8))

    inputs = processor(text=[prompt], images=[red], return_tensors="np")
    image_token = tokenizer.convert_tokens_to_ids(processor.image_token)
    # Qwen: 120x90 resized to 112x84, 14-pixel patches merged 2x2: 8x6/4.
    # Gemma 3: a fixed number an image (this shape's: 4).
    assert (inputs["input_ids"] == image_token).sum() == {"tiny-vl": 12, "tiny-gemma3-vl": 4}[shape]

    images: list[Any] = [red, noise]  # mlx-vlm's hints say paths; it takes PIL images too
    answers = [
        [r.token for r in stream_generate(model, processor, prompt, image=[image], max_tokens=8)]
        for image in images
    ]
    assert answers[0] != answers[1]

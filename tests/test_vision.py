"""Images in the runner's engine (real MLX, the tiny Qwen2.5-VL and Gemma 3
of ``bench/random_vlm.py``): a prompt with an image is answered as mlx-vlm
answers it, alone and beside other requests in a batch, and again from the
prefix cache; a different image never reuses another's cached tokens; an
image seen before is not encoded again."""

from __future__ import annotations

import base64
import io
import itertools
from pathlib import Path
from typing import Any

import pytest

from runner.__main__ import preload_blas

preload_blas()  # before MLX is imported

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from config.settings import ModelConfig  # noqa: E402
from runner.engine import Engine  # noqa: E402
from runner.prefix import PrefixCache  # noqa: E402
from runner.protocol import Generate, Picture, Sampling  # noqa: E402
from runner.vision import Vision  # noqa: E402
from tests.conftest import running, settings_for  # noqa: E402

TOKENS = 12
_ids = itertools.count(1)


@pytest.fixture(scope="module")
def qwen(tiny_vl_dir: Path) -> Vision:
    return Vision.load(tiny_vl_dir)


@pytest.fixture(scope="module", params=["tiny_vl_dir", "tiny_gemma_vl_dir"])
def vision(request: pytest.FixtureRequest) -> Vision:
    return Vision.load(request.getfixturevalue(request.param))


def picture(seed: int, size: tuple[int, int] = (120, 90)) -> Image.Image:
    pixels = np.random.default_rng(seed).random((size[1], size[0], 3)) * 255
    return Image.fromarray(pixels.astype(np.uint8))


def chat(vision: Vision, text: str, image: Image.Image | None) -> str:
    content: list[dict[str, Any]] = [{"type": "image"}] if image is not None else []
    messages = [{"role": "user", "content": [*content, {"type": "text", "text": text}]}]
    tokenizer = vision.processor.tokenizer
    prompt: str = tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    return prompt


def request(vision: Vision, text: str, image: Image.Image | None) -> Generate:
    """The request the daemon would send: the prompt's tokens, the image's
    expanded to as many as the processor makes, and the image's bytes."""
    prompt = chat(vision, text, image)
    processed = vision.processor(
        text=[prompt], images=[image] if image is not None else None, return_tensors="np"
    )
    ids = [int(t) for t in processed["input_ids"][0]]
    pictures: tuple[Picture, ...] = ()
    if image is not None:
        token = vision.processor.tokenizer.convert_tokens_to_ids(vision.processor.image_token)
        at = ids.index(token)
        png = io.BytesIO()
        image.save(png, format="PNG")
        pictures = (Picture(base64.b64encode(png.getvalue()).decode(), at, ids.count(token)),)
    return Generate(ids, TOKENS, Sampling(temperature=0.0), images=pictures, id=next(_ids))


def reference(vision: Vision, text: str, image: Image.Image | None) -> list[int]:
    from mlx_vlm import stream_generate

    images: list[Any] = [image] if image is not None else []
    prompt = chat(vision, text, image)
    made = stream_generate(
        vision.vlm, vision.processor, prompt, image=images or None, max_tokens=TOKENS
    )
    return [r.token for r in made if r.token is not None][:TOKENS]  # (its last repeats one)


def run(engine: Engine, *reqs: Generate) -> dict[int, list[int]]:
    for r in reqs:
        engine.add(r)
    return finish(engine)


def finish(engine: Engine) -> dict[int, list[int]]:
    """Step until every request is done: the tokens of each."""
    out: dict[int, list[int]] = {}
    while engine.active:
        for req_id, token, _, _ in engine.step():
            out.setdefault(req_id, []).append(token)
    return out


def test_an_image_is_answered_as_mlx_vlm_answers_it(vision: Vision) -> None:
    engine = Engine(vision, 4)
    req = request(vision, "What is in the picture?", picture(0))
    assert run(engine, req)[req.id] == reference(vision, "What is in the picture?", picture(0))


def test_images_and_text_batched_together_answer_as_each_alone(vision: Vision) -> None:
    asks = [
        ("What is in the picture?", picture(0)),
        ("Say something.", None),
        ("And this one, in detail?", picture(1, (200, 150))),
    ]
    alone = [reference(vision, text, image) for text, image in asks]
    engine = Engine(vision, 4)
    reqs = [request(vision, text, image) for text, image in asks]
    together = run(engine, *reqs)
    assert [together[r.id] for r in reqs] == alone
    assert engine.stats.max_batch == 3


def test_the_same_image_again_is_read_from_the_prefix_cache_and_another_is_not(
    qwen: Vision,
) -> None:
    vision = qwen
    engine = Engine(vision, 4, prefixes=PrefixCache(vision, 1 << 30))
    first = request(vision, "What is in the picture?", picture(0))
    answer = run(engine, first)[first.id]
    again = request(vision, "What is in the picture?", picture(0))
    encoded = vision.encoded
    hit = engine.add(again)
    assert hit.tokens == len(again.prompt) - 1  # all but the token that starts decoding
    assert finish(engine)[again.id] == answer
    assert vision.encoded == encoded  # its image's tokens were cached: no tower

    other = request(vision, "What is in the picture?", picture(2))
    (image,) = other.images
    hit = engine.add(other)
    assert hit.tokens <= image.at  # the text before the image, at most


async def test_a_vision_models_directory_serves_text_requests(
    tiny_vl_dir: Path, tmp_path: Path
) -> None:
    settings = settings_for(tmp_path, ModelConfig("tiny-vl", str(tiny_vl_dir)))
    async with running(settings) as daemon, daemon.client() as client:
        answers = [
            await client.chat.completions.create(
                model="tiny-vl",
                messages=[{"role": "user", "content": f"Say {word}."}],
                max_tokens=TOKENS,
                temperature=0,
                extra_body={"ignore_eos": True},
            )
            for word in ("hello", "hello", "goodbye")
        ]
    assert [a.usage.completion_tokens for a in answers if a.usage] == [TOKENS] * 3
    assert answers[0].choices[0].message.content == answers[1].choices[0].message.content
    assert answers[1].usage and answers[1].usage.prompt_tokens_details
    assert answers[1].usage.prompt_tokens_details.cached_tokens  # the prefix cache works


def test_an_image_seen_before_is_not_encoded_again_and_answers_the_same(
    vision: Vision,
) -> None:
    """The same image after other text (so no cached prefix covers it) takes
    its features from the cache; a cache too small for two images keeps the
    latest."""
    one = request(vision, "What is in the picture?", picture(0))
    cached = Vision(vision.vlm, vision.processor, 1 << 30)
    run(Engine(cached, 4), one)
    assert cached.encoded == 1 and cached.features.bytes > 0
    size = cached.features.bytes  # one image's features

    other_text = request(vision, "Describe it, please, in one short sentence.", picture(0))
    assert run(Engine(cached, 4), other_text)[other_text.id] == reference(
        vision, "Describe it, please, in one short sentence.", picture(0)
    )
    assert (cached.encoded, cached.reused) == (1, 1)

    small = Vision(vision.vlm, vision.processor, size)  # room for one image
    for seed in (0, 1, 0):
        run(Engine(small, 4), request(vision, "What is in the picture?", picture(seed)))
    assert small.encoded == 3 and small.features.bytes == size

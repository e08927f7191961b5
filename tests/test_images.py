"""Images through every endpoint, with the official clients (real MLX, the
tiny Qwen2.5-VL): an image is answered as mlx-vlm answers the same image,
its tokens are counted as the model's processor makes them, the next turn
with the same image reads it from the prefix cache; a bad image, a URL
from a host the config does not list or an image for a text model is the
sender's 400, and the model keeps serving. Chat's image_url parts,
Responses' input_image, and Anthropic's image blocks, in a turn and inside
a tool result; image URLs from listed hosts, within their limits."""

from __future__ import annotations

import base64
import io
import threading
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, cast

import anthropic
import httpx
import openai
import pytest

from runner.__main__ import preload_blas

preload_blas()  # before MLX is imported

import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

from config.settings import ModelConfig  # noqa: E402
from daemon.cli import ps_text  # noqa: E402
from tests.conftest import TLS, Daemon, running, settings_for  # noqa: E402
from tests.test_messages import client as anthropic_client  # noqa: E402
from tests.test_prefix_api import sample  # noqa: E402
from tests.waiting import eventually  # noqa: E402

TOKENS = 10
ASK = "What is in the picture?"


def png(seed: int, size: tuple[int, int] = (120, 90)) -> bytes:
    pixels = np.random.default_rng(seed).random((size[1], size[0], 3)) * 255
    out = io.BytesIO()
    Image.fromarray(pixels.astype(np.uint8)).save(out, format="PNG")
    return out.getvalue()


def data_uri(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def user(data_url: str, text: str = ASK) -> dict[str, Any]:
    return {
        "role": "user",
        "content": [
            {"type": "image_url", "image_url": {"url": data_url, "detail": "auto"}},
            {"type": "text", "text": text},
        ],
    }


def expected(model_dir: Path, data: bytes) -> tuple[int, str]:
    """The prompt's tokens as mlx-vlm's processor makes them, and its greedy
    answer's text."""
    from mlx_vlm import stream_generate
    from mlx_vlm.utils import load

    model, loaded = load(str(model_dir))
    processor: Any = loaded
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": ASK}]}]
    prompt = processor.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    image: Any = Image.open(io.BytesIO(data))
    ids = processor(text=[prompt], images=[image], return_tensors="np")["input_ids"][0]
    made = stream_generate(model, processor, prompt, image=[image], max_tokens=TOKENS)
    tokens = [r.token for r in made if r.token is not None][:TOKENS]
    return len(ids), processor.tokenizer.decode(tokens)


@pytest.fixture
async def vl(tiny_vl_dir: Path, tiny_dir: Path, tmp_path: Path) -> AsyncIterator[Daemon]:
    # mlx-vlm (for ``expected``) is imported before the daemon's worker threads
    # import transformers: two threads importing from its lazy module at once
    # can fail ("cannot import name 'AutoProcessor'").
    import mlx_vlm  # noqa: F401

    settings = settings_for(
        tmp_path, ModelConfig("tiny-vl", str(tiny_vl_dir)), ModelConfig("tiny", str(tiny_dir))
    )
    async with running(settings) as daemon:
        yield daemon


async def ask(
    client: openai.AsyncOpenAI, messages: list[dict[str, Any]], model: str = "tiny-vl"
) -> Any:
    return await client.chat.completions.create(
        model=model,
        messages=cast(Any, messages),
        max_tokens=TOKENS,
        temperature=0,
        extra_body={"ignore_eos": True},
    )


async def test_an_image_is_answered_counted_and_cached(vl: Daemon, tiny_vl_dir: Path) -> None:
    picture = png(0)
    prompt_tokens, text = expected(tiny_vl_dir, picture)
    async with vl.client() as client:
        first = await ask(client, [user(data_uri(picture))])
        assert first.usage.prompt_tokens == prompt_tokens
        assert first.choices[0].message.content == text

        turn = [user(data_uri(picture)), {"role": "assistant", "content": text}]
        second = await ask(client, [*turn, {"role": "user", "content": "And the colours?"}])
        # The image's tokens (12, after 15 of the template's) come from the cache.
        assert second.usage.prompt_tokens_details.cached_tokens >= 15 + 12

        again = await ask(client, [user(data_uri(picture))])
        assert again.choices[0].message.content == text

        other = await ask(client, [user(data_uri(png(1)))])
        assert other.choices[0].message.content != text

        # After another system prompt no cached prefix covers the image, but
        # its features are kept: the vision tower ran once for each image.
        await ask(client, [{"role": "system", "content": "Be brief."}, user(data_uri(picture))])
    async with httpx.AsyncClient(base_url=vl.url, timeout=60, verify=TLS) as http:

        async def counted() -> bool:  # (a request is counted once its answer has gone)
            metrics = (await http.get("/metrics")).text
            images = sample(metrics, 'mlxd_prompt_images_total{model="tiny-vl"}')
            latest = (await http.get("/api/activity")).json()["latest"]
            runner = (await http.get("/api/ps")).json()["models"][0]["runner"] or {}
            encoded = (runner.get("images_encoded"), runner.get("image_features_reused"))
            return images == 5 and [r["images"] for r in latest] == [1] * 5 and encoded == (2, 1)

        await eventually(counted, what="five images counted, two encoded, one from the cache")


async def test_an_image_to_gemma_3(tiny_gemma_vl_dir: Path, tmp_path: Path) -> None:
    picture = png(3, (300, 200))
    prompt_tokens, text = expected(tiny_gemma_vl_dir, picture)
    settings = settings_for(tmp_path, ModelConfig("gemma", str(tiny_gemma_vl_dir)))
    async with running(settings) as daemon, daemon.client() as client:
        cards = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert cards["gemma"]["type"] == "vlm"
        answer = await ask(client, [user(data_uri(picture))], model="gemma")
    assert answer.usage.prompt_tokens == prompt_tokens  # 4 for the image, whatever its size
    assert answer.choices[0].message.content == text


@pytest.mark.parametrize(
    ("url", "says"),
    [
        (data_uri(b"these bytes are no image"), "could not be read as an image"),
        ("https://example.com/cat.png", "(image_url_hosts): send the image in the request"),
        ("data:image/png;base64,@@@", "the base64 of image 1 of the request does not decode"),
        ("file:///etc/passwd", "must be a data: URI"),
        (data_uri(b"GIF89a" + b"\x00" * 20, "image/gif"), "could not be read as an image"),
        # its header is whole: the runner finds it cut short, as it decodes it
        (data_uri(png(4)[:20000]), "image 1 of the request could not be read as an image"),
    ],
    ids=["not-an-image", "http", "bad-base64", "file", "truncated", "cut-short"],
)
async def test_a_bad_image_is_the_senders_400_and_the_model_keeps_serving(
    vl: Daemon, url: str, says: str
) -> None:
    async with vl.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(client, [user(url)])
        assert says in caught.value.message
        with pytest.raises(openai.BadRequestError) as caught:  # streamed: before the stream
            await client.chat.completions.create(
                model="tiny-vl", messages=cast(Any, [user(url)]), max_tokens=TOKENS, stream=True
            )
        assert says in caught.value.message
        assert (await ask(client, [user(data_uri(png(0)))])).usage.completion_tokens == TOKENS


async def test_models_say_which_take_images_and_a_text_model_refuses_them(vl: Daemon) -> None:
    async def takes() -> dict[str, Any]:
        async with httpx.AsyncClient(base_url=vl.url, timeout=60, verify=TLS) as http:
            pool = (await http.get("/api/ps")).json()
        listed = ps_text(pool)  # as `mlxd ps` prints it
        sees = {m["model"] for m in pool["models"] if f"{m['model']} (vision)" in listed}
        assert sees == {m["model"] for m in pool["models"] if "vision" in (m["capabilities"] or ())}
        return {m["model"]: m["capabilities"] for m in pool["models"]}

    async with vl.client() as client:
        cards = {m.id: m.model_dump() for m in (await client.models.list()).data}
        assert cards["tiny-vl"]["type"] == "vlm"
        assert cards["tiny-vl"]["capabilities"] == ["completion", "vision"]
        assert cards["tiny"]["type"] == "llm" and cards["tiny"]["capabilities"] == ["completion"]
        assert await takes() == {"tiny-vl": ["completion", "vision"], "tiny": ["completion"]}
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(client, [user(data_uri(png(0)))], model="tiny")
        assert "model 'tiny' does not take images" in caught.value.message
        wav = base64.b64encode(b"RIFF" + b"\x00" * 40).decode()
        sound = {"type": "input_audio", "input_audio": {"data": wav, "format": "wav"}}
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(client, [{"role": "user", "content": [sound]}])
        assert "take no audio" in caught.value.message
        assert caught.value.body and "content[0]" in str(caught.value.body)


async def test_the_configured_image_limits_are_the_senders_400s(
    tiny_vl_dir: Path, tmp_path: Path
) -> None:
    big = png(0, (400, 300))  # 120,000 pixels, a few hundred KB of noise
    model = ModelConfig("tiny-vl", str(tiny_vl_dir))
    limits = {"max_images": 2, "max_image_bytes": len(big) - 1, "max_image_pixels": 100_000}
    async with running(settings_for(tmp_path, model, **limits)) as daemon:
        async with daemon.client() as client:
            three = user(data_uri(png(1)))
            three["content"] += [three["content"][0]] * 2
            cases = [
                ([three], "the request has 3 images; at most 2 are read (max_images)"),
                ([user(data_uri(big))], "(max_image_size)"),
                ([user(data_uri(png(2, (400, 260))))], "400x260 pixels; at most 100,000"),
            ]
            for messages, says in cases:
                with pytest.raises(openai.BadRequestError) as caught:
                    await ask(client, messages)
                assert says in caught.value.message
            assert (await ask(client, [user(data_uri(png(1)))])).usage.completion_tokens == TOKENS


async def test_a_bomb_is_refused_before_it_is_decoded(vl: Daemon) -> None:
    # A 6000x6000 PNG of one colour: a few kilobytes that would decode to 108 MB.
    out = io.BytesIO()
    Image.new("RGB", (6000, 6000), "white").save(out, format="PNG")
    async with vl.client() as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await ask(client, [user(data_uri(out.getvalue()))])
        assert "6000x6000 pixels" in caught.value.message


async def test_an_input_image_through_responses(vl: Daemon, tiny_vl_dir: Path) -> None:
    picture = png(0)
    prompt_tokens, text = expected(tiny_vl_dir, picture)
    content = [
        {"type": "input_image", "image_url": data_uri(picture), "detail": "auto"},
        {"type": "input_text", "text": ASK},
    ]
    async with vl.client() as client:
        answer = await client.responses.create(
            model="tiny-vl",
            input=cast(Any, [{"role": "user", "content": content}]),
            max_output_tokens=TOKENS,
            temperature=0,
            extra_body={"ignore_eos": True},
        )
    assert answer.usage and answer.usage.input_tokens == prompt_tokens
    assert answer.output_text == text


async def test_image_blocks_through_messages_in_a_turn_and_in_a_tool_result(
    vl: Daemon, tiny_vl_dir: Path
) -> None:
    picture = png(0)
    prompt_tokens, text = expected(tiny_vl_dir, picture)
    image = {
        "type": "image",
        "source": {
            "type": "base64",
            "media_type": "image/png",
            "data": base64.b64encode(picture).decode(),
        },
    }
    async with anthropic_client(vl) as client:
        answer = await client.messages.create(
            model="tiny-vl",
            max_tokens=TOKENS,
            extra_body={"temperature": 0},  # (this client's create() takes no temperature)
            messages=cast(
                Any, [{"role": "user", "content": [image, {"type": "text", "text": ASK}]}]
            ),
        )
        assert answer.usage.input_tokens == prompt_tokens
        assert "".join(b.text for b in answer.content if b.type == "text") == text

        # Claude Code's Read tool hands back a picture inside a tool_result.
        reading: Any = [
            {"role": "user", "content": "Look at shot.png."},
            {
                "role": "assistant",
                "content": [
                    {"type": "tool_use", "id": "t1", "name": "Read", "input": {"path": "shot.png"}}
                ],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [image]}],
            },
        ]
        looked = await client.messages.create(model="tiny-vl", max_tokens=TOKENS, messages=reading)
        without = await client.messages.count_tokens(
            model="tiny-vl",
            messages=[
                *reading[:2],
                {
                    "role": "user",
                    "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "x"}],
                },
            ],
        )
        usage = looked.usage  # (Anthropic's input_tokens leave out what the cache read)
        read = usage.input_tokens + (usage.cache_read_input_tokens or 0)
        read += usage.cache_creation_input_tokens or 0
        assert read >= without.input_tokens + 12  # the image's 12 tokens

        with pytest.raises(anthropic.BadRequestError) as caught:
            url = {"type": "image", "source": {"type": "url", "url": "https://example.com/a.png"}}
            await client.messages.create(
                model="tiny-vl",
                max_tokens=TOKENS,
                messages=cast(
                    Any, [{"role": "user", "content": [url, {"type": "text", "text": ASK}]}]
                ),
            )
        assert "fetches no image URLs unless its config lists their hosts" in caught.value.message


class Site(BaseHTTPRequestHandler):
    """A web server with a picture (``/shot.png``), a redirect to it on the
    same host (``/moved``) and on another (``/away``), a 404, a picture too
    large, and one that never comes (``/stall``, until the test ends)."""

    picture = png(5)
    released = threading.Event()

    def do_GET(self) -> None:
        port = self.headers["Host"].rpartition(":")[2]
        moves = {"/moved": "/shot.png", "/away": f"http://localhost:{port}/shot.png"}
        if self.path in moves:
            self.send_response(302)
            self.send_header("Location", moves[self.path])
            self.send_header("Content-Length", "0")
            self.end_headers()
        elif self.path in ("/shot.png", "/big.png"):
            body = self.picture if self.path == "/shot.png" else png(6, (400, 300))
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)
        elif self.path == "/stall":
            self.released.wait(60)
        else:
            self.send_error(404)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), Site)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        Site.released.set()
        server.shutdown()
        server.server_close()
        Site.released.clear()


async def test_image_urls_from_listed_hosts_are_fetched_within_limits(
    tiny_vl_dir: Path, tmp_path: Path, site: str
) -> None:
    _, text = expected(tiny_vl_dir, Site.picture)
    settings = settings_for(
        tmp_path,
        ModelConfig("tiny-vl", str(tiny_vl_dir)),
        image_url_hosts=("127.0.0.1",),
        image_url_timeout_s=3.0,  # the stall's bound; the other fetches take milliseconds
        max_image_bytes=len(Site.picture) + 1000,
    )
    async with running(settings) as daemon:
        async with daemon.client() as client:
            for path in ("/shot.png", "/moved"):
                answer = await ask(client, [user(f"{site}{path}")])
                assert answer.choices[0].message.content == text
            cases = [
                ("/away", "'localhost' is not one of them"),
                ("/missing", "its server answered 404"),
                ("/big.png", "(max_image_size)"),
                ("/stall", "was not fetched within 3 s (image_url_timeout)"),
            ]
            for path, says in cases:
                with pytest.raises(openai.BadRequestError) as caught:
                    await ask(client, [user(f"{site}{path}")])
                assert says in caught.value.message
        async with anthropic_client(daemon) as claude:
            url = {"type": "image", "source": {"type": "url", "url": f"{site}/shot.png"}}
            answer = await claude.messages.create(
                model="tiny-vl",
                max_tokens=TOKENS,
                extra_body={"temperature": 0, "ignore_eos": True},
                messages=cast(
                    Any, [{"role": "user", "content": [url, {"type": "text", "text": ASK}]}]
                ),
            )
            assert "".join(b.text for b in answer.content if b.type == "text") == text

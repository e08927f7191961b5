"""One client's bad request touches nobody else (the findings of the
hardening issue, each tried as a careless or hostile client would).

Where what the model computes plays no part, the model is a scripted one
(``tests/scripted.py``): its runner starts in a fifth of the CPU time."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
from pathlib import Path

import httpx
import trio

from config.settings import ModelConfig
from runner.client import RunnerProcess, RunnerSpec
from runner.protocol import Generate, Sampling
from tests.conftest import TLS, Daemon, running, settings_for
from tests.scripted import talking_model
from tests.waiting import eventually

CHAT = [{"role": "user", "content": "Say something."}]


async def test_poison_values_and_malformed_bodies_are_refused_and_the_stream_beside_completes(
    talker: Daemon,
) -> None:
    """Each check is tried directly in ``test_requests.py``; here the refusals
    come over HTTP while another client's stream runs, which completes."""
    url = f"{talker.url}/v1/chat/completions"
    async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 64, "temperature": 1.0}
        body |= {"stream": True, "ignore_eos": True}
        async with http.stream("POST", url, json=body) as stream:
            assert stream.status_code == 200
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break  # it is running
            for poison in ({"top_k": 10**9}, {"seed": -(2**64)}, {"messages": CHAT * 10_001}):
                bad = await http.post(
                    url, json={"model": "tiny", "messages": CHAT, "temperature": 1.0} | poison
                )
                assert bad.status_code == 400, bad.text
            for raw in RAW:
                bad = await http.post(
                    url, content=raw, headers={"Content-Type": "application/json"}
                )
                assert bad.status_code == 400, (raw[:40], bad.text)
                assert bad.json()["error"]["type"] == "invalid_request_error"
            rest = [line async for line in lines if line]
        assert rest[-1] == "data: [DONE]" and not any('"error"' in line for line in rest)
        for seed in (-1, 2**64 - 1, 7):  # as signed or unsigned 64-bit integers
            ok = await http.post(
                url, json={"model": "tiny", "messages": CHAT, "max_tokens": 4, "seed": seed}
            )
            assert ok.status_code == 200, ok.text
        huge = {"model": "tiny", "messages": CHAT, "max_tokens": 2, "keep_alive": 10**400}
        assert (await http.post(url, json=huge)).status_code == 200  # for ever, in effect


RAW = [
    b'{"model": "tiny", "messages": [{"role": "user", "content": "\\ud800"}]}',  # a lone surrogate
    b'{"model": "tiny", "x": ' + b"[" * 10_000 + b"]" * 10_000 + b"}",  # nested 10,000 deep
]


async def test_a_failed_step_fails_its_requests_and_the_runner_samples_on(
    nursery: trio.Nursery, tiny_dir: Path
) -> None:
    """Whatever still fails inside the runner (here a ``top_k`` past the
    vocabulary, sent without the API's checks) fails the requests of that
    step, and the runner goes on sampling for the next ones."""
    runner = await nursery.start(RunnerProcess(RunnerSpec("tiny", tiny_dir, 4)).run)

    async def outcome(sampling: Sampling) -> str:
        async with runner.generate(Generate([1, 2, 3], 4, sampling)) as chunks:
            async for chunk in chunks:
                if chunk.error is not None:
                    return "error"
                if chunk.finish:
                    return "ok"
        return "unfinished"

    assert await outcome(Sampling(temperature=1.0, top_k=10**9)) == "error"
    assert await outcome(Sampling(temperature=1.0)) == "ok"
    assert await outcome(Sampling(temperature=1.0, seed=3)) == "ok"
    runner.stop()


async def test_ps_answers_while_a_runner_is_frozen_and_the_runner_serves_after(
    talker: Daemon,
) -> None:
    async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
        chat = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
        assert (await http.post(f"{talker.url}/v1/chat/completions", json=chat)).status_code == 200
        (entry,) = (await http.get(f"{talker.url}/api/ps")).json()["models"]
        os.kill(entry["pid"], signal.SIGSTOP)  # as busy as a runner gets
        try:
            for _ in range(3):  # however often asked, and whoever gives up
                with trio.move_on_after(0.01):
                    await http.get(f"{talker.url}/api/ps")
                ps = await http.get(f"{talker.url}/api/ps", timeout=10)
                assert ps.status_code == 200
                assert ps.json()["models"][0]["state"] == "ready"
        finally:
            os.kill(entry["pid"], signal.SIGCONT)
        assert (await http.post(f"{talker.url}/v1/chat/completions", json=chat)).status_code == 200


async def test_a_stats_waiter_that_gives_up_leaves_the_runner_alone(
    nursery: trio.Nursery, tiny_dir: Path, tmp_path: Path
) -> None:
    spec = RunnerSpec("tiny", talking_model(tiny_dir, tmp_path / "talker"), 4)
    runner = await nursery.start(RunnerProcess(spec).run)
    with trio.move_on_after(0):  # gone before the runner can answer
        await runner.stats()
    assert (await runner.stats()).active == 0  # the late answer went nowhere
    async with runner.generate(Generate([1, 2, 3], 4, Sampling(temperature=0.0))) as chunks:
        async for chunk in chunks:
            assert chunk.error is None
            if chunk.finish:
                break
    assert chunk.finish == "length"
    runner.stop()


async def test_a_model_with_corrupt_weights_fails_clearly_and_the_others_serve(
    tiny_dir: Path, tmp_path: Path
) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(tiny_dir, broken)
    (weights,) = broken.glob("*.safetensors")
    with weights.open("r+b") as f:
        f.write(b"\xff" * 6)  # a header "length" of 281 TB
    tiny = talking_model(tiny_dir, tmp_path / "talker")
    settings = settings_for(
        tmp_path, ModelConfig("broken", str(broken)), ModelConfig("tiny", str(tiny))
    )
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"
        bad = await http.post(url, json={"model": "broken", "messages": CHAT, "max_tokens": 2})
        assert bad.status_code == 500 and bad.json()["error"]["code"] == "model_load_failed"
        assert "not a safetensors file" in bad.json()["error"]["message"]
        ok = await http.post(url, json={"model": "tiny", "messages": CHAT, "max_tokens": 2})
        assert ok.status_code == 200


async def test_a_client_that_stops_reading_loses_its_slot_and_the_next_is_served(
    tiny_dir: Path, tmp_path: Path
) -> None:
    model = ModelConfig("tiny", str(_long(tiny_dir, tmp_path)), max_concurrency=1)
    settings = settings_for(tmp_path, model, send_timeout_s=1.0)
    async with running(settings) as daemon:
        body = json.dumps(
            {"model": "tiny", "messages": CHAT, "max_tokens": 12_000, "ignore_eos": True}
            | {"stream": True, "logprobs": True, "top_logprobs": 20}  # ~2 KB an event
        ).encode()
        stalled = trio.socket.socket()
        stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        await stalled.connect(("127.0.0.1", settings.port))
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await stalled.send(head.encode() + body)  # ...and then reads nothing
        try:
            async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
                await _wait_for(http, daemon.url, "running", 1)
                chat = {"model": "tiny", "messages": CHAT, "max_tokens": 2}
                after = await http.post(f"{daemon.url}/v1/chat/completions", json=chat)
                assert after.status_code == 200, after.text
                metrics = (await http.get(f"{daemon.url}/metrics")).text
            assert 'status="499"' in metrics
        finally:
            stalled.close()


async def test_a_body_that_never_arrives_gets_a_408_and_connections_asked_closed_close(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A client that sends half a body and then nothing is told, and let go:
    its connection does not linger after the 408."""
    settings = settings_for(tmp_path, ModelConfig("tiny", str(tiny_dir)), send_timeout_s=1.0)
    async with running(settings):
        slow = trio.socket.socket()
        await slow.connect(("127.0.0.1", settings.port))
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n"
        )
        await slow.send(head.encode() + b'{"model": ')  # ...and then nothing
        got = await _until_closed(slow)
        # A client asking to close after one request is answered and let go too.
        once = trio.socket.socket()
        await once.connect(("127.0.0.1", settings.port))
        await once.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        health = await _until_closed(once)
    assert got.startswith(b"HTTP/1.1 408")
    assert b'"type": "invalid_request_error"' in got
    assert health.startswith(b"HTTP/1.1 200") and b'"ok"' in health


async def test_a_client_that_half_closes_is_taken_for_gone_and_frees_its_slot(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """Shutting the write side after a request is how a client that quits
    looks too: its request is cancelled at once and counted as a 499, so a
    client cannot hold a slot for an answer nobody may read."""
    model = ModelConfig("tiny", str(_long(tiny_dir, tmp_path)), max_concurrency=1)
    settings = settings_for(tmp_path, model)
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        body = json.dumps(
            {"model": "tiny", "messages": CHAT, "max_tokens": 12_000, "ignore_eos": True}
        ).encode()
        quitter = trio.socket.socket()
        await quitter.connect(("127.0.0.1", settings.port))
        head = (
            "POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
        )
        await quitter.send(head.encode() + body)
        await _wait_for(http, daemon.url, "running", 1)
        quitter.shutdown(socket.SHUT_WR)
        await _wait_for(http, daemon.url, "running", 0)
        quitter.close()
        metrics = (await http.get(f"{daemon.url}/metrics")).text
    done = 'client="other",endpoint="/v1/chat/completions",model="tiny",status="499"}'
    assert f"{done} 1.0" in metrics
    (generated,) = [
        float(line.split()[-1])
        for line in metrics.splitlines()
        if line.startswith('mlxd_generation_tokens_total{client="other",model="tiny"}')
    ]
    assert generated < 12_000  # cancelled, not made whole for nobody


async def _until_closed(sock: trio.socket.SocketType) -> bytes:
    """All a socket receives until the server closes it (within 30 s: the
    keep-alive timeout would take longer, and a lingering one never ends)."""
    got = b""
    with trio.fail_after(30):
        while chunk := await sock.recv(65536):
            got += chunk
    sock.close()
    return got


def _long(tiny_dir: Path, tmp_path: Path) -> Path:
    """The tiny model, with room for thousands of tokens."""
    long = tmp_path / "long"
    shutil.copytree(tiny_dir, long)
    config = json.loads((long / "config.json").read_text())
    (long / "config.json").write_text(json.dumps(config | {"max_position_embeddings": 16384}))
    return long


async def _wait_for(http: httpx.AsyncClient, url: str, what: str, n: int) -> None:
    async def count() -> bool:
        return bool((await http.get(f"{url}/api/ps")).json()["models"][0][what] == n)

    await eventually(count, what=f"{n} {what}")


async def test_a_frozen_runner_is_killed_its_stream_fails_and_the_model_serves_again(
    tiny_dir: Path, tmp_path: Path
) -> None:
    paced = talking_model(tiny_dir, tmp_path / "talker", step_s=0.01)  # 400 tokens: 4 s
    settings = settings_for(tmp_path, ModelConfig("tiny", str(paced)), runner_timeout_s=2.0)
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 400, "ignore_eos": True}
        async with http.stream("POST", url, json=body | {"stream": True}) as stream:
            lines = stream.aiter_lines()
            async for line in lines:
                if line.startswith("data: {"):
                    break
            (entry,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
            os.kill(entry["pid"], signal.SIGSTOP)  # hung: neither dead nor answering
            with trio.fail_after(60):
                rest = [line async for line in lines if line]
        assert "stopped responding" in rest[-1], rest[-3:]
        again = await http.post(url, json=body | {"max_tokens": 2})
        assert again.status_code == 200, again.text
        metrics = (await http.get(f"{daemon.url}/metrics")).text
        assert 'endpoint="/v1/chat/completions",model="tiny",status="502"} 1.0' in metrics


async def test_a_runner_busy_with_a_long_step_is_not_taken_for_frozen(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A step longer than ``runner_timeout`` (a long prefill on a loaded CPU, a
    big embedding batch): the runner answers its pings while it computes, so
    it is left to finish, and its answer comes."""
    slow = talking_model(tiny_dir, tmp_path / "talker", step_s=3.0)  # each step: 3 s
    settings = settings_for(tmp_path, ModelConfig("tiny", str(slow)), runner_timeout_s=2.0)
    async with running(settings) as daemon, httpx.AsyncClient(timeout=120, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"
        body = {"model": "tiny", "messages": CHAT, "max_tokens": 3, "ignore_eos": True}
        answer = await http.post(url, json=body)
        assert answer.status_code == 200, answer.text  # 9 s of steps, under a 2 s timeout
        assert (await http.get(f"{daemon.url}/health")).json()["status"] == "ok"


async def test_a_request_whose_client_left_while_queued_is_logged_and_counted(
    tiny_dir: Path, tmp_path: Path
) -> None:
    paced = talking_model(tiny_dir, tmp_path / "talker", step_s=0.01, context=16384)  # 20 s
    model = ModelConfig("tiny", str(paced), max_concurrency=1)
    async with running(settings_for(tmp_path, model)) as daemon:
        async with httpx.AsyncClient(timeout=120, verify=TLS) as http:
            url = f"{daemon.url}/v1/chat/completions"
            body = {"model": "tiny", "messages": CHAT, "max_tokens": 4}
            hog = body | {"stream": True, "max_tokens": 12_000, "ignore_eos": True}
            async with http.stream("POST", url, json=hog), trio.open_nursery() as nursery:
                await _wait_for(http, daemon.url, "running", 1)  # the one slot is taken
                cancel = trio.CancelScope()

                async def queued() -> None:
                    with cancel:
                        await http.post(url, json=body)

                nursery.start_soon(queued)
                await _wait_for(http, daemon.url, "queued", 1)
                cancel.cancel()  # the client gives up while it waits

                async def counted() -> bool:  # while the hog still runs
                    return 'status="499"} 1.0' in (await http.get(f"{daemon.url}/metrics")).text

                await eventually(counted, what="the request that left counted as 499")

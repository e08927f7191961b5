"""Clients sharing one model: who they are, at what priority, and who goes
next (``api/clients.py``, ``scheduler/order.py``), through a real daemon."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path

import httpx
import pytest
import trio

from config.settings import ClientConfig, ConfigError, ModelConfig, Settings
from tests.conftest import TLS, Daemon, running, settings_for
from tests.scripted import talking_model
from tests.waiting import eventually

CLIENTS = (
    ClientConfig("indexer", priority="background"),
    ClientConfig("editor", priority="interactive"),
    ClientConfig("agent", key="sk-agent", weight=2.0),
)


def chat(tokens: int = 4) -> dict[str, object]:
    return {
        "model": "slow",
        "messages": [{"role": "user", "content": "Hi"}],
        "max_tokens": tokens,
        "ignore_eos": True,
    }


async def pool(http: httpx.AsyncClient, daemon: Daemon) -> dict[str, int]:
    (m,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
    return {"running": m["running"], "queued": m["queued"]}


async def test_an_interactive_request_passes_a_background_backlog(
    tiny_dir: Path, tmp_path: Path
) -> None:
    slow = talking_model(tiny_dir, tmp_path / "slow", step_s=0.1)  # 10 tokens a second
    model = ModelConfig("slow", str(slow), max_concurrency=1)
    settings = settings_for(tmp_path, model, clients=CLIENTS[:2])  # no keys: named by header
    finished: list[str] = []
    async with running(settings) as daemon, httpx.AsyncClient(timeout=60, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"

        async def ask(name: str, headers: dict[str, str], tokens: int = 2) -> None:
            reply = await http.post(url, json=chat(tokens), headers=headers)
            assert reply.status_code == 200, reply.text
            finished.append(name)

        async with trio.open_nursery() as nursery:
            indexer = {"X-Mlxd-Client": "indexer"}
            nursery.start_soon(ask, "indexer 1", indexer, 60)  # runs 6 s: the rest queue
            await eventually(partial(_is, http, daemon, 1, 0), what="the first one running")
            for i in (2, 3):
                nursery.start_soon(ask, f"indexer {i}", indexer)
                await eventually(partial(_is, http, daemon, 1, i - 1), what=f"{i - 1} queued")
            (m,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
            assert m["clients"] == [
                {
                    "client": "indexer",
                    "priority": "background",
                    "running": 1,
                    "queued": 2,
                    "paused": 0,
                }
            ]
            nursery.start_soon(ask, "editor", {"X-Mlxd-Client": "editor"})
        metrics = (await http.get(f"{daemon.url}/metrics")).text
    # The one running pauses for the editor, and goes on first when it is done.
    assert finished == ["editor", "indexer 1", "indexer 2", "indexer 3"]
    done = 'endpoint="/v1/chat/completions",model="slow",status="200"}'
    assert f'mlxd_requests_total{{client="indexer",{done} 3.0' in metrics
    assert f'mlxd_requests_total{{client="editor",{done} 1.0' in metrics
    assert 'mlxd_generation_tokens_total{client="other",model="slow"} 0.0' in metrics


async def test_a_flood_of_background_requests_does_not_hold_up_the_editor(
    tiny_dir: Path, tmp_path: Path
) -> None:
    """A background client queues 40 long requests on a model that runs two
    at a time; a second background client that comes later is served beside
    it, not after its backlog; the editor's requests start at once, the
    backlog still queued, each pausing a background sequence. (Once the
    second client is served, the rest of the flood is called off.)"""
    slow = talking_model(tiny_dir, tmp_path / "slow", step_s=0.05)
    model = ModelConfig("slow", str(slow), max_concurrency=2, queue_limit=64)
    clients = (*CLIENTS[:2], ClientConfig("eval", priority="background"))
    settings = settings_for(tmp_path, model, clients=clients)
    finished: list[str] = []
    async with running(settings) as daemon, httpx.AsyncClient(timeout=300, verify=TLS) as http:
        url = f"{daemon.url}/v1/chat/completions"

        async def ask(name: str, client: str, tokens: int) -> None:
            reply = await http.post(url, json=chat(tokens), headers={"X-Mlxd-Client": client})
            assert reply.status_code == 200, reply.text
            finished.append(name)

        async def queued() -> int:
            (m,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
            return int(m["queued"])

        async def idle() -> bool:
            (m,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
            return bool(m["running"] == m["queued"] == 0)

        async with trio.open_nursery() as nursery:
            for i in range(40):  # 10 s each at least: the backlog outlasts the test
                nursery.start_soon(ask, f"indexer {i}", "indexer", 200)
            await eventually(partial(_at_least, queued, 38), what="the flood queued")
            nursery.start_soon(ask, "eval", "eval", 16)
            for i in range(3):
                await ask(f"editor {i}", "editor", 2)
                assert await queued() >= 25  # at once: the backlog is still there
            await eventually(lambda: "eval" in finished, what="the second client served")
            nursery.cancel_scope.cancel()  # the rest of the flood's clients leave
        assert finished[:3] == ["editor 0", "editor 1", "editor 2"]
        assert finished.index("eval") < 10  # beside the indexer, not after its 40
        await eventually(idle, what="the flood's requests gone with their clients")


async def _at_least(count: Callable[[], Awaitable[int]], n: int) -> bool:
    return await count() >= n


async def _is(http: httpx.AsyncClient, daemon: Daemon, running: int, queued: int) -> bool:
    return await pool(http, daemon) == {"running": running, "queued": queued}


SHARED = {"Authorization": "Bearer sk-shared"}  # an api_keys key, no client's
AGENT = {"Authorization": "Bearer sk-agent"}  # the agent client's


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        (SHARED | {"X-Mlxd-Client": "stranger"}, "no client 'stranger' is configured"),
        (SHARED | {"X-Mlxd-Client": "agent"}, "is known by its key"),
        (AGENT | {"X-Mlxd-Client": "editor"}, "this API key belongs to client 'agent'"),
        (SHARED | {"X-Mlxd-Client": "editor", "X-Mlxd-Priority": "urgent"}, "expected one of"),
    ],
    ids=["unknown", "keyed by name", "another's key", "bad priority"],
)
async def test_unknown_clients_and_priorities_are_a_clear_400(
    tiny_dir: Path, tmp_path: Path, headers: dict[str, str], says: str
) -> None:
    model = ModelConfig("slow", str(talking_model(tiny_dir, tmp_path / "t")))
    settings = settings_for(tmp_path, model, clients=CLIENTS, api_keys=("sk-shared",))
    async with running(settings) as daemon, httpx.AsyncClient(timeout=60, verify=TLS) as http:
        reply = await http.post(f"{daemon.url}/v1/chat/completions", json=chat(), headers=headers)
        assert reply.status_code == 400
        assert says in reply.json()["error"]["message"]
        ok = await http.post(
            f"{daemon.url}/v1/chat/completions",
            json=chat(),
            headers=AGENT | {"X-Mlxd-Priority": "background"},
        )
        assert ok.status_code == 200, ok.text  # a client's own key, lowering its priority


async def test_an_interactive_request_pauses_a_background_stream_which_then_says_the_same(
    long_context: Path, tmp_path: Path
) -> None:
    """One slot: a background client's long answer is running when the
    editor asks. The background sequence pauses at its next token, the
    editor's request runs, and the background one goes on from where it was:
    greedy, the same text as when nothing came between."""
    model = ModelConfig("slow", str(long_context), max_concurrency=1)
    settings = settings_for(tmp_path, model, clients=CLIENTS[:2])
    long = {
        "model": "slow",
        "prompt": "Once upon a time",
        "max_tokens": 1500,
        "temperature": 0,
        "ignore_eos": True,
        "logprobs": 0,
    }
    async with running(settings) as daemon, httpx.AsyncClient(timeout=300, verify=TLS) as http:
        url = f"{daemon.url}/v1/completions"

        async def background() -> list[str]:
            reply = await http.post(url, json=long, headers={"X-Mlxd-Client": "indexer"})
            assert reply.status_code == 200, reply.text
            return list(reply.json()["choices"][0]["logprobs"]["tokens"])

        alone = await background()
        order: list[str] = []
        paused: list[list[str]] = []

        async def indexer() -> None:
            paused.append(await background())
            order.append("indexer")

        async def editor() -> None:
            reply = await http.post(
                url,
                json={"model": "slow", "prompt": "Hi", "max_tokens": 400, "ignore_eos": True},
                headers={"X-Mlxd-Client": "editor"},
            )
            assert reply.status_code == 200, reply.text
            order.append("editor")

        async def indexer_paused() -> bool:
            (m,) = (await http.get(f"{daemon.url}/api/ps")).json()["models"]
            return any(c["client"] == "indexer" and c["paused"] == 1 for c in m["clients"])

        async with trio.open_nursery() as nursery:
            nursery.start_soon(indexer)
            await eventually(partial(_is, http, daemon, 1, 0), what="the indexer running")
            nursery.start_soon(editor)
            await eventually(indexer_paused, what="/api/ps to show the indexer paused")
        (latest, *_) = (await http.get(f"{daemon.url}/api/activity")).json()["latest"]
    assert order == ["editor", "indexer"]
    assert paused == [alone]
    assert latest["client"] == "indexer" and latest["pauses"] >= 1, latest


def test_clients_in_the_config(tmp_path: Path) -> None:
    path = tmp_path / "mlxd.toml"
    path.write_text(
        'background_max_wait = "1m"\n'
        '[[clients]]\nname = "indexer"\npriority = "background"\n'
        '[[clients]]\nname = "agent"\nkey = "sk-a"\nweight = 2\n'
    )
    s = Settings.from_toml(path)
    assert s.clients == (
        ClientConfig("indexer", priority="background"),
        ClientConfig("agent", key="sk-a", weight=2),
    )
    assert s.background_max_wait_s == 60
    assert "indexer (background, weight 1)" in s.describe()
    for bad, says in [
        ('[[clients]]\nname = "x"\npriority = "urgent"\n', "interactive, normal or background"),
        ('[[clients]]\nname = "x"\n[[clients]]\nname = "x"\n', "same name"),
        ('[[clients]]\nname = "x"\nweight = 0\n', "a number > 0"),
    ]:
        path.write_text(bad)
        with pytest.raises(ConfigError, match=says):
            Settings.from_toml(path)

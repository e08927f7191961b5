"""OpenAI's Conversations API, through the official client and through
openai-agents' OpenAIConversationsSession (which runs on asyncio: here in a
thread of its own)."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

from config.settings import ModelConfig
from tests.conftest import TLS, Daemon, serving, settings_for
from tests.scripted import scripted_model

HI: Any = {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "Hi."}]}


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Daemon]:
    work = tmp_path_factory.mktemp("conversations")
    model = scripted_model(tiny_dir, work / "greeter", "Hello there.")
    keys = ("k1", "k2")
    with serving(settings_for(work, ModelConfig("greeter", str(model)), api_keys=keys)) as d:
        yield d


async def test_a_conversation_is_continued_and_grown_by_responses(daemon: Daemon) -> None:
    async with daemon.client(key="k1") as c:
        conv = await c.conversations.create(items=[HI], metadata={"topic": "greeting"})
        assert conv.id.startswith("conv_") and conv.metadata == {"topic": "greeting"}
        first = await c.responses.create(model="greeter", conversation=conv.id, input="And you?")
        assert first.conversation is not None and first.conversation.id == conv.id
        second = await c.responses.create(
            model="greeter", conversation={"id": conv.id}, input="Bye."
        )
        assert first.usage is not None and second.usage is not None
        assert second.usage.input_tokens > first.usage.input_tokens  # the first turn came first

        items: list[Any] = [i async for i in c.conversations.items.list(conv.id, order="asc")]
        texts = [item.content[0].text for item in items]
        assert texts == ["Hi.", "And you?", "Hello there.", "Bye.", "Hello there."]
        newest = await c.conversations.items.list(conv.id, limit=2)
        assert [i.id for i in newest.data] == [items[-1].id, items[-2].id] and newest.has_more

        assert (await c.conversations.items.retrieve(items[0].id, conversation_id=conv.id)).id
        await c.conversations.items.delete(items[0].id, conversation_id=conv.id)
        left = [i.id async for i in c.conversations.items.list(conv.id, order="asc")]
        assert left == [i.id for i in items[1:]]

        added = await c.conversations.items.create(conv.id, items=[HI])
        assert len(added.data) == 1 and added.data[0].id
        updated = await c.conversations.update(conv.id, metadata={"topic": "farewell"})
        assert updated.metadata == {"topic": "farewell"}

        with pytest.raises(openai.BadRequestError):  # one or the other
            await c.responses.create(
                model="greeter", conversation=conv.id, previous_response_id=first.id, input="x"
            )
        with pytest.raises(openai.BadRequestError):
            nonsense: list[Any] = [{"type": "nonsense"}]
            await c.conversations.items.create(conv.id, items=nonsense)

        async with daemon.client(key="k2") as other:  # another key sees nothing of it
            with pytest.raises(openai.NotFoundError):
                await other.conversations.retrieve(conv.id)
            with pytest.raises(openai.NotFoundError):
                await other.responses.create(model="greeter", conversation=conv.id, input="x")

        deleted = await c.conversations.delete(conv.id)
        assert deleted.deleted
        with pytest.raises(openai.NotFoundError):
            await c.conversations.retrieve(conv.id)


def test_openai_agents_keeps_its_session_in_a_conversation(daemon: Daemon) -> None:
    from agents import OpenAIConversationsSession

    async def session_round() -> tuple[list[Any], Any, list[Any], list[Any]]:
        http = openai.DefaultAsyncHttpxClient(verify=TLS)
        sdk = openai.AsyncOpenAI(
            base_url=f"{daemon.url}/v1", api_key="k1", max_retries=0, timeout=60, http_client=http
        )
        async with sdk:
            session = OpenAIConversationsSession(openai_client=sdk)
            said: list[Any] = [HI, {"role": "assistant", "content": "Hi."}]
            said.append({"role": "user", "content": "Ok"})
            await session.add_items(said)
            items = await session.get_items()
            popped = await session.pop_item()
            after = await session.get_items()
            await session.clear_session()
            cleared = await session.get_items()  # a fresh conversation
        return items, popped, after, cleared

    items, popped, after, cleared = asyncio.run(session_round())
    assert [i["role"] for i in items] == ["user", "assistant", "user"]
    assert popped is not None and popped["content"][0]["text"] == "Ok"
    assert len(after) == 2 and cleared == []

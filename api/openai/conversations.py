"""OpenAI's Conversations API (``/v1/conversations``): conversations and
their items, on the store and key rules of stored responses
(``api/openai/store.py``). A Responses request that names a conversation continues
it and adds to it (``api/openai/turns.py``); openai-agents'
``OpenAIConversationsSession`` keeps an agent's history here."""

from __future__ import annotations

from typing import Any

from quart import Blueprint, g, request

from api.http import json_body
from api.openai.pages import listing, page
from api.openai.responses import check_items
from api.openai.store import ResponseStore
from api.openai.turns import items_with_ids
from api.schemas import json_object
from scheduler.errors import InvalidRequest, ResponseNotFound

MAX_METADATA = 16  # key-value pairs, as OpenAI's API allows


def blueprint(store: ResponseStore) -> Blueprint:
    bp = Blueprint("conversations", __name__)

    @bp.post("/v1/conversations")
    async def create() -> dict[str, Any]:
        body = json_object(await json_body())
        items = _items(body.get("items") or [])
        return store.create_conversation(g.owner, items, _metadata(body.get("metadata"))).card

    @bp.get("/v1/conversations/<conversation_id>")
    async def get(conversation_id: str) -> dict[str, Any]:
        return store.conversation(g.owner, conversation_id).card

    @bp.post("/v1/conversations/<conversation_id>")
    async def update(conversation_id: str) -> dict[str, Any]:
        body = json_object(await json_body())
        metadata = _metadata(body.get("metadata"))
        return store.update_conversation(g.owner, conversation_id, metadata=metadata).card

    @bp.delete("/v1/conversations/<conversation_id>")
    async def delete(conversation_id: str) -> dict[str, Any]:
        store.delete_conversation(g.owner, conversation_id)
        return {"id": conversation_id, "object": "conversation.deleted", "deleted": True}

    @bp.get("/v1/conversations/<conversation_id>/items")
    async def list_items(conversation_id: str) -> dict[str, Any]:
        return page(store.conversation(g.owner, conversation_id).items, request.args)

    @bp.post("/v1/conversations/<conversation_id>/items")
    async def add_items(conversation_id: str) -> dict[str, Any]:
        body = json_object(await json_body())
        items = _items(body.get("items"))
        store.update_conversation(g.owner, conversation_id, more=items)
        return listing(items)

    @bp.get("/v1/conversations/<conversation_id>/items/<item_id>")
    async def get_item(conversation_id: str, item_id: str) -> dict[str, Any]:
        for item in store.conversation(g.owner, conversation_id).items:
            if item.get("id") == item_id:
                return item
        raise ResponseNotFound(f"no item with id {item_id!r} in {conversation_id!r}")

    @bp.delete("/v1/conversations/<conversation_id>/items/<item_id>")
    async def delete_item(conversation_id: str, item_id: str) -> dict[str, Any]:
        return store.update_conversation(g.owner, conversation_id, without=item_id).card

    def _items(raw: Any) -> list[dict[str, Any]]:
        items = items_with_ids(raw, store, g.owner)
        if items:
            check_items(items)
        return items

    return bp


def _metadata(raw: Any) -> dict[str, Any]:
    """Up to 16 string pairs (keys up to 64 characters, values up to 512)."""
    if raw is None:
        return {}
    if (
        not isinstance(raw, dict)
        or len(raw) > MAX_METADATA
        or not all(
            isinstance(k, str) and isinstance(v, str) and len(k) <= 64 and len(v) <= 512
            for k, v in raw.items()
        )
    ):
        raise InvalidRequest(
            f"'metadata' must map at most {MAX_METADATA} keys (up to 64 characters) to strings "
            "(up to 512)",
            param="metadata",
        )
    return raw

"""What a Responses request continues, and what it leaves in the store.

A request may continue a stored response (``previous_response_id``: its
whole chain comes first, as OpenAI's API does; instructions and tools are
the new request's own), or a conversation (``conversation``: its items come
first, and the request's input and output are added to it when it is
answered), and may refer to stored items by id (``item_reference``). All are
resolved here, before the model is touched, so an unknown or evicted id is a
404 that costs nothing. The request's own input becomes items with ids, as
the store keeps them and ``GET /v1/responses/{id}/input_items`` lists them.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import attrs

from api.openai.store import ResponseStore
from scheduler.errors import InvalidRequest, ResponseNotFound

log = logging.getLogger("mlxd.store")

MAX_ADDED = 20  # items one request may add to a conversation, as OpenAI's API allows
_PREFIXES = {
    "message": "msg",
    "function_call": "fc",
    "function_call_output": "fco",
    "custom_tool_call": "ctc",
    "custom_tool_call_output": "ctco",
    "reasoning": "rs",
}


@attrs.frozen
class Turn:
    """One Responses request's place in its conversation."""

    items: Any  # its own input as items with ids (as given if not a list: refused later)
    context: list[dict[str, Any]]  # what it continues (oldest first)
    previous: str | None
    store: bool  # whether the response is kept
    conversation: str | None = None  # the conversation it adds to

    @classmethod
    def read(cls, body: Mapping[str, Any], store: ResponseStore, owner: str) -> Turn:
        keep = body.get("store", True)
        if not isinstance(keep, bool):
            raise InvalidRequest("'store' must be true or false", param="store")
        previous = body.get("previous_response_id")
        if previous is not None and not isinstance(previous, str):
            raise InvalidRequest("'previous_response_id' must be a string", "previous_response_id")
        conversation = conversation_id(body.get("conversation"))
        if conversation is not None and previous is not None:
            raise InvalidRequest(
                "'conversation' and 'previous_response_id' cannot both be given", "conversation"
            )
        context = store.chain(owner, previous) if previous else []
        if conversation is not None:
            context = list(store.conversation(owner, conversation, "conversation").items)
        raw = body.get("input")
        if isinstance(raw, str):
            raw = [{"type": "message", "role": "user", "content": raw}]
        items = raw
        if isinstance(raw, list):
            items = [_resolved(item, store, owner) for item in raw]
        return cls(items, context, previous, keep, conversation)

    def keeper(self, store: ResponseStore, owner: str) -> Callable[[dict[str, Any]], None] | None:
        """What keeps the finished response, and adds it to its conversation
        (None if there is nothing to keep)."""
        if not self.store and self.conversation is None:
            return None

        def keep(response: dict[str, Any]) -> None:
            if self.store:
                store.put(owner, response, self.items, self.previous)
            if self.conversation is not None:
                more = [*self.items, *response.get("output", ())]
                try:
                    store.update_conversation(owner, self.conversation, more=more)
                except ResponseNotFound:  # deleted while the answer was made
                    log.info("conversation %s is gone; the answer is not added", self.conversation)

        return keep


def conversation_id(value: Any) -> str | None:
    """A ``conversation`` field: an id, or an object with one."""
    if isinstance(value, dict):
        value = value.get("id")
    if value is not None and not isinstance(value, str):
        raise InvalidRequest("'conversation' must be a conversation id", param="conversation")
    return value


def items_with_ids(raw: Any, store: ResponseStore, owner: str) -> list[dict[str, Any]]:
    """Items as a conversation keeps them (``POST /v1/conversations``, its items)."""
    if not isinstance(raw, list) or not all(isinstance(i, dict) for i in raw):
        raise InvalidRequest("'items' must be a list of items", param="items")
    if len(raw) > MAX_ADDED:
        raise InvalidRequest(f"'items' may hold at most {MAX_ADDED} at a time", param="items")
    return [_resolved(item, store, owner) for item in raw]


def _resolved(item: Any, store: ResponseStore, owner: str) -> Any:
    """An input item as the store keeps it: a reference replaced by the item
    it names, a message's text as content parts, and an id."""
    if not isinstance(item, dict):
        return item  # refused by the input check, with its index
    kind = item.get("type", "message")
    if not isinstance(kind, str):
        raise InvalidRequest(f"an input item's 'type' must be a string, got {kind!r}", "input")
    if kind == "item_reference":
        if not isinstance(item.get("id"), str):
            raise InvalidRequest("an item_reference needs an 'id'", param="input")
        return store.item(owner, item["id"])
    item = {"type": kind, **item}
    if kind == "message" and isinstance(item.get("content"), str):
        part = "output_text" if item.get("role") == "assistant" else "input_text"
        item["content"] = [{"type": part, "text": item["content"]}]
    if kind == "message":
        item.setdefault("status", "completed")
    if not isinstance(item.get("id"), str):
        item["id"] = f"{_PREFIXES.get(kind, 'item')}_{uuid.uuid4().hex}"
    return item

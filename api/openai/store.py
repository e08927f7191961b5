"""Stored responses and conversations: what ``previous_response_id``,
``item_reference``, ``conversation``, ``/v1/responses/{id}`` and
``/v1/conversations`` read.

A response made with ``store`` (the default, as OpenAI's) is kept with its
request's input items and its output items, in a store bounded by entries
and bytes: the least recently used go first. A follow-up names the response
it continues, and its conversation is that chain (``chain``), walked back to
its start; reading a chain touches every response in it, so a live
conversation's early turns are the last to go. A response whose chain was cut
by eviction answers as not found, never with part of its context.

A conversation (OpenAI's Conversations API) is a list of items kept under
its own id: made with up to 20, grown by the requests that name it in
``conversation`` (their input and output) or by adding items, and read a
page at a time. Conversations are bounded apart from responses, by the same
numbers of entries and bytes, least recently used first.

Each response and conversation belongs to the API key that made it (a hash
of it: requests without keys share one owner); another key cannot see it,
which answers as not found too. With a ``path``, the store is written there
(``save``, at shutdown) and read back when the daemon starts.
"""

from __future__ import annotations

import collections
import hashlib
import json
import logging
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import attrs
import trio

from api.openai.journal import Journal
from scheduler.errors import ResponseNotFound

log = logging.getLogger("mlxd.store")

SYNC_S = 1.0  # the journal is on the disk within this of a change
COMPACT_MIN_BYTES = 1 << 20  # a journal smaller than this is never compacted


def owner_of(api_key: str | None) -> str:
    """Who owns what a request stores: a digest of its key (never the key)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:24] if api_key else ""


@attrs.define
class Entry:
    owner: str
    response: dict[str, Any]  # the response object, as the client got it
    input_items: list[dict[str, Any]]  # its request's input, as items with ids
    previous: str | None  # the response it continued
    nbytes: int = 0

    def __attrs_post_init__(self) -> None:
        self.nbytes = len(json.dumps([self.response, self.input_items]))

    @property
    def items(self) -> Iterator[dict[str, Any]]:
        """Its input and output items, in conversation order."""
        yield from self.input_items
        yield from self.response.get("output", ())


@attrs.define
class Conversation:
    owner: str
    id: str
    created_at: int
    metadata: dict[str, Any]
    items: list[dict[str, Any]]  # oldest first, each with an id
    nbytes: int = 0

    def __attrs_post_init__(self) -> None:
        self.measure()

    def measure(self) -> None:
        self.nbytes = len(json.dumps([self.metadata, self.items]))

    @property
    def card(self) -> dict[str, Any]:
        """The conversation object, as the API answers with it."""
        return {
            "id": self.id,
            "object": "conversation",
            "created_at": self.created_at,
            "metadata": self.metadata,
        }


class ResponseStore:
    def __init__(self, max_entries: int, max_bytes: int, path: Path | None = None) -> None:
        self.max_entries, self.max_bytes, self.path = max_entries, max_bytes, path
        self.journal = Journal(path) if path is not None else None
        self._replaying = False  # reading the journal back: nothing to write
        self._entries: collections.OrderedDict[str, Entry] = collections.OrderedDict()
        # (owner, item id) -> the response that holds it: ids are the client's
        # to choose, so one key's may be another's too
        self._items: dict[tuple[str, str], str] = {}
        self.nbytes = 0
        self._conversations: collections.OrderedDict[str, Conversation] = collections.OrderedDict()
        self.conversation_bytes = 0

    def __len__(self) -> int:
        return len(self._entries)

    def put(
        self,
        owner: str,
        response: dict[str, Any],
        input_items: list[dict[str, Any]],
        previous: str | None = None,
    ) -> None:
        """Keep ``response`` (its ``id`` is the key), evicting the least
        recently used beyond the bounds. One larger than the whole byte
        bound is not kept."""
        entry = Entry(owner, response, input_items, previous)
        if entry.nbytes > self.max_bytes or self.max_entries <= 0:
            log.warning(
                "response %s (%d bytes) is too large to store", response["id"], entry.nbytes
            )
            return
        self._log(
            {"op": "put", "owner": owner, "response": response, "input": input_items}
            | {"previous": previous}
        )
        self._drop(response["id"])
        self._entries[response["id"]] = entry
        self.nbytes += entry.nbytes
        for item in entry.items:
            if isinstance(item.get("id"), str):
                self._items[owner, item["id"]] = response["id"]
        while len(self._entries) > self.max_entries or self.nbytes > self.max_bytes:
            self._drop(next(iter(self._entries)))

    def get(self, owner: str, response_id: str, param: str | None = None) -> Entry:
        entry = self._entries.get(response_id)
        if entry is None or entry.owner != owner:
            raise ResponseNotFound(f"no stored response with id {response_id!r}", param)
        self._entries.move_to_end(response_id)
        return entry

    def delete(self, owner: str, response_id: str) -> None:
        self.get(owner, response_id)
        self._log({"op": "delete", "owner": owner, "id": response_id})
        self._drop(response_id)

    def chain(self, owner: str, response_id: str) -> list[dict[str, Any]]:
        """The items of the chain of responses ``response_id`` ends, oldest
        first (for ``previous_response_id``)."""
        chain: list[str] = []
        at: str | None = response_id
        while at is not None:
            if at in chain:  # a store file edited by hand could loop
                break
            chain.append(at)
            at = self.get(owner, at, "previous_response_id").previous
        return [item for rid in reversed(chain) for item in self._entries[rid].items]

    def item(self, owner: str, item_id: str) -> dict[str, Any]:
        """A stored input or output item, by its id (for ``item_reference``)."""
        response_id = self._items.get((owner, item_id))
        if response_id is None:
            raise ResponseNotFound(f"no stored item with id {item_id!r}", "input")
        for item in self.get(owner, response_id, "input").items:
            if item.get("id") == item_id:
                return item
        raise ResponseNotFound(f"no stored item with id {item_id!r}", "input")

    # -- conversations -------------------------------------------------------

    def create_conversation(
        self, owner: str, items: list[dict[str, Any]], metadata: dict[str, Any]
    ) -> Conversation:
        conversation = Conversation(
            owner, f"conv_{uuid.uuid4().hex}", int(time.time()), metadata, items
        )
        self._keep_conversation(conversation)
        return conversation

    def _keep_conversation(self, conversation: Conversation) -> None:
        self._log({"op": "conversation", **attrs.asdict(conversation)})
        self._conversations[conversation.id] = conversation
        self.conversation_bytes += conversation.nbytes
        self._bound_conversations()

    def conversation(
        self, owner: str, conversation_id: str, param: str | None = None
    ) -> Conversation:
        found = self._conversations.get(conversation_id)
        if found is None or found.owner != owner:
            raise ResponseNotFound(f"no conversation with id {conversation_id!r}", param)
        self._conversations.move_to_end(conversation_id)
        return found

    def update_conversation(
        self,
        owner: str,
        conversation_id: str,
        metadata: dict[str, Any] | None = None,
        more: Sequence[dict[str, Any]] = (),
        without: str | None = None,
    ) -> Conversation:
        """Set a conversation's ``metadata``, add ``more`` items to it, or take
        the item whose id is ``without`` from it."""
        found = self.conversation(owner, conversation_id)
        items = [*found.items, *more]
        if without is not None:
            items = [item for item in items if item.get("id") != without]
            if len(items) == len(found.items):
                raise ResponseNotFound(f"no item with id {without!r} in {conversation_id!r}")
        change = {"metadata": metadata, "more": list(more), "without": without}
        self._log({"op": "conversation_update", "owner": owner, "id": conversation_id, **change})
        self.conversation_bytes -= found.nbytes
        found.items = items
        if metadata is not None:
            found.metadata = metadata
        found.measure()
        self.conversation_bytes += found.nbytes
        self._bound_conversations()
        return found

    def delete_conversation(self, owner: str, conversation_id: str) -> None:
        found = self.conversation(owner, conversation_id)
        self._log({"op": "conversation_delete", "owner": owner, "id": conversation_id})
        del self._conversations[conversation_id]
        self.conversation_bytes -= found.nbytes

    def _bound_conversations(self) -> None:
        while self._conversations and (
            len(self._conversations) > self.max_entries or self.conversation_bytes > self.max_bytes
        ):
            _, dropped = self._conversations.popitem(last=False)
            self.conversation_bytes -= dropped.nbytes
            log.info("conversation %s dropped from the store (its bounds)", dropped.id)

    def _drop(self, response_id: str) -> None:
        entry = self._entries.pop(response_id, None)
        if entry is None:
            return
        self.nbytes -= entry.nbytes
        for item in entry.items:
            key = (entry.owner, item.get("id", ""))
            if self._items.get(key) == response_id:
                del self._items[key]

    # -- the file (``persist_responses``: ``api/openai/journal.py``) --------

    def _log(self, record: dict[str, Any]) -> None:
        if self.journal is not None and not self._replaying:
            self.journal.append(record)

    def _content(self) -> dict[str, Any]:
        """The store whole, as its snapshot holds it, oldest first."""
        entries = [
            {
                "owner": e.owner,
                "response": e.response,
                "input": e.input_items,
                "previous": e.previous,
            }
            for e in self._entries.values()
        ]
        conversations = [attrs.asdict(c) for c in self._conversations.values()]
        return {"version": 1, "entries": entries, "conversations": conversations}

    def save(self) -> None:
        """Write the store whole and start the journal afresh (at shutdown)."""
        if self.journal is not None and self.journal.set_aside():
            self.journal.write_snapshot(self._content())

    async def maintain(self) -> None:
        """Put the journal on the disk every second, and write the store whole
        when the journal has grown past twice the store (the writing in a
        worker thread: the snapshot holds the responses it is handed, which
        the store never changes once kept)."""
        journal = self.journal
        if journal is None:
            return
        while True:
            await trio.sleep(SYNC_S)
            await trio.to_thread.run_sync(journal.sync)
            grown = journal.appended > max(
                COMPACT_MIN_BYTES, 2 * (self.nbytes + self.conversation_bytes)
            )
            if grown and journal.set_aside():
                await trio.to_thread.run_sync(journal.write_snapshot, self._content())

    def load(self) -> None:
        """Read back the snapshot and the journal; whatever of them is damaged
        is skipped with a warning (``api/openai/journal.py``)."""
        if self.journal is None:
            return
        snapshot, records = self.journal.read()
        if snapshot is not None and not isinstance(snapshot, dict):
            log.warning("ignoring the stored responses in %s: not an object", self.path)
            snapshot = None
        bad = 0
        self._replaying = True
        try:
            snapshot = snapshot or {}
            entries = snapshot.get("entries", [])
            conversations = snapshot.get("conversations", [])
            for record in [
                *({"op": "put", **e} for e in (entries if isinstance(entries, list) else [])),
                *(
                    {"op": "conversation", **c}
                    for c in (conversations if isinstance(conversations, list) else [])
                ),
                *records,
            ]:
                try:
                    self._apply(record)
                except Exception:  # a record of the wrong shape: skipped
                    bad += 1
        finally:
            self._replaying = False
        if bad:
            log.warning("skipped %d stored responses or changes of the wrong shape", bad)

    def _apply(self, r: dict[str, Any]) -> None:
        op = r.get("op")
        if op == "put":
            self.put(r["owner"], r["response"], r["input"], r.get("previous"))
        elif op == "delete":
            self._drop(r["id"])
        elif op == "conversation":
            fields = ("owner", "id", "created_at", "metadata", "items")
            self._keep_conversation(Conversation(*(r[k] for k in fields)))
        elif op == "conversation_update":
            if r["id"] in self._conversations:
                self.update_conversation(
                    r["owner"], r["id"], r.get("metadata"), r.get("more") or (), r.get("without")
                )
        elif op == "conversation_delete":
            if r["id"] in self._conversations:
                self.delete_conversation(r["owner"], r["id"])
        else:
            raise ValueError(f"not a change the store makes: {op!r}")

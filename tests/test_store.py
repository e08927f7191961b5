"""The store of responses behind previous_response_id and item_reference."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from api.openai.store import ResponseStore, owner_of
from scheduler.errors import ResponseNotFound

ME, THEM = owner_of("key-1"), owner_of("key-2")


def response(n: int, text: str = "answer") -> dict[str, Any]:
    return {
        "id": f"resp_{n}",
        "object": "response",
        "output": [
            {
                "id": f"msg_out{n}",
                "type": "message",
                "role": "assistant",
                "content": [{"type": "output_text", "text": f"{text} {n}"}],
            }
        ],
    }


def said(n: int) -> list[dict[str, Any]]:
    return [{"id": f"msg_in{n}", "type": "message", "role": "user", "content": f"question {n}"}]


def test_a_conversation_is_its_chain_of_responses_oldest_first() -> None:
    store = ResponseStore(10, 10**6)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2), previous="resp_1")
    store.put(ME, response(3), said(3), previous="resp_2")
    items = store.chain(ME, "resp_3")
    assert [i["id"] for i in items] == [
        "msg_in1",
        "msg_out1",
        "msg_in2",
        "msg_out2",
        "msg_in3",
        "msg_out3",
    ]
    assert store.chain(ME, "resp_1") == [*said(1), *response(1)["output"]]


def test_one_keys_responses_are_invisible_to_another() -> None:
    store = ResponseStore(10, 10**6)
    store.put(ME, response(1), said(1))
    with pytest.raises(ResponseNotFound) as e:
        store.get(THEM, "resp_1")
    assert "resp_1" in e.value.message
    with pytest.raises(ResponseNotFound):
        store.item(THEM, "msg_out1")
    with pytest.raises(ResponseNotFound):
        store.delete(THEM, "resp_1")
    assert store.get(ME, "resp_1").response == response(1)
    assert owner_of(None) == owner_of("") == ""  # no keys: one shared owner


def test_items_are_found_by_id_and_deleted_with_their_response() -> None:
    store = ResponseStore(10, 10**6)
    store.put(ME, response(1), said(1))
    assert store.item(ME, "msg_out1")["content"][0]["text"] == "answer 1"
    assert store.item(ME, "msg_in1")["content"] == "question 1"
    store.delete(ME, "resp_1")
    with pytest.raises(ResponseNotFound, match="msg_out1") as e:
        store.item(ME, "msg_out1")
    assert e.value.param == "input"
    with pytest.raises(ResponseNotFound):
        store.get(ME, "resp_1")


def test_an_item_id_one_key_chose_does_not_hide_anothers_item() -> None:
    store = ResponseStore(10, 10**6)
    store.put(ME, response(1), said(1))
    theirs = response(2) | {"output": []}
    store.put(THEM, theirs, said(1))  # the same client-chosen item id, another key
    assert store.item(ME, "msg_in1")["content"] == "question 1"  # mine still
    assert store.item(THEM, "msg_in1")["content"] == "question 1"
    store.delete(THEM, "resp_2")
    assert store.item(ME, "msg_in1")["content"] == "question 1"


def test_the_least_recently_used_go_first_and_a_cut_chain_is_not_found() -> None:
    store = ResponseStore(3, 10**6)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2), previous="resp_1")
    store.put(ME, response(9), said(9))
    store.get(ME, "resp_1")  # used: "resp_2" is now the oldest
    store.put(ME, response(10), said(10))
    assert len(store) == 3
    with pytest.raises(ResponseNotFound):
        store.get(ME, "resp_2")
    store.put(ME, response(3), said(3), previous="resp_2")  # continues an evicted one
    with pytest.raises(ResponseNotFound) as e:
        store.chain(ME, "resp_3")
    assert e.value.param == "previous_response_id"


def test_reading_a_chain_keeps_its_early_turns() -> None:
    store = ResponseStore(4, 10**6)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2), previous="resp_1")
    store.put(ME, response(8), said(8))
    store.put(ME, response(9), said(9))
    store.chain(ME, "resp_2")  # touches resp_2 and resp_1
    store.put(ME, response(3), said(3), previous="resp_2")
    assert [i["id"] for i in store.chain(ME, "resp_3")][:2] == ["msg_in1", "msg_out1"]
    with pytest.raises(ResponseNotFound):
        store.get(ME, "resp_8")


def test_the_byte_bound_holds_and_an_oversized_response_is_not_kept() -> None:
    one = ResponseStore(100, 10**6)
    one.put(ME, response(0), said(0))
    size = one.nbytes
    store = ResponseStore(100, int(size * 2.5))
    for n in range(5):
        store.put(ME, response(n), said(n))
        assert store.nbytes <= store.max_bytes
    assert len(store) == 2
    store.put(ME, response(99, "x" * 3 * size), said(99))
    assert len(store) == 2
    with pytest.raises(ResponseNotFound):
        store.get(ME, "resp_99")


def test_the_store_is_saved_and_read_back_and_a_broken_file_is_ignored(tmp_path: Path) -> None:
    path = tmp_path / "responses.json"
    store = ResponseStore(10, 10**6, path)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2), previous="resp_1")
    store.save()
    again = ResponseStore(10, 10**6, path)
    again.load()
    assert again.chain(ME, "resp_2") == store.chain(ME, "resp_2")
    with pytest.raises(ResponseNotFound):
        again.get(THEM, "resp_1")
    path.write_text('{"entries": [{"owner": ')  # cut short
    broken = ResponseStore(10, 10**6, path)
    broken.load()
    assert len(broken) == 0


def test_each_change_is_in_the_journal_at_once_and_read_back(tmp_path: Path) -> None:
    """As after a SIGKILL: no save at the end, and the next store has it all."""
    path = tmp_path / "responses.json"
    store = ResponseStore(10, 10**6, path)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2), previous="resp_1")
    store.delete(ME, "resp_1")
    conv = store.create_conversation(THEM, said(7), {"topic": "x"})
    store.update_conversation(THEM, conv.id, more=said(8))
    again = ResponseStore(10, 10**6, path)  # the daemon started again
    again.load()
    assert again.get(ME, "resp_2").previous == "resp_1"
    with pytest.raises(ResponseNotFound):
        again.get(ME, "resp_1")
    assert [i["id"] for i in again.conversation(THEM, conv.id).items] == ["msg_in7", "msg_in8"]
    again.save()  # written whole; the journal starts afresh
    assert (
        not (tmp_path / "responses.jsonl").exists()
        or not (tmp_path / "responses.jsonl").read_text()
    )
    third = ResponseStore(10, 10**6, path)
    third.load()
    assert third.get(ME, "resp_2").response == response(2)


@pytest.mark.parametrize(
    "damage",
    [
        "wrong shape",
        "nested 10,000 deep",
        "a directory",
        "cut-off line",
        "a line of the wrong shape",
    ],
)
def test_damaged_files_are_skipped_with_a_warning_never_fatal(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / "responses.json"
    store = ResponseStore(10, 10**6, path)
    store.put(ME, response(1), said(1))
    store.put(ME, response(2), said(2))
    journal = tmp_path / "responses.jsonl"
    if damage == "wrong shape":
        path.write_text(json.dumps({"entries": [{"owner": 3}], "conversations": "x"}))
    elif damage == "nested 10,000 deep":
        path.write_text("[" * 10_000 + "]" * 10_000)
    elif damage == "a directory":
        path.mkdir()
    elif damage == "cut-off line":
        with journal.open("a") as f:
            f.write('{"op": "put", "owner": "')  # a crash mid-write
    else:
        with journal.open("a") as f:
            f.write(json.dumps({"op": "delete"}) + "\n" + json.dumps([1, 2]) + "\n")
    with caplog.at_level(logging.WARNING, logger="mlxd.store"):
        again = ResponseStore(10, 10**6, path)
        again.load()
    assert again.get(ME, "resp_2").response == response(2)  # what was sound is kept
    assert caplog.records  # and what was not is named
    assert any(
        str(tmp_path) in r.getMessage() or "skipped" in r.getMessage() for r in caplog.records
    )
    again.save()  # and writing it does not fail either


def test_a_journal_that_cannot_be_written_leaves_the_store_in_memory(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder should be")
    with caplog.at_level(logging.WARNING, logger="mlxd.store"):
        store = ResponseStore(10, 10**6, blocked / "responses.json")
        store.load()
        store.put(ME, response(1), said(1))
        store.put(ME, response(2), said(2))
        store.save()
    assert store.get(ME, "resp_2").response == response(2)
    assert len([r for r in caplog.records if "in memory only" in r.getMessage()]) == 1

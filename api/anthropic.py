"""Anthropic's Messages API (``POST /v1/messages``): its request turned into
a chat request.

As with Responses, the request is validated by turning it into a
chat-completions body for ``ChatRequest.from_openai``, so every endpoint
accepts and refuses the same things. Content blocks map onto chat messages:
``text`` blocks join into a message's text, an assistant's ``tool_use``
blocks become its tool calls, a user's ``tool_result`` blocks become tool
messages (before the user's own text, as Anthropic orders them), and
``thinking`` blocks are left out of the prompt (as chat templates leave out
earlier reasoning). Images and documents are refused: mlxd serves text
models.
"""

from __future__ import annotations

import json
from typing import Any

from api.schemas import MAX_MESSAGES, ChatRequest, json_object
from scheduler.errors import InvalidRequest

_PASSED = ("model", "temperature", "top_p", "top_k", "stream", "max_tokens")
_DROPPED = {"thinking", "redacted_thinking"}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}


def chat_request(body: Any) -> ChatRequest:
    body = json_object(body)
    if body.get("max_tokens") is None:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    chat["messages"] = _system(body.get("system")) + _messages(body.get("messages"))
    if body.get("stop_sequences") is not None:
        if not isinstance(body["stop_sequences"], list):
            raise InvalidRequest("'stop_sequences' must be a list of strings", "stop_sequences")
        chat["stop"] = body["stop_sequences"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(body["tool_choice"]))
    thinking = body.get("thinking")
    if thinking is not None:
        if not isinstance(thinking, dict) or thinking.get("type") not in ("enabled", "disabled"):
            raise InvalidRequest(
                '\'thinking\' must be {"type": "enabled"} or {"type": "disabled"}',
                param="thinking",
            )
        chat["thinking"] = thinking["type"] == "enabled"
    try:
        return ChatRequest.from_openai(chat)
    except InvalidRequest as e:
        e.param = {"stop": "stop_sequences"}.get(e.param or "", e.param)
        raise


def _system(value: Any) -> list[dict[str, Any]]:
    if value is None:
        return []
    return [{"role": "system", "content": _text(value, "system")}]


def _messages(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list) or not value:
        raise InvalidRequest("'messages' must be a non-empty list", param="messages")
    if len(value) > MAX_MESSAGES:
        raise InvalidRequest(f"'messages' may hold at most {MAX_MESSAGES}", param="messages")
    out: list[dict[str, Any]] = []
    for i, message in enumerate(value):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            raise InvalidRequest(f"'{where}' must be an object", param=where)
        role, content = message.get("role"), message.get("content")
        if role not in ("user", "assistant"):
            raise InvalidRequest(
                f"'{where}.role' must be 'user' or 'assistant', got {role!r}", param=f"{where}.role"
            )
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif role == "assistant":
            out.append(_assistant(_blocks(content, where), where))
        else:
            out += _user(_blocks(content, where), where)
    return out


def _blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise InvalidRequest(
            f"'{where}.content' must be a string or a list of content blocks",
            param=f"{where}.content",
        )
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind not in ("text", "tool_use", "tool_result", *_DROPPED):
            raise InvalidRequest(
                f"'{where}.content[{j}]': blocks of type {kind!r} are not supported "
                "(mlxd serves text models)",
                param=f"{where}.content",
            )
    return [b for b in content if b.get("type") not in _DROPPED]


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    text = _text([b for b in blocks if b["type"] == "text"], f"{where}.content")
    calls = []
    for block in blocks:
        if block["type"] == "tool_result":
            raise InvalidRequest(
                f"'{where}': tool_result blocks belong in a user message", f"{where}.content"
            )
        if block["type"] == "tool_use":
            arguments = block.get("input", {})
            if not isinstance(arguments, dict):
                raise InvalidRequest(
                    f"'{where}': a tool_use block's 'input' must be an object", f"{where}.content"
                )
            function = {"name": block.get("name"), "arguments": json.dumps(arguments)}
            calls.append({"id": block.get("id"), "type": "function", "function": function})
    message: dict[str, Any] = {"role": "assistant", "content": text or None}
    if calls:
        message["tool_calls"] = calls
    return message


def _user(blocks: list[dict[str, Any]], where: str) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for block in blocks:
        if block["type"] == "tool_use":
            raise InvalidRequest(
                f"'{where}': tool_use blocks belong in an assistant message", f"{where}.content"
            )
        if block["type"] == "tool_result":
            content = block.get("content", "")
            text = content if isinstance(content, str) else _text(content, f"{where}.content")
            out.append({"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": text})
    texts = [b for b in blocks if b["type"] == "text"]
    if texts or not out:
        out.append({"role": "user", "content": _text(texts, f"{where}.content")})
    return out


def _text(value: Any, param: str) -> str:
    """A string, or text blocks joined."""
    if isinstance(value, str):
        return value
    if not isinstance(value, list):
        raise InvalidRequest(f"'{param}' must be a string or a list of text blocks", param)
    texts = []
    for block in value:
        if not isinstance(block, dict) or block.get("type") != "text":
            raise InvalidRequest(f"'{param}' may hold only text blocks here", param)
        if not isinstance(block.get("text"), str):
            raise InvalidRequest(f"'{param}': a text block needs 'text'", param)
        texts.append(block["text"])
    return "".join(texts)


def _tools(value: Any) -> Any:
    """Anthropic's tools (``name``, ``description``, ``input_schema``) in the chat shape."""
    if not isinstance(value, list):
        return value  # refused by the chat check
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict) or "input_schema" not in tool:
            raise InvalidRequest(
                f"tools[{i}]: only custom tools (with 'input_schema') are supported", "tools"
            )
        function = {"name": tool.get("name"), "parameters": tool["input_schema"]}
        if tool.get("description") is not None:
            function["description"] = tool["description"]
        out.append({"type": "function", "function": function})
    return out


def _tool_choice(value: Any) -> dict[str, Any]:
    if not isinstance(value, dict) or value.get("type") not in (*_CHOICES, "tool"):
        raise InvalidRequest(
            "'tool_choice' must be an object whose type is 'auto', 'any', 'tool' or 'none'",
            param="tool_choice",
        )
    out: dict[str, Any] = {"tool_choice": _CHOICES.get(value["type"])}
    if value["type"] == "tool":
        out["tool_choice"] = {"type": "function", "function": {"name": value.get("name")}}
    if value.get("disable_parallel_tool_use") is not None:
        out["parallel_tool_calls"] = not value["disable_parallel_tool_use"]
    return out

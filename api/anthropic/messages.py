"""Anthropic's Messages API (``POST /v1/messages``): its request turned into
a chat request, and its answer shaped as Anthropic's clients parse it.

As with Responses, the request is validated by turning it into a
chat-completions body for ``ChatRequest.from_openai``, so every endpoint
accepts and refuses the same things. Content blocks map onto chat messages:
``text`` blocks join into a message's text, an assistant's ``tool_use``
blocks become its tool calls, a user's ``tool_result`` blocks become tool
messages (before the user's own text, as Anthropic orders them), a
``system`` turn inside ``messages`` (Claude Code sends one after the first
user turn) stays where it stands, and ``thinking`` blocks are left out of
the prompt (as chat templates leave out earlier reasoning). ``image``
blocks (a base64 source, or a URL source, fetched only from the hosts the
config lists: ``api/image_urls.py``), in a user's turn or a tool result,
become the chat's image parts in their places; documents are refused.

``thinking`` is ``enabled`` (with ``budget_tokens``, a cap on the reasoning
of a model that reasons), ``adaptive`` (the model's own default, as its
template has it) or ``disabled``; ``output_config.effort`` goes to the
template as its reasoning effort and ``output_config.format`` constrains the
answer as ``response_format`` does. What mlxd has no use for is accepted and
left aside: ``metadata``, ``context_management``, ``service_tier``,
``container``, ``cache_control`` (the prefix cache keeps every prompt; the
marks only say what usage counts as written to the cache), beta headers.
Tools that only Anthropic's servers run (web search, code execution...) and
Anthropic-defined tools without a schema are left out of the prompt, with a
line in the log; so are tools marked ``defer_loading`` (the model learns of
them later in the conversation, as with Anthropic's tool search).

The answer is a message of content blocks in the order the model produced
them (thinking, text, tool use); streamed, each block opens, grows by deltas
and closes, between ``message_start`` and ``message_stop``.
"""

from __future__ import annotations

import json
import logging
import uuid
from typing import Any

import attrs

from api import errors, sse
from api.delta import Delta, ToolCall
from api.record import Tokens
from api.schemas import MAX_MESSAGES, ChatRequest, json_object
from scheduler.errors import InvalidRequest

_PASSED = ("model", "temperature", "top_p", "top_k", "stream", "max_tokens")
_DROPPED = {"thinking", "redacted_thinking"}
_CHOICES = {"auto": "auto", "any": "required", "none": "none"}
_THINKING = '\'thinking\' must be {"type": "enabled" | "adaptive" | "disabled"}'

log = logging.getLogger("mlxd.api")


def chat_request(body: Any) -> ChatRequest:
    body = json_object(body)
    if body.get("max_tokens") is None:
        raise InvalidRequest("'max_tokens' is required", param="max_tokens")
    chat: dict[str, Any] = {k: body[k] for k in _PASSED if k in body}
    marks: list[str] = []  # the texts that end a cache_control block
    chat["messages"] = _system(body.get("system"), marks) + _messages(body.get("messages"), marks)
    if body.get("stop_sequences") is not None:
        if not isinstance(body["stop_sequences"], list):
            raise InvalidRequest("'stop_sequences' must be a list of strings", "stop_sequences")
        chat["stop"] = body["stop_sequences"]
    if body.get("tools") is not None:
        chat["tools"] = _tools(body["tools"])
    if body.get("tool_choice") is not None:
        chat.update(_tool_choice(body["tool_choice"]))
    thinking, budget = _thinking(body.get("thinking"))
    if thinking is not None:
        chat["thinking"] = thinking
    output = _output_config(body.get("output_config"))
    if output.get("format") is not None:
        chat["response_format"] = {"type": "json_schema", "json_schema": output["format"]}
    try:
        req = ChatRequest.from_openai(chat)
    except InvalidRequest as e:
        e.param = _RENAMED.get(e.param or "", e.param)
        raise
    return attrs.evolve(
        req, effort=output.get("effort"), reasoning_budget=budget, cache_marks=tuple(marks)
    )


_RENAMED = {"stop": "stop_sequences", "response_format": "output_config.format"}


def _thinking(value: Any) -> tuple[bool | None, int | None]:
    """Whether the model should reason (None: as its template does by
    default), and at most how many tokens."""
    if value is None:
        return None, None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "adaptive":
        return None, None  # the model decides: its template's default
    if kind == "disabled":
        return False, None
    if kind != "enabled":
        raise InvalidRequest(_THINKING, param="thinking")
    budget = value.get("budget_tokens")
    if budget is not None and (
        isinstance(budget, bool) or not isinstance(budget, int) or budget < 1
    ):
        raise InvalidRequest(
            f"'thinking.budget_tokens' must be an integer >= 1, got {budget!r}",
            param="thinking.budget_tokens",
        )
    return True, budget


def _output_config(value: Any) -> dict[str, Any]:
    """``output_config``: ``effort`` (the template's reasoning effort) and
    ``format`` (a JSON schema the answer must follow)."""
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise InvalidRequest("'output_config' must be an object", param="output_config")
    effort, fmt = value.get("effort"), value.get("format")
    if effort is not None and not isinstance(effort, str):
        raise InvalidRequest(
            "'output_config.effort' must be a string such as 'low' or 'high'",
            param="output_config.effort",
        )
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "json_schema"):
        raise InvalidRequest(
            '\'output_config.format\' must be {"type": "json_schema", "schema": {...}}',
            param="output_config.format",
        )
    return {"effort": effort, "format": fmt}


def _system(value: Any, marks: list[str]) -> list[dict[str, Any]]:
    if value is None:
        return []
    return [{"role": "system", "content": _text(value, "system", marks)}]


def _messages(value: Any, marks: list[str]) -> list[dict[str, Any]]:
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
        if role not in ("user", "assistant", "system"):
            raise InvalidRequest(
                f"'{where}.role' must be 'user', 'assistant' or 'system', got {role!r}",
                param=f"{where}.role",
            )
        if isinstance(content, str):
            out.append({"role": role, "content": content})
        elif role == "system":
            out.append({"role": role, "content": _text(content, f"{where}.content", marks)})
        elif role == "assistant":
            out.append(_assistant(_blocks(content, where, marks), where))
        else:
            out += _user(_blocks(content, where, marks), where, marks)
    return out


def _blocks(content: Any, where: str, marks: list[str]) -> list[dict[str, Any]]:
    if not isinstance(content, list) or not all(isinstance(b, dict) for b in content):
        raise InvalidRequest(
            f"'{where}.content' must be a string or a list of content blocks",
            param=f"{where}.content",
        )
    for j, block in enumerate(content):
        kind = block.get("type")
        if kind not in ("text", "image", "tool_use", "tool_result", *_DROPPED):
            raise InvalidRequest(
                f"'{where}.content[{j}]': blocks of type {kind!r} are not supported",
                param=f"{where}.content",
            )
        if block.get("cache_control") is not None:
            _mark(block, marks)
    return content


def _mark(block: dict[str, Any], marks: list[str]) -> None:
    """Note the text a ``cache_control`` block ends with: the prompt up to
    there is what the request asks to have written to the cache."""
    text = block.get("text") if block.get("type") == "text" else None
    if block.get("type") == "tool_result":
        content = block.get("content")
        if isinstance(content, str):
            text = content
        elif isinstance(content, list) and content and isinstance(content[-1], dict):
            text = content[-1].get("text")
    elif block.get("type") == "tool_use" and isinstance(block.get("name"), str):
        text = block["name"]
    if isinstance(text, str) and text:
        marks.append(text)


def _assistant(blocks: list[dict[str, Any]], where: str) -> dict[str, Any]:
    text = _text([b for b in blocks if b["type"] == "text"], f"{where}.content")
    thoughts = [b.get("thinking") for b in blocks if b["type"] == "thinking"]
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
    if any(isinstance(t, str) and t for t in thoughts):
        # for the templates that write a tool loop's reasoning back
        message["reasoning_content"] = "".join(t for t in thoughts if isinstance(t, str))
    return message


def _user(blocks: list[dict[str, Any]], where: str, marks: list[str]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    blocks = [b for b in blocks if b["type"] not in _DROPPED]
    for block in blocks:
        if block["type"] == "tool_use":
            raise InvalidRequest(
                f"'{where}': tool_use blocks belong in an assistant message", f"{where}.content"
            )
        if block["type"] == "tool_result":
            content = block.get("content", "")
            if not isinstance(content, str):
                content = _parts(content, f"{where}.content")
            out.append(
                {"role": "tool", "tool_call_id": block.get("tool_use_id"), "content": content}
            )
    own = [b for b in blocks if b["type"] in ("text", "image")]
    if own or not out:
        out.append({"role": "user", "content": _parts(own, f"{where}.content")})
    return out


def _parts(value: Any, param: str) -> Any:
    """Text and image blocks as chat content: the text joined, or, with
    images, the chat's parts in their order."""
    if not isinstance(value, list) or not any(
        isinstance(b, dict) and b.get("type") == "image" for b in value
    ):
        return _text(value, param)
    parts: list[dict[str, Any]] = []
    for block in value:
        if isinstance(block, dict) and block.get("type") == "image":
            parts.append({"type": "image_url", "image_url": {"url": _image_url(block, param)}})
        else:
            parts.append({"type": "text", "text": _text([block], param)})
    return parts


def _image_url(block: dict[str, Any], param: str) -> Any:
    """An image block's source as a chat image's URL (a data: URI, or the
    source's own URL)."""
    source = block.get("source")
    if not isinstance(source, dict):
        raise InvalidRequest(f"'{param}': an image block needs a 'source'", param)
    if source.get("type") == "url":
        return source.get("url")  # fetched, or refused with the reason, where URLs are read
    data, media = source.get("data"), source.get("media_type")
    if source.get("type") != "base64" or not isinstance(data, str) or not isinstance(media, str):
        raise InvalidRequest(
            f"'{param}': an image's source must be base64 data with its 'media_type'", param
        )
    return f"data:{media};base64,{data}"


def _text(value: Any, param: str, marks: list[str] | None = None) -> str:
    """A string, or text blocks joined (their ``cache_control`` marks noted)."""
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
        if marks is not None and block.get("cache_control") is not None:
            _mark(block, marks)
    return "".join(texts)


def _tools(value: Any) -> Any:
    """Anthropic's tools (``name``, ``description``, ``input_schema``) in the
    chat shape; those the model cannot be offered are left out (and logged)."""
    if not isinstance(value, list):
        return value  # refused by the chat check
    out = []
    for i, tool in enumerate(value):
        if not isinstance(tool, dict):
            raise InvalidRequest(f"tools[{i}] must be an object", "tools")
        if "input_schema" not in tool:
            if tool.get("type") in (None, "custom"):
                raise InvalidRequest(f"tools[{i}]: a custom tool needs 'input_schema'", "tools")
            log.info(
                "tool %r (type %s) is left out of the prompt: mlxd does not run Anthropic's "
                "own tools",
                tool.get("name"),
                tool.get("type"),
            )
            continue
        if tool.get("defer_loading") is True:
            continue  # offered later in the conversation, as with Anthropic's tool search
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


_STOP_REASONS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use"}


class MessageShaper:
    """A ``message`` and its stream's events for one request (the face of
    ``api.openai.chat.Shaper``)."""

    end = b""  # the stream ends with message_stop
    opens_with_usage = True  # message_start's usage agrees with message_delta's

    def __init__(self, model: str, tokens: Tokens) -> None:
        self.id = f"msg_{uuid.uuid4().hex}"
        self.model = model
        self.tokens = tokens
        self._kind: str | None = None  # the open block's type
        self._index = -1  # the open block's index
        self._end: Delta | None = None  # the last delta: why it ended

    def final(self, whole: Delta) -> dict[str, Any]:
        blocks: list[dict[str, Any]] = []
        if whole.reasoning:
            blocks.append({"type": "thinking", "thinking": whole.reasoning, "signature": ""})
        if whole.text or not (whole.reasoning or whole.calls):
            blocks.append({"type": "text", "text": whole.text})
        blocks += [_tool_use(call) for call in whole.calls]
        return self._message(blocks, whole) | {"usage": self._usage()}

    def opening(self) -> list[dict[str, Any]]:
        start = self._message([], None) | {"usage": self._usage()}
        return [{"type": "message_start", "message": start}, {"type": "ping"}]

    def events(self, d: Delta) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if d.reasoning:
            out += self._open("thinking", {"thinking": "", "signature": ""})
            out.append(self._delta({"type": "thinking_delta", "thinking": d.reasoning}))
        if d.text:
            out += self._open("text", {"text": ""})
            out.append(self._delta({"type": "text_delta", "text": d.text}))
        for call in d.calls:
            out += self._open("tool_use", _tool_use(call) | {"input": {}}, again=True)
            out.append(self._delta({"type": "input_json_delta", "partial_json": call.arguments}))
        if d.finish is not None:
            self._end = d
        return out

    def closing(self) -> list[dict[str, Any]]:
        out = [] if self._index >= 0 else self._open("text", {"text": ""})
        out += self._close()
        end = self._stop(self._end)
        out.append({"type": "message_delta", "delta": end, "usage": self._usage()})
        return [*out, {"type": "message_stop"}]

    def failed(self, status: int, error: dict[str, Any]) -> dict[str, Any]:
        return errors.anthropic(status, error)

    def frame(self, event: dict[str, Any]) -> bytes:
        return sse.typed(event)

    def _message(self, content: list[dict[str, Any]], end: Delta | None) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            **self._stop(end),
        }

    def _stop(self, end: Delta | None) -> dict[str, Any]:
        if end is None or end.finish is None:
            return {"stop_reason": None, "stop_sequence": None}
        if end.stop_sequence is not None:
            return {"stop_reason": "stop_sequence", "stop_sequence": end.stop_sequence}
        return {"stop_reason": _STOP_REASONS.get(end.finish, "end_turn"), "stop_sequence": None}

    def _usage(self) -> dict[str, Any]:
        """Anthropic counts the prompt in three parts: read from the cache,
        written to it (what the request marked with ``cache_control`` and did
        not find there), and the rest."""
        t = self.tokens
        cached = t.cached or 0
        written = max(t.marked - cached, 0) if t.caching else 0
        return {
            "input_tokens": t.prompt - cached - written,
            "output_tokens": t.generated,
            "cache_read_input_tokens": cached,
            "cache_creation_input_tokens": written,
        }

    def _open(self, kind: str, block: dict[str, Any], again: bool = False) -> list[dict[str, Any]]:
        """Open a block of ``kind`` unless one is open (``again``: always)."""
        if self._kind == kind and not again:
            return []
        out = self._close()
        self._kind, self._index = kind, self._index + 1
        start = {"type": kind, **block}
        return [*out, {"type": "content_block_start", "index": self._index, "content_block": start}]

    def _delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._index, "delta": delta}

    def _close(self) -> list[dict[str, Any]]:
        if self._kind is None:
            return []
        self._kind = None
        return [{"type": "content_block_stop", "index": self._index}]


def _tool_use(call: ToolCall) -> dict[str, Any]:
    return {
        "type": "tool_use",
        "id": call.id,
        "name": call.name,
        "input": _input(call.arguments),
    }


def _input(arguments: str) -> Any:
    """A call's arguments as the object Anthropic gives: the parser's JSON
    (what no parse makes an object of is given whole, as a string)."""
    try:
        parsed = json.loads(arguments)
    except (ValueError, RecursionError):
        return {"arguments": arguments}
    return parsed if isinstance(parsed, dict) else {"arguments": parsed}

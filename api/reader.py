"""Splits a chat model's output text into reasoning, content and tool calls.

Thinking models wrap their reasoning in markers (``<think>`` … ``</think>``
and the others mlx-lm knows); models that call tools wrap each call in their
format's markers and mlx-lm's parser for that format reads what is between.
Both sets of markers come from mlx-lm's tokenizer wrapper (``Markers``). The
reader sees the text as it streams, hands out each piece as soon as it knows
which part it belongs to, and holds back only what might be the start of a
marker. A call that does not parse stays text, markers included.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from api.delta import Delta, ToolCall
from api.texts import Markers, held_back

log = logging.getLogger("mlxd.api")


class Reader:
    """Reads one generation. ``feed`` text as it comes, then ``flush`` once;
    both add what they could decide to the delta they are given (the
    decoder's, so that no token makes an object of its own)."""

    def __init__(
        self,
        markers: Markers,
        *,
        tools: Sequence[dict[str, Any]] = (),
        parse_calls: bool = False,
        reasoning: bool = False,
    ) -> None:
        self._markers = markers
        self._tools = list(tools)
        self._calls = parse_calls and markers.tool is not None and markers.parse_tool is not None
        self.state = "reasoning" if reasoning and markers.think else "content"
        self._buf = ""
        self._trim = False  # drop the whitespace that follows a closing marker

    def feed(self, text: str, out: Delta) -> None:
        self._buf += text
        while self._step(out):
            pass

    def flush(self, out: Delta) -> None:
        buf, self._buf = self._buf, ""
        if self.state == "reasoning":
            out.reasoning += buf
        elif self.state == "tool":
            start, end = self._markers.tool or ("", "")
            if not end and self._parse(buf, out):
                return  # a format whose calls run to the end of the output
            out.text += start + buf
        else:
            out.text += buf.lstrip() if self._trim else buf

    def _step(self, out: Delta) -> bool:
        """Move what can be decided from the buffer into ``out``; true if the
        state changed and there may be more to decide."""
        think, tool = self._markers.think, self._markers.tool
        if self.state == "reasoning":
            assert think is not None
            i = self._buf.find(think[1])
            if i < 0:
                out.reasoning += self._take(len(self._buf) - held_back(self._buf, think[1:]))
                return False
            out.reasoning += self._take(i)
            self._take(len(think[1]))
            self.state, self._trim = "content", True
            return True
        if self.state == "tool":
            assert tool is not None
            end = tool[1]
            i = self._buf.find(end) if end else -1
            if i < 0:
                return False
            call = self._take(i)
            self._take(len(end))
            parsed = self._parse(call, out)
            if not parsed:
                out.text += tool[0] + call + end
            self.state, self._trim = "content", parsed
            return True
        if self._trim:
            self._buf = self._buf.lstrip()
            self._trim = not self._buf
        opens = {}
        if think is not None:
            opens[think[0]] = "reasoning"
        if self._calls and tool is not None:
            opens[tool[0]] = "tool"
        hits = [(i, m) for m in opens if (i := self._buf.find(m)) >= 0]
        if not hits:
            out.text += self._take(len(self._buf) - held_back(self._buf, list(opens)))
            return False
        i, marker = min(hits)
        out.text += self._take(i)
        self._take(len(marker))
        self.state = opens[marker]
        return True

    def _take(self, n: int) -> str:
        taken, self._buf = self._buf[:n], self._buf[n:]
        return taken

    def _parse(self, text: str, out: Delta) -> bool:
        assert self._markers.parse_tool is not None
        try:
            parsed = self._markers.parse_tool(text, self._tools or None)
            calls = [ToolCall.from_parsed(p) for p in _as_list(parsed)]
        except Exception as e:  # parsers raise what they raise; the text stays text
            log.info("a tool call did not parse (%s: %s); kept as text", type(e).__name__, e)
            return False
        out.calls += calls
        return bool(calls)


def _as_list(parsed: Any) -> list[dict[str, Any]]:
    items = parsed if isinstance(parsed, list) else [parsed]
    if not all(isinstance(p, dict) and "name" in p for p in items):
        raise ValueError(f"not a tool call: {parsed!r}")
    return items

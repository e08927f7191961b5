"""Token ids in, deltas out: one generation's text pipeline, pure and
synchronous, so that it is tested with token lists and no runner at all.

Per token it detokenizes (``TextStream``: special tokens hidden, stop strings
cut), splits the text into reasoning, content and tool calls (a chat's
``Reader``), keeps the logprobs asked for, and counts the token (and whether
it was reasoning) in the request's ``Tokens``. Everything is added to one
pending ``Delta``, which ``take`` hands out whole: the caller decides how
often to send (once per batch of tokens that arrived together), and a token
costs no object of its own.

The runner's end-of-turn token never arrives here (``runner.client.Chunk``
leaves it out): every token fed is part of the answer.
"""

from __future__ import annotations

from typing import Any

from api.delta import Delta
from api.reader import Reader
from api.record import Tokens
from api.texts import TextStream


class Decoder:
    def __init__(
        self, text: TextStream, reader: Reader | None, tokens: Tokens, one_call: bool = False
    ) -> None:
        self._text = text
        self._reader = reader  # None: the text is all content (a completion)
        self._one_call = one_call  # ``parallel_tool_calls: false``: end at the first call
        self._cut = False  # ended at that call
        self.tokens = tokens
        self._out = Delta()
        self._called = False  # a tool call was made: "stop" reads "tool_calls"

    def feed(self, token: int, logprob: dict[str, Any] | None = None) -> bool:
        """Add one generated token (and its logprobs, if asked for). True once
        a stop string (or, with ``one_call``, a tool call) has ended the
        answer: the caller then calls ``finish("stop")`` and feeds nothing more."""
        self.tokens.generated += 1
        piece = self._text.feed(token)
        reader = self._reader
        if reader is None:
            self._out.text += piece
        else:
            if piece:
                reader.feed(piece, self._out)
            if reader.state == "reasoning":
                self.tokens.reasoning += 1
        if logprob is not None:
            self._out.logprobs.append({"id": token, **logprob})
        if self._one_call and (self._called or self._out.calls):
            del self._out.calls[0 if self._called else 1 :]
            self._cut = True  # what the reader holds now came after the call
            return True
        return self._text.stopped

    def take(self) -> Delta | None:
        """What the tokens fed since the last ``take`` decided, or ``None``
        if they decided nothing yet (text held back at a possible marker or
        stop string)."""
        out = self._out
        if out.empty:
            return None
        self._out = Delta()
        self._called = self._called or bool(out.calls)
        return out

    def finish(self, reason: str) -> Delta:
        """The last delta: whatever was held back, and why the answer ended
        (a "stop" that made tool calls is "tool_calls")."""
        out, self._out = self._out, Delta()
        held = self._text.flush()
        if self._reader is None:
            out.text += held
        elif not self._cut:
            self._reader.feed(held, out)
            self._reader.flush(out)
        called = self._called or bool(out.calls)
        out.finish = "tool_calls" if reason == "stop" and called else reason
        out.stop_sequence = self._text.matched
        return out

"""From a validated request to text deltas: tokenize, check the context, lease
the model, generate, detokenize.

``prepare`` does everything that can fail before a model is touched (unknown
model, no chat template, prompt too long), so those failures cost no load.
``deltas`` holds the model's lease for exactly as long as the caller iterates.
"""

from __future__ import annotations

import time
from collections.abc import AsyncGenerator, Iterator
from contextlib import contextmanager
from typing import Any

import attrs
import trio

from api.catalog import Catalog
from api.reader import Parts, Reader, ToolCall
from api.record import Record
from api.schemas import ChatRequest, CompletionRequest, GenerationParams
from api.texts import Texts
from api.tools import forced_call
from runner.client import Chunk
from runner.errors import RunnerError
from scheduler.errors import ContextLengthExceeded, InvalidRequest, RunnerCrashed
from scheduler.pool import Scheduler

TOGETHER = 4  # the most chunks one event carries


@attrs.frozen
class Prepared:
    model: str  # canonical name
    params: GenerationParams
    prompt: list[int]
    max_tokens: int
    texts: Texts
    record: Record  # the request's account (timings, tokens)
    grammar: dict[str, Any] | None = None  # the runner's: structured output or a forced call
    chat: ChatRequest | None = None  # a chat's output is read into parts (api.reader)
    reasoning: bool = False  # the prompt opened a reasoning block


@attrs.define
class Delta:
    text: str  # content
    finish: str | None = None  # "stop", "length" or "tool_calls"
    # per token, when asked for: {"id", "logprob", "top": [[id, logprob], ...]}
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)
    reasoning: str = ""
    calls: list[ToolCall] = attrs.field(factory=list)

    def __iadd__(self, other: Delta) -> Delta:
        self.text += other.text
        self.reasoning += other.reasoning
        self.calls += other.calls
        self.logprobs += other.logprobs
        self.finish = other.finish
        return self


@attrs.define
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0
    reasoning_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens the runner took from its prefix cache

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
            "prompt_tokens_details": {"cached_tokens": self.cached_tokens},
        }
        if self.reasoning_tokens:
            out["completion_tokens_details"] = {"reasoning_tokens": self.reasoning_tokens}
        return out


async def prepare(
    catalog: Catalog, req: ChatRequest | CompletionRequest, record: Record
) -> Prepared:
    model = catalog.get(req.params.model)
    record.model = model.name
    texts = await catalog.texts(model.name)
    grammar, reasoning = req.params.grammar, False
    vocabulary = len(texts.tokenizer)
    if isinstance(req, ChatRequest):
        tools = req.tools if req.tool_choice.mode != "none" else ()
        prompt = await trio.to_thread.run_sync(
            texts.chat_prompt, list(req.messages), tools, req.thinking
        )
        grammar = grammar or forced_call(texts.markers, req.tools, req.tool_choice)
        reasoning = texts.opens_reasoning(prompt)
    elif isinstance(req.prompt, str):
        prompt = await trio.to_thread.run_sync(texts.encode, req.prompt)
    else:
        prompt = list(req.prompt)
        if max(prompt) >= vocabulary:
            raise InvalidRequest(f"token id {max(prompt)} is outside the vocabulary", "prompt")
    for token, _ in req.params.logit_bias:
        if token >= vocabulary:
            raise InvalidRequest(f"token id {token} is outside the vocabulary", "logit_bias")
    if req.params.sampling.top_k > vocabulary:
        raise InvalidRequest(
            f"'top_k' is {req.params.sampling.top_k}, but model {model.name!r} has "
            f"{vocabulary} tokens",
            "top_k",
        )
    room = texts.max_context - len(prompt)
    wanted = req.params.max_tokens
    if room <= 0 or (wanted is not None and wanted > room):
        asked = f" plus max_tokens {wanted}" if wanted is not None else ""
        raise ContextLengthExceeded(
            f"this model's maximum context length is {texts.max_context} tokens; the prompt "
            f"has {len(prompt)} tokens{asked}, which is "
            f"{len(prompt) + (wanted or 1)} in total",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
        )
    chat = req if isinstance(req, ChatRequest) else None
    record.prompt_tokens = len(prompt)
    max_tokens = wanted or min(room, catalog.settings.max_tokens_for(model))
    return Prepared(
        model.name, req.params, prompt, max_tokens, texts, record, grammar, chat, reasoning
    )


async def deltas(scheduler: Scheduler, job: Prepared, usage: Usage) -> AsyncGenerator[Delta, None]:
    """Generate, yielding text as it becomes safe to show. The first delta is
    empty and comes as soon as the model has taken the request (queued,
    loaded, granted); the last has ``finish`` set. ``usage.completion_tokens`` is kept current."""
    text = job.texts.text_stream(job.params.stop)
    parts = _Parts(job)
    p = job.params
    stop_ids = () if p.ignore_eos else job.texts.stop_ids
    options: dict[str, Any] = {  # only what a request turns on: plain requests stay plain
        k: v
        for k, v in (
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
            ("logit_bias", dict(p.logit_bias)),
            ("grammar", job.grammar),
        )
        if v
    }
    if p.logprobs is not None:
        options["logprobs"] = p.logprobs
    asked = time.monotonic()
    job.record.queued()
    with _as_runner_crash():
        async with scheduler.lease(job.model, p.keep_alive_s, job.prompt, job.max_tokens) as runner:
            kv = scheduler.kv_bytes(job.model, len(job.prompt), job.max_tokens)
            job.record.granted(time.monotonic() - asked, kv)
            if job.record.others_arriving():
                options["more"] = True  # worth a moment's wait for the runner
            async with runner.generate(
                job.prompt, job.max_tokens, p.sampling, stop_ids, **options
            ) as chunks:
                yield Delta("")  # the model has taken the request
                async for first in chunks:
                    out = Delta("")
                    for chunk in _waiting(first, chunks):
                        if chunk.error is not None:
                            raise chunk.error
                        if chunk.cached is not None:
                            usage.cached_tokens = job.record.cached_tokens = chunk.cached
                            continue
                        lps = chunk.logprobs or (None,) * len(chunk.tokens)
                        for token, lp in zip(chunk.tokens, lps, strict=True):
                            if chunk.finish == "stop" and token in stop_ids:
                                continue  # the end-of-turn token is not part of the answer
                            usage.completion_tokens += 1
                            job.record.token()
                            out += parts.feed(text.feed(token))
                            if parts.thinking:
                                usage.reasoning_tokens += 1
                            if lp is not None:
                                out.logprobs.append({"id": token, **lp})
                            if text.stopped:
                                out += parts.end("stop")
                                yield out
                                return  # leaving the block cancels the generation
                        if chunk.finish is not None:
                            out += parts.feed(text.flush())
                            out += parts.end(chunk.finish)
                            yield out
                            return
                    if out.text or out.reasoning or out.calls or out.logprobs:
                        yield out


def _waiting(first: Chunk, chunks: trio.MemoryReceiveChannel[Chunk]) -> Iterator[Chunk]:
    """``first`` and up to ``TOGETHER - 1`` chunks already waiting behind it.
    Under load a stream falls a few tokens behind its runner; sending them as
    one event costs the daemon one write instead of several (a write per
    token was most of its work at 32 streams). The bound keeps a stream that
    is far behind a stream of pieces, not one block."""
    yield first
    for _ in range(TOGETHER - 1):
        try:
            yield chunks.receive_nowait()
        except (trio.WouldBlock, trio.EndOfChannel):
            return


class _Parts:
    """Text into deltas: a chat's through its reader, a completion's as it is."""

    def __init__(self, job: Prepared) -> None:
        chat = job.chat
        self._reader = None
        if chat is not None:
            self._reader = Reader(
                job.texts.markers,
                tools=chat.tools,
                parse_calls=chat.tool_choice.mode != "none",
                reasoning=job.reasoning,
            )
        self._called = False

    @property
    def thinking(self) -> bool:
        return self._reader is not None and self._reader.state == "reasoning"

    def feed(self, text: str) -> Delta:
        if self._reader is None:
            return Delta(text)
        return self._delta(self._reader.feed(text))

    def end(self, finish: str) -> Delta:
        d = self._delta(self._reader.flush()) if self._reader is not None else Delta("")
        d.finish = "tool_calls" if finish == "stop" and self._called else finish
        return d

    def _delta(self, parts: Parts) -> Delta:
        self._called = self._called or bool(parts.calls)
        return Delta(parts.content, reasoning=parts.reasoning, calls=parts.calls)


@contextmanager
def _as_runner_crash() -> Iterator[None]:
    """A runner's failure (its process gone, or a step failed) is the
    request's ``RunnerCrashed``."""
    try:
        yield
    except RunnerError as e:
        raise RunnerCrashed(e.message) from e

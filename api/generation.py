"""From a validated request to deltas: tokenize, check the context, build the
runner's request, lease the model, generate, decode.

``prepare`` does everything that can fail before a model is touched (unknown
model, an embedding model, no chat template, prompt too long), so those
failures cost no load.
A ``Generation`` then holds the model's lease from ``start`` (which returns
once the model has taken the request) until ``aclose``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from contextlib import AsyncExitStack
from types import TracebackType
from typing import Any

import attrs
import trio

from api.catalog import Catalog
from api.decoder import Decoder
from api.delta import Delta
from api.image_urls import fetched
from api.images import Limits, check
from api.offload import INLINE_BYTES, off_loop
from api.openai.custom_calls import call_grammar
from api.pool import ModelRunner, Pool
from api.reader import Reader
from api.record import Record
from api.schemas import ChatRequest, CompletionRequest, GenerationParams, check_grammar
from api.texts import Texts
from api.tools import forced_call
from runner.errors import Refused, RunnerError
from runner.protocol import Chunk, Generate, Picture
from scheduler.errors import ContextLengthExceeded, InvalidRequest, RunnerCrashed
from scheduler.pool import Claim

TOGETHER = 4  # the most chunks one delta carries
GROW_AHEAD = 0.25  # of a step: how far from its reservation's end a sequence asks for more
EDGE = 16  # tokens short of its reservation's end at which a sequence that has not grown pauses


@attrs.frozen
class Prepared:
    model: str  # canonical name
    params: GenerationParams
    request: Generate  # the runner's, built once
    texts: Texts
    record: Record  # the request's account (timings, tokens)
    chat: ChatRequest | None = None  # a chat's output is read into parts (api.reader)
    reasoning: bool = False  # the prompt opened a reasoning block
    step: int = 0  # output tokens its KV is reserved for at a time (0: all of max_tokens)

    def decoder(self) -> Decoder:
        text = self.texts.text_stream(self.params.stop)
        chat, reader = self.chat, None
        if chat is not None:
            reader = Reader(
                self.texts.markers,
                tools=chat.tools,
                parse_calls=chat.tool_choice.mode != "none",
                reasoning=self.reasoning,
            )
        one_call = chat is not None and not chat.parallel_tool_calls
        return Decoder(text, reader, self.record.tokens, one_call)


async def prepare(
    catalog: Catalog, req: ChatRequest | CompletionRequest, record: Record
) -> Prepared:
    model = catalog.get(req.params.model)
    record.model = model.name
    await catalog.require(model.name, "chat")
    texts = await catalog.texts(model.name)
    chat = req if isinstance(req, ChatRequest) else None
    if chat is not None and chat.tools and chat.tool_choice.mode != "none":
        if not texts.renders_tools:
            raise InvalidRequest(
                f"model {model.name!r} cannot take tools: its chat template leaves them out",
                param="tools",
            )
    _too_long_to_read(texts, req, model.name)
    limits = _image_limits(catalog, texts, req, model.name)
    small = record.body_bytes is not None and record.body_bytes <= INLINE_BYTES
    prompt, reasoning, marked, pictures = await _prompt(texts, req, limits, small)
    grammar = req.params.grammar
    if chat is not None:
        grammar = grammar or forced_call(texts.markers, chat.tools, chat.tool_choice)
        if grammar is None and chat.custom_grammars and chat.tool_choice.mode != "none":
            grammar = call_grammar(texts.markers, chat.tools, chat.custom_grammars)
            if grammar is not None:
                check_grammar(grammar, "tools")
    _check(texts, req.params, model.name)
    room = texts.max_context - len(prompt)
    if room <= 0:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {texts.max_context} tokens; the prompt "
            f"has {len(prompt)} tokens, which leaves no room for an answer",
            param="messages" if chat is not None else "prompt",
        )
    record.tokens.prompt = len(prompt)
    record.images = len(pictures)
    record.tokens.marked = marked
    record.tokens.caching = model.prefix_cache_bytes > 0
    # Agents ask for more than the context leaves (Claude Code: 32,000 on
    # every turn); the answer gets the room there is, and ends with "length"
    # if it fills it, as OpenAI's and Anthropic's own servers do.
    max_tokens = min(req.params.max_tokens or catalog.settings.max_tokens_for(model), room)
    budget = None
    if chat is not None and chat.reasoning_budget is not None and texts.markers.think:
        budget = _budget(texts, chat.reasoning_budget, reasoning)
    request = _request(texts, req.params, prompt, max_tokens, grammar, budget, pictures)
    step = catalog.settings.kv_step_tokens if _resumable(request) else 0
    return Prepared(model.name, req.params, request, texts, record, chat, reasoning, step)


def _resumable(request: Generate) -> bool:
    """Whether the request can pause and go on from its tokens so far as
    though it had not (a sequence whose KV grows on demand pauses when it
    cannot grow): not where the runner's state beyond the tokens would be
    lost (a grammar's, a reasoning budget's, penalties' windows, a seeded
    sampler's)."""
    r, sampling = request, request.sampling
    return (
        r.grammar is None
        and r.reasoning_budget is None
        and r.presence_penalty == r.frequency_penalty == 0
        and (sampling.seed is None or sampling.temperature == 0)
    )


def _too_long_to_read(texts: Texts, req: ChatRequest | CompletionRequest, model: str) -> None:
    """Refuse, before any templating and tokenizing (seconds of CPU for a
    body at the 10,000-message cap), a request whose text alone cannot fit
    the context: no token spells more than ``longest_token`` characters."""
    if isinstance(req, ChatRequest):
        chars = sum(len(m["content"]) for m in req.messages if isinstance(m.get("content"), str))
    else:
        chars = len(req.prompt) if isinstance(req.prompt, str) else 0
    least = chars // texts.longest_token
    if least >= texts.max_context:
        raise ContextLengthExceeded(
            f"this model's maximum context length is {texts.max_context} tokens; the prompt "
            f"has at least {least} ({chars} characters of text)",
            param="messages" if isinstance(req, ChatRequest) else "prompt",
        )


def _budget(texts: Texts, tokens: int, opened: bool) -> dict[str, Any]:
    """The runner's ``reasoning_budget`` option: the model's reasoning
    markers as token ids, and whether the prompt opened a block."""
    assert texts.markers.think is not None
    start, end = (texts.encode(m) for m in texts.markers.think)
    return {"tokens": tokens, "start": start, "end": end, "open": opened}


async def count_prompt(catalog: Catalog, req: ChatRequest) -> int:
    """The tokens ``req``'s prompt takes, as its model's template renders it
    (what ``/v1/responses/input_tokens`` and ``/v1/messages/count_tokens`` say)."""
    name = catalog.get(req.params.model).name
    await catalog.require(name, "chat")
    texts = await catalog.texts(name)
    prompt, _, _, _ = await _prompt(texts, req, _image_limits(catalog, texts, req, name))
    return len(prompt)


def _image_limits(
    catalog: Catalog, texts: Texts, req: ChatRequest | CompletionRequest, model: str
) -> Limits:
    """The settings' limits on a request's images, after refusing images
    for a model that takes none, or more of them than the limit."""
    s = catalog.settings
    limits = Limits(
        s.max_images,
        s.max_image_bytes,
        s.max_image_pixels,
        s.image_url_hosts,
        s.image_url_timeout_s,
    )
    images = req.images if isinstance(req, ChatRequest) else ()
    if images and texts.sizing is None:
        raise InvalidRequest(f"model {model!r} does not take images", param="messages")
    if len(images) > limits.images:
        raise InvalidRequest(
            f"the request has {len(images)} images; at most {limits.images} are read (max_images)",
            param="messages",
        )
    return limits


Prompt = tuple[list[int], bool, int, tuple[Picture, ...]]


async def _prompt(
    texts: Texts,
    req: ChatRequest | CompletionRequest,
    limits: Limits,
    small: bool = False,
) -> Prompt:
    """The prompt's tokens, whether it opened a reasoning block, how many of
    its tokens come before the request's last cache mark, and its images;
    ``small``: the request is small enough to do it in place (never one with
    images: their headers are read, and the URLs among them fetched)."""
    if isinstance(req, ChatRequest):
        files = await fetched(req.images, limits) if req.images else ()
        return await off_loop(small and not files, _chat_prompt, texts, req, files, limits)
    if isinstance(req.prompt, str):
        return await off_loop(small, texts.encode, req.prompt), False, 0, ()
    prompt = list(req.prompt)
    if max(prompt) >= len(texts.tokenizer):
        raise InvalidRequest(f"token id {max(prompt)} is outside the vocabulary", "prompt")
    return prompt, False, 0, ()


def _chat_prompt(texts: Texts, req: ChatRequest, files: Sequence[str], limits: Limits) -> Prompt:
    tools = req.tools if req.tool_choice.mode != "none" else ()
    images = [check(data, n, limits) for n, data in enumerate(files)]
    sizing = texts.sizing if images else None  # (one with none was refused: _image_limits)
    text = texts.render(list(req.messages), tools, req.thinking, req.effort)
    if sizing is not None:
        text = sizing.expand_text(text)
    prompt = texts.prompts.encode(text)
    marked = texts.marked(text, req.cache_marks) if req.cache_marks else 0
    pictures: tuple[Picture, ...] = ()
    if sizing is not None:
        prompt, pictures = sizing.expand(prompt, images)
    return prompt, texts.opens_reasoning(prompt), marked, pictures


def _check(texts: Texts, params: GenerationParams, model: str) -> None:
    """Token ids the request names must be in the model's vocabulary."""
    vocabulary = len(texts.tokenizer)
    for token, _ in params.logit_bias:
        if token >= vocabulary:
            raise InvalidRequest(f"token id {token} is outside the vocabulary", "logit_bias")
    if params.sampling.top_k >= vocabulary:  # mlx-lm's top-k fails from k = vocabulary on
        raise InvalidRequest(
            f"'top_k' is {params.sampling.top_k}, but model {model!r} has {vocabulary} tokens: "
            "it must be fewer (0 turns top-k off)",
            "top_k",
        )


def _request(
    texts: Texts,
    p: GenerationParams,
    prompt: list[int],
    max_tokens: int,
    grammar: dict[str, Any] | None,
    budget: dict[str, Any] | None,
    pictures: tuple[Picture, ...] = (),
) -> Generate:
    # What the request leaves out of temperature, top_p, top_k and min_p is
    # the model's own (its generation_config.json), as in transformers.
    defaults: dict[str, Any] = {k: v for k, v in texts.sampling_defaults.items() if k in p.unset}
    return Generate(
        prompt,
        max_tokens,
        attrs.evolve(p.sampling, **defaults),
        () if p.ignore_eos else texts.stop_ids,
        logprobs=p.logprobs,
        presence_penalty=p.presence_penalty,
        frequency_penalty=p.frequency_penalty,
        logit_bias=dict(p.logit_bias),
        grammar=grammar,
        reasoning_budget=budget,
        images=pictures,
    )


class Generation:
    """One request's generation, in two explicit steps.

    ``start`` waits until the model has taken the request (queued, loaded,
    granted, sent to its runner): a failure to get there is an ordinary
    error, before any response has begun. Then the generation is an async
    iterator of deltas, the last with ``finish`` set. It holds the model's
    lease until ``aclose`` (or the end of ``async with``), which a stream
    calls after its last byte, so that a model is released when the
    *stream* ends, not when its handler returns.
    """

    def __init__(self, scheduler: Pool, job: Prepared) -> None:
        self._scheduler = scheduler
        self._job = job
        self._held = AsyncExitStack()
        self._chunks: trio.MemoryReceiveChannel[Chunk] | None = None
        self._decoder = job.decoder()
        self._done = False
        self._first: Chunk | None = None  # a chunk ``cached`` took ahead of its turn
        # A reservation that grows (``job.step``): its claim, the tokens made
        # (for a resume), those made before this lease, the growth last asked.
        self._claim: Claim[ModelRunner] | None = None
        self._out: list[int] = []
        self._base = 0
        self._asked = 0
        self._pausing = False

    async def start(self) -> None:
        job, record, request = self._job, self._job.record, self._job.request
        asked = time.monotonic()
        record.queued()
        try:
            runner = await self._lease(request)
            reserved = self._claim.reserved if self._claim is not None else request.max_tokens
            kv = self._scheduler.kv_bytes(job.model, len(request.prompt), reserved)
            record.granted(time.monotonic() - asked, kv)
            # Others on their way: worth a moment's wait for the runner.
            more = record.others_arriving()
            self._chunks = await self._held.enter_async_context(runner.generate(request, more=more))
        except BaseException as e:
            await self.aclose()
            if isinstance(e, RunnerError):
                raise _crashed(e) from e
            raise

    async def _lease(
        self, request: Generate, resumes: Claim[ModelRunner] | None = None
    ) -> ModelRunner:
        """Wait for the model to take ``request``, and hold its lease: one whose
        reservation grows a step at a time, where the request allows."""
        job, record = self._job, self._job.record
        client = record.client.lowered("background") if job.params.flex else record.client
        args = (job.model, job.params.keep_alive_s, request.prompt, request.max_tokens, client.who)
        if job.step:  # it can pause: for memory to grow, or for an interactive request
            self._claim = await self._held.enter_async_context(
                self._scheduler.claim(
                    *args, reserve=min(job.step, request.max_tokens), resumes=resumes
                )
            )
            self._base, self._asked = len(self._out), 0
            return self._claim.runner
        self._claim = None
        return await self._held.enter_async_context(self._scheduler.lease(*args))

    def _must_pause(self) -> bool:
        """Ask for the next step of the reservation ahead of need; whether the
        sequence must pause: it has come to the end of what it holds without
        it, or the pool asks it to."""
        claim, step = self._claim, self._job.step
        if claim is None or len(self._out) >= self._job.request.max_tokens:
            return False  # (its last token's finish is on its way)
        if claim.pause_asked:  # an interactive request waits for what it holds
            return True
        made, reserved, most = len(self._out) - self._base, claim.reserved, claim.most
        if reserved >= most:
            return False
        if made >= reserved - step * GROW_AHEAD and self._asked <= reserved:
            self._asked = min(reserved + step, most)
            claim.grow(self._asked)
        return made >= reserved - min(EDGE, step // 4)

    async def _pause(self) -> None:
        """Leave the runner (the sequence's KV goes to its prefix cache) and the
        lease, and come back as a request for the rest: the prompt and the
        tokens made so far, and the tokens left. Its client sees a pause."""
        record, first, claim = self._job.record, self._job.request, self._claim
        paused = time.monotonic()
        await self.aclose()
        self._held = AsyncExitStack()
        rest = attrs.evolve(
            first,
            prompt=(*first.prompt, *self._out),
            max_tokens=first.max_tokens - len(self._out),
        )
        try:
            runner = await self._lease(rest, resumes=claim)
            self._chunks = await self._held.enter_async_context(runner.generate(rest))
        except RunnerError as e:
            raise _crashed(e) from e
        record.paused(time.monotonic() - paused)

    async def cached(self) -> None:
        """Wait until the runner has said how much of the prompt it found in
        its prefix cache (its first word on a request, before the prefill),
        for an answer whose first event tells it (Anthropic's
        ``message_start``), or for a request with images, which the runner
        may refuse (one that does not decode) before a stream's headers go."""
        assert self._chunks is not None, "start() first"
        if self._job.record.tokens.cached is not None or self._first is not None:
            return
        try:
            chunk = await self._chunks.receive()
        except trio.EndOfChannel:
            return
        if chunk.error is not None:
            await self.aclose()
            raise _crashed(chunk.error) from chunk.error
        if chunk.cached is not None:
            self._job.record.tokens.cached = chunk.cached
        else:
            self._first = chunk

    async def aclose(self) -> None:
        """Leave the runner's stream (cancelling what is left of it) and the lease."""
        with trio.CancelScope(shield=True):
            await self._held.aclose()

    async def __aenter__(self) -> Generation:
        await self.start()
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def __aiter__(self) -> Generation:
        return self

    async def __anext__(self) -> Delta:
        """The next delta: the tokens of one chunk and of up to ``TOGETHER - 1``
        more already waiting behind it. Under load a stream falls a few
        tokens behind its runner; sending them as one event costs the daemon
        one write instead of several (a write per token was most of its work
        at 32 streams). The bound keeps a stream that is far behind a stream
        of pieces, not one block."""
        decoder, record = self._decoder, self._job.record
        assert self._chunks is not None, "start() first"
        while not self._done:
            if self._pausing:
                self._pausing = False
                await self._pause()
            chunks = self._chunks
            if self._first is not None:
                chunk, self._first = self._first, None
            else:
                try:
                    chunk = await chunks.receive()
                except trio.EndOfChannel:
                    break
            for taken in range(1, TOGETHER + 1):
                if chunk.error is not None:
                    raise _crashed(chunk.error) from chunk.error
                if chunk.cached is not None:
                    if record.tokens.cached is None:  # (a resumed sequence's is not the request's)
                        record.tokens.cached = chunk.cached
                elif chunk.token is not None:
                    record.token()
                    self._out.append(chunk.token)
                    if decoder.feed(chunk.token, chunk.logprob):
                        self._done = True  # a stop string: leaving cancels the generation
                        return decoder.finish("stop")
                if chunk.finish is not None:
                    self._done = True
                    return decoder.finish(chunk.finish)
                if self._must_pause():
                    self._pausing = True
                    break
                if taken == TOGETHER:
                    break
                try:
                    chunk = chunks.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
            out = decoder.take()
            if out is not None:
                return out
        raise StopAsyncIteration

    async def whole(self) -> Delta:
        """The whole answer as one delta (after ``start``)."""
        whole = Delta()
        async for d in self:
            whole += d
        return whole


def _crashed(e: Exception) -> RunnerCrashed | InvalidRequest:
    """A runner's failure (its process gone, or a step failed) is the
    request's ``RunnerCrashed``; one for the request's own input (an image
    that does not decode), the sender's ``InvalidRequest``."""
    if isinstance(e, Refused):
        return InvalidRequest(e.message, param="messages")
    return RunnerCrashed(e.message if isinstance(e, RunnerError) else str(e))

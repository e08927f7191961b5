"""From a validated request to text deltas: tokenize, check the context, lease
the model, generate, detokenize.

``prepare`` does everything that can fail before a model is touched (unknown
model, no chat template, prompt too long), so those failures cost no load.
``deltas`` holds the model's lease for exactly as long as the caller iterates.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator
from typing import Any

import attrs
import trio

from api.catalog import Catalog
from api.schemas import ChatRequest, CompletionRequest, GenerationParams
from api.texts import Texts
from scheduler.errors import ContextLengthExceeded, InvalidRequest
from scheduler.pool import Scheduler


@attrs.frozen
class Prepared:
    model: str  # canonical name
    params: GenerationParams
    prompt: list[int]
    max_tokens: int
    texts: Texts


@attrs.define
class Delta:
    text: str
    finish: str | None = None
    # per token, when asked for: {"id", "logprob", "top": [[id, logprob], ...]}
    logprobs: list[dict[str, Any]] = attrs.field(factory=list)


@attrs.define
class Usage:
    prompt_tokens: int
    completion_tokens: int = 0

    def as_dict(self) -> dict[str, int]:
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.prompt_tokens + self.completion_tokens,
        }


async def prepare(catalog: Catalog, req: ChatRequest | CompletionRequest) -> Prepared:
    model = catalog.get(req.params.model)
    texts = await catalog.texts(model.name)
    if isinstance(req, ChatRequest):
        prompt = await trio.to_thread.run_sync(texts.chat_prompt, list(req.messages))
    elif isinstance(req.prompt, str):
        prompt = await trio.to_thread.run_sync(texts.encode, req.prompt)
    else:
        prompt = list(req.prompt)
        if max(prompt) >= len(texts.tokenizer):
            raise InvalidRequest(f"token id {max(prompt)} is outside the vocabulary", "prompt")
    for token, _ in req.params.logit_bias:
        if token >= len(texts.tokenizer):
            raise InvalidRequest(f"token id {token} is outside the vocabulary", "logit_bias")
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
    return Prepared(model.name, req.params, prompt, wanted or room, texts)


async def deltas(scheduler: Scheduler, job: Prepared, usage: Usage) -> AsyncGenerator[Delta, None]:
    """Generate, yielding text as it becomes safe to show. The first delta is
    empty and comes as soon as the model has taken the request (queued,
    loaded, granted); the last has ``finish`` set. ``usage.completion_tokens`` is kept current."""
    text = job.texts.text_stream(job.params.stop)
    p = job.params
    stop_ids = () if p.ignore_eos else job.texts.stop_ids
    options: dict[str, Any] = {  # only what a request turns on: plain requests stay plain
        k: v
        for k, v in (
            ("presence_penalty", p.presence_penalty),
            ("frequency_penalty", p.frequency_penalty),
            ("logit_bias", dict(p.logit_bias)),
            ("grammar", p.grammar),
        )
        if v
    }
    if p.logprobs is not None:
        options["logprobs"] = p.logprobs
    async with scheduler.lease(job.model, p.keep_alive_s) as runner:
        async with runner.generate(
            job.prompt, job.max_tokens, p.sampling, stop_ids, **options
        ) as chunks:
            yield Delta("")  # the model has taken the request
            async for chunk in chunks:
                if chunk.error is not None:
                    raise chunk.error
                out, logprobs = [], []
                lps = chunk.logprobs or (None,) * len(chunk.tokens)
                for token, lp in zip(chunk.tokens, lps, strict=True):
                    if chunk.finish == "stop" and token in stop_ids:
                        continue  # the end-of-turn token is not part of the answer
                    usage.completion_tokens += 1
                    out.append(text.feed(token))
                    if lp is not None:
                        logprobs.append({"id": token, **lp})
                    if text.stopped:
                        yield Delta("".join(out), "stop", logprobs)
                        return  # leaving the block cancels the generation
                if chunk.finish is not None:
                    out.append(text.flush())
                    yield Delta("".join(out), chunk.finish, logprobs)
                    return
                if any(out) or logprobs:
                    yield Delta("".join(out), None, logprobs)

"""Token generation for one loaded model, inside its runner process.

A lone request decodes on mlx-lm's single-stream path (``generate_step``),
which is markedly faster than a batch of one. When a second request arrives the
lone sequence moves into a batch (``runner/batch.py``) together with the
newcomers (continuous batching); when the batch is down to one sequence again
it moves back. A move keeps the KV cache: both paths leave the cache holding every
token they have returned, so the cache is trimmed by one token and that token
is fed again on the other path, costing one step.

A request starts from the longest prefix it shares with an earlier request's
cache (``runner/prefix.py``), and only the rest of its prompt is read. Every
step has a budget of prompt tokens to read: while streams decode, one chunk
(so none waits more than about a chunk for its next token); with nothing
decoding, mlx-lm's own prefill step (``FULL_STEP``: a prompt alone is read
at full speed). Each step the waiting prompts share it, oldest first: every
one whose rest fits is read whole, together with the others, in the batch's
one prompt pass for newcomers, and starts decoding; the oldest that does not fit (a long
prompt) is read a part at a time on a cache of its own, with what the others
leave of the budget (a quarter at least), until its rest fits too. So
requests that arrive while others run start within a step or two of their
arrival, however many come, and a long prompt never holds them up for more
than a chunk. A chunk is a fixed number of tokens if configured; otherwise as
many as the engine reads in ``PREFILL_GAP_S``, from the speed it measures as
it reads, so the longest gap a stream sees is about the same on a laptop and
on a data-centre GPU. A request that ends (or is cancelled) leaves its cache
to the prefix cache.

A request's logit bias, penalties, reasoning budget and grammar are mlx-lm
logits processors, which both paths call once per step for each sequence.

Only the runner's main thread calls into this module, so MLX work never
crosses threads.
"""

from __future__ import annotations

import functools
import os
import time
from collections import deque
from collections.abc import Generator, Iterable
from typing import Any, cast

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import generate_step, generation_stream
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from runner.batch import Batch, Newcomer, Processor, Sampler
from runner.budget import ReasoningBudget
from runner.grammar import Constraint, Grammars
from runner.prefix import PrefixCache, trimmable
from runner.protocol import Generate, Sampling
from runner.steps import Hit, Logprobs, Output, Stats
from runner.vision import Seen, Vision, keyed

LOGPROB_FLOOR = -9999.0  # what a forbidden token (-inf) reports
PREFILL_GAP_S = 0.2  # what an automatic chunk aims to take
FIRST_CHUNK = 512  # before any speed is measured
FULL_STEP = 2048  # mlx-lm's own prefill step, about its most efficient
CHUNK_RANGE = (32, FULL_STEP)


def warm_kernels() -> None:
    """Have the GPU load the kernels most models use, by generating a few
    tokens with one-layer random models in the commonest form (bfloat16,
    4-bit, head dims 64 and 128). A spare runner does this while it waits, so
    that the model it loads next reaches its first token sooner (on an H200,
    0.07 s instead of 0.3-0.4 s for a 1B model's first prefill) and competes
    less for the device with the models already serving. What it allocated
    is given back."""
    for heads in (4, 2):
        _generate_with_one_layer(heads)
    mx.clear_cache()


def _generate_with_one_layer(heads: int) -> None:
    # A function of its own: the model and its last outputs are freed on
    # return, before ``warm_kernels`` clears the cache.
    args = llama.ModelArgs.from_dict(
        {
            "model_type": "llama",
            "hidden_size": 256,
            "num_hidden_layers": 1,
            "intermediate_size": 512,
            "num_attention_heads": heads,
            "num_key_value_heads": heads // 2,
            "rms_norm_eps": 1e-5,
            "vocab_size": 256,
        }
    )
    model = llama.Model(args)
    model.set_dtype(mx.bfloat16)
    nn.quantize(model, group_size=64, bits=4)
    for _ in generate_step(mx.arange(128), model, max_tokens=4):
        pass


@functools.lru_cache(maxsize=64)
def _shared_sampler(temperature: float, top_p: float, top_k: int, min_p: float) -> Sampler:
    # One object per parameter set lets the batch sample a batch whose
    # rows share parameters in a single call.
    return make_sampler(temperature, top_p=top_p, min_p=min_p, top_k=top_k)


def make_request_sampler(s: Sampling) -> Sampler:
    if s.seed is None or s.temperature == 0:
        return _shared_sampler(s.temperature, s.top_p, s.top_k, s.min_p)
    # A seeded request carries its own key, so its samples do not depend on
    # what else shares the batch.
    key = mx.random.key(s.seed)
    inv_temp = 1.0 / s.temperature

    def sample(logprobs: mx.array) -> mx.array:
        nonlocal key
        key, sub = mx.random.split(key)
        if 0 < s.top_p < 1:
            logprobs = apply_top_p(logprobs, s.top_p)
        if s.min_p > 0:
            logprobs = apply_min_p(logprobs, s.min_p)
        if s.top_k > 0:
            logprobs = apply_top_k(logprobs, s.top_k)
        return mx.random.categorical(logprobs * inv_temp, key=sub)

    return sample


def logprobs_of(logprobs: mx.array, token: int, top: int) -> Logprobs:
    """The protocol's ``lp`` for a sampled token, from its step's log-probabilities."""
    best = mx.argpartition(-logprobs, kth=top - 1)[:top] if top else mx.array([], mx.uint32)
    values = logprobs[best].astype(mx.float32)
    order = mx.argsort(-values)
    ids: list[int] = best[order].tolist()  # type: ignore[assignment]
    floats: list[float] = values[order].tolist()  # type: ignore[assignment]
    pairs = zip(ids, floats, strict=True)
    chosen = float(logprobs[token].item())  # type: ignore[arg-type]
    return {
        "logprob": max(chosen, LOGPROB_FLOOR),
        "top": [[t, max(v, LOGPROB_FLOOR)] for t, v in pairs],
    }


@attrs.define
class Sequence:
    req: Generate
    sampler: Sampler
    tokens: list[int]  # prompt and generated tokens, in order
    processors: list[Processor]  # each called with the generated tokens only
    constraint: Constraint | None = None
    generated: int = 0
    cache: list[Any] | None = None  # its KV, while no batch holds it
    in_cache: int = 0  # how many of ``tokens`` that cache holds
    seen: Seen | None = None  # a prompt with images: what the model reads for it

    @property
    def delta(self) -> int:
        """Where its positions stand from its tokens' indices (``runner/vision.py``)."""
        return self.seen.delta if self.seen is not None else 0

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - self.generated

    @property
    def unread(self) -> int:
        """Tokens not yet in its cache (its prompt's rest, before it decodes)."""
        return len(self.tokens) - self.in_cache

    def processors_seeing(self, seen: int) -> list[Processor]:
        """The processors in mlx-lm's convention, for a path that passes them
        the sequence's tokens from index ``seen`` on (the tokens it was started
        with, then those it generates)."""
        if not self.processors:
            return []
        start = len(self.req.prompt)
        before = mx.array(self.tokens[start:seen], dtype=mx.int32)

        def process(tokens: mx.array, logits: mx.array) -> mx.array:
            generated = mx.concatenate([before, tokens[max(start - seen, 0) :]])
            for processor in self.processors:
                logits = processor(generated, logits)
            return logits

        return [process]


def _power_of_two(n: float) -> int:
    """The largest power of two at most ``n`` (at least 1)."""
    return 1 << max(int(n).bit_length() - 1, 0)


class Engine:
    def __init__(
        self,
        model: Any,
        max_batch: int,
        grammars: Grammars | None = None,
        prefixes: PrefixCache | None = None,
        chunk: int | None = None,
        full_step: int = FULL_STEP,
    ) -> None:
        self.model = model
        self.max_batch = max_batch
        self.grammars = grammars
        self.prefixes = prefixes
        self.fixed_chunk = chunk
        self.full_step = full_step  # a step's prompt budget with nothing decoding
        self.prefill_rate: float | None = None  # prompt tokens a second, as measured
        # Whether a sequence can change paths (its cache trimmed by a token).
        self.can_trim = prefixes.can_trim if prefixes is not None else trimmable(model)
        self.stats = Stats()
        self._pending: deque[Sequence] = deque()
        self._single: Sequence | None = None
        self._single_gen: Generator[tuple[Any, mx.array], None, None] | None = None
        self._batch: Batch | None = None
        self._in_batch: dict[int, Sequence] = {}  # request id -> sequence

    # -- commands ----------------------------------------------------------

    def warm_up(self) -> None:
        """Run two tokens through the model, so that the device has its kernels
        ready before the first request."""
        for _ in generate_step(mx.array([0, 1]), self.model, max_tokens=2):
            pass

    def add(self, req: Generate) -> Hit:
        """Queue a request, starting from the longest prefix cached for it
        (returned); raises ``ValueError`` if its grammar is unusable."""
        processors: list[Processor] = make_logits_processors(
            req.logit_bias or None,
            presence_penalty=req.presence_penalty,
            presence_context_size=req.max_tokens,
            frequency_penalty=req.frequency_penalty,
            frequency_context_size=req.max_tokens,
        )
        if req.reasoning_budget is not None:
            processors.append(ReasoningBudget.from_option(req.reasoning_budget))
        constraint = None
        if req.grammar is not None:
            if self.grammars is None:
                raise ValueError("this runner cannot apply grammars")
            constraint = self.grammars.constraint(req.grammar, req.stop_ids)
            processors.append(constraint)  # last: nothing may lift its -inf
        sampler = make_request_sampler(req.sampling)
        seq = Sequence(req, sampler, list(req.prompt), processors, constraint)
        vision = self.model if req.images and isinstance(self.model, Vision) else None
        if req.images and vision is None:
            raise ValueError("this model takes no images")
        if vision is not None:
            seq.tokens = keyed(req.prompt, req.images)  # its images, keyed by their bytes
        hit = self.prefixes.lookup(seq.tokens) if self.prefixes is not None else Hit()
        if vision is not None:
            last = max(p.at + p.tokens for p in req.images)
            seq.seen = vision.see(req.prompt, req.images, tower=hit.tokens < last)
        seq.cache, seq.in_cache = hit.cache, hit.tokens
        self.stats.prompt_tokens += len(req.prompt)
        self._pending.append(seq)
        return hit

    def image_counters(self) -> dict[str, int]:
        """A vision model's: images encoded, images whose features came from
        its cache instead, and the cache's bytes (none for a text model)."""
        if not isinstance(self.model, Vision):
            return {}
        return {
            "images_encoded": self.model.encoded,
            "image_features_reused": self.model.reused,
            "image_feature_bytes": self.model.features.bytes,
        }

    def cancel(self, req_id: int) -> None:
        self.stats.cancelled += 1
        for seq in self._pending:
            if seq.req.id == req_id:
                self._pending.remove(seq)
                return
        if self._single is not None and self._single.req.id == req_id:
            self._end_single()
        elif req_id in self._in_batch:
            self._leave_batch([req_id])

    @property
    def active(self) -> int:
        return len(self._pending) + (self._single is not None) + len(self._in_batch)

    def request_ids(self) -> list[int]:
        seqs = [*self._pending, *self._in_batch.values()]
        if self._single is not None:
            seqs.append(self._single)
        return [s.req.id for s in seqs]

    def reset(self) -> None:
        """Forget every sequence (after an error has been reported for them);
        their caches are not kept, since the error may have spoiled them."""
        self._pending.clear()
        self._single = None
        self._single_gen = None
        self._in_batch.clear()
        self._batch = None

    def recover(self) -> None:
        """After a step failed: forget every sequence (``reset``), give MLX a
        fresh random state (a sampler that failed mid-step leaves it without
        a value, and every sampled token after would fail too), and check
        that the model still decodes; raises if it does not."""
        self.reset()
        mx.random.seed(int.from_bytes(os.urandom(8)))
        self.warm_up()

    @property
    def chunk(self) -> int:
        """Prompt tokens to read in one step."""
        if self.fixed_chunk is not None:
            return self.fixed_chunk
        if self.prefill_rate is None:
            return FIRST_CHUNK
        low, high = CHUNK_RANGE
        # A power of two, so that the device meets few distinct shapes (on a
        # GPU each new one can cost a kernel compile: a stall of its own).
        return _power_of_two(min(max(self.prefill_rate * PREFILL_GAP_S, low), high))

    def _measured(self, tokens: int, seconds: float) -> None:
        if tokens >= 16 and seconds > 0:
            rate = tokens / seconds
            old = self.prefill_rate
            self.prefill_rate = rate if old is None else 0.7 * old + 0.3 * rate

    # -- stepping ----------------------------------------------------------

    def step(self) -> list[Output]:
        """Run one step (a decoding step, this step's prompt work, or both)
        and return the tokens it produced."""
        self.stats.steps += 1
        self._start(self._read())
        if self._single is not None:
            out = self._step_single()
        elif self._batch is not None:
            out = self._step_batch()
        else:
            out = []  # a long prompt read, nothing decoding yet
        if self._batch is not None and not self._in_batch:
            self._batch = None  # an idle one still holds its last step's arrays
        self.stats.tokens += len(out)
        return out

    def _read(self) -> list[Sequence]:
        """This step's prompt work: the waiting sequences whose rest fits the
        step's budget, oldest first (to start now: their rest is read as
        they start), and a part of the oldest that does not fit, read here."""
        if not self._pending:
            return []
        decoding = self._single is not None or bool(self._in_batch)
        budget = self.chunk if decoding else self.full_step
        room = self.max_batch - len(self._in_batch) - (self._single is not None)
        kept = budget // 4 if any(s.unread > budget for s in self._pending) else 0
        ready: list[Sequence] = []
        left = budget - kept  # what fits whole; the oldest long prompt keeps a part
        for seq in list(self._pending):
            # A prompt with images is read on its own cache (``_prefill``): it
            # starts with its last token left.
            fits = seq.unread <= left and (seq.seen is None or seq.unread == 1)
            if len(ready) < room and fits:
                ready.append(seq)
                self._pending.remove(seq)
                left -= seq.unread
        if self._pending and room > len(ready):
            oldest = self._pending[0]
            part = min(left + kept, oldest.unread - 1)  # its last token starts its decoding
            if part > 0 and (oldest.unread > left + kept or oldest.seen is not None):
                self._prefill(oldest, part)
        return ready

    def _start(self, ready: list[Sequence]) -> None:
        """Start decoding the sequences whose rest of prompt fits this step
        (alone: on the single path; else in the batch, which reads them all
        in one prompt pass)."""
        if not ready:
            if len(self._in_batch) == 1 and self._single is None:
                self._to_single()
            return
        alone = self._single is None and not self._in_batch and not self._pending
        if alone and len(ready) == 1:
            self._single = ready[0]
            return
        if self._single is not None:
            if not self._off_single():
                self._pending.extendleft(reversed(ready))  # cannot move it: they wait for it
                return
            ready.insert(0, self._single)
            self._single = None
        self._join(ready)
        self.stats.max_batch = max(self.stats.max_batch, len(self._in_batch))

    # -- the single path -----------------------------------------------------

    def _step_single(self) -> list[Output]:
        seq = self._single
        assert seq is not None
        self.stats.max_batch = max(self.stats.max_batch, 1)
        reading = 0  # prompt tokens this step reads (the first: all of its rest)
        if self._single_gen is None:
            reading = seq.unread
            if seq.cache is None:
                seq.cache = make_prompt_cache(self.model)
            self._single_gen = generate_step(
                mx.array(seq.tokens[seq.in_cache :]),
                cast("nn.Module", functools.partial(self.model, deltas=seq.delta))
                if seq.delta
                else self.model,
                max_tokens=seq.remaining,
                sampler=seq.sampler,
                logits_processors=seq.processors_seeing(seq.in_cache),
                prompt_cache=seq.cache,
                prefill_step_size=self.full_step,  # its rest fits one: read in one pass
            )
        started = time.perf_counter()
        token, logprobs = next(self._single_gen)
        if reading:
            self._measured(reading, time.perf_counter() - started)
        finish = self._record(seq, token)
        seq.in_cache = len(seq.tokens)  # generate_step has fed the token it returns
        if finish is not None:
            self._end_single()
        return [(seq.req.id, token, finish, self._logprobs(seq, token, logprobs))]

    def _prefill(self, seq: Sequence, n: int) -> None:
        """Feed the next ``n`` prompt tokens into the sequence's own cache."""
        if seq.cache is None:
            seq.cache = make_prompt_cache(self.model)
        started = time.perf_counter()
        start, end = seq.in_cache, seq.in_cache + n
        with mx.stream(generation_stream):
            if seq.seen is None:
                self.model(mx.array(seq.tokens[start:end])[None], cache=seq.cache)
            else:  # its embeddings (its tokens are its images' keys)
                positions = seq.seen.positions
                self.model(
                    mx.zeros((1, n), mx.int32),
                    cache=seq.cache,
                    input_embeddings=seq.seen.embeddings[:, start:end],
                    positions=None if positions is None else positions[..., start:end],
                )
            mx.eval([c.state for c in seq.cache])
        self._measured(n, time.perf_counter() - started)
        seq.in_cache += n
        mx.clear_cache()

    def _end_single(self) -> None:
        """The lone sequence is done (or cancelled): its cache, which holds
        ``tokens[:in_cache]``, goes to the prefix cache."""
        seq, self._single = self._single, None
        if self._single_gen is not None:
            self._single_gen.close()
            self._single_gen = None
        assert seq is not None
        self._keep(seq.tokens[: seq.in_cache], seq.cache)
        seq.cache = None

    def _record(self, seq: Sequence, token: int) -> str | None:
        seq.generated += 1
        seq.tokens.append(token)
        if token in seq.req.stop_ids:
            return "stop"
        if seq.constraint is not None:
            seq.constraint.sync(seq.tokens, start=len(seq.req.prompt))
            if seq.constraint.done:
                return "stop"
        if seq.generated >= seq.req.max_tokens:
            return "length"
        return None

    # -- moving between paths ------------------------------------------------

    def _off_single(self) -> bool:
        """Ready the lone sequence to join the batch: a decoding one's cache
        gives back its last token, which the batch feeds again."""
        seq = self._single
        assert seq is not None
        if self._single_gen is not None:  # decoding
            if not self.can_trim or seq.cache is None:
                return False
            trim_prompt_cache(seq.cache, 1)
            seq.in_cache -= 1
            self._single_gen = None  # the generator is abandoned, its cache kept
            self.stats.migrations += 1
        return True

    def _to_single(self) -> None:
        ((req_id, seq),) = self._in_batch.items()
        if seq.generated == 0 or not self.can_trim:
            return  # still reading its prompt in the batch, or its cache cannot move
        assert self._batch is not None
        ((cache, held),) = self._batch.leave([req_id]).values()
        del self._in_batch[req_id]
        trim_prompt_cache(cache, 1)
        seq.cache, seq.in_cache = cache, held - 1
        self._single = seq
        self.stats.migrations += 1

    # -- the batch -----------------------------------------------------------

    def _join(self, seqs: list[Sequence]) -> None:
        """Into the batch, which reads the rest of their prompts (it fits this
        step's budget: ``_read``) in one pass, and starts them decoding."""
        if self._batch is None:
            self._batch = Batch(self.model)
        newcomers = []
        for seq in seqs:
            cache, seq.cache = seq.cache, None
            newcomers.append(
                Newcomer(
                    seq.req.id,
                    seq.tokens,
                    seq.in_cache,
                    cache,
                    seq.sampler,
                    seq.processors_seeing(0),  # it passes the whole history
                    seq.req.logprobs is not None,
                    seq.delta,
                )
            )
            self._in_batch[seq.req.id] = seq
        started = time.perf_counter()
        read = self._batch.join(newcomers)
        self._measured(read, time.perf_counter() - started)

    def _leave_batch(self, req_ids: list[int]) -> None:
        """Take sequences out of the batch, keeping their caches for reuse."""
        assert self._batch is not None
        for req_id, (cache, held) in self._batch.leave(req_ids).items():
            seq = self._in_batch.pop(req_id)
            self._keep(seq.tokens[:held], cache)

    def _step_batch(self) -> list[Output]:
        assert self._batch is not None
        out = []
        done = []
        for req_id, token, logprobs in self._batch.step():
            seq = self._in_batch[req_id]
            finish = self._record(seq, token)
            if finish is not None:
                done.append(req_id)
            lp = None if logprobs is None else self._logprobs(seq, token, logprobs)
            out.append((req_id, token, finish, lp))
        if done:
            self._leave_batch(done)
        return out

    # -- shared --------------------------------------------------------------

    def _keep(self, tokens: Iterable[int], cache: list[Any] | None) -> None:
        """Leave a finished (or cancelled) sequence's cache, which holds
        ``tokens``, to the prefix cache."""
        if self.prefixes is not None and cache is not None:
            self.prefixes.store(tuple(tokens), cache)

    def _logprobs(self, seq: Sequence, token: int, logprobs: mx.array) -> Logprobs | None:
        top = seq.req.logprobs
        return None if top is None else logprobs_of(logprobs, token, top)

"""Token generation for one loaded model, inside its runner process.

A lone request decodes on mlx-lm's single-stream path (``generate_step``),
which is markedly faster than a batch of one. When a second request arrives the
lone sequence moves into a ``BatchGenerator`` together with the newcomers
(continuous batching); when the batch is down to one sequence again it moves
back. A move keeps the KV cache: both paths leave the cache holding every
token they have returned, so the cache is trimmed by one token and that token
is fed again on the other path, costing one step.

A request's logit bias, penalties and grammar are mlx-lm logits processors,
which both paths call once per step for each sequence.

Only the runner's main thread calls into this module, so MLX work never
crosses threads.
"""

from __future__ import annotations

import functools
from collections import deque
from collections.abc import Callable, Generator
from typing import Any

import attrs
import mlx.core as mx
import mlx.nn as nn
from mlx_lm.generate import BatchGenerator, StopSequences, generate_step
from mlx_lm.models import llama
from mlx_lm.models.cache import can_trim_prompt_cache, make_prompt_cache, trim_prompt_cache
from mlx_lm.sample_utils import (
    apply_min_p,
    apply_top_k,
    apply_top_p,
    make_logits_processors,
    make_sampler,
)

from runner.grammar import Constraint, Grammars
from runner.protocol import Generate, Sampling

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]  # (tokens, logits) -> logits
Logprobs = dict[str, Any]  # {"logprob": x, "top": [[token, x], ...]}
Output = tuple[int, int, str | None, Logprobs | None]  # request id, token, finish, logprobs

LOGPROB_FLOOR = -9999.0  # what a forbidden token (-inf) reports


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
    # One object per parameter set lets BatchGenerator sample a batch whose
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

    @property
    def remaining(self) -> int:
        return self.req.max_tokens - self.generated

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


@attrs.define
class Stats:
    steps: int = 0
    tokens: int = 0
    prompt_tokens: int = 0
    cancelled: int = 0
    max_batch: int = 0
    migrations: int = 0


class Engine:
    def __init__(self, model: Any, max_batch: int, grammars: Grammars | None = None) -> None:
        self.model = model
        self.max_batch = max_batch
        self.grammars = grammars
        self.stats = Stats()
        self._pending: deque[Sequence] = deque()
        self._single: Sequence | None = None
        self._single_gen: Generator[tuple[Any, mx.array], None, None] | None = None
        self._single_cache: list[Any] = []
        self._batch: BatchGenerator | None = None
        self._in_batch: dict[int, Sequence] = {}  # BatchGenerator uid -> sequence
        self._uid: dict[int, int] = {}  # request id -> uid

    # -- commands ----------------------------------------------------------

    def warm_up(self) -> None:
        """Run two tokens through the model, so that the device has its kernels
        ready before the first request."""
        for _ in generate_step(mx.array([0, 1]), self.model, max_tokens=2):
            pass

    def add(self, req: Generate) -> None:
        """Queue a request; raises ``ValueError`` if its grammar is unusable."""
        processors: list[Processor] = make_logits_processors(
            req.logit_bias or None,
            presence_penalty=req.presence_penalty,
            presence_context_size=req.max_tokens,
            frequency_penalty=req.frequency_penalty,
            frequency_context_size=req.max_tokens,
        )
        constraint = None
        if req.grammar is not None:
            if self.grammars is None:
                raise ValueError("this runner cannot apply grammars")
            constraint = self.grammars.constraint(req.grammar, req.stop_ids)
            processors.append(constraint)  # last: nothing may lift its -inf
        sampler = make_request_sampler(req.sampling)
        seq = Sequence(req, sampler, list(req.prompt), processors, constraint)
        self.stats.prompt_tokens += len(req.prompt)
        self._pending.append(seq)

    def cancel(self, req_id: int) -> None:
        self.stats.cancelled += 1
        for seq in self._pending:
            if seq.req.id == req_id:
                self._pending.remove(seq)
                return
        if self._single is not None and self._single.req.id == req_id:
            self._drop_single()
        elif req_id in self._uid:
            uid = self._uid.pop(req_id)
            del self._in_batch[uid]
            assert self._batch is not None
            self._batch.remove([uid])

    @property
    def active(self) -> int:
        return len(self._pending) + (self._single is not None) + len(self._in_batch)

    def request_ids(self) -> list[int]:
        seqs = [*self._pending, *self._in_batch.values()]
        if self._single is not None:
            seqs.append(self._single)
        return [s.req.id for s in seqs]

    def reset(self) -> None:
        """Forget every sequence (after an error has been reported for them)."""
        self._pending.clear()
        self._drop_single()
        self._in_batch.clear()
        self._uid.clear()
        self._batch = None

    # -- stepping ----------------------------------------------------------

    def step(self) -> list[Output]:
        """Run one decoding step and return the tokens it produced."""
        self._arrange()
        self.stats.steps += 1
        if self._single is not None:
            out = self._step_single()
        else:
            out = self._step_batch()
        self.stats.tokens += len(out)
        return out

    def _arrange(self) -> None:
        if self._pending:
            if self._single is None and not self._in_batch and len(self._pending) == 1:
                self._start_single(self._pending.popleft(), [])
                return
            if self._single is not None and not self._to_batch():
                return  # cannot move it: newcomers wait for it to finish
            while self._pending and len(self._in_batch) < self.max_batch:
                seq = self._pending.popleft()
                self._insert(seq, seq.tokens, None)
        elif len(self._in_batch) == 1 and self._single is None:
            self._to_single()
        self.stats.max_batch = max(self.stats.max_batch, len(self._in_batch))

    def _start_single(self, seq: Sequence, cache: list[Any]) -> None:
        cache = cache or make_prompt_cache(self.model)
        prompt = seq.tokens[-1:] if seq.generated else seq.tokens
        self._single = seq
        self._single_cache = cache
        self._single_gen = generate_step(
            mx.array(prompt),
            self.model,
            max_tokens=seq.remaining,
            sampler=seq.sampler,
            logits_processors=seq.processors_seeing(len(seq.tokens) - len(prompt)),
            prompt_cache=cache,
        )

    def _drop_single(self) -> None:
        if self._single_gen is not None:
            self._single_gen.close()
        self._single = None
        self._single_gen = None
        self._single_cache = []

    def _step_single(self) -> list[Output]:
        seq, gen = self._single, self._single_gen
        assert seq is not None and gen is not None
        self.stats.max_batch = max(self.stats.max_batch, 1)
        token, logprobs = next(gen)
        finish = self._record(seq, token)
        if finish is not None:
            self._drop_single()
        return [(seq.req.id, token, finish, self._logprobs(seq, token, logprobs))]

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

    def _to_batch(self) -> bool:
        seq, cache = self._single, self._single_cache
        assert seq is not None
        if seq.generated == 0:
            return False  # still in prefill inside generate_step; let it finish
        if not can_trim_prompt_cache(cache):
            return False
        trim_prompt_cache(cache, 1)
        self._single_gen = None  # the generator is abandoned, its cache kept
        self._single = None
        self._single_cache = []
        self._insert(seq, seq.tokens[-1:], cache)
        self.stats.migrations += 1
        return True

    def _to_single(self) -> None:
        ((uid, seq),) = self._in_batch.items()
        if seq.generated == 0:
            return  # still prefilling in the batch
        assert self._batch is not None
        cache, _ = self._batch.remove([uid], return_prompt_caches=True)[uid]
        if not can_trim_prompt_cache(cache):
            self._insert(seq, seq.tokens[-1:], cache)
            return
        del self._in_batch[uid]
        del self._uid[seq.req.id]
        trim_prompt_cache(cache, 1)
        self._start_single(seq, cache)
        self.stats.migrations += 1

    def _insert(self, seq: Sequence, prompt: list[int], cache: list[Any] | None) -> None:
        if self._batch is None:
            self._batch = BatchGenerator(self.model, completion_batch_size=self.max_batch)
        stops = [[t] for t in seq.req.stop_ids]
        (uid,) = self._batch.insert(
            [prompt],
            max_tokens=[seq.remaining],
            caches=[cache] if cache is not None else None,
            all_tokens=[seq.tokens[: len(seq.tokens) - len(prompt)]] if cache else None,
            samplers=[seq.sampler],
            logits_processors=[seq.processors_seeing(0)],  # it passes the whole history
            stop_sequences=[StopSequences(stops or None)],
        )
        self._in_batch[uid] = seq
        self._uid[seq.req.id] = uid

    def _step_batch(self) -> list[Output]:
        assert self._batch is not None
        out = []
        for r in self._batch.next_generated():
            seq = self._in_batch.get(r.uid)
            if seq is None:
                continue
            finish = self._record(seq, r.token)
            if finish is None and r.finish_reason is not None:
                finish = r.finish_reason
            if finish is not None:
                del self._in_batch[r.uid]
                del self._uid[seq.req.id]
                if r.finish_reason is None:
                    self._batch.remove([r.uid])
            out.append((seq.req.id, r.token, finish, self._logprobs(seq, r.token, r.logprobs)))
        return out

    def _logprobs(self, seq: Sequence, token: int, logprobs: mx.array) -> Logprobs | None:
        top = seq.req.logprobs
        return None if top is None else logprobs_of(logprobs, token, top)

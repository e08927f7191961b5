"""Sequences that decode together: one forward pass a step feeds each of them
a token.

mlx-lm's ``BatchGenerator`` takes newcomers in three synchronous passes: their
prompts, then their last tokens alone (to sample their first tokens), then a
copy of their caches merged into the running batch's. On the lent H100 a step
that took in newcomers cost 55-65 ms against 11 ms for a step that only
decoded, however few they were, so requests arriving a step apart spent most
of the device's time joining. Here a join is one prompt pass over all the
newcomers' prompts but their last tokens (right-padded, as mlx-lm pads them),
whose caches then extend the batch's; their last tokens are fed in the batch's
next step beside everyone else's tokens, and that step samples their first.

A step is pipelined as in mlx-lm: it builds the next forward pass on the
tokens the previous step sampled, starts it on the device, and only then
reads those tokens back, so the device computes step k+1 while the runner
hands out step k's tokens. A row's token is reported in the step that feeds
it, which is when its KV enters the cache, so a row's cache holds every token
reported for it (``leave`` says how many tokens in all).

Stop tokens, lengths and grammars are the engine's: it takes rows out with
``leave``, which hands back each one's cache for the prefix cache.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import attrs
import mlx.core as mx
from mlx_lm.generate import generation_stream
from mlx_lm.models.cache import TokenBuffer, make_prompt_cache

Sampler = Callable[[mx.array], mx.array]
Processor = Callable[[mx.array, mx.array], mx.array]  # (tokens, logits) -> logits
Reported = tuple[int, int, mx.array | None]  # row id, token, its log-probabilities if wanted


@attrs.frozen
class Newcomer:
    """A sequence joining the batch."""

    id: int
    tokens: list[int]  # every token it has so far: prompt, then any it generated
    cached: int  # how many of ``tokens`` ``cache`` holds (fewer than all)
    cache: list[Any] | None  # its own KV cache (None: an empty one)
    sampler: Sampler
    processors: list[Processor]  # called with all of ``tokens`` and what follows
    logprobs: bool = False  # whether its log-probabilities are reported
    delta: int = 0  # its positions, less its tokens' indices (``runner/vision.py``)


@attrs.define
class _Row:
    id: int
    sampler: Sampler
    processors: list[Processor]
    context: TokenBuffer | None  # what its processors see, when it has any
    logprobs: bool
    held: int  # tokens its cache holds
    delta: int
    reports: bool = False  # False while the token it feeds next is its prompt's last


class Batch:
    def __init__(self, model: Any) -> None:
        self.model = model
        self._rows: list[_Row] = []
        self._cache: list[Any] = []  # one batched cache per layer
        self._next: mx.array | None = None  # the token each row feeds next
        self._next_logprobs: list[mx.array | None] = []  # what those were sampled from

    def join(self, newcomers: list[Newcomer]) -> int:
        """Read the newcomers' prompts (all but their last tokens) and add
        them as rows; returns how many tokens that read.

        Those whose caches hold as many tokens (all that start cold, among
        them) are read in one pass. A batched cache keeps its rows' lengths
        apart by padding them on the left, so newcomers with caches of other
        lengths read together would each be padded twice, for the others'
        caches and for the others' prompts: every later step would attend
        to the padding, and it is memory the ledger never charged."""
        groups: dict[int, list[Newcomer]] = {}
        for n in newcomers:
            groups.setdefault(n.cached, []).append(n)
        read = 0
        with mx.stream(generation_stream):
            for group in groups.values():
                caches = [n.cache or make_prompt_cache(self.model) for n in group]
                merged = [layer[0].merge(list(layer)) for layer in zip(*caches, strict=True)]
                heads = [n.tokens[n.cached : -1] for n in group]
                if any(heads):
                    self._read(heads, merged)
                    read += sum(map(len, heads))
                self._extend(merged, [n.tokens[-1] for n in group])
                for n in group:
                    context = TokenBuffer(n.tokens[:-1]) if n.processors else None
                    held = len(n.tokens) - 1
                    self._rows.append(
                        _Row(n.id, n.sampler, n.processors, context, n.logprobs, held, n.delta)
                    )
        self._next_logprobs += [None] * len(newcomers)
        return read

    def _extend(self, cache: list[Any], last: list[int]) -> None:
        """Add rows whose caches are ``cache`` and who feed ``last`` next."""
        if self._cache:
            for mine, theirs in zip(self._cache, cache, strict=True):
                mine.extend(theirs)  # right-aligned: the shorter side is padded
        else:
            self._cache = cache
        tokens = mx.array(last)
        self._next = tokens if self._next is None else mx.concatenate([self._next, tokens])

    @property
    def positions(self) -> int:
        """The positions each row's cache takes (its tokens and its padding)."""
        return self._cache[0].size() if self._cache else 0

    def _read(self, heads: list[list[int]], cache: list[Any]) -> None:
        lengths = [len(h) for h in heads]
        longest = max(lengths)
        padding = [longest - n for n in lengths]
        if any(padding):  # right-padded: each row's real tokens see no padding
            for c in cache:
                c.prepare(lengths=lengths, right_padding=padding)
        tokens = [h + [0] * p for h, p in zip(heads, padding, strict=True)]
        self.model(mx.array(tokens), cache=cache)
        if any(padding):
            for c in cache:
                c.finalize()  # the padding moves to the left, where the batch keeps it
        mx.eval([c.state for c in cache])

    def step(self) -> list[Reported]:
        """Feed every row its next token; returns the tokens fed, for the
        rows that report them (a row that has just joined fed its prompt's
        last token, which it does not report)."""
        fed = self._next
        assert fed is not None, "a step with no rows"
        with mx.stream(generation_stream):
            # Rows after an image are placed apart from their tokens' indices
            # (``runner/vision.py``); a model is told only where some row is.
            deltas = [row.delta for row in self._rows]
            placing = {"deltas": mx.array(deltas)} if any(deltas) else {}
            logits = self.model(fed[:, None], cache=self._cache, **placing)[:, -1, :]
            contexts = []
            if any(row.processors for row in self._rows):
                rows = []
                for i, row in enumerate(self._rows):
                    one = logits[i : i + 1]
                    if row.context is not None:
                        context = row.context.update_and_fetch(fed[i : i + 1])
                        contexts.append(context)
                        for processor in row.processors:
                            one = processor(context, one)
                    rows.append(one)
                logits = mx.concatenate(rows)
            logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
            self._next = self._sample(logprobs)
            reported_logprobs = self._next_logprobs
            self._next_logprobs = [
                logprobs[i] if row.logprobs else None for i, row in enumerate(self._rows)
            ]
            wanted = [lp for lp in self._next_logprobs if lp is not None]
            mx.async_eval(self._next, *wanted, *contexts)
            tokens: list[int] = fed.tolist()  # type: ignore[assignment]  # sampled a step ago
        out = []
        for row, token, lp in zip(self._rows, tokens, reported_logprobs, strict=True):
            if row.reports:
                out.append((row.id, token, lp))
            row.reports = True
            row.held += 1
        return out

    def _sample(self, logprobs: mx.array) -> mx.array:
        """One call per distinct sampler (requests with the same parameters
        share one: ``engine._shared_sampler``)."""
        groups: dict[Sampler, list[int]] = {}
        for i, row in enumerate(self._rows):
            groups.setdefault(row.sampler, []).append(i)
        if len(groups) == 1:
            return next(iter(groups))(logprobs)
        order = [i for rows in groups.values() for i in rows]
        parts = [sampler(logprobs[mx.array(rows)]) for sampler, rows in groups.items()]
        back = sorted(range(len(order)), key=order.__getitem__)
        return mx.concatenate(parts)[mx.array(back)]

    def leave(self, ids: Collection[int]) -> dict[int, tuple[list[Any], int]]:
        """Take these rows out; returns each one's cache and how many of its
        tokens (from the first) that cache holds."""
        where = {row.id: i for i, row in enumerate(self._rows)}
        with mx.stream(generation_stream):
            caches = {
                id: ([c.extract(where[id]) for c in self._cache], self._rows[where[id]].held)
                for id in ids
            }
            keep = [i for i, row in enumerate(self._rows) if row.id not in caches]
            if not keep:
                self._rows, self._cache, self._next, self._next_logprobs = [], [], None, []
                return caches
            for c in self._cache:
                c.filter(keep)
            assert self._next is not None
            self._next = self._next[mx.array(keep)]
        self._rows = [self._rows[i] for i in keep]
        self._next_logprobs = [self._next_logprobs[i] for i in keep]
        return caches

"""The protocol between the daemon and a runner process.

One JSON object per line. The daemon writes commands to the runner's stdin;
the runner writes events to its stdout (anything else it prints goes to
stderr, which the daemon passes through to its own log). Both sides handle
them as typed values: the commands in ``runner/commands.py`` (and
``Generate``, here), the events in ``runner/events.py``.

Commands (daemon → runner)::

    {"op": "load", "model_dir": "/models/x", "max_batch": 8, "prefill_chunk": 512,
     "prefix_cache": 0, "prefix_dir": "/cache/prefixes/3fa2...", "prefix_disk": 17179869184,
     "prefix_disk_writes": 4294967296, "prompt": [1, 2], "cache_limit": 268435456,
     "kind": "chat", "image_features": 134217728}
                                      first line to a runner started without a
                                      model (a spare); it then loads and says
                                      "ready". prefix_cache: bytes its prefix
                                      cache may hold; prefix_dir (or null) and
                                      prefix_disk (bytes, all models'): its disk tier,
                                      prefix_disk_writes: bytes all write per hour;
                                      prompt: the first request's (its cached prefix
                                      is read while the weights load); cache_limit:
                                      bytes of freed buffers MLX may keep (the
                                      working memory the pool charges beyond weights);
                                      kind: "chat", or "embed" for an embedding
                                      model (``runner/embedder.py``), which
                                      answers "embed" and refuses "generate";
                                      image_features: bytes a vision model keeps
                                      of its images' features
    {"op": "generate", "id": 7, "prompt": [1, 2, 3], "max_tokens": 64,
     "temperature": 0.0, "top_p": 1.0, "top_k": 0, "min_p": 0.0,
     "seed": null, "stop_ids": [2], "logprobs": null, "presence_penalty": 0.0,
     "frequency_penalty": 0.0, "logit_bias": {"42": -100.0}, "grammar": null,
     "reasoning_budget": null, "more": false}
    {"op": "embed", "id": 8, "inputs": [[101, 7592, 102], [101, 102]]}
                                      embed each input (token ids, special tokens
                                      included: the daemon tokenizes), answered
                                      with one "embeddings" event (or "error")
    {"op": "cancel", "id": 7}         stop generating for 7 at the next step
    {"op": "prefix_limit", "bytes": 1073741824}
                                      the prefix cache's limit from now on (0 drops it)
    {"op": "stats"}                   answer with a "stats" event (between steps)
    {"op": "ping", "id": 3}           answer with a "pong" event at once, whatever the
                                      runner computes or loads (its command reader
                                      answers: the daemon's liveness check)
    {"op": "shutdown"}                finish nothing more, write the most
                                      recently used prefixes to disk, exit 0

Events (runner → daemon)::

    {"ev": "spare", "pid": 123, "startup_s": 4.2, "bytes": 541065216}
                                      a spare (--spare) has its imports done and
                                      device up, and waits for "load"; bytes: the
                                      memory it holds so (a CUDA context), as
                                      every runner does before its model
    {"ev": "ready", "pid": 123, "memory": {...}, "load_s": 0.4}
                                      the model is loaded (in load_s seconds)
    {"ev": "cached", "id": 7, "tokens": 1200, "source": "memory"}
                                      request 7 starts from a cached prefix of
                                      1200 prompt tokens ("memory", "disk"; 0
                                      and "" for none); sent before its tokens
    {"ev": "tokens", "out": [[7, 42, null, null], [8, 2, "stop", lp]]}
        one decoding step: [id, token, finish, lp] for every sequence that made
        a token; finish is null, "stop" or "length"; lp is null unless the
        request asked for logprobs (below)
    {"ev": "embeddings", "id": 8, "count": 2, "dims": 384, "data": "AAB..."}
                                      request 8's vectors, in its inputs' order:
                                      count x dims little-endian float32, base64
                                      (a fifth of a JSON list's size, and exact);
                                      unit length, as the model pools them
    {"ev": "error", "ids": [7], "message": "..."}    those requests failed
    {"ev": "stats", "active": 2, "memory": {...}, "counters": {"steps": ..., ...},
     "prefill_chunk": 512, "prefix": {"bytes": ..., "entries": ..., "hits": ..., ...}}
    {"ev": "saving", "memory": {...}, "prefix_bytes": ...}
                                      after "shutdown": the model is freed; what
                                      is left is the prefixes being written
    {"ev": "saved", "written_bytes": ..., "skipped_bytes": ...}
                                      they are written; skipped: over the
                                      hourly write bound
    {"ev": "fatal", "message": "..."}                 loading failed; exiting
    {"ev": "pong", "id": 3}                           the answer to a ping

Generate options (each off by default):

- ``logprobs``: 0..20. Every token then carries ``lp = {"logprob": x, "top":
  [[token, x], ...]}``, the top list sorted best first and as long as asked.
  They are mlx-lm's log-softmax of the logits after ``logit_bias``, the
  penalties and the grammar mask, before temperature, top-p and the like. A
  token the grammar forbids has logprob -9999.0 (JSON has no -inf).
- ``presence_penalty``, ``frequency_penalty``: OpenAI's, over the tokens this
  request has generated (not its prompt).
- ``logit_bias``: token id (a string, as JSON keys are) -> value added to its logit.
- ``grammar``: ``{"type": "json_schema", "schema": {...}}``,
  ``{"type": "json_object"}``, ``{"type": "lark", "lark": "..."}`` (llguidance's
  Lark dialect, which can embed JSON schemas) or ``{"type": "grammars",
  "grammars": [{"lark_grammar": "..."}, {"name": "x", "lark_grammar": "..."}]}``
  (the first refers to the others as ``@x``); only tokens that keep the output a valid prefix
  may be sampled. A request finishes with "stop" on the token that completes
  the grammar (that token is part of the answer; no stop token follows it).
  Where the grammar may end but could also go on (a top-level number, say),
  the request's ``stop_ids`` are allowed too, and sampling one finishes with
  "stop" as usual. A grammar that does not compile fails only its request,
  with an "error" event.
- ``reasoning_budget``: ``{"tokens": 1024, "start": [ids], "end": [ids],
  "open": true}``: once the model has written ``tokens`` tokens of reasoning
  (after ``start``, or from the first token when the prompt opened the
  block), the tokens of ``end`` are forced, closing its reasoning.
- ``images`` (a vision-language model's runner): ``[{"data": "base64 of the
  image file", "at": 12, "tokens": 154}]``: the prompt's tokens ``at`` ..
  ``at + tokens - 1`` are the model's image token, and the image's features
  take their place.

``memory`` is MLX's view: ``{"active": bytes, "peak": bytes, "cache": bytes}``,
and ``"device"``: all the GPU memory the process holds, where the driver
says (NVML, on a CUDA host: MLX's buffers and the CUDA context).
Stdin reaching EOF means the daemon is gone: the runner exits.
"""

from __future__ import annotations

import base64
import binascii
import functools
import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any, Generic, TypeVar

import attrs

from runner.errors import BadInput

T = TypeVar("T")

MAX_LOGPROBS = 20


@attrs.frozen
class Sampling:
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    seed: int | None = None


def _token_ids(ids: Iterable[int]) -> tuple[int, ...]:
    return tuple(ids)


@attrs.frozen
class Picture:
    """An image in a prompt: its file in base64 (as the request sent it, so
    that neither side encodes it again), and the prompt's tokens it takes
    (``tokens`` of them from index ``at``, each the model's image token,
    whose embeddings its features replace)."""

    encoded: str = attrs.field(repr=False)
    at: int
    tokens: int

    @functools.cached_property
    def digest(self) -> bytes:
        """What the runner's caches key it by (made once, where first asked:
        an image may be megabytes, and the daemon never asks)."""
        return hashlib.sha256(self.encoded.encode()).digest()

    def data(self) -> bytes:
        """The file; ``BadInput`` if its base64 does not decode."""
        try:
            return base64.b64decode(self.encoded, validate=True)
        except (binascii.Error, ValueError):
            raise BadInput("an image's base64 does not decode") from None

    def to_message(self) -> dict[str, Any]:
        return {"data": self.encoded, "at": self.at, "tokens": self.tokens}

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Picture:
        if not isinstance(msg["data"], str):
            raise ValueError("an image's data must be base64 text")
        return cls(msg["data"], int(msg["at"]), int(msg["tokens"]))


@attrs.frozen
class Generate:
    """A request to generate. The API builds it once, when the request has
    been read; the runner's client stamps it with its ``id`` on that runner
    (and ``more``, the hint of the moment) as it sends it."""

    prompt: tuple[int, ...] = attrs.field(converter=_token_ids)
    max_tokens: int
    sampling: Sampling
    stop_ids: tuple[int, ...] = ()
    logprobs: int | None = attrs.field(
        default=None,
        validator=attrs.validators.optional(
            [attrs.validators.ge(0), attrs.validators.le(MAX_LOGPROBS)]
        ),
    )
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] = attrs.field(factory=dict)
    grammar: dict[str, Any] | None = None
    reasoning_budget: dict[str, Any] | None = None
    more: bool = False
    images: tuple[Picture, ...] = ()
    id: int = attrs.field(default=0, kw_only=True)

    def to_message(self) -> dict[str, Any]:
        return {
            "op": "generate",
            "id": self.id,
            "prompt": list(self.prompt),
            "max_tokens": self.max_tokens,
            **attrs.asdict(self.sampling),
            "stop_ids": list(self.stop_ids),
            "logprobs": self.logprobs,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "logit_bias": {str(k): v for k, v in self.logit_bias.items()},
            "grammar": self.grammar,
            "reasoning_budget": self.reasoning_budget,
            "more": self.more,
            **({"images": [p.to_message() for p in self.images]} if self.images else {}),
        }

    @classmethod
    def from_message(cls, msg: dict[str, Any]) -> Generate:
        fields = attrs.fields_dict(Sampling)
        return cls(
            id=msg["id"],
            prompt=tuple(msg["prompt"]),
            max_tokens=msg["max_tokens"],
            sampling=Sampling(**{k: msg[k] for k in fields if k in msg}),
            stop_ids=tuple(msg.get("stop_ids", ())),
            logprobs=msg.get("logprobs"),
            presence_penalty=msg.get("presence_penalty", 0.0),
            frequency_penalty=msg.get("frequency_penalty", 0.0),
            logit_bias={int(k): float(v) for k, v in msg.get("logit_bias", {}).items()},
            grammar=msg.get("grammar"),
            reasoning_budget=msg.get("reasoning_budget"),
            more=bool(msg.get("more", False)),
            images=tuple(Picture.from_message(p) for p in msg.get("images", ())),
        )


def encode(msg: dict[str, Any]) -> bytes:
    return json.dumps(msg, separators=(",", ":")).encode() + b"\n"


class Wire(Generic[T]):
    """One direction of the wire: its kinds of value (attrs classes), each
    named under ``tag`` ("op" for commands, "ev" for events)."""

    def __init__(self, tag: str, what: str, names: Mapping[type[T], str]) -> None:
        self.tag, self.what = tag, what
        self._names = dict(names)
        self._kinds = {name: kind for kind, name in names.items()}

    def line(self, value: T) -> bytes:
        """``value`` as a line, its kind's name under the tag (a kind with a
        ``to_message`` writes itself, tag included)."""
        if (write := getattr(value, "to_message", None)) is not None:
            return encode(write())
        fields = attrs.asdict(value, recurse=False)  # type: ignore[arg-type]
        return encode({self.tag: self._names[type(value)], **fields})

    def read(self, msg: dict[str, Any]) -> T:
        """The value a decoded line holds: the kind ``msg[tag]`` names, built
        from its fields (others ignored; a kind with a ``from_message``
        builds itself); ``ValueError`` if no kind has that name or the
        fields do not fit."""
        kind = self._kinds.get(msg.get(self.tag))  # type: ignore[arg-type]
        if kind is None:
            raise ValueError(f"not a runner {self.what}: {str(msg)[:80]}")
        try:
            if (build := getattr(kind, "from_message", None)) is not None:
                return build(msg)
            names = _field_names(kind)  # type: ignore[arg-type]
            return kind(**{k: v for k, v in msg.items() if k in names})
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"a malformed {msg.get(self.tag)!r} {self.what}: {e!r}") from None


@functools.cache
def _field_names(kind: type) -> frozenset[str]:
    return frozenset(a.name for a in attrs.fields(kind))  # once a kind: every step reads one


def decode(line: bytes) -> dict[str, Any]:
    msg = json.loads(line)
    if not isinstance(msg, dict):
        raise ValueError(f"protocol message is not an object: {line[:80]!r}")
    return msg


def to_llguidance(grammar: dict[str, Any]) -> str:
    """llguidance's grammar for a ``grammar`` option; ``ValueError`` if it is not one.

    The JSON it allows is compact (no whitespace between tokens) unless the
    schema says otherwise (``x-guidance``): a small model left free to add
    whitespace can spend its whole budget on it."""
    import llguidance

    kind = grammar.get("type")
    if kind == "json_schema":
        schema = grammar.get("schema")
        if not isinstance(schema, dict):
            raise ValueError("a json_schema grammar needs a 'schema' object")
        return llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False}
        )
    if kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema(
            {"type": "object"}, defaults={"whitespace_flexible": False}
        )
    if kind == "lark":
        return llguidance.LLMatcher.grammar_from_lark(str(grammar.get("lark")))
    if kind == "grammars":  # several, the first the start, the others named (its @name)
        return json.dumps({"grammars": grammar.get("grammars")})
    raise ValueError(f"unknown grammar type {kind!r}")


@attrs.frozen
class Chunk:
    """What one decoding step made for one request: a token (with its
    logprobs, when asked for), or the end, or a failure.

    The first chunk of every request carries no token but ``cached``: how many
    prompt tokens its runner took from the prefix cache. A request that ends
    on one of its ``stop_ids`` ends with a chunk whose ``token`` is ``None``:
    the end-of-turn token is the runner's business (its cache holds it), not
    part of the answer, so no layer above ever has to drop it."""

    token: int | None
    finish: str | None = None
    logprob: dict[str, Any] | None = None  # {"logprob": x, "top": [[id, x], ...]}
    error: Exception | None = None
    cached: int | None = None

"""OpenAI request bodies, validated once, at the boundary.

``ChatRequest.from_openai`` and ``CompletionRequest.from_openai`` are the only
places a request body is checked; everything after them works with these
frozen classes. A field that is present but wrong is an ``InvalidRequest``
naming the field (``param``), as OpenAI does. Unknown fields are ignored, as
OpenAI-compatible servers commonly do; known fields that mlxd cannot honour
are refused rather than silently ignored.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import attrs

from api.images import Remote, from_url
from api.tools import ToolChoice, tool_choice_field, tools_field
from config.units import parse_duration
from runner.protocol import Sampling, to_llguidance
from scheduler.errors import InvalidRequest

T = TypeVar("T")
_ROLES = {"system", "developer", "user", "assistant", "tool"}
MAX_STOPS = 16
MAX_MESSAGES = 10_000  # a long agent session has a few thousand
MAX_DEPTH = 64  # of JSON nesting: tool schemas included, real requests stay far below
# The sampling fields a model's generation_config.json may set for requests
# that leave them out; their values where it does not.
SAMPLING_DEFAULTS = ("temperature", "top_p", "top_k", "min_p")


@attrs.frozen
class GenerationParams:
    """What chat and completion requests share."""

    model: str
    max_tokens: int | None
    sampling: Sampling
    stop: tuple[str, ...]
    stream: bool
    include_usage: bool
    ignore_eos: bool = False  # an extension (as in vLLM): generate through end-of-text
    keep_alive_s: float | None = None  # an extension (as in Ollama): the model's idle time
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    logprobs: int | None = None  # alternatives per token; None: no logprobs
    grammar: dict[str, Any] | None = attrs.field(default=None, eq=False)  # structured output
    unset: frozenset[str] = frozenset()  # the sampling fields the request left to the model
    flex: bool = False  # OpenAI's service_tier "flex": it may wait (background priority)

    @classmethod
    def from_openai(
        cls, body: Mapping[str, Any], max_tokens_keys: tuple[str, ...], chat: bool = True
    ) -> GenerationParams:
        model = _field(body, "model", str, "a model name", required=True)
        assert model is not None
        max_tokens = None
        for key in max_tokens_keys:
            value = _field(body, key, int, "an integer >= 1", check=lambda n: n >= 1)
            if value is not None:
                max_tokens = value
        temperature = _number(body, "temperature", 0.0, 2.0, default=1.0)
        sampling = Sampling(
            temperature=temperature,
            top_p=_number(body, "top_p", 0.0, 1.0, default=1.0, low_open=True),
            top_k=_field(body, "top_k", int, "an integer >= 0", check=lambda n: n >= 0) or 0,
            min_p=_number(body, "min_p", 0.0, 1.0, default=0.0),
            seed=_seed(body),
        )
        stop = body.get("stop")
        if stop is None:
            stops: tuple[str, ...] = ()
        elif isinstance(stop, str):
            stops = (stop,)
        elif (
            isinstance(stop, list)
            and all(isinstance(s, str) for s in stop)
            and len(stop) <= MAX_STOPS
        ):
            stops = tuple(stop)
        else:
            raise InvalidRequest(
                f"'stop' must be a string or a list of at most {MAX_STOPS} strings", param="stop"
            )
        stream = _field(body, "stream", bool, "a boolean") or False
        options = _field(body, "stream_options", dict, "an object")
        include_usage = False
        if options is not None:
            if not stream:
                raise InvalidRequest(
                    "'stream_options' is only allowed when 'stream' is true", param="stream_options"
                )
            include_usage = _field(options, "include_usage", bool, "a boolean") or False
        ignore_eos = _field(body, "ignore_eos", bool, "a boolean") or False
        keep_alive = keep_alive_field(body)
        _refuse_unsupported(body)
        return cls(
            model,
            max_tokens,
            sampling,
            tuple(s for s in stops if s),
            stream,
            include_usage,
            ignore_eos,
            keep_alive,
            presence_penalty=_number(body, "presence_penalty", -2.0, 2.0, default=0.0),
            frequency_penalty=_number(body, "frequency_penalty", -2.0, 2.0, default=0.0),
            logit_bias=_logit_bias(body),
            logprobs=_chat_logprobs(body) if chat else _completion_logprobs(body),
            grammar=grammar_of(body.get("response_format"), "response_format"),
            unset=frozenset(k for k in SAMPLING_DEFAULTS if body.get(k) is None),
            flex=body.get("service_tier") == "flex",
        )


def _seed(body: Mapping[str, Any]) -> int | None:
    """OpenAI's seed is a 64-bit integer, signed or not; MLX's key takes it
    unsigned (-1 is 2**64 - 1)."""
    expected = "an integer from -2**63 to 2**64 - 1"
    seed = _field(body, "seed", int, expected, check=lambda n: -(2**63) <= n < 2**64)
    return None if seed is None else seed % 2**64


def _logit_bias(body: Mapping[str, Any]) -> tuple[tuple[int, float], ...]:
    raw = _field(body, "logit_bias", dict, "an object of token ids to biases")
    if not raw:
        return ()
    if len(raw) > 1024:
        raise InvalidRequest("'logit_bias' may hold at most 1024 tokens", param="logit_bias")
    out = []
    for key, bias in raw.items():
        ok = isinstance(bias, (int, float)) and not isinstance(bias, bool) and -100 <= bias <= 100
        if not (isinstance(key, str) and key.isascii() and key.isdigit()) or not ok:
            raise InvalidRequest(
                f"'logit_bias' maps token ids to numbers in [-100, 100]; got {key!r}: {bias!r}",
                param="logit_bias",
            )
        out.append((int(key), float(bias)))
    return tuple(out)


def _chat_logprobs(body: Mapping[str, Any]) -> int | None:
    wanted = _field(body, "logprobs", bool, "a boolean")
    top = _field(body, "top_logprobs", int, "an integer in [0, 20]", check=lambda n: 0 <= n <= 20)
    if top is not None and not wanted:
        raise InvalidRequest("'top_logprobs' needs 'logprobs': true", param="top_logprobs")
    return (top or 0) if wanted else None


def _completion_logprobs(body: Mapping[str, Any]) -> int | None:
    return _field(body, "logprobs", int, "an integer in [0, 5]", check=lambda n: 0 <= n <= 5)


def grammar_of(fmt: Any, param: str) -> dict[str, Any] | None:
    """The runner's grammar for an OpenAI ``response_format`` (chat) or
    ``text.format`` (responses): ``None`` for plain text."""
    if fmt is None:
        return None
    kind = fmt.get("type") if isinstance(fmt, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind == "json_schema":
        # chat nests the schema under "json_schema"; responses puts it in the format itself
        spec = fmt.get("json_schema", fmt)
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise InvalidRequest(f"'{param}' of type json_schema needs a 'schema' object", param)
        grammar = {"type": "json_schema", "schema": schema}
        check_grammar(grammar, param)
        return grammar
    raise InvalidRequest(
        f"'{param}.type' must be text, json_object or json_schema, got {kind!r}", param=param
    )


def check_grammar(grammar: dict[str, Any], param: str) -> None:
    """Refuse a grammar that the runner's grammar engine cannot compile, or
    that allows no output at all (a schema whose ``$ref`` only leads back to
    itself): llguidance compiles it against a tokenizer of single bytes and
    computes the first step's mask, as the runner would with the model's."""
    import llguidance

    try:
        matcher = llguidance.LLMatcher(_bytes_tokenizer(), to_llguidance(grammar), log_level=0)
        if not matcher.is_error():
            matcher.compute_bitmask()
        problem = matcher.get_error() if matcher.is_error() else ""
    except (ValueError, TypeError) as e:
        problem = str(e)
    if problem.startswith("NoExtensionBias"):
        problem = "it allows no output at all (does a $ref only lead back to itself?)"
    if problem:
        what = "JSON schema" if grammar.get("type") == "json_schema" else "grammar"
        raise InvalidRequest(f"'{param}' holds an invalid {what}: {problem}", param=param)


@functools.cache
def _bytes_tokenizer() -> Any:
    """An llguidance tokenizer whose tokens are the 256 bytes and an end."""
    import llguidance

    class Bytes:
        eos_token_id, bos_token_id = 256, None
        tokens = [bytes([i]) for i in range(256)] + [b""]
        special_token_ids = [256]

        def __call__(self, text: str | bytes) -> list[int]:
            return list(text.encode() if isinstance(text, str) else text)

    return llguidance.LLTokenizer(llguidance.TokenizerWrapper(Bytes()))


def keep_alive_field(body: Mapping[str, Any]) -> float | None:
    """``keep_alive``: seconds, a duration string ("5m"), or negative / "forever"."""
    if body.get("keep_alive") is None:
        return None
    try:
        return parse_duration(body["keep_alive"])
    except ValueError as e:
        raise InvalidRequest(f"'keep_alive': {e}", param="keep_alive") from None


@attrs.frozen
class ChatRequest:
    params: GenerationParams
    messages: tuple[dict[str, Any], ...]
    tools: tuple[dict[str, Any], ...] = ()
    tool_choice: ToolChoice = attrs.field(factory=lambda: ToolChoice("none"))
    thinking: bool | None = None  # None: the chat template's default
    parallel_tool_calls: bool = True  # False: the answer ends with its first call
    effort: str | None = None  # the template's ``reasoning_effort``, where it takes one
    reasoning_budget: int | None = None  # at most this many tokens of reasoning
    cache_marks: tuple[str, ...] = ()  # texts that end what the request asks to cache
    # its images, in the order of the messages: their files in base64, or URLs to fetch
    images: tuple[str | Remote, ...] = ()
    # custom tools (Responses) whose input has a grammar: (offered name, {"syntax", "definition"})
    custom_grammars: tuple[tuple[str, dict[str, Any]], ...] = ()

    @classmethod
    def from_openai(cls, body: Any) -> ChatRequest:
        body = json_object(body)
        params = GenerationParams.from_openai(body, ("max_tokens", "max_completion_tokens"))
        raw = body.get("messages")
        if not isinstance(raw, list) or not raw:
            raise InvalidRequest("'messages' must be a non-empty list", param="messages")
        if len(raw) > MAX_MESSAGES:
            raise InvalidRequest(f"'messages' may hold at most {MAX_MESSAGES}", param="messages")
        names: dict[str, str] = {}  # tool call id -> function name, for tool results
        images: list[str | Remote] = []
        messages = tuple(_message(m, i, names, images) for i, m in enumerate(raw))
        tools = tools_field(body)
        choice = tool_choice_field(body, tools)
        if choice.mode in ("required", "function") and params.grammar is not None:
            raise InvalidRequest(
                "'response_format' and a required tool call cannot both constrain the output",
                param="tool_choice",
            )
        parallel = _field(body, "parallel_tool_calls", bool, "true or false")
        effort = _field(body, "reasoning_effort", str, "a string such as 'none', 'low' or 'high'")
        return cls(
            params,
            messages,
            tools,
            choice,
            _thinking(body),
            parallel is not False,
            effort=effort if effort != "none" else None,
            images=tuple(images),
        )


def _thinking(body: Mapping[str, Any]) -> bool | None:
    """Whether the model should think: ``thinking`` (an extension),
    ``reasoning_effort`` ("none" turns it off) or vLLM's
    ``chat_template_kwargs.enable_thinking``; None where the request is silent."""
    kwargs = _field(body, "chat_template_kwargs", dict, "an object") or {}
    for key, value in (
        ("thinking", body.get("thinking")),
        ("chat_template_kwargs", kwargs.get("enable_thinking")),
    ):
        if value is not None and not isinstance(value, bool):
            raise InvalidRequest(f"'{key}' must be a boolean, got {value!r}", param=key)
        if value is not None:
            return bool(value)
    effort = _field(body, "reasoning_effort", str, "a string such as 'none', 'low' or 'high'")
    if effort is not None:
        return effort != "none"
    return None


@attrs.frozen
class CompletionRequest:
    params: GenerationParams
    prompt: str | tuple[int, ...]

    @classmethod
    def from_openai(cls, body: Any) -> CompletionRequest:
        body = json_object(body)
        params = GenerationParams.from_openai(body, ("max_tokens",), chat=False)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
            prompt = prompt[0]  # a batch of one
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequest("'prompt' must not be empty", param="prompt")
            return cls(params, prompt)
        if (
            isinstance(prompt, list)
            and prompt
            and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in prompt)
        ):
            return cls(params, tuple(prompt))
        raise InvalidRequest(
            "'prompt' must be a non-empty string or list of token ids (one prompt per request)",
            param="prompt",
        )


def parse_json(raw: str | bytes, what: str = "the request body", param: str | None = None) -> Any:
    """A request body (or JSON a request carries in a string, ``what``: a
    tool call's arguments): JSON nested at most ``MAX_DEPTH`` deep whose every
    string (keys too) is valid Unicode (JSON can spell a lone surrogate,
    ``"\\ud800"``, which no tokenizer takes)."""
    try:
        value = json.loads(raw)
    except RecursionError:
        raise InvalidRequest(f"{what} is nested more than {MAX_DEPTH} deep", param) from None
    except (ValueError, UnicodeDecodeError) as e:
        raise InvalidRequest(f"{what} is not valid JSON: {e}", param) from None
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            _unicode(item)
        elif isinstance(item, dict | list):
            if depth > MAX_DEPTH:
                raise InvalidRequest(f"{what} is nested more than {MAX_DEPTH} deep", param)
            if isinstance(item, dict):
                for key in item:
                    _unicode(key)
                item = list(item.values())
            stack.extend((x, depth + 1) for x in item)
    return value


def _unicode(text: str) -> None:
    if not text.isascii():
        try:
            text.encode()
        except UnicodeEncodeError:
            raise InvalidRequest(
                "the request body has text that is not valid Unicode (a lone surrogate)"
            ) from None


def json_object(body: Any) -> Mapping[str, Any]:
    if not isinstance(body, dict):
        raise InvalidRequest("the request body must be a JSON object")
    return body


def _message(
    raw: Any, i: int, names: dict[str, str], images: list[str | Remote] | None = None
) -> dict[str, Any]:
    """A message as chat templates take it; tool calls' arguments become
    objects. An assistant's reasoning (``reasoning_content``) goes to the
    template, which decides whether to write it (Qwen3's writes it back in
    the turns of a tool loop, so the prompt repeats what the model generated
    and its cached tokens are reused; most leave it out)."""
    where = f"messages[{i}]"
    if not isinstance(raw, dict):
        raise InvalidRequest(f"'{where}' must be an object", param=where)
    role = raw.get("role")
    if not isinstance(role, str) or role not in _ROLES:
        raise InvalidRequest(
            f"'{where}.role' must be one of {', '.join(sorted(_ROLES))}", param=f"{where}.role"
        )
    calls = raw.get("tool_calls")
    if calls is not None and not isinstance(calls, list):
        raise InvalidRequest(f"'{where}.tool_calls' must be a list", param=f"{where}.tool_calls")
    message: dict[str, Any]
    if role == "assistant" and calls:
        content = raw.get("content")
        message = {
            "role": role,
            "content": "" if content is None else _content(content, where),
            "tool_calls": [
                _call(c, f"{where}.tool_calls[{j}]", names) for j, c in enumerate(calls)
            ],
        }
    else:
        takes = images if role in ("user", "tool") else None  # images come from them
        message = {
            "role": "system" if role == "developer" else role,
            "content": _content(raw.get("content"), where, takes),
        }
    if role == "assistant":
        reasoning = raw.get("reasoning_content")
        if reasoning is not None and not isinstance(reasoning, str):
            raise InvalidRequest(f"'{where}.reasoning_content' must be a string", param=where)
        if reasoning:
            message["reasoning_content"] = reasoning
    if role == "tool":
        call_id = raw.get("tool_call_id")
        if not isinstance(call_id, str):
            raise InvalidRequest(f"'{where}.tool_call_id' must be a string", param=where)
        message["tool_call_id"] = call_id
        name = raw.get("name") or names.get(call_id)
        if name:
            message["name"] = name
    return message


def _call(raw: Any, where: str, names: dict[str, str]) -> dict[str, Any]:
    fn = raw.get("function") if isinstance(raw, dict) else None
    if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
        raise InvalidRequest(f"'{where}' must hold a function with a name", param=where)
    args = fn.get("arguments", "{}")
    what = f"'{where}.function.arguments'"
    parsed = parse_json(args, what, where) if isinstance(args, str) else args
    call_id = raw.get("id") if isinstance(raw.get("id"), str) else f"call_{len(names)}"
    names[call_id] = fn["name"]
    return {
        "id": call_id,
        "type": "function",
        "function": {"name": fn["name"], "arguments": parsed},
    }


def _content(content: Any, where: str, images: list[str | Remote] | None = None) -> Any:
    """A message's content: its text, or, where it has images (which only
    ``images`` takes: its files are added to it), its parts as chat
    templates take them, an image as ``{"type": "image"}``."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts: list[dict[str, Any]] = []
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind == "text" and isinstance(part.get("text"), str):
                parts.append({"type": "text", "text": part["text"]})
            elif kind == "image_url" and images is not None:
                url = part.get("image_url")
                url = url.get("url") if isinstance(url, dict) else url
                images.append(from_url(url, f"{where}.content[{j}].image_url.url"))
                parts.append({"type": "image"})
            elif kind == "input_audio":
                raise InvalidRequest(
                    "mlxd's models take no audio: an input_audio part cannot be read "
                    "(send its transcript as text)",
                    param=f"{where}.content[{j}]",
                )
            else:
                allowed = "text and image_url" if images is not None else "text"
                raise InvalidRequest(
                    f"only {allowed} content parts are supported here",
                    param=f"{where}.content[{j}]",
                )
        if any(p["type"] == "image" for p in parts):
            return parts
        return "".join(p["text"] for p in parts)
    raise InvalidRequest(
        f"'{where}.content' must be a string or a list of content parts", param=f"{where}.content"
    )


def _refuse_unsupported(body: Mapping[str, Any]) -> None:
    n = body.get("n", 1)
    if n != 1:
        raise InvalidRequest("only n=1 is supported", param="n")
    if body.get("functions"):
        raise InvalidRequest("'functions' is deprecated; send 'tools'", param="functions")
    if body.get("echo") not in (None, False):
        raise InvalidRequest("'echo' is not supported", param="echo")
    if body.get("suffix") is not None:
        raise InvalidRequest("'suffix' is not supported", param="suffix")
    if body.get("best_of") not in (None, 1):
        raise InvalidRequest("'best_of' is not supported", param="best_of")


def _field(
    body: Mapping[str, Any],
    key: str,
    kind: type[T],
    expected: str,
    *,
    required: bool = False,
    check: Callable[[T], bool] = lambda _: True,
) -> T | None:
    value = body.get(key)
    if value is None:
        if required:
            raise InvalidRequest(f"'{key}' is required", param=key)
        return None
    if (
        (isinstance(value, bool) and kind is not bool)
        or not isinstance(value, kind)
        or not check(value)
    ):
        raise InvalidRequest(f"'{key}' must be {expected}, got {value!r}", param=key)
    return value


def _number(
    body: Mapping[str, Any],
    key: str,
    low: float,
    high: float,
    *,
    default: float,
    low_open: bool = False,
) -> float:
    value = body.get(key)
    if value is None:
        return default
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if ok:
        ok = (low < value if low_open else low <= value) and value <= high
    if not ok:
        bracket = "(" if low_open else "["
        raise InvalidRequest(
            f"'{key}' must be a number in {bracket}{low:g}, {high:g}], got {value!r}", param=key
        )
    return float(value)

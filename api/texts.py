"""Text on the daemon's side of a model: chat template, tokenizing, detokenizing.

The runner sees only token ids; everything textual happens here, with the
model's own Hugging Face tokenizer (no MLX computation). Tokenizing runs in worker threads
(``trio.to_thread``); detokenizing a stream is cheap and runs inline.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from stat import S_ISREG
from typing import Any

import attrs
from tokenizers import Tokenizer
from tokenizers.decoders import DecodeStream

from api.images import Sizing
from api.prompt_tokens import PromptTokens
from scheduler.errors import InvalidRequest

ToolParser = Callable[[str, Any], Any]


@attrs.frozen
class Markers:
    """A model's output markers; ``None`` where it has none."""

    think: tuple[str, str] | None = None
    tool: tuple[str, str] | None = None
    tool_format: str | None = None  # mlx-lm's name for it ("json_tools", ...)
    parse_tool: ToolParser | None = attrs.field(default=None, eq=False)


def texts_of(model_dir: Path, max_context: int | None) -> Texts:
    """The ``Texts`` of a model directory, loaded once per process while its
    files stay as they are: models configured on the same files share one, and
    a reload that changes only a model's settings keeps it (a tokenizer takes
    half a second or more to load). Rewritten files are read again."""
    return _shared(model_dir.resolve(), max_context, _stamp(model_dir))


def _stamp(model_dir: Path) -> tuple[tuple[str, int, int], ...]:
    """The name, change time and size of every file in the directory but the weights."""
    stats = ((p.name, p.stat()) for p in model_dir.iterdir() if p.suffix != ".safetensors")
    return tuple(sorted((n, s.st_mtime_ns, s.st_size) for n, s in stats if S_ISREG(s.st_mode)))


@functools.lru_cache(maxsize=4)
def _shared(model_dir: Path, max_context: int | None, stamp: object) -> Texts:
    return Texts(model_dir, max_context)


class Texts:
    """The tokenizer, chat template, output markers and text limits of one
    model directory.

    The tokenizer is mlx-lm's wrapper around the Hugging Face one: it knows
    the model's thinking markers, its tool-call format and parser, and the
    template's switch for thinking."""

    def __init__(self, model_dir: Path, max_context: int | None) -> None:
        os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
        from mlx_lm.tokenizer_utils import load

        self.tokenizer: Any = load(model_dir)
        config = json.loads((model_dir / "config.json").read_text())
        self.max_context = max_context or _context_from(config, self.tokenizer)
        generation = _generation_config(model_dir)
        self.stop_ids = _stop_ids(config, generation, self.tokenizer)
        self.sampling_defaults = _sampling_defaults(generation)
        self.markers = _markers(self.tokenizer)
        self._hidden = _hidden_ids(self.backend, self.markers)
        think = self.markers.think
        self._thinking = (
            re.compile(re.escape(think[0]) + ".*?" + re.escape(think[1]), re.S) if think else None
        )
        self.renders_tools = self._renders_tools()
        self.prompts = PromptTokens(self.backend)  # chat prompts, tokenized from where they differ
        # The most characters one token can stand for (byte-level vocabularies
        # spell a byte a character): a text has at least len // this tokens.
        self.longest_token = max((len(t) for t in self.backend.get_vocab()), default=1) or 1
        self.places_system = self._places_system()
        self.sizing = Sizing.of(model_dir)  # None: the model takes no images

    @property
    def backend(self) -> Tokenizer:
        return self.tokenizer.backend_tokenizer

    def chat_prompt(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]] = (),
        thinking: bool | None = None,
        effort: str | None = None,
    ) -> list[int]:
        """The prompt for a conversation (``render``, then tokenized, from
        where it departs from an earlier prompt: ``api/prompt_tokens.py``)."""
        return self.prompts.encode(self.render(messages, tools, thinking, effort))

    def render(
        self,
        messages: list[dict[str, Any]],
        tools: Sequence[dict[str, Any]] = (),
        thinking: bool | None = None,
        effort: str | None = None,
    ) -> str:
        """A conversation as the chat template writes it: ``tools`` (OpenAI
        function tools), ``thinking`` (None: the template's default) and
        ``effort`` (its ``reasoning_effort``, for templates that take one) go
        to the template. Reasoning in earlier assistant turns is left out,
        unless the message carries it apart (``reasoning_content``), for the
        templates that write it back."""
        if not self.tokenizer.has_chat_template:
            raise InvalidRequest(
                "this model has no chat template; use /v1/completions", param="messages"
            )
        kwargs: dict[str, Any] = {"tools": list(tools)} if tools else {}
        if thinking is not None:
            kwargs["enable_thinking"] = thinking
        if effort is not None:
            kwargs["reasoning_effort"] = effort
        if not self.places_system:
            messages = folded_system(messages)
        return str(
            self.tokenizer.apply_chat_template(
                [self._without_reasoning(m) for m in messages],
                add_generation_prompt=True,
                tokenize=False,
                **kwargs,
            )
        )

    def marked(self, text: str, marks: Sequence[str]) -> int:
        """How many of ``text``'s tokens come before the end of the last of
        ``marks`` found in it (0 if none is): the part of a prompt a request
        asked to have cached (Anthropic's ``cache_control``). ``text`` is a
        prompt just encoded by ``self.prompts``, whose cuts spare tokenizing
        it whole again."""
        end = max((i + len(m) for m in marks if (i := text.rfind(m)) >= 0), default=0)
        return self.prompts.before(text, end) if end else 0

    def _renders_tools(self) -> bool:
        """Whether the chat template puts tools in the prompt at all (many
        leave them out without a word: their requests would be answered as
        if no tools had been given)."""
        if not self.tokenizer.has_chat_template:
            return False
        probe = {"type": "function", "function": {"name": "mlxd_probe", "parameters": {}}}
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": "hi"}], tools=[probe], tokenize=False
            )
        except Exception:  # a template that fails on tools takes none
            return False
        return "mlxd_probe" in text

    def _places_system(self) -> bool:
        """Whether the chat template renders a system turn where it stands
        mid-conversation (ChatML, Qwen and Llama templates do; Gemma's and
        Mistral's refuse anything but alternating user and assistant turns)."""
        probe = [
            {"role": "system", "content": "s"},
            {"role": "user", "content": "u"},
            {"role": "system", "content": "mlxd_probe"},
            {"role": "user", "content": "v"},
        ]
        try:
            text = self.tokenizer.apply_chat_template(probe, tokenize=False)
        except Exception:  # templates raise on roles they do not take
            return False
        return "mlxd_probe" in text and text.index("mlxd_probe") > text.index("u")

    def opens_reasoning(self, prompt: list[int]) -> bool:
        """Whether the prompt ends inside a reasoning block (the template
        opened it for the model)."""
        w = self.tokenizer
        return bool(w.has_thinking) and w.rfind_think_start(prompt) > w.rfind_think_end(prompt)

    def encode(self, text: str) -> list[int]:
        return list(self.backend.encode(text, add_special_tokens=False).ids)

    def text_stream(self, stops: Sequence[str]) -> TextStream:
        return TextStream(self.backend, stops, self._hidden)

    def _without_reasoning(self, message: dict[str, Any]) -> dict[str, Any]:
        content = message.get("content")
        if message["role"] != "assistant" or self._thinking is None or not isinstance(content, str):
            return message
        return message | {"content": self._thinking.sub("", content).lstrip()}


def folded_system(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The conversation for a template that takes system text only at its
    start: the leading system turns joined into one, and each later one put,
    where it stands, into the user turn beside it (the one before, else the
    one after; a turn of its own as the user's if neither is a user turn).
    Never moved to the front, which would change every turn's prompt from
    that point and cost the prefix cache the whole conversation. Such
    templates also want user and assistant turns to alternate: user turns
    that end up side by side are joined, as Anthropic's API joins them."""
    lead = 0
    while lead < len(messages) and messages[lead]["role"] == "system":
        lead += 1
    out = []
    if lead:
        joined = "\n\n".join(_text_of(m) for m in messages[:lead])
        out.append({"role": "system", "content": joined})
    carried: list[str] = []  # system text waiting for the next user turn
    for message in messages[lead:]:
        if message["role"] == "system":
            text = _text_of(message)
            if out and out[-1]["role"] == "user" and isinstance(out[-1]["content"], str):
                out[-1] = out[-1] | {"content": out[-1]["content"] + "\n\n" + text}
            else:
                carried.append(text)
            continue
        if carried:
            if message["role"] == "user" and isinstance(message["content"], str):
                message = message | {"content": "\n\n".join([*carried, message["content"]])}
            else:
                out.append({"role": "user", "content": "\n\n".join(carried)})
            carried = []
        if _joinable(out[-1] if out else None) and _joinable(message):
            message = message | {"content": out.pop()["content"] + "\n\n" + message["content"]}
        out.append(message)
    if carried:
        out.append({"role": "user", "content": "\n\n".join(carried)})
    return out


def _joinable(message: dict[str, Any] | None) -> bool:
    return message is not None and message["role"] == "user" and isinstance(message["content"], str)


def _text_of(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else ""


def _markers(wrapper: Any) -> Markers:
    think = (wrapper.think_start, wrapper.think_end) if wrapper.has_thinking else None
    if not wrapper.has_tool_calling:
        return Markers(think)
    return Markers(
        think,
        (wrapper.tool_call_start, wrapper.tool_call_end),
        wrapper.init_kwargs.get("tool_parser_type"),
        wrapper.tool_parser,
    )


def _hidden_ids(tokenizer: Tokenizer, markers: Markers) -> frozenset[int]:
    """Special tokens, which stay out of the text, except the markers."""
    shown = {m for pair in (markers.think, markers.tool) if pair for m in pair}
    return frozenset(
        i
        for i, t in tokenizer.get_added_tokens_decoder().items()
        if t.special and t.content not in shown
    )


class TextStream:
    """Turns generated token ids into text deltas, cutting at stop strings.

    Text that might be the start of a stop string is held back until it is
    known not to be one, so a stop string never leaks into the output.
    """

    def __init__(
        self, tokenizer: Tokenizer, stops: Sequence[str] = (), hidden: frozenset[int] = frozenset()
    ) -> None:
        self._tokenizer = tokenizer
        self._decode = DecodeStream(skip_special_tokens=False)
        self._hidden = hidden
        self._stops = [s for s in stops if s]
        self._held = ""
        self.stopped = False
        self.matched: str | None = None  # the stop string that ended the text

    def feed(self, token: int) -> str:
        if self.stopped or token in self._hidden:
            return ""
        piece = self._decode.step(self._tokenizer, token) or ""
        if not self._stops:
            return piece
        text = self._held + piece
        hits = [(i, s) for i, s in ((text.find(s), s) for s in self._stops) if i >= 0]
        if hits:
            at, self.matched = min(hits)
            self.stopped = True
            self._held = ""
            return text[:at]
        keep = held_back(text, self._stops)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep]

    def flush(self) -> str:
        held, self._held = self._held, ""
        return held


def held_back(text: str, stops: Sequence[str]) -> int:
    """Length of the longest suffix of ``text`` that begins one of ``stops``
    (which must then be held back until more text decides)."""
    best = 0
    for stop in stops:
        for n in range(min(len(stop) - 1, len(text)), best, -1):
            if stop.startswith(text[-n:]):
                best = n
                break
    return best


def _context_from(config: dict[str, Any], tokenizer: Any) -> int:
    for key in ("max_position_embeddings", "max_sequence_length", "n_positions", "seq_length"):
        value = config.get(key) or config.get("text_config", {}).get(key)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None)
    if isinstance(limit, int) and 0 < limit < 10**7:
        return limit
    return 4096


def _generation_config(model_dir: Path) -> dict[str, Any]:
    """The model's ``generation_config.json`` (its makers' sampling settings
    and end tokens), or nothing if it has none or it is not an object."""
    try:
        config = json.loads((model_dir / "generation_config.json").read_text())
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def _sampling_defaults(generation: dict[str, Any]) -> dict[str, float | int]:
    """The sampling settings a request gets for the fields it leaves out:
    the model's own, where it gives them (and they are in range). A config
    that says ``do_sample: false`` means greedy."""
    out: dict[str, float | int] = {}
    for key, low, high in (("temperature", 0, 2), ("top_p", 0, 1), ("min_p", 0, 1)):
        value = generation.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high:
            out[key] = float(value)
    top_k = generation.get("top_k")
    if isinstance(top_k, int) and not isinstance(top_k, bool) and top_k >= 0:
        out["top_k"] = top_k
    if out.get("top_p") == 0:
        del out["top_p"]  # OpenAI's range starts above 0
    if generation.get("do_sample") is False:
        out["temperature"] = 0.0
    return out


def _stop_ids(
    config: dict[str, Any], generation: dict[str, Any], tokenizer: Any
) -> tuple[int, ...]:
    ids: set[int] = set()
    sources: list[Any] = [
        config.get("eos_token_id"),
        tokenizer.eos_token_id,
        generation.get("eos_token_id"),
    ]
    for value in sources:
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, list):
            ids.update(v for v in value if isinstance(v, int))
    return tuple(sorted(ids))

"""Model directories for the tool-call and reasoning tests.

``agent_tokenizer`` gives the SmolLM2 tokenizer what a thinking, tool-calling
model has: ``<think>`` and ``</think>`` tokens, and a chat template that
renders tools, calls and their results in the common JSON-between-markers
format and honours ``enable_thinking``. ``scripted_model`` makes a model
directory whose runner replays a given text (``tests/script_engine.py``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

from tokenizers import AddedToken, Tokenizer

# The layout of Qwen-style templates (this one written for the tests): tools in
# the system turn, each call as JSON between <tool_call> markers, results in
# "tool" turns, and an empty reasoning block when thinking is turned off.
TEMPLATE = """\
{%- if tools -%}
<|im_start|>system
You can call these functions:
{% for tool in tools %}{{ tool | tojson }}
{% endfor %}To call one, write <tool_call>
{"name": NAME, "arguments": ARGUMENTS}
</tool_call><|im_end|>
{% endif -%}
{%- for message in messages -%}
{%- if message.role == "assistant" and message.tool_calls -%}
<|im_start|>assistant
{{ message.content }}{% for tool_call in message.tool_calls %}
{%- if tool_call.function %}{% set tool_call = tool_call.function %}{% endif -%}
<tool_call>
{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}
</tool_call>{% endfor %}<|im_end|>
{% else -%}
<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif -%}
{%- endif -%}"""


# The same, writing an assistant's reasoning back (``reasoning_content``), as
# Qwen3's template does in the turns of a tool loop.
RECALLING = TEMPLATE.replace(
    "<|im_start|>assistant\n{{ message.content }}",
    "<|im_start|>assistant\n{% if message.reasoning_content %}<think>"
    "{{ message.reasoning_content }}</think>{% endif %}{{ message.content }}",
)


def agent_tokenizer(
    tokenizer_dir: Path, out: Path, think_tokens: bool = True, template: str = TEMPLATE
) -> Path:
    """Copy a model directory's tokenizer into ``out``, made agent-like."""
    out.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    if think_tokens:
        new = [AddedToken(t, special=False, normalized=False) for t in ("<think>", "</think>")]
        tok.add_tokens(new)
    tok.save(str(out / "tokenizer.json"))
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    config.pop("added_tokens_decoder", None)
    config["chat_template"] = template
    (out / "tokenizer_config.json").write_text(json.dumps(config))
    return out


def agent_model(model_dir: Path, out: Path) -> Path:
    """A real model (weights and config) with the agent template (and no new
    tokens, which its embedding would not have)."""
    agent_tokenizer(model_dir, out, think_tokens=False)
    shutil.copy(model_dir / "config.json", out / "config.json")
    for weights in model_dir.glob("*.safetensors"):
        shutil.copy(weights, out / weights.name)
    return out


def scripted_model(
    tokenizer_dir: Path,
    out: Path,
    text: str,
    step_s: float = 0.0,
    context: int = 4096,
    replies: Sequence[tuple[str, str]] = (),
    template: str = TEMPLATE,
) -> Path:
    """A model that answers every request with ``text`` and then end-of-turn,
    a token every ``step_s`` seconds, in a context of ``context`` tokens.

    ``replies`` are ``(pattern, text)`` pairs tried first, in order: the
    first whose regular expression is found in what the prompt adds since the
    model last spoke (its last ``<|im_start|>assistant`` turn, or the whole
    prompt) gives the answer, so that one model can call a tool and then, once
    the tool's result is in (``<|im_start|>tool``), answer (an agent's loop)."""
    agent_tokenizer(tokenizer_dir, out, template=template)
    tok = Tokenizer.from_file(str(out / "tokenizer.json"))
    eos = tok.token_to_id("<|im_end|>")
    assert eos is not None

    def script(said: str) -> list[int]:
        return [*tok.encode(said, add_special_tokens=False).ids, eos]

    config = {
        "model_type": "mlxd_script",
        "script": script(text),
        "replies": [[pattern, script(said)] for pattern, said in replies],
        "eos_token_id": eos,
        "max_position_embeddings": context,
        "step_s": step_s,
    }
    (out / "config.json").write_text(json.dumps(config))
    return out


WORDS = "word " * 2000  # longer than any test lets a stream run


def talking_model(tokenizer_dir: Path, out: Path, step_s: float = 0.0, context: int = 4096) -> Path:
    """A scripted model that says ``WORDS``: for the tests of the daemon and
    its runners, where what a model computes plays no part."""
    return scripted_model(tokenizer_dir, out, WORDS, step_s, context)

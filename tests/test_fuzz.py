"""Random request bodies against a running daemon: whatever a client sends,
it gets an answer below 500, and the daemon serves on.

The bodies are valid requests with fields replaced by arbitrary JSON (nested
values, huge and non-finite numbers, lone surrogates), so that every check
on the way in is tried. The runner is scripted, so that whatever passes the
checks is answered at once. Derandomized: the same examples every run.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from config.settings import ModelConfig
from tests.conftest import TLS, serving, settings_for
from tests.scripted import scripted_model

MESSAGES = [{"role": "user", "content": "Hello"}]
TOOLS = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
VALID: dict[str, dict[str, Any]] = {
    "/v1/chat/completions": {"model": "m", "messages": MESSAGES, "max_tokens": 4},
    "/v1/completions": {"model": "m", "prompt": "Hello", "max_tokens": 4},
    "/v1/responses": {"model": "m", "input": "Hello", "max_output_tokens": 4},
    "/api/load": {"model": "m"},
}
FIELDS = [
    "model", "messages", "prompt", "input", "max_tokens", "max_completion_tokens",
    "max_output_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "stop", "stream",
    "stream_options", "tools", "tool_choice", "response_format", "text", "logit_bias",
    "logprobs", "top_logprobs", "presence_penalty", "frequency_penalty", "keep_alive", "n",
    "ignore_eos", "reasoning", "instructions", "chat_template_kwargs",
]  # fmt: skip
MESSAGE_FIELDS = ["role", "content", "tool_calls", "tool_call_id", "name", "reasoning_content"]

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12)
    | st.text(st.characters(categories=["Cs"]), min_size=1, max_size=2)  # lone surrogates
    | st.sampled_from(["user", "assistant", "tool", "function", "auto", "required", "m"])
)
values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def requests(draw: st.DrawFn) -> tuple[str, dict[str, Any]]:
    path = draw(st.sampled_from(sorted(VALID)))
    body = json.loads(json.dumps(VALID[path]))
    for field in draw(st.lists(st.sampled_from(FIELDS), max_size=3)):
        body[field] = draw(values)
    if path == "/v1/chat/completions" and draw(st.booleans()):
        message: dict[str, Any] = dict(MESSAGES[0])
        for field in draw(st.lists(st.sampled_from(MESSAGE_FIELDS), min_size=1, max_size=2)):
            message[field] = draw(values)
        body["messages"] = [message]
    if draw(st.booleans()):
        body["tools"] = TOOLS
    return path, body


@pytest.fixture(scope="module")
def daemon(tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("fuzz")
    model = scripted_model(tiny_dir, work / "m", "Hi there.")
    with serving(settings_for(work, ModelConfig("m", str(model)))) as d:
        yield d.url


@settings(
    max_examples=200,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
@given(requests())
def test_no_body_gets_a_server_error(daemon: str, request: tuple[str, dict[str, Any]]) -> None:
    path, body = request
    with httpx.Client(timeout=60, verify=TLS) as http:
        headers = {"Content-Type": "application/json"}
        with http.stream("POST", daemon + path, content=json.dumps(body), headers=headers) as resp:
            resp.read()
    assert resp.status_code < 500, (body, resp.text)
    if resp.status_code >= 400:
        assert set(resp.json()["error"]) == {"message", "type", "param", "code"}
    assert resp.status_code != 415


def test_the_daemon_serves_after_the_fuzz(daemon: str) -> None:
    with httpx.Client(timeout=60, verify=TLS) as http:
        resp = http.post(f"{daemon}/v1/chat/completions", json=VALID["/v1/chat/completions"])
    assert resp.status_code == 200 and resp.json()["choices"][0]["message"]["content"]

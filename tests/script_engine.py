"""A test engine that replays a scripted token sequence through the protocol.

Tool calls and reasoning come from models trained to emit them, and none is
reachable where the tests run. A model directory whose ``config.json`` says
``"model_type": "mlxd_script"`` and holds ``"script": [token ids]`` (plus the
tokenizer files, for the daemon; ``tests/scripted.py`` writes one) loads this
engine instead of MLX weights: each request gets the script's tokens, one per
step, through the same events, stop-token, ``max_tokens`` and cancellation
handling as a real model. Only the sampling is absent: there are no logits to
sample from. ``"step_s"`` makes each step take that long, as a real model's
decode does (a stream that must still be running when a test acts on it).
``"replies"``, ``[[pattern, script], ...]``, choose another script by what the
prompt adds since the model's last turn (``tests/scripted.py``): an agent's
tool call, then its answer once the tool's result is in.

The runner reaches it through its engine hook: the tests set
``MLXD_ENGINE=tests.script_engine:load`` (``tests/conftest.py``), and
``load`` answers for scripted directories only.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import attrs

from runner.commands import Load
from runner.protocol import Generate
from runner.steps import Hit, Output, Stats


@attrs.define
class _Replay:
    req: Generate
    script: list[int]
    at: int = 0


class ScriptEngine:
    prefixes = None
    model = None
    chunk = 0

    def __init__(
        self,
        script: list[int],
        max_batch: int,
        step_s: float = 0.0,
        replies: list[tuple[re.Pattern[str], list[int]]] | None = None,
        tokenizer: Any = None,
    ) -> None:
        self.script = script
        self.max_batch = max_batch
        self.step_s = step_s
        self.replies = replies or []
        self.tokenizer = tokenizer  # reads prompts, when replies depend on them
        self.stats = Stats()
        self._running: dict[int, _Replay] = {}

    def warm_up(self) -> None:
        pass

    def add(self, req: Generate) -> Hit:
        self._running[req.id] = _Replay(req, self._script_for(req.prompt))
        self.stats.prompt_tokens += len(req.prompt)
        return Hit()

    def _script_for(self, prompt: Sequence[int]) -> list[int]:
        if not self.replies:
            return self.script
        text = self.tokenizer.decode(prompt, skip_special_tokens=False)
        turn = "<|im_start|>assistant"
        spoke = text.rfind(turn, 0, max(text.rfind(turn), 0))  # before the generation prompt
        new = text[spoke + len(turn) :] if spoke >= 0 else text
        for pattern, script in self.replies:
            if pattern.search(new):
                return script
        return self.script

    def cancel(self, req_id: int) -> None:
        if self._running.pop(req_id, None) is not None:
            self.stats.cancelled += 1

    @property
    def active(self) -> int:
        return len(self._running)

    def request_ids(self) -> list[int]:
        return list(self._running)

    def reset(self) -> None:
        self._running.clear()

    def recover(self) -> None:
        self.reset()

    def step(self) -> list[Output]:
        if self._running and self.step_s:
            time.sleep(self.step_s)
        out: list[Output] = []
        for replay in list(self._running.values())[: self.max_batch]:
            req = replay.req
            token = replay.script[replay.at]
            replay.at += 1
            finish = None
            if token in req.stop_ids or replay.at == len(replay.script):
                finish = "stop"
            elif replay.at >= req.max_tokens:
                finish = "length"
            if finish is not None:
                del self._running[req.id]
            out.append((req.id, token, finish, None))
        self.stats.steps += 1
        self.stats.tokens += len(out)
        self.stats.max_batch = max(self.stats.max_batch, len(out))
        return out


def load(model_dir: Path, how: Load) -> ScriptEngine | None:
    """The runner's engine hook: the engine for a scripted model directory;
    ``None`` for a real model (which the runner then loads itself)."""
    config = json.loads((model_dir / "config.json").read_text())
    if config.get("model_type") != "mlxd_script":
        return None
    script = [int(t) for t in config["script"]]
    replies = [(re.compile(p), [int(t) for t in ids]) for p, ids in config.get("replies", [])]
    tokenizer = None
    if replies:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    return ScriptEngine(script, how.max_batch, float(config.get("step_s", 0)), replies, tokenizer)

"""Token log-probabilities in OpenAI's two shapes.

The runner reports, per generated token, ``{"id", "logprob", "top": [[id,
logprob], ...]}``; these turn that into the chat shape (``content`` entries
with ``bytes`` and ``top_logprobs``) or the legacy completions shape
(parallel ``tokens`` / ``token_logprobs`` / ``top_logprobs`` / ``text_offset``).
"""

from __future__ import annotations

from typing import Any

from api.texts import Texts


def _token(texts: Texts, token: int) -> str:
    return str(texts.tokenizer.decode([token]))


def chat(texts: Texts, entries: list[dict[str, Any]]) -> dict[str, Any]:
    def one(token: int, logprob: float) -> dict[str, Any]:
        text = _token(texts, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode())}

    content = [
        one(e["id"], e["logprob"]) | {"top_logprobs": [one(t, lp) for t, lp in e["top"]]}
        for e in entries
    ]
    return {"content": content, "refusal": None}


def completion(texts: Texts, entries: list[dict[str, Any]], offset: int) -> dict[str, Any]:
    tokens = [_token(texts, e["id"]) for e in entries]
    offsets = []
    for t in tokens:
        offsets.append(offset)
        offset += len(t)
    return {
        "tokens": tokens,
        "token_logprobs": [e["logprob"] for e in entries],
        "top_logprobs": [{_token(texts, t): lp for t, lp in e["top"]} for e in entries],
        "text_offset": offsets,
    }

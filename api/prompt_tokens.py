"""Prompts tokenized once: an agent's next turn is tokenized only from where
it departs from an earlier prompt.

An agent sends its whole conversation every turn: 10,000 tokens and more of
text that was tokenized the turn before (22 ms of CPU for 10k tokens with
SmolLM2's tokenizer, on the daemon's event loop's process), and a few hundred
new ones. The tokenizer splits a text at its added tokens (``<|im_start|>``,
``<|im_end|>`` and the like) before anything else, and tokenizes the pieces
between them on their own: so the tokens of a text up to the end of an added
token do not depend on what follows it. ``PromptTokens`` keeps the last
prompts' tokens with the places where such tokens end, finds the one that
shares the longest start with a new prompt, takes its tokens up to the last
of those places inside the shared start, and tokenizes only the rest.
"""

from __future__ import annotations

import collections
import threading

from tokenizers import Tokenizer

Cut = tuple[int, int]  # (character offset just after an added token, tokens before it)


class PromptTokens:
    def __init__(self, tokenizer: Tokenizer, entries: int = 32) -> None:
        self._tokenizer = tokenizer
        self._added = frozenset(tokenizer.get_added_tokens_decoder())
        self._entries: collections.OrderedDict[str, tuple[list[int], list[Cut]]] = (
            collections.OrderedDict()
        )
        self._size = entries
        self._lock = threading.Lock()  # prompts are tokenized in worker threads

    def encode(self, text: str) -> list[int]:
        with self._lock:
            base, ids, cuts = self._nearest(text)
        rest = self._tokenizer.encode(text[base:], add_special_tokens=False)
        new = rest.ids
        cuts = list(cuts)
        for i, token in enumerate(new):
            if token in self._added and (chars := rest.token_to_chars(i)) is not None:
                cuts.append((base + chars[1], len(ids) + i + 1))
        ids = ids + new
        with self._lock:
            self._entries[text] = (ids, cuts)
            self._entries.move_to_end(text)
            while len(self._entries) > self._size:
                self._entries.popitem(last=False)
        return list(ids)

    def before(self, text: str, end: int) -> int:
        """How many of ``text``'s tokens end at or before character ``end``;
        ``text`` was just encoded, so only the piece between the cuts around
        ``end`` is tokenized again."""
        with self._lock:
            _, cuts = self._entries.get(text, ((), []))
        at, n = next((cut for cut in reversed(cuts) if cut[0] <= end), (0, 0))
        stop = next((c for c, _ in cuts if c > end), len(text))
        piece = self._tokenizer.encode(text[at:stop], add_special_tokens=False)
        return n + sum(1 for _, right in piece.offsets if at + right <= end)

    def _nearest(self, text: str) -> tuple[int, list[int], list[Cut]]:
        """Where the kept prompt sharing the longest start with ``text``
        lets its tokenizing begin, the tokens before that, and their cuts."""
        best: tuple[int, list[int], list[Cut]] = (0, [], [])
        used = None
        for kept, (ids, cuts) in self._entries.items():
            shared = _shared(kept, text)
            usable = [cut for cut in cuts if cut[0] <= shared]
            if usable and usable[-1][0] > best[0]:
                at, n = usable[-1]
                best, used = (at, ids[:n], usable), kept
        if used is not None:
            self._entries.move_to_end(used)
        return best


def _shared(a: str, b: str) -> int:
    """The length of the longest common start of ``a`` and ``b`` (a binary
    search over slice comparisons, which run in C)."""
    low, high = 0, min(len(a), len(b))
    while low < high:
        mid = (low + high + 1) // 2
        if a[:mid] == b[:mid]:
            low = mid
        else:
            high = mid - 1
    return low

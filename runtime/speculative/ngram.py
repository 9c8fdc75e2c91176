"""NGRAM drafting (prompt lookup): continue the request's text the way it continued before.

The last n tokens of prompt + output are looked up among their earlier occurrences (longest n
first, most recent occurrence); the tokens that followed are the draft. No model, no device: it
runs wherever the scheduler runs. Each request keeps an index of its n-grams that grows with its
output, so a lookup costs O(MAX_N) dictionary probes, not a scan of the prompt.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# n-gram lengths tried, longest first. A single-token match proposes too often and is right too
# rarely to pay for its verify rows.
MAX_N = 4
MIN_N = 2


@dataclass
class NgramIndex:
    """For every n-gram of tokens[:indexed] (n in MIN_N..MAX_N) the position right after its latest
    occurrence. The n-grams that end at the last token are left out, so a lookup of the current
    suffix finds an earlier occurrence whose continuation is known."""

    tokens: list[int] = field(default_factory=list)
    follow: dict[tuple[int, ...], int] = field(default_factory=dict)

    def sync(self, prompt: list[int], output: list[int]) -> None:
        """Index the tokens appended since the last call. Output rewritten behind our back (grammar
        jump-forward re-tokenizes its last token) means a rebuild: a stale index only proposes bad
        drafts, which verification rejects, but a fresh one proposes good ones."""
        have = len(self.tokens)
        total = len(prompt) + len(output)
        if have > total or (have and self._token_at(prompt, output, have - 1) != self.tokens[-1]):
            self.tokens, self.follow, have = [], {}, 0
        if have < len(prompt):
            self.tokens.extend(prompt[have:])
            self.tokens.extend(output)
        else:
            self.tokens.extend(output[have - len(prompt):])
        # n-grams ending at positions [have - 1, total - 2]: each now has a known next token.
        toks = self.tokens
        for end in range(max(have - 1, 0), total - 1):
            for n in range(MIN_N, MAX_N + 1):
                if end + 1 >= n:
                    self.follow[tuple(toks[end + 1 - n : end + 1])] = end + 1

    @staticmethod
    def _token_at(prompt: list[int], output: list[int], i: int) -> int:
        return prompt[i] if i < len(prompt) else output[i - len(prompt)]

    def propose(self, max_tokens: int) -> list[int]:
        toks = self.tokens
        for n in range(MAX_N, MIN_N - 1, -1):
            if len(toks) <= n:
                continue
            start = self.follow.get(tuple(toks[-n:]))
            if start is not None:
                return toks[start : start + max_tokens]
        return []


class NgramDrafter:
    """Per-request n-gram indexes; `propose` drafts for one request from its own tokens only, so a
    request drafts the same alone or in any batch."""

    def __init__(self) -> None:
        self.indexes: dict[int, NgramIndex] = {}

    def propose(self, key: int, prompt: list[int], output: list[int], max_tokens: int) -> list[int]:
        if max_tokens <= 0:
            return []
        index = self.indexes.setdefault(key, NgramIndex())
        index.sync(prompt, output)
        return index.propose(max_tokens)

    def forget(self, key: int) -> None:
        self.indexes.pop(key, None)

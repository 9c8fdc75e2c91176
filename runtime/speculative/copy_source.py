"""Where a request's last NGRAM chain was copied from, to go on copying where no n-gram matches (issue 18).

A chain copies the text after an earlier occurrence of the request's suffix. When the target replaces one of its
tokens (the verify's bonus token differs from the draft), the text the request now ends with occurred nowhere
before: no n-gram matches until copying has run two tokens past the edit, and those steps decode plainly. If the
edit was a substitution (one token for one), the copy goes on at the source position the replaced token stood
for: the token after the edit is the source's token after it. So a request keeps its last chain's source (start
position, text length when drafted) and, with nothing matched, drafts from the source position its text length
now maps to (past the source's end, a loop: the period the chain was drafted with). A resumed chain that has
none of its drafts accepted drops the source (the copy is over), and so do two verifies in a row that accept
nothing (chains built ahead, verify_ahead.py, resume without registering), so a request that stops copying decodes
plainly again after a wasted verify row or two.

Only speed depends on this: verification emits exactly what decoding would.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass
class CopySource:
    start: int  # the text position the chain's first draft was copied from
    end: int  # the text's length when it was drafted
    resumed: bool  # drafted from a resumed source, not a matched n-gram
    misses: int = 0  # verifies in a row since that accepted no draft


class CopySources:
    """Per request (its drafter key) the source of its last chain."""

    def __init__(self) -> None:
        self.sources: dict[int, CopySource] = {}

    def drafted(self, key: int, start: int, end: int, resumed: bool) -> None:
        self.sources[key] = CopySource(start, end, resumed)

    def verified(self, key: int, accepted: int) -> None:
        """A verify result of the request: a resumed chain with nothing accepted ends the copy, as do two such
        verifies in a row."""
        source = self.sources.get(key)
        if source is None:
            return
        source.misses = source.misses + 1 if accepted == 0 else 0
        if source.misses and (source.resumed or source.misses >= 2):
            del self.sources[key]

    def resume(self, key: int, total: int) -> int:
        """The source position of the token after a text of `total` tokens (one source token per token appended
        since the chain was drafted), -1 without a source."""
        source = self.sources.get(key)
        if source is None or total <= source.end:
            return -1
        at = source.start + (total - source.end)
        return at if at < source.end else source.start + (at - source.start) % (source.end - source.start)

    def forget(self, key: int) -> None:
        self.sources.pop(key, None)

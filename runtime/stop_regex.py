"""`stop_regex` (SGLang 0.5.10): a request stops once a pattern is found in the decoded tail of its
output. SGLang's semantics: the tail is the decoded last (longest possible match + 1) tokens, or the
whole output for an unbounded pattern (a character never takes less than one token); `re.search`;
the finish reason is `{"type": "stop", "matched": <the pattern>}`. Unlike SGLang (whose trim looks
for the pattern text itself in the output, so a regex match usually leaks), the match is cut from
the output, as a stop string is, and while streaming, text that could still grow into a match is
held back (partial matching, from the `regex` package; `re` has none).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from re import _parser as sre_parse  # type: ignore[attr-defined]  # SGLang's length bound uses it too

_UNBOUNDED = sre_parse.MAXREPEAT


@dataclass(frozen=True)
class StopRegexes:
    patterns: tuple[re.Pattern[str], ...]
    window_tokens: int | None  # tail tokens to decode for a match; None: the whole output

    def search(self, tail: str) -> str | None:
        """The first pattern (as sent) found in `tail`, or None."""
        for p in self.patterns:
            if p.search(tail):
                return p.pattern
        return None


def validate(pattern: str) -> str | None:
    """Why `pattern` cannot be a stop regex, or None when it can."""
    try:
        compiled = re.compile(pattern)
    except re.error as exc:
        return f"not a valid regular expression: {exc}"
    if compiled.search("") is not None:
        return f"{pattern!r} matches the empty string, so every request would stop at once"
    return None


@functools.lru_cache(maxsize=1024)
def compile_stop_regexes(patterns: tuple[str, ...]) -> StopRegexes:
    bounds = [_max_len(sre_parse.parse(p)) for p in patterns]
    window = None if any(b is None for b in bounds) else max(bounds) + 1
    return StopRegexes(tuple(re.compile(p) for p in patterns), window)


def _max_len(parsed: sre_parse.SubPattern) -> int | None:
    """Longest text (in characters) `parsed` can match, or None when unbounded."""
    total = 0
    for op, av in parsed:
        if op in (sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.IN, sre_parse.ANY):
            total += 1
        elif op == sre_parse.SUBPATTERN:
            n = _max_len(av[3])
        elif op == sre_parse.BRANCH:
            lens = [_max_len(b) for b in av[1]]
            n = None if any(x is None for x in lens) else max(lens)
        elif op in (sre_parse.MAX_REPEAT, sre_parse.MIN_REPEAT, getattr(sre_parse, "POSSESSIVE_REPEAT", None)):
            inner = _max_len(av[2])
            n = None if av[1] == _UNBOUNDED or inner is None else av[1] * inner
        elif op in (sre_parse.AT, sre_parse.ASSERT, sre_parse.ASSERT_NOT):
            n = 0  # zero width
        elif op == sre_parse.ATOMIC_GROUP:
            n = _max_len(av)
        else:  # GROUPREF (a backreference) and anything unknown: no bound
            return None
        if op not in (sre_parse.LITERAL, sre_parse.NOT_LITERAL, sre_parse.IN, sre_parse.ANY):
            if n is None:
                return None
            total += n
    return total


def trim_at_first_match(text: str, patterns: tuple[str, ...]) -> str:
    """`text` up to the earliest match of any pattern (the output a stop-regex finish returns)."""
    starts = [m.start() for p in compile_stop_regexes(patterns).patterns if (m := p.search(text))]
    return text[: min(starts)] if starts else text


def regex_holdback(text: str, patterns: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a match: held back while streaming."""
    import regex

    best = 0
    for pattern in patterns:
        for m in regex.finditer(pattern, text, partial=True):
            if m.partial:
                best = max(best, len(text) - m.start())
                break
    return best

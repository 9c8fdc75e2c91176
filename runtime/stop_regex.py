"""`stop_regex` (SGLang 0.5.10): a request stops once a pattern is found in the decoded tail of its
output. SGLang's semantics: the tail is the decoded last (longest possible match + 1) tokens, or the
whole output for an unbounded pattern (a character never takes less than one token); `re.search`;
the finish reason is `{"type": "stop", "matched": <the pattern>}`. Unlike SGLang (whose trim looks
for the pattern text itself in the output, so a regex match usually leaks), the match is cut from
the output, as a stop string is, and while streaming, text that could still grow into a match is
held back (partial matching, from the `regex` package; `re` has none).

A pattern runs on the scheduler's thread at every step of its request (and on the front's event loop
while streaming), on text the request can steer: a backtracking pattern such as `(x|xx)+y` takes
exponential time in the output's length. So patterns are matched by the `regex` package (in its
`re`-compatible V0 mode), whose searches take a timeout: a request whose patterns take more than
SEARCH_BUDGET_S on its output is finished with a 400 naming stop_regex instead of holding every other
request's decoding. Their total length is bounded (MAX_PATTERN_CHARS) since compiling runs on the
scheduler's thread too (a 150-KB alternation: ~130 ms).
"""
from __future__ import annotations

import functools
import re
import time
from dataclasses import dataclass
from re import _parser as sre_parse  # type: ignore[attr-defined]  # SGLang's length bound uses it too

import regex

_UNBOUNDED = sre_parse.MAXREPEAT
SEARCH_BUDGET_S = 0.005  # one request's stop-regex searches at one step (a benign pattern on 90 KB: ~1 ms)
MAX_PATTERN_CHARS = 8192  # all of a request's patterns together


class StopRegexTooSlow(Exception):
    """A request's stop regexes took more than their budget on its output."""

    def __init__(self, pattern: str, budget_s: float) -> None:
        super().__init__(f"stop_regex: {pattern!r} took more than {budget_s * 1e3:g} ms to search the output "
                         "(nested repetition backtracks exponentially); simplify the pattern")


@dataclass(frozen=True)
class StopRegexes:
    patterns: tuple[regex.Pattern[str], ...]
    window_tokens: int | None  # tail tokens to decode for a match; None: the whole output

    def search(self, tail: str, budget_s: float = SEARCH_BUDGET_S) -> str | None:
        """The first pattern (as sent) found in `tail`, or None; StopRegexTooSlow past `budget_s` of this
        thread's CPU time. (The regex timeout counts wall time: a search that timed out having used
        less than half the budget was preempted, not backtracking, and gets one more full budget.)"""
        cpu_start = time.thread_time()
        for attempt in range(2):
            deadline = time.perf_counter() + budget_s
            try:
                for p in self.patterns:
                    if p.search(tail, timeout=max(deadline - time.perf_counter(), 1e-6)):
                        return p.pattern
                return None
            except TimeoutError:
                if attempt or time.thread_time() - cpu_start >= budget_s / 2:
                    raise StopRegexTooSlow(p.pattern, budget_s) from None
        return None


def validate(pattern: str) -> str | None:
    """Why `pattern` cannot be a stop regex, or None when it can."""
    if len(pattern) > MAX_PATTERN_CHARS:
        return f"a pattern may have at most {MAX_PATTERN_CHARS} characters, this one has {len(pattern)}"
    try:
        compiled = re.compile(pattern)
        regex.compile(pattern, flags=regex.V0)
        _max_len(sre_parse.parse(pattern))
    except (re.error, regex.error) as exc:
        return f"not a valid regular expression: {exc}"
    except RecursionError:
        return "the pattern nests groups too deeply"
    if compiled.search("") is not None:
        return f"{pattern!r} matches the empty string, so every request would stop at once"
    return None


def validate_all(patterns: list[str] | tuple[str, ...]) -> str | None:
    """Why `patterns` cannot be a request's stop regexes, or None when they can."""
    total = sum(len(p) for p in patterns)
    if total > MAX_PATTERN_CHARS:
        return f"the patterns may have at most {MAX_PATTERN_CHARS} characters in all, these have {total}"
    for pattern in patterns:
        why = validate(pattern)
        if why is not None:
            return why
    return None


@functools.lru_cache(maxsize=1024)
def compile_stop_regexes(patterns: tuple[str, ...]) -> StopRegexes:
    bounds = [_max_len(sre_parse.parse(p)) for p in patterns]
    window = None if any(b is None for b in bounds) else max(bounds) + 1
    return StopRegexes(tuple(regex.compile(p, flags=regex.V0) for p in patterns), window)


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
    """`text` up to the earliest match of any pattern (the output a stop-regex finish returns). On
    the front's event loop: the patterns share one budget; once it is spent the rest trim nothing."""
    starts = []
    deadline = time.perf_counter() + SEARCH_BUDGET_S
    for p in compile_stop_regexes(patterns).patterns:
        try:
            if m := p.search(text, timeout=max(deadline - time.perf_counter(), 1e-6)):
                starts.append(m.start())
        except TimeoutError:
            break
    return text[: min(starts)] if starts else text


def regex_holdback(text: str, patterns: tuple[str, ...]) -> int:
    """Characters at the end of `text` that could still grow into a match: held back while streaming.
    On the front's event loop at every chunk: the patterns share one budget; once it is spent the
    rest hold back nothing."""
    best = 0
    deadline = time.perf_counter() + SEARCH_BUDGET_S
    for p in compile_stop_regexes(patterns).patterns:
        try:
            for m in p.finditer(text, partial=True, timeout=max(deadline - time.perf_counter(), 1e-6)):
                if m.partial:
                    best = max(best, len(text) - m.start())
                    break
        except TimeoutError:
            break
    return best

"""API speculative execution (`@function(num_api_spec_tokens=N)`), as SGLang's frontend does it: on
an API that bills or rate-limits per call, one call generates ahead and later gens of the program
are cut from that text instead of calling again.

Completion APIs (`CompletionSpeculation`): a gen with stop strings asks once for
max(its max_new_tokens, N) tokens without stops; its value is the text up to the first stop, and the
rest is kept: constant text the program appends next consumes it when it matches (the program's own
delimiter was predicted), and the next gen cuts its value from what is left. Where SGLang would
return a guess, this asks the API for that one gen instead: a gen without stops, with a constraint
or n > 1, and a gen whose stop is not found in text speculated for it (with leftover text, it
speculates afresh first).

Chat APIs (`ChatSpeculation`): an assistant message cannot be continued, so everything inside an
assistant block (constant text and gens) is collected and sent as one chat completion when the
block ends; the reply is matched against that format (texts verbatim, each gen up to its first
stop, the last gen takes the rest). A reply that does not fit is asked for again (3 tries in all,
as SGLang), then the program fails naming the reply (SGLang fills the variables it could match and
leaves the others empty).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from radixlm.lang.ir import SglSamplingParams

if TYPE_CHECKING:
    from radixlm.lang.interpreter import StreamExecutor

CHAT_MAX_TRIES = 3


def _first_stop(text: str, stops: list[str]) -> int:
    hits = [p for p in (text.find(s) for s in stops) if p >= 0]
    return min(hits) if hits else -1


def _speculable(params: SglSamplingParams) -> bool:
    return bool(params.stop_list()) and params.n == 1 and not params.constraint_kinds() and params.dtype is None


class CompletionSpeculation:
    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.text = ""  # speculated continuation of the program's text, not yet used

    def on_fill(self, value: str) -> None:
        """The program appended `value`: consume it from the speculation, or drop a wrong guess."""
        self.text = self.text[len(value):] if self.text.startswith(value) else ""

    def generate(self, s: "StreamExecutor", params: SglSamplingParams) -> tuple[Any, Any]:
        if not _speculable(params):
            self.text = ""
            return s.backend.generate(s, params)
        stops = params.stop_list()
        fresh = False
        if not self.text or _first_stop(self.text, stops) < 0:
            ahead = dataclasses.replace(params, max_new_tokens=max(params.max_new_tokens, self.num_tokens), stop=())
            self.text, _ = s.backend.generate(s, ahead)
            fresh = True
        pos = _first_stop(self.text, stops)
        if pos < 0:  # no stop within the speculated tokens: this gen ran to its length limit
            self.text = ""
            return s.backend.generate(s, params)
        value, self.text = self.text[:pos], self.text[pos:]
        return value, {"speculative": True, "fresh_call": fresh, "finish_reason": {"type": "stop"}}


@dataclass
class _Term:
    text: str = ""
    name: str | None = None  # a gen's variable (None for constant text and unnamed gens)
    stops: tuple[str, ...] | None = None  # a gen (None: constant text)


class ChatSpeculation:
    def __init__(self, num_tokens: int) -> None:
        self.num_tokens = num_tokens
        self.terms: list[_Term] = []
        self.params: SglSamplingParams | None = None

    def defer_text(self, value: str) -> None:
        self.terms.append(_Term(text=value))

    def defer_gen(self, name: str | None, params: SglSamplingParams) -> None:
        common = dataclasses.replace(params, stop=(), max_new_tokens=self.num_tokens)
        if self.params is None:
            self.params = common
        elif common != self.params:
            raise ValueError("API speculative execution: the gens of one assistant message must use the same "
                             "sampling parameters (stop strings and max_new_tokens aside)")
        self.terms.append(_Term(name=name, stops=tuple(params.stop_list())))

    @property
    def has_gens(self) -> bool:
        return any(t.stops is not None for t in self.terms)

    def flush(self, s: "StreamExecutor") -> list[_Term]:
        """One call for the collected assistant message; the matched terms, in order."""
        terms, params = self.terms, self.params
        self.terms, self.params = [], None
        if params is None:
            return terms  # constant text only: nothing to generate
        reply = ""
        for _ in range(CHAT_MAX_TRIES):
            reply, _ = s.backend.generate(s, params)
            matched = _match(reply if isinstance(reply, str) else reply[0], terms)
            if matched is not None:
                return matched
        raise ValueError(f"API speculative execution: {CHAT_MAX_TRIES} replies did not follow the assistant "
                         f"message's format; the last one was {reply!r}")


def _match(reply: str, terms: list[_Term]) -> list[_Term] | None:
    out: list[_Term] = []
    rest = reply
    for i, term in enumerate(terms):
        if term.stops is None:
            if not rest.startswith(term.text):
                return None
            rest = rest[len(term.text):]
            out.append(term)
            continue
        pos = _first_stop(rest, list(term.stops)) if term.stops else -1
        if pos < 0:
            if i != len(terms) - 1:
                return None
            pos = len(rest)
        out.append(_Term(text=rest[:pos], name=term.name, stops=term.stops))
        rest = rest[pos:]
    return out

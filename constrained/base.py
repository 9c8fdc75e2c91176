"""The backend-neutral interface the scheduler programs against.

One `Grammar` per distinct spec (compiled once, cached, shared); one `Matcher` per request
(cheap, mutable). Per decode step the scheduler fills each constrained row's mask, samples, then
`advance`s, for the whole batch at once (`prepare_fill` / `advance_rows` through MaskWorkers);
`forced_prefix` feeds jump-forward and `rollback` undoes speculative or jump-forward tokens that
were not kept.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .bitmask import allocate_token_bitmask, row_to_ids
from .vocab import TokenizerInfo

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers


class Matcher(ABC):
    """Per-request automaton state. End tokens are allowed exactly in accepting states."""

    grammar: Grammar

    @abstractmethod
    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        """Write row `index` of a CPU int32 [batch, W] bitmask: bit set = token allowed.

        Columns past the tokenizer vocabulary (model vocab padding) are cleared.
        """

    @abstractmethod
    def advance(self, token_id: int) -> bool:
        """Consume one token; False (state unchanged) if the grammar does not allow it."""

    @abstractmethod
    def rollback(self, n_tokens: int) -> None:
        """Undo the last n accepted tokens (an accepted end token counts as one)."""

    @abstractmethod
    def is_accepting(self) -> bool:
        """The text so far is a complete match (so an end token would be accepted)."""

    @abstractmethod
    def is_terminated(self) -> bool:
        """Nothing but an end token can follow (or an end token was already consumed)."""

    @abstractmethod
    def forced_bytes(self) -> bytes:
        """The bytes every valid continuation starts with (b"" when not forced or accepting)."""

    @abstractmethod
    def copy(self) -> Matcher:
        """An independent matcher in the same state (forking a request, n>1 sampling)."""

    @property
    @abstractmethod
    def num_tokens(self) -> int:
        """Tokens accepted so far (the rollback horizon)."""

    @classmethod
    def prepare_fill(cls, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor,
                     workers: MaskWorkers) -> Callable[[], None]:
        """Many rows of this backend at once: checks and set-up now, on the caller's thread; the
        returned function does the filling (on a background thread, as little Python as possible).
        Here: per-row fills split over the workers' threads; a backend with a batch call overrides."""
        def fill(chunk: Sequence[tuple[Matcher, int]]) -> None:
            for matcher, index in chunk:
                matcher.fill_next_token_bitmask(bitmask, index)

        return lambda: workers.run_chunks(fill, items)

    @classmethod
    def advance_rows(cls, matchers: Sequence[Matcher], tokens: Sequence[int], workers: MaskWorkers) -> list[bool]:
        """`advance` for many matchers of this backend (see MaskWorkers.advance)."""
        return [m.advance(t) for m, t in zip(matchers, tokens)]

    def _check_rollback(self, n_tokens: int) -> None:
        if n_tokens < 0 or n_tokens > self.num_tokens:
            raise ValueError(f"cannot roll back {n_tokens} of {self.num_tokens} tokens")

    def allowed_token_ids(self) -> list[int]:
        """Allowed ids, ascending (reference/debug path; the hot path is the bitmask)."""
        row = allocate_token_bitmask(1, self.grammar.info.vocab_size)
        self.fill_next_token_bitmask(row, 0)
        return row_to_ids(row[0])

    def forced_prefix(self) -> str:
        """The text the grammar forces next, for jump-forward; "" if there is none.

        Only whole UTF-8 characters: a forced prefix that starts inside a character (the last
        token split one) yields "", one that ends inside a character is cut before it.
        """
        data = self.forced_bytes()
        if not data or 0x80 <= data[0] < 0xC0:
            return ""
        end = len(data)
        for back in range(1, min(4, len(data)) + 1):  # trim an incomplete trailing character
            b = data[-back]
            if b < 0x80:
                break
            if b >= 0xC0:
                need = 2 if b < 0xE0 else 3 if b < 0xF0 else 4
                if need > back:
                    end = len(data) - back
                break
        return data[:end].decode("utf-8", errors="ignore")

    def accepts_tokens(self, token_ids: list[int]) -> bool:
        """Advance through all tokens, then roll back: True if the whole list is allowed."""
        done = 0
        try:
            for tid in token_ids:
                if not self.advance(tid):
                    return False
                done += 1
            return True
        finally:
            self.rollback(done)


def fill_next_token_bitmasks(items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor,
                             workers: MaskWorkers | None = None) -> None:
    """Fill row `index` of `bitmask` for each (matcher, index): one by one on this thread, or
    split over `workers`' threads (the same rows either way; see mask_workers.py)."""
    if workers is None:
        for matcher, index in items:
            matcher.fill_next_token_bitmask(bitmask, index)
    else:
        workers.fill(items, bitmask)


class Grammar(ABC):
    """A compiled spec for one tokenizer; immutable and shared by all requests using it."""

    kind: str  # "regex" | "json_schema" | "ebnf" | "choices"
    spec: str  # canonical spec text (cache key material)
    backend: str
    info: TokenizerInfo

    @abstractmethod
    def matcher(self, family: int = 0) -> Matcher:
        """A fresh matcher at the start state. Matchers of one `family` may share caches (and
        whatever guards them); rows whose masks are computed in parallel should come from
        different families (GrammarRuntime: one per mask thread). Backends without shared
        state ignore it."""

    def prepare_families(self, count: int) -> None:
        """Build what `matcher(family)` needs for families 0..count-1 now (not inside a timed
        decode step). Nothing to do for backends without per-family state."""

    @abstractmethod
    def payload(self) -> Any:
        """Picklable form for shipping across processes (see service.py)."""

    def __repr__(self) -> str:
        spec = self.spec if len(self.spec) <= 60 else self.spec[:57] + "..."
        return f"<{type(self).__name__} {self.kind} via {self.backend}: {spec!r}>"

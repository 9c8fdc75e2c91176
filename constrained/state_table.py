"""Per-state mask tables for regular grammars: a row's mask is one table row, filled once per state.

A row's mask depends only on its grammar state. For a JSON schema whose language is regular
(constrained/regular_schema.py), a byte DFA of that language (built lazily, byte_automaton.py)
names the state; the table keeps, per DFA state, the packed mask llguidance computed the first
time any row stood there, so at batch 256 a step fills masks only for states no row has visited
yet, and the decode step gathers every row's mask from the table on the device
(GrammarRuntime). The llguidance matcher of each row still advances with it (table_grammar.py: the
grammar and matchers over a table): it decides
acceptance, termination, forced text and rollback exactly as before, and every sampled token is
still checked by it. Masks equal llguidance's wherever the DFA's states refine llguidance's
(tests/constrained/test_state_table.py compares them along random and greedy walks); a token
llguidance accepts and the DFA refuses (a mismatch) or a DFA past its state budget turns the
table off for that grammar and its rows fall back to llguidance's own masks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import Grammar, Matcher
from .byte_automaton import DEAD, LazyDfa

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers
    from .table_grammar import TableMatcher

logger = logging.getLogger(__name__)

ALL_ROW, NONE_ROW = 0, 1  # reserved rows of every table: all tokens allowed / none (an ended matcher)
FIRST_STATE_ROW = 2
MAX_STATES = 16_384  # ~100 MB of host + device rows at a 49k vocabulary; past it: llguidance's masks
# The NFA is built whole on the scheduler's thread when a grammar's first request arrives, a few µs a state:
# past this many, no table. MaskBench dev's tables: 18 of 20 under 44,100 states; 200,654 and 1,065,782 took 0.6-2.3 s.
MAX_NFA_STATES = 50_000
MAX_PAIRS = 1 << 21  # cached (state, token) moves; past it the cache starts over (moves per byte class stay)


class StateTable:
    """Packed mask rows by DFA state (row = state + 2), filled on first use; owned by the
    scheduler's thread (fills of missing rows may run on mask workers, see `fill_missing`)."""

    def __init__(self, dfa: LazyDfa, inner: Grammar) -> None:
        self.dfa = dfa
        self.inner = inner
        self.info = inner.info
        self.words = (self.info.vocab_size + 31) // 32
        self.vocab = self.info.vocab_size
        self.end_ids = frozenset(self.info.end_token_ids)
        self.broken = False
        self.rows = torch.empty((0, self.words), dtype=torch.int32)
        self.ready: list[bool] = []
        self.terminated: list[bool] = []  # per filled row: llguidance's is_terminated() at that state
        self.lazy = True  # matchers commit to llguidance only when a row needs it (TableMatcher)
        self.fresh: list[int] = []  # rows filled since the device copy was last brought up to date
        self._next: dict[int, int] = {}
        self._forces: dict[int, bool] = {}
        self.forced: dict[int, bytes] = {}  # the backend's forced bytes at a DFA state, recorded where a row stood
        self._single: dict[int, int] = {}  # per filled state: its mask's only allowed token, or -1
        # per state, tokens seen taken there that lead to a state forcing one token: token -> that token
        self.forced_after: dict[int, dict[int, int]] = {}
        self.guess_runs: dict[int, Any] = {}  # per state: forced_tokens.GuessRuns, made from `forced_after`
        self.guessed: dict[int, list[int]] = {}  # per state: guesses seen there, and tokens they took (forced_rows.py)
        self.runs_from: dict[int, tuple[tuple[int, ...], bool]] = {}  # per state: its forced run (forced_tokens.py)
        self.forced_flags: dict[int, int] = {}  # per state: 1 where a ride or a guess may start there, else 0
        self.learn_pairs = False  # commits note `forced_after` pairs (--enable-forced-rows)
        self._grow(256)
        self.rows[ALL_ROW] = -1
        self.rows[NONE_ROW] = 0
        self.ready[ALL_ROW] = self.ready[NONE_ROW] = True
        self.fresh += [ALL_ROW, NONE_ROW]

    def _grow(self, capacity: int) -> None:
        rows = torch.empty((capacity, self.words), dtype=torch.int32)  # pageable: the device copy is staged
        rows[: self.rows.shape[0]] = self.rows
        self.rows = rows
        self.ready += [False] * (capacity - len(self.ready))
        self.terminated += [False] * (capacity - len(self.terminated))

    def next_state(self, state: int, token: int) -> int:
        """The DFA state after `token` (DEAD if the DFA refuses it); cached per (state, token)."""
        key = state * self.vocab + token
        nxt = self._next.get(key)
        if nxt is None:
            data = self.info.token_bytes[token] if 0 <= token < self.vocab else None
            nxt = DEAD if data is None else self.dfa.walk(state, data)
            if len(self._next) >= MAX_PAIRS:
                self._next.clear()
            self._next[key] = nxt
        return nxt

    def may_force(self, state: int) -> bool:
        """False when no byte is forced at `state` (llguidance's forced bytes there are then empty:
        what it forces, every continuation of the language starts with); cached per state."""
        hit = self._forces.get(state)
        if hit is None:
            try:
                hit = self._forces[state] = self.dfa.forces_a_byte(state)
            except OverflowError:
                return True  # unknown: ask the backend
        return hit

    def row_of(self, state: int) -> int:
        row = state + FIRST_STATE_ROW
        if row >= self.rows.shape[0]:
            self._grow(max(2 * self.rows.shape[0], row + 1))
        return row

    def disable(self, why: str) -> None:
        if not self.broken:
            logger.error("grammar state table turned off (%s): masks come from %s again", why, self.inner.backend)
            self.broken = True

    def missing(self, matchers: Sequence[TableMatcher]) -> list[tuple[Matcher, int]]:
        """(a matcher standing at it, its row) for each state among `matchers` whose row is not filled."""
        out: list[tuple[Matcher, int]] = []
        seen: set[int] = set()
        for m in matchers:
            if m.ended:
                continue
            row = self.row_of(m.state)
            if not self.ready[row] and row not in seen:
                seen.add(row)
                out.append((m.inner, row))  # (a matcher at an unfilled row has no lag: see TableMatcher)
        return out

    def fill_missing(self, items: list[tuple[Matcher, int]], workers: MaskWorkers | None) -> Callable[[], None]:
        """Fill the rows of `items` (from `missing`) with the backend's masks: the returned function
        does the work (on a mask thread if the caller wants); rows count as filled after it."""
        if not items:
            return lambda: None
        from .base import fill_next_token_bitmasks

        rows = self.rows

        def run() -> None:
            fill_next_token_bitmasks(items, rows, workers)
            for m, row in items:
                self.terminated[row] = m.is_terminated()
                self.forced.setdefault(row - FIRST_STATE_ROW, m.forced_bytes())
                self.ready[row] = True
            self.fresh.extend(row for _, row in items)

        return run

"""Per-state mask tables for regular grammars: a row's mask is one table row, filled once per state.

A row's mask depends only on its grammar state. For a JSON schema whose language is regular
(constrained/regular_schema.py), a byte DFA of that language (built lazily, byte_automaton.py)
names the state; the table keeps, per DFA state, the packed mask llguidance computed the first
time any row stood there, so at batch 256 a step fills masks only for states no row has visited
yet, and the decode step gathers every row's mask from the table on the device
(GrammarRuntime). The llguidance matcher of each row still advances with it: it decides
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
from .byte_automaton import DEAD, LazyDfa, nfa_states
from .regular_schema import schema_expression

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers

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


class TableMatcher(Matcher):
    """A backend matcher (`inner`, authoritative) plus its DFA state path (`states[-1]` now).

    Lazy commits (`table.lazy`): a token whose DFA move lands on a state with a filled row is
    only recorded (`lag`), not given to the backend: that row's mask and `is_terminated` are the
    table's (both recorded from the backend at that state), so the backend's ~5 µs commit per row
    and step leaves the decode loop. The backend takes the lagging tokens (`sync`) whenever its
    own state is needed: a state first reached (its row is filled from it), an end token, forced
    text where the DFA says a byte is forced, acceptance, rollback past the lag, copies, a table
    turned off. A lagging token the
    backend refuses (a DFA that disagrees) turns the table off and fails the next commit.

    The backend matcher itself is made on first need (`_inner` None until then: a fresh one plus the
    lag is the same state): a batch of 256 new requests whose rows all walk a filled table made 256
    llguidance matchers (~18 µs each on a GPU host) in the first step's grammar poll, before its
    prefill launched, and item (f)'s rows almost never need theirs."""

    __slots__ = ("grammar", "table", "_inner", "states", "lag", "refused", "family")

    def __init__(self, grammar: TableGrammar, inner: Matcher | None, states: list[int], family: int = 0,
                 lag: list[int] | None = None) -> None:
        self.grammar, self.table, self._inner, self.states = grammar, grammar.table, inner, states
        self.family = family  # the backend matcher's family, when it is made
        self.lag: list[int] = [] if lag is None else lag  # tokens the DFA took that the backend has not yet
        self.refused = False  # the backend refused a lagging token: the next commit fails

    @property
    def inner(self) -> Matcher:
        """The backend matcher (made now if not yet), brought up to date."""
        if self.lag or self._inner is None:
            self.sync()
        return self._inner  # type: ignore[return-value]

    @property
    def behind(self) -> bool:
        """The backend matcher is not at this matcher's state (lagging tokens, or not made yet)."""
        return bool(self.lag) or self._inner is None

    def sync(self) -> None:
        """Give the backend the lagging tokens (one call per token, as a commit would); made first if not yet."""
        if self._inner is None:
            self._inner = self.grammar.inner.matcher(self.family)
        lag, self.lag = self.lag, []
        for j, tok in enumerate(lag):
            if not self._inner.advance(tok):
                self.table.disable(f"token {tok} accepted by the DFA, refused by {self.table.inner.backend}")
                self.refused = True
                del self.states[len(self.states) - (len(lag) - j):]  # the backend's state is the truth
                return

    @property
    def state(self) -> int:
        return self.states[-1]

    @property
    def ended(self) -> bool:
        """An end token was consumed (its mask: nothing). End tokens never lag (nor does a matcher not made)."""
        return bool(getattr(self._inner, "_ended", False))

    @property
    def num_tokens(self) -> int:
        return (0 if self._inner is None else self._inner.num_tokens) + len(self.lag)

    def table_row(self) -> int:
        """This matcher's row of the table (NONE_ROW once an end token was consumed), or -1 while that
        row is not filled or the table is off."""
        if self.table.broken:
            return -1
        if self.ended:
            return NONE_ROW
        row = self.table.row_of(self.state)
        return row if self.table.ready[row] else -1

    def fill_next_token_bitmask(self, bitmask: torch.Tensor, index: int = 0) -> None:
        row = self.table_row()
        if row < 0:
            self.table.fill_missing(self.table.missing([self]), None)()
            row = self.table_row()
        if row < 0:  # table off
            self.inner.fill_next_token_bitmask(bitmask, index)
            return
        out = bitmask[index]
        out[: self.table.words] = self.table.rows[row]
        out[self.table.words :] = 0

    def _lazy_move(self, token_id: int) -> bool:
        """Take `token_id` on the DFA alone where the state it reaches has a filled row."""
        table = self.table
        if not table.lazy or table.broken or self.refused or token_id in table.end_ids:
            return False
        nxt = table._next.get(self.states[-1] * table.vocab + token_id)
        if nxt is None:
            try:
                nxt = table.next_state(self.states[-1], token_id)
            except OverflowError:
                return False  # the slow path turns the table off
        if nxt == DEAD:
            return False
        row = nxt + FIRST_STATE_ROW
        if row >= len(table.ready) or not table.ready[row]:
            return False
        self.states.append(nxt)
        self.lag.append(token_id)
        return True

    def advance(self, token_id: int) -> bool:
        if self._lazy_move(token_id):
            return True
        inner = self.inner
        if self.refused or not inner.advance(token_id):
            return False
        self._follow(token_id)
        return True

    def _follow(self, token_id: int) -> None:
        """Move the DFA state after the backend accepted `token_id`."""
        if token_id in self.table.end_ids or self.table.broken:
            self.states.append(self.state)
            return
        try:
            nxt = self.table.next_state(self.state, token_id)
        except OverflowError as exc:
            self.table.disable(str(exc))
            nxt = DEAD
        if nxt == DEAD:
            self.table.disable(f"token {token_id} accepted by {self.table.inner.backend}, refused by the DFA")
            self.states.append(self.state)
            return
        self.states.append(nxt)

    def rollback(self, n_tokens: int) -> None:
        self._check_rollback(n_tokens)
        lagging = min(n_tokens, len(self.lag))
        if lagging:
            del self.lag[-lagging:]
        if self._inner is not None:  # (not made: every token it counts lags)
            self._inner.rollback(n_tokens - lagging)
        if n_tokens:
            del self.states[-n_tokens:]

    def is_accepting(self) -> bool:
        return self.inner.is_accepting()

    def is_terminated(self) -> bool:
        if self.behind and not self.table.broken:
            row = self.states[-1] + FIRST_STATE_ROW  # (a lagging row's is filled; a start state's may not be)
            if row < len(self.table.ready) and self.table.ready[row]:
                return self.table.terminated[row]
        return self.inner.is_terminated()

    def forced_bytes(self) -> bytes:
        """The backend's, recorded per DFA state (a function of the state, as its mask is): a lagging
        row asks without a catch-up. Only the scheduler's jump pre-check reads it (each live row, each
        step, once few rows run); the jump itself takes the backend's own `forced_prefix`."""
        table = self.table
        if self.behind and not table.broken:
            if not table.may_force(self.states[-1]):
                return b""  # nothing forced: no catch-up needed to say so
            hit = table.forced.get(self.states[-1])
            if hit is not None:
                return hit
        out = self.inner.forced_bytes()
        if not table.broken and not self.ended:
            table.forced[self.states[-1]] = out
        return out

    def forced_prefix(self) -> str:
        if self.behind and not self.table.broken and not self.table.may_force(self.states[-1]):
            return ""
        return self.inner.forced_prefix()

    def copy(self) -> TableMatcher:
        if self._inner is None:  # still not made: the copy's is made on its own first need
            return TableMatcher(self.grammar, None, list(self.states), self.family, list(self.lag))
        return TableMatcher(self.grammar, self.inner.copy(), list(self.states), self.family)

    @classmethod
    def prepare_fill(cls, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor,
                     workers: MaskWorkers) -> Callable[[], None]:
        """States no row has visited get the backend's mask (in parallel over the workers), then every
        row is one copy from the table. Rows of a table that is off are filled by the backend."""
        by_table: dict[int, list[tuple[TableMatcher, int]]] = {}
        tables: dict[int, StateTable] = {}
        fallback: list[tuple[Matcher, int]] = []
        for m, index in items:
            assert isinstance(m, TableMatcher)
            if m.table.broken:
                fallback.append((m.inner, index))
            else:
                by_table.setdefault(id(m.table), []).append((m, index))
                tables[id(m.table)] = m.table
        jobs: list[Callable[[], None]] = []
        for key, group in by_table.items():
            table = tables[key]
            jobs.append(table.fill_missing(table.missing([m for m, _ in group]), workers))
        if fallback:
            jobs.append(lambda: workers.fill(fallback, bitmask))

        def run() -> None:
            for job in jobs:
                job()
            for key, group in by_table.items():
                table = tables[key]
                rows = torch.tensor([m.table_row() for m, _ in group])
                dst = torch.tensor([i for _, i in group])
                bitmask[dst, : table.words] = table.rows[rows]
                if bitmask.shape[1] > table.words:
                    bitmask[dst, table.words :] = 0

        return run

    @classmethod
    def advance_rows(cls, matchers: Sequence[Matcher], tokens: Sequence[int], workers: MaskWorkers) -> list[bool]:
        """Tokens whose DFA move reaches a filled row are taken lazily (no backend call); the rest
        go to the backend in one batch (its rows brought up to date first), then the DFA follows."""
        ok = [True] * len(matchers)
        slow: list[int] = []
        for j, (m, tok) in enumerate(zip(matchers, tokens)):
            table = m.table  # type: ignore[attr-defined]
            nxt = table._next.get(m.states[-1] * table.vocab + tok)  # type: ignore[attr-defined]
            if (nxt is not None and nxt != DEAD and table.lazy and not table.broken and tok not in table.end_ids
                    and nxt + FIRST_STATE_ROW < len(table.ready) and table.ready[nxt + FIRST_STATE_ROW]
                    and not m.refused):  # type: ignore[attr-defined]
                m.states.append(nxt)  # type: ignore[attr-defined]
                m.lag.append(tok)  # type: ignore[attr-defined]  (`_lazy_move` inline: the usual row)
            elif not m._lazy_move(tok):  # type: ignore[attr-defined]
                slow.append(j)
        inner = [matchers[j].inner for j in slow]  # type: ignore[attr-defined]
        for j in slow:
            if matchers[j].refused:  # type: ignore[attr-defined]
                ok[j] = False  # a lagging token was refused: this row's backend is past its error
        slow = [j for j in slow if ok[j]]
        if not slow:
            return ok
        inner = [matchers[j]._inner for j in slow]  # type: ignore[attr-defined]
        groups: dict[type[Matcher], list[int]] = {}
        for k, m in enumerate(inner):
            groups.setdefault(type(m), []).append(k)
        for kind, idx in groups.items():
            for k, good in zip(idx, kind.advance_rows([inner[k] for k in idx], [tokens[slow[k]] for k in idx], workers)):
                j = slow[k]
                m = matchers[j]
                if not good:
                    ok[j] = False
                    continue
                table, states, tok = m.table, m.states, tokens[j]  # type: ignore[attr-defined]
                nxt = table._next.get(states[-1] * table.vocab + tok)
                if nxt is None or nxt == DEAD or table.broken or tok in table.end_ids:
                    m._follow(tok)  # type: ignore[attr-defined]
                else:
                    states.append(nxt)
        return ok


class TableGrammar(Grammar):
    """A compiled grammar (`inner`) whose matchers also track a DFA state and share a mask table."""

    def __init__(self, inner: Grammar, table: StateTable) -> None:
        self.inner, self.table = inner, table
        self.kind, self.spec, self.backend, self.info = inner.kind, inner.spec, inner.backend, inner.info

    @staticmethod
    def wrap(inner: Grammar) -> TableGrammar | None:
        """A table grammar over `inner` when its language is one regular_schema mirrors, else None."""
        ll_grammar = getattr(inner, "ll_grammar", None)
        if inner.backend != "llguidance" or inner.kind != "json_schema" or not isinstance(ll_grammar, str):
            return None
        expr = schema_expression(ll_grammar)
        if expr is None or nfa_states(expr) > MAX_NFA_STATES:
            return None
        return TableGrammar(inner, StateTable(LazyDfa(expr, MAX_STATES), inner))

    def matcher(self, family: int = 0) -> TableMatcher:
        return TableMatcher(self, None, [0], family)  # the backend's matcher: on first need

    def prepare_families(self, count: int) -> None:
        self.inner.prepare_families(count)

    def payload(self) -> Any:
        return self.inner.payload()

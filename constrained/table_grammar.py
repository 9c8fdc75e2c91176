"""A grammar whose matchers also walk a DFA state and share its per-state mask table (state_table.py).

`TableGrammar.wrap` puts one over an llguidance JSON-schema grammar whose language regular_schema.py
mirrors; its `TableMatcher`s keep the backend's matcher authoritative (acceptance, termination, forced
text, rollback) while their masks are the table's rows, and commit to the backend lazily.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import torch

from .base import Grammar, Matcher
from .byte_automaton import DEAD, LazyDfa, nfa_states
from .regular_schema import schema_expression
from .state_table import FIRST_STATE_ROW, MAX_NFA_STATES, MAX_STATES, NONE_ROW, StateTable

if TYPE_CHECKING:
    from .mask_workers import MaskWorkers


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

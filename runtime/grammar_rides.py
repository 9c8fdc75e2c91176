"""The grammars' side of grammar-forced tokens computed as extra decode rows (runtime/forced_rows.py): a row's
forced run committed to its grammar after its sampled token (a ride, or the run a guess took), and the last
commit's table rows, from which the forced rows' planning reads each row's state without visiting its matcher.

A mixin of GrammarRuntime: it shares the runtime's commit record (`_step`: the last commit's TableStep, until its
masks are taken or a matcher moves), its background mask work (`_settle`, `_prefetch`) and the termination it
recorded per request (`_terminated`).
"""
from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from radixlm.constrained.forced_tokens import forced_run
from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.constrained.state_table import StateTable
    from radixlm.runtime.grammar_tables import TableStep


class GrammarRides:
    _step: TableStep | None
    _rows_of: tuple[TableStep, dict[int, int]] | None
    _prefetch: Any
    _terminated: dict[int, tuple[Req, bool]]
    _settle: Callable[[], None]  # (GrammarRuntime's: wait for background mask work)

    def _ride(self, req: Req, ride: list[int], step: TableStep | None, j: int) -> tuple[bool, bool]:
        """Commit a row's forced tokens after its sampled one; (accepted, terminated). The commit's
        table row for it (`step`) becomes the row after them."""
        grammar = req.grammar
        for token in ride:
            if not grammar.advance(token):
                return False, True
        done = grammar.is_terminated()
        if step is not None:
            row = grammar.table_row() if hasattr(grammar, "table_row") else -1
            step.rows[j] = row
            step.done[j] = done
            step.forced.append(j)  # (its state after the ride may start a ride or a guess)
            if row < 0:
                step.missing = []  # (the gather scans the batch and fills what is missing)
        return True, done

    def committed_step(self) -> TableStep | None:
        """The last commit's table rows (`advance_many`), until its masks are taken or a matcher moves."""
        return self._step

    def rows_after_commit(self, reqs: list[Req]) -> tuple[StateTable, list[int]] | None:
        """The table rows the last commit left `reqs` at (-1 for a request it did not cover or whose row it
        does not know), when that commit's rows share one healthy table, else None; each found by identity
        (the usual step samples the commit's own requests: `committed_step` answers it, with its rows)."""
        step = self._step
        if step is None or step.table.broken:
            return None
        rows = step.rows
        if step.reqs == reqs:
            return step.table, list(rows)
        where = self._row_index(step)
        return step.table, [rows[k] if (k := where.get(id(r), -1)) >= 0 else -1 for r in reqs]

    def _row_index(self, step: TableStep) -> dict[int, int]:
        """`step`'s row per request (by identity), made once a step."""
        if self._rows_of is None or self._rows_of[0] is not step:
            self._rows_of = (step, {id(r): k for k, r in enumerate(step.reqs)})
        return self._rows_of[1]

    def ride_after(self, req: Req, run: Sequence[int]) -> bool:
        """After the last commit (`advance_many`), before its masks are taken: commit `run` to `req`'s
        grammar too, if its state forces exactly those tokens one by one (False, and nothing done,
        otherwise). A run whose last token reaches a state that ends the grammar is taken too: the row
        ends with it when the commit appends it."""
        m = req.grammar
        table = getattr(m, "table", None)
        if table is None or table.broken or m.ended or forced_run(table, m.state, len(run))[0] != list(run):
            return False
        step = self._step
        j = -1
        if step is not None:  # (no scan of the batch a ride)
            j = self._row_index(step).get(id(req), -1)
        self._settle()
        if j < 0:
            self._step = None
            for token in run:
                if not m.advance(token):
                    return False
            if self._prefetch is not None:
                self._prefetch.rows.pop(id(req), None)
            self._terminated[id(req)] = (req, m.is_terminated())
            return True
        ok, done = self._ride(req, list(run), step, j)
        self._terminated[id(req)] = (req, done)
        return ok

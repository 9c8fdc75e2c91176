"""The scheduler's state tables (constrained/state_table.py) and their copies on the device.

A decode step whose constrained rows all use one grammar's table takes its masks as a gather:
the rows' table indices (one int each) go to the device and select rows of the device copy,
which receives only the rows filled since the last step. No per-row mask fill or copy on the host.

The usual commit of such rows (`commit`) is one pass over them: each sampled token's DFA move is
looked up, recorded (lazy: the backend takes it later, see table_grammar.TableMatcher), and the
state's row and termination read from the table; the next gather reuses those rows instead of
scanning the batch again (`TableStep`). On item (f)'s host that pass replaced three (the matchers'
commit, the finish flags, the scan for missing rows) and the gather's own scan.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from radixlm.constrained.forced_tokens import note_move
from radixlm.constrained.state_table import ALL_ROW, FIRST_STATE_ROW, NONE_ROW, StateTable
from radixlm.constrained.table_grammar import TableMatcher

if TYPE_CHECKING:
    from radixlm.constrained.mask_workers import MaskWorkers
    from radixlm.runtime.request import Req


MAX_WRAPPED = 256  # grammars remembered with their tables (the compile cache's own size)
MAX_ON_DEVICE = 16  # tables with a device copy (least recently gathered dropped first; re-sent whole on use)


@dataclass
class TableStep:
    """One commit of rows sharing a table (`DeviceTables.commit`): per request, its token accepted,
    its grammar terminated, and its table row after the token (-1: not known, the gather scans);
    `missing`: (matcher, row) of states first reached, filled before the next gather."""

    reqs: list[Req]
    table: StateTable
    ok: list[bool]
    done: list[bool]
    rows: list[int]
    missing: list[tuple[Any, int]]
    # forced rows on (runtime/forced_rows.py), found in the commit's own pass by `StateTable.forced_flags`: the
    # requests (by index) whose state after the commit may start a ride (or is not known yet), and those where
    # only a guess may start
    forced: list[int] = field(default_factory=list)
    guessing: list[int] = field(default_factory=list)


class DeviceTables:
    def __init__(self) -> None:
        self._wrapped: OrderedDict[int, tuple[Any, Any]] = OrderedDict()  # id(compiled) -> (it, table grammar or None)
        self._device: OrderedDict[int, tuple[StateTable, torch.Tensor]] = OrderedDict()

    def grammar(self, compiled: Any, wrap: Callable[[], Any]) -> Any:
        """`compiled` with its table (made once per compiled grammar), or `compiled` without one."""
        hit = self._wrapped.get(id(compiled))
        if hit is None or hit[0] is not compiled:
            hit = self._wrapped[id(compiled)] = (compiled, wrap())
            if len(self._wrapped) > MAX_WRAPPED:  # the least recently compiled-or-reused grammar goes
                _, (_, old) = self._wrapped.popitem(last=False)
                if old is not None:
                    self._device.pop(id(old.table), None)
        self._wrapped.move_to_end(id(compiled))
        return hit[1] if hit[1] is not None else compiled

    @staticmethod
    def scan(reqs: Sequence[Req]) -> tuple[StateTable, list[int], list[tuple[Any, int]]] | None:
        """One pass over a batch: (the table every constrained row uses, each row's table row, a
        (matcher, row) for each state whose row is not filled yet), or None unless every constrained
        row uses one healthy table. Unconstrained and finished rows get the all-allowed row."""
        table: StateTable | None = None
        rows: list[int] = []
        missing: dict[int, Any] = {}
        for r in reqs:
            m = r.grammar
            if m is None or r.finished:
                rows.append(ALL_ROW)
                continue
            if type(m) is not TableMatcher or (table is not None and m.table is not table):
                return None
            if table is None:
                table = m.table
                if table.broken:
                    return None
                ready, capacity = table.ready, len(table.ready)
            if m.ended:
                rows.append(NONE_ROW)
                continue
            row = m.states[-1] + FIRST_STATE_ROW
            rows.append(row)
            if (row >= capacity or not ready[row]) and row not in missing:
                missing[row] = m.inner
        if table is None:
            return None
        if missing:
            table.row_of(max(missing) - FIRST_STATE_ROW)  # room for every row named
        return table, rows, [(m, row) for row, m in missing.items()]

    @staticmethod
    def commit(reqs: list[Req], tokens: Sequence[int], workers: MaskWorkers) -> TableStep | None:
        """Commit one token per request when the first request's matcher has a healthy lazy table
        (None, and nothing committed, otherwise). Rows whose move (cached, or walked on the DFA now)
        is a filled row of that table are taken here in one pass; the others (another table or kind,
        an end token, a state first reached, a DFA past its budget) go to their matchers' own
        batched commit."""
        first = reqs[0].grammar if reqs else None
        if type(first) is not TableMatcher or first.table.broken or not first.table.lazy:
            return None
        table = first.table
        moves, vocab, ready, terminated, end_ids = table._next, table.vocab, table.ready, table.terminated, table.end_ids
        single, learn, flags = table._single, table.learn_pairs, table.forced_flags
        capacity = len(ready)
        n = len(reqs)
        ok, done, rows = [True] * n, [False] * n, [-1] * n
        slow: list[int] = []
        forced: list[int] = []
        guessing: list[int] = []
        for j, (req, tok) in enumerate(zip(reqs, tokens)):
            m = req.grammar
            if type(m) is TableMatcher and m.table is table and not m.refused and tok not in end_ids:
                states = m.states
                nxt = moves.get(states[-1] * vocab + tok)
                if nxt is None:  # a move not taken before: the token's bytes walked on the DFA (then cached)
                    try:
                        nxt = table.next_state(states[-1], tok)
                    except OverflowError:
                        nxt = None  # (the matcher's own commit turns the table off)
                if nxt is not None and nxt >= 0:
                    row = nxt + FIRST_STATE_ROW
                    if row < capacity and ready[row]:
                        if learn:  # (forced_rows.py)
                            if single.get(nxt, 0) >= 0:  # (unknown, or forcing a token)
                                note_move(table, states[-1], tok, nxt)
                            flag = flags.get(nxt, 3)  # (3: not known yet; forced_rows.RIDE, GUESS)
                            if flag == 1:
                                guessing.append(j)
                            elif flag:
                                forced.append(j)
                        states.append(nxt)
                        m.lag.append(tok)
                        rows[j] = row
                        done[j] = terminated[row]
                        continue
            slow.append(j)
        if learn:
            forced += slow
        missing: dict[int, Any] = {}
        if slow:
            for j, good in zip(slow, workers.advance([reqs[j].grammar for j in slow], [tokens[j] for j in slow])):
                ok[j] = good
        if table.broken:  # a slow row turned it off: termination from the backend, rows by the gather's scan
            return TableStep(list(reqs), table, ok, [not g or r.grammar.is_terminated() for g, r in zip(ok, reqs)],
                             [-1] * n, [])
        for j in slow:
            m = reqs[j].grammar
            if not ok[j] or type(m) is not TableMatcher or m.table is not table:
                done[j] = not ok[j] or m.is_terminated()
                continue  # (row -1: the gather scans)
            done[j] = m.is_terminated()
            if m.ended:
                rows[j] = NONE_ROW
                continue
            row = rows[j] = table.row_of(m.states[-1])
            if not table.ready[row] and row not in missing:
                missing[row] = m.inner
        return TableStep(list(reqs), table, ok, done, rows, [(m, row) for row, m in missing.items()], forced,
                         guessing)

    def fill_missing(self, reqs: Sequence[Req], workers: MaskWorkers) -> Callable[[], None] | None | bool:
        """A job filling the table rows of states these requests reached first; None: nothing to
        fill; False: the requests do not share one healthy table."""
        found = self.scan(reqs)
        if found is None:
            return False
        table, _, items = found
        return table.fill_missing(items, workers) if items else None

    def gather(self, reqs: Sequence[Req], device: torch.device, workers: MaskWorkers,
               step: TableStep | None = None) -> torch.Tensor | None:
        """[B, W] int32 on `device`, every row its table row (unconstrained and finished rows: all
        allowed), or None when the rows do not share one healthy table. `step`: the last commit of
        exactly these requests, nothing done to their matchers since (its rows are taken as they are)."""
        found = self._known(reqs, step) or self.scan(reqs)
        if found is None:
            return None
        table, rows, items = found
        if items:  # states first reached since the last commit's prefetch (or no prefetch ran)
            table.fill_missing(items, workers)()
        if table.broken:
            return None
        if device.type == "cpu":
            table.fresh.clear()
            return table.rows.index_select(0, torch.tensor(rows, dtype=torch.int64))
        index = torch.tensor(rows, dtype=torch.int64, pin_memory=True).to(device, non_blocking=True)
        return self._synced(table, device).index_select(0, index)

    @staticmethod
    def _known(reqs: Sequence[Req], step: TableStep | None) -> tuple[StateTable, list[int], list[Any]] | None:
        """`scan`'s answer from the last commit, when it covers these requests: the same ones in the
        same order, every row known, none finished, the table healthy and every row filled."""
        if step is None or step.table.broken or step.reqs != reqs or -1 in step.rows:
            return None
        if any(r.finished for r in reqs):
            return None
        ready = step.table.ready
        if any(not ready[row] for _, row in step.missing):
            return None
        return step.table, step.rows, []

    def refresh(self) -> None:
        """Bring every device copy up to date with the rows filed into its table since its last use. A
        table's background completion files its rows between steps (GrammarRuntime.file_completed_rows,
        after a forward pass is launched); sent there, they spare the next gather an upload of every
        row filed meanwhile (item (f)'s served schema: its first timed step sent ~7,300 rows, 45 MB)."""
        for table, copy in list(self._device.values()):
            if table.fresh or copy.shape[0] < table.rows.shape[0]:
                self._synced(table, copy.device)

    def _synced(self, table: StateTable, device: torch.device) -> torch.Tensor:
        """The device copy of `table`, brought up to date with the rows filled since the last call. Every
        host-to-device copy goes through pinned staging (`stage_rows`); the table's own host rows stay
        pageable, so that its growth (doubling, to ~100 MB) never pins memory inside the decode loop, and a
        grown table's device copy takes its old rows from the old device copy."""
        hit = self._device.get(id(table))
        rows = table.rows
        pin = device.type == "cuda"
        if hit is None or hit[0] is not table:  # new, or dropped from the device: every row
            index, staged = stage_rows(rows, range(rows.shape[0]), pin)  # (unfilled rows are never read)
            copy = staged.to(device, non_blocking=True)
            self._device[id(table)] = (table, copy)
            if len(self._device) > MAX_ON_DEVICE:
                self._device.popitem(last=False)
            table.fresh.clear()
            return copy
        self._device.move_to_end(id(table))
        copy = hit[1]
        if copy.shape[0] < rows.shape[0]:  # grown
            old, copy = copy, torch.empty(rows.shape, dtype=rows.dtype, device=device)
            copy[: old.shape[0]].copy_(old)
            self._device[id(table)] = (table, copy)
        if table.fresh:
            index, staged = stage_rows(rows, table.fresh, pin)
            table.fresh.clear()
            copy.index_copy_(0, index.to(device, non_blocking=True), staged.to(device, non_blocking=True))
        return copy


def stage_rows(rows: torch.Tensor, picked: Sequence[int], pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """(the row indices, those rows of `rows`), in pinned memory if `pin`: copies from pageable memory
    may wait for the stream to drain (runtime/device_transfer.py), and a state table's first steps file
    hundreds of rows (a table's background completion: 256 per chunk), which would then stall the host
    until the forward pass in flight ends."""
    index = torch.tensor(picked, dtype=torch.int64, pin_memory=pin)
    staged = torch.empty((len(picked), rows.shape[1]), dtype=rows.dtype, pin_memory=pin)
    torch.index_select(rows, 0, index, out=staged)
    return index, staged

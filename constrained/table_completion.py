"""Fill a state table's every row ahead of use, in a background process (issue 14.4).

A state table (state_table.py) fills a DFA state's row the first time a row stands there. On a
server that has served a schema only a little, new documents keep reaching states and
(state, token) moves no row took before: each costs the scheduler's thread a llguidance catch-up
of the lagging tokens, a first mask fill (30-1,400 µs) and DFA walks, inside the decode loop. For
item (f) at batch 256 that made a run whose walks were new ~0.71x the unconstrained rate, against
~0.94x for walks whose states were all filled (benchmarks/RESULTS.md).

The languages the tables cover are regular and small (item (f): 7,397 DFA states), so every
state can be visited once: a depth-first walk over the DFA's byte classes, one llguidance matcher
advanced by single-byte tokens and rolled back, its mask filled at each state first reached. That
runs in its own process (it is mostly Python: on the scheduler's thread or beside it under the GIL
it would stall decode steps), and the rows come back in chunks keyed by the DFA state's NFA set,
which names a state whatever order either side built its lazy DFA in; `file_rows` files
them under the scheduler's own state numbers. Masks stay llguidance's own, computed at the state
itself; a byte llguidance refuses ends that branch (its states stay lazily filled). Last comes the
walk's DFA moves (every visited state's move on every byte class), which `file_moves` gives the
scheduler's DFA: otherwise each of those subset steps (~10 µs) would be taken again on the
scheduler's thread the first time a row's token crossed it (item (f) at 256 rows, first run after
completion, 2-core CPU: the grammar commit 0.81 ms a step at the median against 0.44 with the moves known).
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .byte_automaton import UNKNOWN
from .compile_worker import end_process, jobs, load_tokenizer
from .forced_tokens import PAIR_MAX_ALLOWED, ForcedPairs, allowed_tokens, file_pairs, forced_pairs
from .state_table import FIRST_STATE_ROW, StateTable
from .table_grammar import TableGrammar

logger = logging.getLogger(__name__)

CHUNK_STATES = 256  # rows per message (1.5 MB at a 49k vocabulary): one merge costs the scheduler ~1 ms
TIME_LIMIT_S = 120.0  # a grammar's walk stops here (its other states stay lazily filled)
MOVE_SLICE = 1024  # states whose moves one scheduler turn files (~3 ms on the 2-core CPU)


@dataclass(frozen=True)
class RowChunk:
    """Rows of one table: each state's NFA set, its packed mask, llguidance's is_terminated and forced
    bytes there."""

    nfa_states: int  # the NFA's size: both sides must have built the same automaton
    sets: list[tuple[int, ...]]
    rows: np.ndarray  # [len(sets), words] int32
    terminated: list[bool]
    ids: list[int]  # each state's number in the walk's own DFA (what `DfaMoves` names states by)
    forced: list[bytes] = field(default_factory=list)  # (empty: not recorded)
    single: list[int] = field(default_factory=list)  # the one token each state's mask allows, else -1 (forced pairs only)


@dataclass(frozen=True)
class DfaMoves:
    """The walk's DFA moves: row = its state number, column = byte class; DEAD, or UNKNOWN where not taken."""

    nfa_states: int
    moves: np.ndarray  # [states, byte classes] int32


def walk_states(grammar: TableGrammar, max_states: int | None = None, time_limit_s: float = TIME_LIMIT_S,
                chunk: int = CHUNK_STATES, pairs: bool = True) -> Iterator[RowChunk | DfaMoves | ForcedPairs]:
    """Every DFA state reachable by llguidance-accepted bytes, depth first, with its mask, then the DFA's
    moves, then (`pairs`) the forced pairs of its states with few allowed tokens; `grammar`'s own table is
    not touched (its DFA is only stepped)."""
    table = grammar.table
    dfa = table.dfa
    limit = min(max_states or dfa.max_states, dfa.max_states)
    single = grammar.info.single_byte_tokens
    by_class: dict[int, int] = {}  # a byte class -> a token spelling one byte of it
    for b, tid in sorted(single.items()):
        by_class.setdefault(dfa.byte_class(b), tid)
    classes = sorted(by_class)
    matcher = grammar.inner.matcher()
    buf = torch.zeros((1, table.words), dtype=torch.int32)
    nfa = dfa.nfa_size
    sets: list[tuple[int, ...]] = []
    rows: list[np.ndarray] = []
    terminated: list[bool] = []
    ids: list[int] = []
    forced: list[bytes] = []
    single: list[int] = []
    seen = {0}
    deadline = time.monotonic() + time_limit_s
    few: dict[int, np.ndarray] = {}  # states allowing at most PAIR_MAX_ALLOWED tokens: those tokens
    single_of: dict[int, int] = {}  # states allowing one token (not ended there): that token

    def visit(q: int) -> None:
        matcher.fill_next_token_bitmask(buf, 0)
        sets.append(dfa.nfa_set(q))
        row = buf[0].numpy().copy()
        rows.append(row)
        terminated.append(matcher.is_terminated())
        ids.append(q)
        forced.append(matcher.forced_bytes())
        allowed = allowed_tokens(row, PAIR_MAX_ALLOWED) if pairs else None
        if pairs:
            single.append(int(allowed[0]) if allowed is not None and len(allowed) == 1 else -1)
        if allowed is not None:
            few[q] = allowed
            if len(allowed) == 1 and not terminated[-1]:
                single_of[q] = int(allowed[0])

    def flush() -> RowChunk:
        out = RowChunk(nfa, list(sets), np.stack(rows), list(terminated), list(ids), list(forced), list(single))
        for part in (sets, rows, terminated, ids, forced, single):
            part.clear()
        return out

    visit(0)
    stack: list[tuple[int, int]] = [(0, 0)]  # (state, next class index to try)
    while stack and len(seen) < limit and time.monotonic() < deadline:
        q, k = stack[-1]
        if k == len(classes):
            stack.pop()
            if stack:
                matcher.rollback(1)
            continue
        stack[-1] = (q, k + 1)
        try:
            nxt = dfa.step(q, dfa.class_example(classes[k]))
        except OverflowError:
            break
        if nxt < 0 or nxt in seen or matcher.is_terminated() or not matcher.advance(by_class[classes[k]]):
            continue
        seen.add(nxt)
        visit(nxt)
        stack.append((nxt, 0))
        if len(sets) >= chunk:
            yield flush()
    if sets:
        yield flush()
    yield DfaMoves(nfa, np.array(dfa.move_table(), dtype=np.int32).reshape(-1, dfa.num_byte_classes))
    if pairs:
        yield ForcedPairs(nfa, forced_pairs(grammar, few, single_of, deadline))


def file_rows(table: StateTable, chunk: RowChunk, renamed: dict[int, int] | None = None) -> int:
    """File a chunk's rows under `table`'s own state numbers (each state named by its NFA set); rows
    filled there already stay. Returns rows filed; `renamed` gets the walk's state -> the table's.
    The caller owns the table: no fill job may run."""
    if table.broken or chunk.nfa_states != table.dfa.nfa_size or chunk.rows.shape[1] != table.words:
        return 0
    states: list[int] = []
    for s, theirs in zip(chunk.sets, chunk.ids):
        try:
            states.append(table.dfa.intern(s))
        except OverflowError:  # past the state budget: the rest stay unfilled
            break
        if renamed is not None:
            renamed[theirs] = states[-1]
    if not states:
        return 0
    for q, forced in zip(states, chunk.forced):  # (a lagging row's jump pre-check reads them: no catch-up)
        table.forced.setdefault(q, forced)
    for q, token in zip(states, chunk.single):  # (forced rows' per-step filter: no state left to look at first)
        table._single.setdefault(q, token)
    table.row_of(max(states))  # room for every row named
    ready = table.ready
    take = [i for i, q in enumerate(states) if not ready[q + FIRST_STATE_ROW]]
    if not take:
        return 0
    dst = [states[i] + FIRST_STATE_ROW for i in take]
    table.rows[dst] = torch.from_numpy(chunk.rows[take])
    for i, row in zip(take, dst):
        table.terminated[row] = bool(chunk.terminated[i])
        ready[row] = True
    table.fresh.extend(dst)
    return len(dst)


def file_moves(table: StateTable, moves: DfaMoves, renamed: dict[int, int],
               slice_states: int = MOVE_SLICE) -> Iterator[int]:
    """Give `table`'s DFA the walk's moves of the states `file_rows` renamed (a move to a state the walk
    did not send stays unknown), `slice_states` at a time: yields the count of each slice, so that the
    scheduler spreads the filing over its turns. The caller owns the table while a slice runs."""
    if table.broken or moves.nfa_states != table.dfa.nfa_size or not renamed:
        return
    theirs = np.fromiter(renamed.keys(), dtype=np.int64, count=len(renamed))
    mine = np.fromiter(renamed.values(), dtype=np.int64, count=len(renamed))
    keep = theirs < moves.moves.shape[0]
    theirs, mine = theirs[keep], mine[keep]
    lookup = np.full(moves.moves.shape[0], UNKNOWN, dtype=np.int64)
    lookup[theirs] = mine
    for start in range(0, len(mine), slice_states):
        block = moves.moves[theirs[start : start + slice_states]].astype(np.int64)
        block = np.where(block >= 0, lookup[np.maximum(block, 0)], block)  # DEAD (-1) and UNKNOWN (-2) stay
        for q, row in zip(mine[start : start + slice_states].tolist(), block.tolist()):
            table.dfa.add_moves(q, row)
        yield len(block)


def _worker_main(conn: Any, tokenizer_path: str) -> None:
    """One grammar at a time: rebuild it from its payload, walk its states, send the rows in chunks."""
    from .compiler import grammar_from_payload
    from .vocab import TokenizerInfo

    try:
        info = TokenizerInfo.from_tokenizer(load_tokenizer(tokenizer_path))
    except Exception as exc:  # noqa: BLE001 - reported; the tables then stay lazily filled
        conn.send(("dead", None, repr(exc)))
        return
    conn.send(("ready", None, info.fingerprint))
    for job_id, backend, payload, max_states, pairs in jobs(conn):
        try:
            grammar = TableGrammar.wrap(grammar_from_payload(info, backend, payload))
            if grammar is not None:
                for chunk in walk_states(grammar, max_states, pairs=pairs):
                    tag = "moves" if isinstance(chunk, DfaMoves) else "pairs" if isinstance(chunk, ForcedPairs) else "rows"
                    conn.send((tag, job_id, chunk))
            conn.send(("done", job_id, None))
        except Exception as exc:  # noqa: BLE001 - this grammar's table stays lazily filled
            conn.send(("done", job_id, repr(exc)))


class TableCompletion:
    """The scheduler's side: tables queued for completion, a worker process (started on first use,
    loading the tokenizer once), and the rows it sends merged into their tables by `poll`."""

    def __init__(self, tokenizer_path: str, fingerprint: str) -> None:
        self.tokenizer_path = tokenizer_path
        self.fingerprint = fingerprint
        self._ctx = mp.get_context("spawn")
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._dead = False
        self._queue: deque[tuple[int, StateTable, str, Any, bool]] = deque()
        self._inflight: tuple[int, StateTable, str, Any, bool] | None = None
        self._renamed: dict[int, int] = {}  # the job in flight: the walk's state numbers -> its table's
        self._filing: Iterator[int] | None = None  # a walk's moves being filed, a slice per poll
        self._next_id = 0
        self._sent_at = 0.0
        self.merged = 0  # rows filed into tables (not counting rows already filled there)

    def start(self) -> None:
        """Start the worker now (it loads the tokenizer, seconds): the caller does this while its first
        grammar compiles, so that the first table's walk begins as soon as that grammar is there."""
        if self._proc is None and not self._dead:
            parent, child = self._ctx.Pipe()
            self._proc = self._ctx.Process(target=_worker_main, args=(child, self.tokenizer_path), daemon=True,
                                           name="radixlm-grammar-tables")
            self._proc.start()
            child.close()
            self._conn = parent

    def submit(self, table: StateTable, backend: str, payload: Any, pairs: bool = False) -> None:
        """Queue `table` for completion; `pairs`: also walk its forced pairs (runtime/forced_rows.py)."""
        if self._dead:
            return
        self._queue.append((self._next_id, table, backend, payload, pairs))
        self._next_id += 1
        self.start()
        self._send_next()  # (else when `poll` reads the worker's "ready")

    @property
    def pending(self) -> int:
        """Tables queued, being walked or having their moves filed (0 once the worker is dead: they stay
        lazily filled)."""
        return 0 if self._dead else len(self._queue) + (self._inflight is not None) + (self._filing is not None)

    def has_news(self) -> bool:
        """Something arrived (the caller settles its mask work before `poll` merges it)."""
        try:
            return self._filing is not None or (self._conn is not None and self._conn.poll(0))
        except (EOFError, OSError):
            self._stop("the table worker died")
            return False

    def poll(self) -> int:
        """Merge what arrived into its table (never blocks); returns rows merged. The caller owns
        the tables now: no mask work on them may be running."""
        merged = 0
        if self._filing is not None and next(self._filing, None) is None:
            self._filing = None
        try:
            while self._conn is not None and self._conn.poll(0):
                tag, job_id, body = self._conn.recv()
                if tag == "ready":
                    if body != self.fingerprint:
                        self._stop("the table worker's tokenizer differs from the scheduler's")
                        return merged
                    self._ready = True
                elif tag == "dead":
                    self._stop(f"the table worker failed to start: {body}")
                    return merged
                elif self._inflight is not None and self._inflight[0] == job_id:
                    table = self._inflight[1]
                    if tag == "moves":
                        self._filing = file_moves(table, body, self._renamed)  # from the next poll on
                    elif tag == "pairs":
                        file_pairs(table, body, self._renamed)
                    elif tag == "rows":
                        merged += file_rows(table, body, self._renamed)
                    else:  # done
                        if body is not None:
                            logger.warning("state table completion failed: %s", body)
                        logger.info("state table completed in the background: %d states, %d rows filed in %.1f s",
                                    table.dfa.num_states, self.merged + merged, time.monotonic() - self._sent_at)
                        self._inflight = None
                self._send_next()
        except (EOFError, OSError):
            self._stop("the table worker died")
        self.merged += merged
        return merged

    def _send_next(self) -> None:
        if self._ready and self._inflight is None and self._queue and self._conn is not None:
            self._inflight = self._queue.popleft()
            self._renamed = {}
            job_id, table, backend, payload, pairs = self._inflight
            self._sent_at = time.monotonic()
            self._conn.send((job_id, backend, payload, table.dfa.max_states, pairs))

    def _stop(self, why: str) -> None:
        logger.warning("%s: state tables stay filled on first use", why)
        self._dead = True
        self.close()

    def close(self) -> None:
        end_process(self._proc, self._conn, ask_first=True)
        self._proc = self._conn = None
        self._queue.clear()
        self._inflight = self._filing = None

"""Tokens a state table's grammar forces one at a time (runtime/forced_rows.py computes them as extra decode rows).

A state forces a token when its mask allows that token alone: whatever the logits, the masked draw takes it. The
table answers per state (`single_token`), follows such tokens from a state (`forced_run`), and keeps, per state, the
tokens that lead to a state forcing one (`StateTable.forced_after`): noted from commits (`note_move`) and walked by
the background completion for every state allowing few tokens (`forced_pairs`, `ForcedPairs`, `file_pairs`).
"""

from __future__ import annotations

import functools
import itertools
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

from .state_table import FIRST_STATE_ROW, StateTable

if TYPE_CHECKING:
    from .table_grammar import TableGrammar

# A state's forced run is walked once, this many tokens at most, and kept (`StateTable.runs_from`): rides take up to
# runtime/forced_rows.MAX_RIDE + 1, guesses MAX_GUESS; item (f) follows ~20 new pairs' runs a step at 64 rows.
CACHED_RUN = 32
# States allowing at most this many tokens get their forced pairs walked (item (f)'s schema: every state a free
# token was taken at before a forced one allowed fewer than 256; 420 such states, 30k walks, 0.45 s on the 2-core CPU)
PAIR_MAX_ALLOWED = 256


def single_token(table: StateTable, state: int) -> int:
    """The only token the mask of `state` allows (its filled row has one bit set), else -1 (several,
    none, or the row not filled yet); cached per state once the row is filled."""
    hit = table._single.get(state)
    if hit is not None:
        return hit
    row = state + FIRST_STATE_ROW
    if row >= len(table.ready) or not table.ready[row]:
        return -1
    words = table.rows[row]
    nonzero = words.nonzero()
    token = -1
    if nonzero.numel() == 1:
        w = int(nonzero[0, 0])
        bits = int(words[w]) & 0xFFFFFFFF
        if bits & (bits - 1) == 0:
            token = 32 * w + bits.bit_length() - 1
    table._single[state] = token
    return token


def note_move(table: StateTable, state: int, token: int, nxt: int) -> None:
    """A row at `state` took `token` to `nxt` (a filled row): remember the token `nxt` forces, if one
    (never an end token), for rows at `state` later (runtime/forced_rows.py)."""
    forced = table._single.get(nxt)
    if forced is None:
        forced = single_token(table, nxt)
    if forced >= 0 and forced not in table.end_ids:
        pairs = table.forced_after.setdefault(state, {})
        if pairs.get(token) != forced:
            pairs[token] = forced
            _pairs_changed(table, state)


def _pairs_changed(table: StateTable, state: int) -> None:
    """`state`'s forced pairs grew: where no ride nor guess was known to start there (`StateTable.forced_flags`),
    that is asked again (one that was goes on; its runs grow when a guess is planned there)."""
    if table.forced_flags.get(state) == 0:
        del table.forced_flags[state]


def forced_run(table: StateTable, state: int, limit: int) -> tuple[list[int], bool]:
    """The tokens a row at `state` must take next, one by one (each state's mask allows only that
    token), at most `limit`, and whether the row ends with them: either the run is empty and the next
    token is an end token (not in the list), or the run's last token reaches a state that ends the
    grammar (a JSON document's closing brace: the row's last token). Every other token of the run
    reaches a filled row that is not terminated: riding it needs no backend fill. Read-only: the
    table's moves may be walked and cached, no matcher moves."""
    if table.broken or limit <= 0:
        return [], False
    if limit > CACHED_RUN:
        run, ends, _ = _forced_walk(table, state, limit)
        return run, ends
    hit = table.runs_from.get(state)
    if hit is None:
        run, ends, final = _forced_walk(table, state, CACHED_RUN)
        if not final:  # (stopped at a row not filled yet: walked again next time)
            return (run[:limit], False) if len(run) > limit else (run, ends)
        hit = table.runs_from[state] = (tuple(run), ends)
    run_t, ends = hit
    if len(run_t) > limit:
        return list(run_t[:limit]), False
    return list(run_t), ends


def _forced_walk(table: StateTable, state: int, limit: int) -> tuple[list[int], bool, bool]:
    """`forced_run`, and whether its answer is final: False where the walk stopped at a row not filled yet
    (or a DFA past its budget), which a later walk may pass."""
    run: list[int] = []
    if table.broken:
        return run, False, True
    ready = table.ready
    while len(run) < limit:
        if state + FIRST_STATE_ROW >= len(ready) or not ready[state + FIRST_STATE_ROW]:
            return run, False, False
        token = single_token(table, state)
        if token < 0:
            break
        if token in table.end_ids:
            return run, not run, True
        try:
            nxt = table.next_state(state, token)
        except OverflowError:
            return run, False, False
        if nxt < 0:
            break
        row = nxt + FIRST_STATE_ROW
        if row >= len(ready) or not ready[row]:
            return run, False, False
        run.append(token)
        if table.terminated[row]:
            return run, True, True
        state = nxt
    return run, False, True


@dataclass(frozen=True)
class GuessRuns:
    """What a guess at one state may take (runtime/forced_rows.py): per token a row may be sampled there
    that leads to a forced run, that run (its first token the pair's, `StateTable.forced_after`; the
    longest `width` tokens). `keys` [P] and `values` [P, `most_tokens`] (0-padded) are the same as arrays,
    for the pick on the device, made when a guess first uses them (a state's runs grow a few pairs a step
    while most are never guessed). Made once per state and number of pairs known (`guess_runs`)."""

    pairs: int
    runs: dict[int, tuple[int, ...]]
    width: int
    most_tokens: int

    @functools.cached_property
    def keys(self) -> np.ndarray:
        return np.fromiter(self.runs, dtype=np.int64, count=len(self.runs))

    @functools.cached_property
    def values(self) -> np.ndarray:
        values = np.zeros((len(self.runs), self.most_tokens), dtype=np.int64)
        for k, run in enumerate(self.runs.values()):
            values[k, : len(run)] = run
        return values

    def entries(self, width: int) -> np.ndarray:
        """The pick's entries for a guess of `width` tokens, pair by pair then token by token, as rows of one
        [3, entries] array (one concatenation lays a step's out): each entry's key, its run's token there (0
        past the run's end) and that token's place in the guess (0..width-1); made once per width."""
        hit = self._entries.get(width)
        if hit is None:
            hit = self._entries[width] = np.stack([np.repeat(self.keys, width), self.values[:, :width].reshape(-1),
                                                   np.tile(np.arange(width, dtype=np.int64), len(self.runs))])
        return hit

    _entries: dict[int, np.ndarray] = field(default_factory=dict, compare=False, repr=False)


def guess_runs(table: StateTable, state: int, pairs: dict[int, int], most_pairs: int, most_tokens: int) -> GuessRuns | None:
    """`GuessRuns` of `state` from its forced pairs (the first `most_pairs`), each run followed from the
    pair's forced token while states force one token (`forced_run`, at most `most_tokens`); cached on the
    table per state, the runs of new pairs added as they are known (only theirs followed: item (f) learns ~20
    pairs a step at 64 rows). None where no pair's run can be taken."""
    hit = table.guess_runs.get(state)
    known = min(len(pairs), most_pairs)
    if hit is not None and hit.pairs == known:
        return hit if hit.width else None
    # pairs are only ever added (in order): the runs of those seen before stay, the new ones are followed
    new: dict[int, tuple[int, ...]] = {}
    for token, first in itertools.islice(pairs.items(), hit.pairs if hit is not None else 0, known):
        try:
            after = table.next_state(state, token)
        except OverflowError:
            break
        run, _ = forced_run(table, after, most_tokens) if after >= 0 else ([], False)
        if run and run[0] == first:
            new[token] = tuple(run)
    width = max(map(len, new.values()), default=0)
    if hit is not None:
        new, width = ({**hit.runs, **new} if new else hit.runs), max(width, hit.width)
    found = table.guess_runs[state] = GuessRuns(known, new, width, most_tokens)
    return found if width else None


@dataclass(frozen=True)
class ForcedPairs:
    """Per walked state whose mask allows at most PAIR_MAX_ALLOWED tokens: each allowed token that leads
    to a state whose mask allows one token (not an end token, the state not terminated), with that
    token (`StateTable.forced_after`, which runtime/forced_rows.py's guesses read)."""

    nfa_states: int
    pairs: dict[int, dict[int, int]]


def allowed_tokens(row: np.ndarray, most: int) -> np.ndarray | None:
    """The token ids a packed mask row allows, or None when more than `most`."""
    bits = np.unpackbits(row.view(np.uint8), bitorder="little")
    if int(bits.sum()) > most:
        return None
    return np.flatnonzero(bits)


def forced_pairs(grammar: TableGrammar, few: dict[int, np.ndarray], single_of: dict[int, int],
                 deadline: float) -> dict[int, dict[int, int]]:
    """`ForcedPairs.pairs` of the walk's states: each state of `few`'s allowed tokens walked on the DFA."""
    dfa, info = grammar.table.dfa, grammar.info
    end_ids = set(info.end_token_ids)
    out: dict[int, dict[int, int]] = {}
    for q, allowed in few.items():
        if time.monotonic() > deadline:
            break
        pairs: dict[int, int] = {}
        for x in allowed.tolist():
            data = info.token_bytes[x] if x < len(info.token_bytes) else None
            if x in end_ids or not data:
                continue
            try:
                nxt = dfa.walk(q, data)
            except OverflowError:
                return out
            forced = single_of.get(nxt, -1)
            if forced >= 0 and forced not in end_ids:
                pairs[x] = forced
        if pairs:
            out[q] = pairs
    return out


def file_pairs(table: StateTable, found: ForcedPairs, renamed: dict[int, int]) -> int:
    """File the walk's forced pairs under `table`'s state numbers; returns the states given pairs."""
    if table.broken or found.nfa_states != table.dfa.nfa_size:
        return 0
    filed = 0
    for q, pairs in found.pairs.items():
        mine = renamed.get(q)
        if mine is not None:
            table.forced_after.setdefault(mine, {}).update(pairs)
            _pairs_changed(table, mine)
            filed += 1
    return filed




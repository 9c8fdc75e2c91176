"""Tokens a state table's grammar forces one at a time (runtime/forced_rows.py computes them as extra decode rows).

A state forces a token when its mask allows that token alone: whatever the logits, the masked draw takes it. The
table answers per state (`single_token`), follows such tokens from a state (`forced_run`), and keeps, per state, the
tokens that lead to a state forcing one (`StateTable.forced_after`): noted from commits (`note_move`) and walked by
the background completion for every state allowing few tokens (`forced_pairs`, `ForcedPairs`, `file_pairs`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from .state_table import FIRST_STATE_ROW, StateTable

if TYPE_CHECKING:
    from .state_table import TableGrammar

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


def singles_at_rows(table: StateTable, rows: np.ndarray) -> np.ndarray:
    """`single_token` of many table rows (state + FIRST_STATE_ROW) at once, -1 where not one: read from an
    array beside the table (`StateTable.single_rows`, -2 where not asked yet), so that the forced rows'
    per-step filter is one gather, not a lookup a row."""
    mirror = table.single_rows
    if mirror.shape[0] < len(table.ready):
        grown = np.full(len(table.ready), -2, dtype=np.int64)
        grown[: mirror.shape[0]] = mirror
        mirror = table.single_rows = grown
    got = mirror[rows]
    unknown = got == -2
    if unknown.any():
        for row in np.unique(rows[unknown]).tolist():
            token = single_token(table, row - FIRST_STATE_ROW) if row >= FIRST_STATE_ROW else -1
            if token >= 0 or row < FIRST_STATE_ROW or table.ready[row]:
                mirror[row] = token  # (a row not filled yet is asked again once it is)
        got = mirror[rows]
        got[got == -2] = -1
    return got


def note_move(table: StateTable, state: int, token: int, nxt: int) -> None:
    """A row at `state` took `token` to `nxt` (a filled row): remember the token `nxt` forces, if one
    (never an end token), for rows at `state` later (runtime/forced_rows.py)."""
    forced = table._single.get(nxt)
    if forced is None:
        forced = single_token(table, nxt)
    if forced >= 0 and forced not in table.end_ids:
        table.forced_after.setdefault(state, {})[token] = forced


def forced_run(table: StateTable, state: int, limit: int) -> tuple[list[int], bool]:
    """The tokens a row at `state` must take next, one by one (each state's mask allows only that
    token), at most `limit`, and whether the row ends with them: either the run is empty and the next
    token is an end token (not in the list), or the run's last token reaches a state that ends the
    grammar (a JSON document's closing brace: the row's last token). Every other token of the run
    reaches a filled row that is not terminated: riding it needs no backend fill. Read-only: the
    table's moves may be walked and cached, no matcher moves."""
    run: list[int] = []
    if table.broken:
        return run, False
    while len(run) < limit:
        token = single_token(table, state)
        if token < 0:
            break
        if token in table.end_ids:
            return run, not run
        try:
            nxt = table.next_state(state, token)
        except OverflowError:
            break
        row = nxt + FIRST_STATE_ROW
        if nxt < 0 or row >= len(table.ready) or not table.ready[row]:
            break
        run.append(token)
        if table.terminated[row]:
            return run, True
        state = nxt
    return run, False


@dataclass(frozen=True)
class GuessRuns:
    """What a guess at one state may take (runtime/forced_rows.py): per token a row may be sampled there
    that leads to a forced run, that run (its first token the pair's, `StateTable.forced_after`; the
    longest `width` tokens); `keys` [P] and `values` [P, the most tokens asked] (0-padded) are the same as
    arrays, for the pick on the device. Made once per state and number of pairs known (`guess_runs`)."""

    pairs: int
    runs: dict[int, tuple[int, ...]]
    keys: np.ndarray
    values: np.ndarray
    width: int


def guess_runs(table: StateTable, state: int, pairs: dict[int, int], most_pairs: int, most_tokens: int) -> GuessRuns | None:
    """`GuessRuns` of `state` from its forced pairs (the first `most_pairs`), each run followed from the
    pair's forced token while states force one token (`forced_run`, at most `most_tokens`); cached on the
    table per state, the runs of new pairs added as they are known. None where no pair's run can be taken."""
    hit = table.guess_runs.get(state)
    if hit is not None and hit.pairs == len(pairs):
        return hit if hit.width else None
    # pairs are only ever added (in order): the runs of those seen before stay, the new ones are followed
    runs: dict[int, tuple[int, ...]] = dict(hit.runs) if hit is not None else {}
    done = hit.pairs if hit is not None else 0
    for token, first in list(pairs.items())[done:most_pairs]:
        try:
            after = table.next_state(state, token)
        except OverflowError:
            break
        run, _ = forced_run(table, after, most_tokens) if after >= 0 else ([], False)
        if run and run[0] == first:
            runs[token] = tuple(run)
    width = max(map(len, runs.values()), default=0)
    values = np.zeros((len(runs), most_tokens), dtype=np.int64)
    for k, run in enumerate(runs.values()):
        values[k, : len(run)] = run
    found = table.guess_runs[state] = GuessRuns(len(pairs), runs, np.fromiter(runs, dtype=np.int64, count=len(runs)),
                                                values, width)
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
            filed += 1
    return filed




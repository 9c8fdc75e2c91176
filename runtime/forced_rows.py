"""Grammar-forced tokens computed as extra rows of the next decode step, not each in a step of its own.

Where a constrained row's grammar allows exactly one token at its state, the masked draw can only
take that token, at any temperature and seed. With overlap scheduling, when step k+1's mask is
taken the host knows the run a row's next token starts: t1 (sampled by step k+1 as usual) and the
tokens t2..tm forced after it. They ride with t1: step k+1's commit appends t1..tm, and step k+2
computes their KV beside t1 as decode rows of the same request (each a one-token decode row whose
KV ends at it, as a verify step's drafts: the decode kernels and CUDA graphs, one bucket larger at
most), then samples the token after tm with the state after tm's mask. The row saves m - 1 steps,
and the extra decode rows cost little on a device where a decode step is bound by reading weights.
A row whose forced run ends it (its last token reaches a state that ends the grammar: a JSON
document's closing brace; or its next token is a forced end token) is marked instead: the step
after leaves it out (it ends when that token is committed), so the run no longer needs a step to
find out that its last row ended.

Most forced tokens follow a free one (a key's rest after its first piece, `"` and a key after `,`):
t1 is known only once the free token is, after step k+1 is launched. Guesses take those: per state the
table keeps the tokens seen taken there that led to a state forcing one (`StateTable.forced_after`),
followed into the forced runs they lead to (`forced_tokens.guess_runs`, up to MAX_GUESS tokens); a row
at such a state computes as many more decode rows in step k+1 as its longest run, their tokens picked
on the device from the runs by the sampled token (padding tokens where none matches). Once the host
has the sampled token it knows which run matched: that run rides after it and step k+1 samples after
the run; the slots the run did not use go back to the pool. Guess rows fill the padding of the CUDA
graph the step replays anyway; a bucket grows only where the states' measured yields pay for it
(`_worth`, priced from the H200's decode steps).

Host time: the plans visit only candidate rows. The grammar commit's own pass over the batch reads a per-state
flag (`StateTable.forced_flags`: a ride may start there, only a guess, neither) and lists the candidates; each
state's forced run is walked once (`forced_tokens.forced_run`); a step's extra tokens follow its plain rows
(forced_rows_batch.py). On the CPU each numpy / torch operation after the forward pass costs tens of µs (cold
caches), so the plans use none (benchmarks/RESULTS.md, jf16). Rows of another state table than the commit's
(several schemas in one batch) neither ride nor guess.

Off by default (`--enable-forced-rows`): on the CPU it cuts item (f)'s decode steps for the same tokens
(benchmarks/RESULTS.md), but the extra rows' cost on a GPU and the device-side pick have not been measured.

Outputs are unchanged: a ride holds only tokens each of whose states allows nothing else (state
table rows with one bit set), never an end token, never into a state that is not filled yet (into a
state that ends the grammar only as its last token, the row then marked as ending), and only for rows
whose draw could not refuse it (no logit bias, no token bans of min_new_tokens in force, no logprobs
asked, no stop strings) and whose length and context leave room for a token after it. Rows without a
state table (llguidance's masks only) do not ride.
"""
from __future__ import annotations

import bisect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixlm.constrained.forced_tokens import GuessRuns, forced_run, guess_runs
from radixlm.constrained.state_table import FIRST_STATE_ROW
from radixlm.constrained.table_grammar import TableMatcher
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.constrained.state_table import StateTable
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.uncommitted_step import UncommittedStep

# Forced tokens riding after one row's token (a JSON key literal of the benchmark's schema: 2-6 tokens).
MAX_RIDE = 16
# Pairs (token -> the run it forces) a guess picks from on the device, and the run's tokens at most (item (f):
# a key's last piece after its first, `"` then a key after a free `,`: 1-2 tokens).
MAX_PAIRS = 64
MAX_GUESS = 4
# A state's guess yield (tokens a guess takes) starts at PRIOR_HITS / PRIOR_TRIES (item (f) on the CPU: 88 of 443
# guesses taken); candidates left out are watched while their state has fewer than WATCH_TRIES guesses seen.
PRIOR_HITS, PRIOR_TRIES = 1.0, 5.0
WATCH_TRIES = 64
# The decode step's cost that does not grow with its rows, in rows' worth: the H200, 8B shape, item (f)'s JSON
# steps at 64 and 256 rows took 5.56 and 9.51 ms at the median (benchmarks/RESULTS.md, gmask5): 0.0206 ms a row
# above 4.24 ms.
DECODE_FIXED_ROWS = 206
_NO_RIDE: list[int] = []  # never changed in place: a row's ride is replaced, not extended


def rides_allowed(req: Req) -> bool:
    """The row's draw takes a forced token whatever the logits (see the module docstring)."""
    p = req.params
    return (req.grammar is not None and not req.return_logprob and not p.stop and not p.stop_regex
            and not p.logit_bias and len(req.output_ids) + req.tokens_on_device >= p.min_new_tokens)


RIDE, GUESS = 2, 1  # `StateTable.forced_flags`: a ride (or an end) may start at the state, or only a guess; 0: neither


def _starts_at(table: StateTable, state: int) -> int:
    """RIDE where a row at `state` may take a ride (its next token starts a forced run of two tokens or more, or
    one that ends the row), GUESS where only a guess may start (some tokens lead to a forced run: `guess_runs`),
    else 0; kept per state (`StateTable.forced_flags`) where the answer is final (a 0 is asked again when the
    state's pairs grow; a walk stopped at a row not filled yet is asked again)."""
    run, ends = forced_run(table, state, MAX_RIDE + 1)
    pairs = table.forced_after.get(state)
    flag = (RIDE if ends or len(run) > 1 else
            GUESS if pairs is not None and guess_runs(table, state, pairs, MAX_PAIRS, MAX_GUESS) is not None else 0)
    if flag == RIDE or state in table.runs_from:
        table.forced_flags[state] = flag
    return flag


def _forced_candidates(sched: Scheduler, reqs: list[Req]) -> tuple[StateTable, list[int], list[int], list[int]] | None:
    """(table, rows, the indices of `reqs` whose state may start a ride or is not known yet, those where only a
    guess may start) for a step about to sample `reqs`. The usual step samples the last commit's requests: the
    commit's own pass listed both (`TableStep.forced`, `guessing`: the states' flags read in its loop) and kept
    each row. Otherwise each row's table row is found (the commit's by identity, the others visited) and every
    row's flag read."""
    grammars = sched.grammars
    step = grammars.committed_step()
    if step is not None and step.reqs == reqs:
        table, rows, guessing = step.table, step.rows, step.guessing
        picked = sorted(set(step.forced)) if step.forced else []
    else:
        found = grammars.rows_after_commit(reqs)
        if found is not None:
            table, rows = found
        else:
            table = next((r.grammar.table for r in reqs if type(r.grammar) is TableMatcher), None)
            if table is None:
                return None
            rows = [-1] * len(reqs)
        for i, row in enumerate(rows):
            m = reqs[i].grammar
            if row < 0 and type(m) is TableMatcher and m.table is table and not m.ended and not m.refused:
                rows[i] = m.states[-1] + FIRST_STATE_ROW
        flags = table.forced_flags
        seen = [(i, flags.get(row - FIRST_STATE_ROW, 3)) for i, row in enumerate(rows) if row >= FIRST_STATE_ROW]
        picked = [i for i, f in seen if f > GUESS]
        guessing = [i for i, f in seen if f == GUESS]
    if table.broken:
        return None
    return table, rows, picked, guessing


def plan_rides(sched: Scheduler, reqs: list[Req]) -> tuple[list[list[int]] | None, list[bool] | None, Any]:
    """For a decode step about to sample `reqs` (their grammars at their last tokens): per row the forced
    tokens to ride after its next token, and whether the row ends with them (or that token is forced to be
    an end token): the step after leaves it out. (None, None) where no row has either. Third: the rows that
    may guess in the step after (`GuessCandidates`, None: none), by the states their tokens are sampled at.
    The rows a step adds stay within the largest CUDA graph (a step past it would run eagerly, costing more
    than the steps it saves). Only rows whose state may start a ride (or is not known yet) are visited
    (`_forced_candidates`), each state's run walked once (`forced_tokens.forced_run`)."""
    if sched.grammars is None or not sched.args.enable_forced_rows:
        return None, None, None
    found = _forced_candidates(sched, reqs)
    if found is None:
        return None, None, None
    table, rows, picked, guessing = found
    if not picked:
        return None, None, (GuessCandidates(table, rows, guessing) if guessing else None)
    graphs = sched.runner.graph_runner
    spare = (graphs.max_bs - len(reqs)) if graphs is not None else MAX_RIDE * len(picked)
    context = sched.runner.context_len
    flags = table.forced_flags
    rides: list[list[int]] | None = None
    ends: list[bool] | None = None
    guessing = list(guessing)
    ride_tokens = ended = 0
    for i in picked:
        row = rows[i]
        if row < FIRST_STATE_ROW:
            continue
        state = row - FIRST_STATE_ROW
        flag = flags.get(state)
        if flag is None:
            flag = _starts_at(table, state)
        if flag != RIDE:
            if flag == GUESS:
                guessing.append(i)
            continue
        r = reqs[i]
        m = r.grammar
        if r.finished or m.ended or m.refused:
            continue
        run, end = _NO_RIDE, False
        if rides_allowed(r):
            after = len(r.output_ids) + r.tokens_on_device + 1  # tokens once the next one is appended
            room = min(r.params.max_new_tokens - after, context - len(r.input_ids) - after) - 1
            run, end = forced_run(table, state, max(min(MAX_RIDE, room), 0) + 1)
        if len(run) > 1:
            if len(run) - 1 > spare:  # (cut: the row no longer ends with it)
                run, end = run[: max(spare, 0) + 1], False
            spare -= len(run) - 1
            if len(run) > 1:
                if rides is None:
                    rides = [_NO_RIDE] * len(reqs)  # (one shared empty ride: no list a row a step)
                rides[i] = run[1:]
                ride_tokens += len(run) - 1
        if end:
            if ends is None:
                ends = [False] * len(reqs)
            ends[i] = True
            ended += 1
        elif len(run) <= 1 and state in table.guess_runs:
            guessing.append(i)  # (a ride not taken: its token may still lead to a forced run)
    stats = sched.stats
    stats["forced_ride_tokens"] += ride_tokens
    stats["forced_end_rows"] += ended
    return rides, ends, (GuessCandidates(table, rows, guessing) if guessing else None)


@dataclass(frozen=True)
class GuessCandidates:
    """Rows of a step whose tokens are sampled at a state where some tokens lead to a forced run (`plan_rides`):
    their indices in the step (`picks`) and every row's table row then (`rows`: state + FIRST_STATE_ROW); the
    next step's `plan_guesses` picks from them."""

    table: StateTable
    rows: list[int]
    picks: list[int]


@dataclass(frozen=True)
class Guess:
    """A guess `plan_guesses` picked for a row: its state's runs, that state, the tokens the row computes for it."""

    runs: GuessRuns
    state: int
    width: int


@dataclass(frozen=True)
class GuessesSeen:
    """The candidates a guess left out (`plan_guesses`): (row in the pending step, state, the tokens a guess there
    would have computed) each, whose sampled tokens count for their states' rates (`resolve_guesses`)."""

    table: StateTable
    rows: list[tuple[int, int, int]]


def plan_guesses(sched: Scheduler, todo: list[Req], rows: int) -> tuple[dict[int, Guess], GuessesSeen | None]:
    """For a decode step about to run `todo` overlapped: the rows whose token on the device was sampled at a
    state where some tokens lead to a forced run (`GuessCandidates` of the pending step), where a guess pays
    (`_worth`), by request identity: its `Guess` (its state's `GuessRuns`, the state, the width): it
    computes `width` more tokens, the run its sampled token names (picked on the device), and samples after
    the run where a pair matched. Without graphs (the CPU, where steps are not overlapped unless asked) every
    candidate row guesses. Second: the candidates left out, whose tokens `resolve_guesses` looks at too
    (None: none). Only the candidates are visited."""
    pending = sched.uncommitted
    if (sched.grammars is None or not sched.args.enable_forced_rows or pending is None or sched.spec is not None
            or pending.prefill or pending.guess_candidates is None):
        return {}, None
    cands = pending.guess_candidates
    table = cands.table
    if table.broken:
        return {}, None
    context = sched.runner.context_len
    guessed, forced_after = table.guessed, table.forced_after
    candidates: list[tuple[float, float, int, int, int, Req]] = []  # (rate / width, rate, row, state, width, req)
    reqs, rows_of, ends = pending.reqs, cands.rows, pending.ends
    done: set[int] = set()
    per_state: dict[int, tuple[GuessRuns | None, float]] = {}  # (its runs as known now, its rate): once a state
    for j in cands.picks:
        state = rows_of[j] - FIRST_STATE_ROW
        r = reqs[j]
        m = r.grammar
        if (j in done or r.tokens_on_device != 1 or r.finished or m is None or m.ended or m.refused
                or m.states[-1] != state or not rides_allowed(r) or (ends is not None and ends[j])):
            continue  # (a ride pending, or its state moved since)
        done.add(j)
        # room for its token on the device, the run and a token after it
        room = min(r.params.max_new_tokens, context - len(r.input_ids)) - len(r.output_ids) - 2
        if room <= 0:
            continue
        hit = per_state.get(state)
        if hit is None:  # (pairs may have been learned since the runs were made: grown here)
            pairs = forced_after.get(state)
            tried, taken = guessed.get(state, (0, 0))
            hit = per_state[state] = (guess_runs(table, state, pairs, MAX_PAIRS, MAX_GUESS) if pairs else None,
                                      (taken + PRIOR_HITS) / (tried + PRIOR_TRIES))
        runs, rate = hit
        if runs is None:
            continue
        width = min(runs.width, room)
        candidates.append((rate / width, rate, j, state, width, r))
    if not candidates:
        return {}, None
    candidates.sort(key=lambda c: -c[0])
    graphs = sched.runner.graph_runner
    take = _worth([c[1] for c in candidates], rows, len(todo), graphs.buckets if graphs is not None else None,
                  [c[4] for c in candidates])
    if not sched.results.can_defer(_decode_of(todo)):
        return {}, None  # (only an overlapped step learns its rows' tokens before sampling them)
    # the rows left out are watched: what their tokens would have taken counts for their states' rates, so
    # that a state whose guesses pay is found without guessing there first
    # (until a state has WATCH_TRIES of them: its yield is known well enough by then)
    left = [(j, state, width) for _, _, j, state, width, _ in candidates[take:]
            if guessed.get(state, (0, 0))[0] < WATCH_TRIES]
    seen = GuessesSeen(table, left) if left else None
    runs_of = table.guess_runs
    return {id(r): Guess(runs_of[state], state, width) for _, _, _, state, width, r in candidates[:take]}, seen


def _decode_of(todo: list[Req]) -> ScheduledBatch:
    """A decode batch of `todo` for `ResultProcessor.can_defer` (no per-row lists made)."""
    from radixlm.runtime.schedule_batch import ScheduledBatch

    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    batch.reqs = todo
    return batch


def _worth(gains: list[float], rows: int, batch: int, buckets: list[int] | None, widths: list[int] | None = None) -> int:
    """How many of the candidates (expected tokens each takes, best per row first; `widths`: the rows each
    adds, by default one) guess. A CUDA graph replays a whole bucket: guess rows in the padding of the
    bucket the step's `rows` replay anyway cost nothing; growing into the next bucket (n more rows) pays
    when the guesses it lets in are expected to save more row-steps than the n rows cost. A decode step
    costs about (DECODE_FIXED_ROWS + batch) rows' worth, so a row-step saved is worth
    (DECODE_FIXED_ROWS + batch) / batch rows of a step."""
    if buckets is None:
        return len(gains)
    widths = widths or [1] * len(gains)
    at = bisect.bisect_left(buckets, rows)
    if at >= len(buckets):
        return 0
    take, used = _fit(widths, 0, 0, buckets[at] - rows)
    value = (DECODE_FIXED_ROWS + batch) / batch
    while take < len(gains) and at + 1 < len(buckets):
        grow = buckets[at + 1] - buckets[at]
        more, more_used = _fit(widths, take, used, buckets[at + 1] - rows)
        if sum(gains[take:more]) * value < grow:
            break
        take, used, at = more, more_used, at + 1
    return take


def _fit(widths: list[int], take: int, used: int, room: int) -> tuple[int, int]:
    """Candidates from `take` on that fit in `room` rows, `used` of them taken already: (count, rows)."""
    while take < len(widths) and used + widths[take] <= room:
        used += widths[take]
        take += 1
    return take, used


def resolve_guesses(sched: Scheduler, batch: ScheduledBatch, previous: UncommittedStep) -> list[int] | None:
    """After the pending step's tokens went into the grammars (an overlapped step, before sampling): a
    guess row whose token matched a pair took the run it names, which now rides after that token
    (appended with it, committed to its grammar); the guess slots it did not take go back to the pool.
    Returns each request's logits row to sample: after the run where it was taken (None: the step has no
    guess rows). Each guess, and each watched row (`guess_seen`), counts for its state's rate."""
    ids = previous._host_tokens()
    seen = batch.guess_seen
    if seen is not None:
        runs_of, guessed = seen.table.guess_runs, seen.table.guessed
        for j, state, width in seen.rows:
            _count(guessed, state, min(len(runs_of[state].runs.get(ids[j], ())), width))
    if batch.guesses is None:
        return None
    chosen = list(batch.sample_rows)
    free: list[int] = []  # the step's new slots (by index, request by request) of guess tokens not taken
    for i in batch.guess_index:
        guess = batch.guesses[i]
        assert guess is not None
        req = batch.reqs[i]
        width = batch.guess_widths[i]
        sched.stats["forced_guess_rows"] += width
        run = guess.runs.get(ids[req.uncommitted_row], ())[:width] if not req.finished else ()
        if run and previous.rides is None:
            previous.rides = [_NO_RIDE] * len(previous.reqs)
        taken = len(run) if run and sched.grammars.ride_after(req, run) else 0
        _count(req.grammar.table.guessed, batch.guess_states[i], taken)
        if taken:
            previous.rides[req.uncommitted_row] = list(run)  # type: ignore[index]
            req.tokens_on_device += taken
            sched.stats["forced_guess_hits"] += 1
            sched.stats["forced_guess_tokens"] += taken
            chosen[i] = batch.guess_rows[i] + taken - 1
        if taken < width:
            at = batch.guess_slots[i]
            free += range(at + taken, at + width)
            req.kv_len -= width - taken
    if free:  # (one gather for all: a slice a row was an operation a row)
        slots = batch.new_slots[0] if len(batch.new_slots) == 1 else torch.cat(batch.new_slots)
        sched.kv_pool.free(slots[free])
    return chosen  # type: ignore[return-value]


def _count(guessed: dict[int, list[int]], state: int, taken: int) -> None:
    """One guess seen at `state` that took (or would have taken) `taken` tokens. The counts change in place:
    a new pair of numbers a guess would be a long-lived object a step, and at 256 rows those made the
    cyclic collector's full passes ~3 ms a decode step on the CPU (benchmarks/RESULTS.md, jf15)."""
    counts = guessed.get(state)
    if counts is None:
        counts = guessed[state] = [0, 0]
    counts[0] += 1
    counts[1] += taken

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
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from radixlm.constrained.forced_tokens import GuessRuns, forced_run, guess_runs, singles_at_rows
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


def plan_rides(sched: Scheduler, reqs: list[Req]) -> tuple[list[list[int]] | None, list[bool] | None]:
    """For a decode step about to sample `reqs` (their grammars at their last tokens): per row the forced
    tokens to ride after its next token, and whether the row ends with them (or that token is forced to be
    an end token): the step after leaves it out. (None,
    None) where no row has either. The rows a step adds stay within the largest CUDA graph (a step past
    it would run eagerly, costing more than the steps it saves)."""
    grammars = sched.grammars
    if grammars is None or not sched.args.enable_forced_rows:
        return None, None
    found = grammars.rows_after_commit(reqs)
    if found is not None:  # the rows whose state forces a token, by one gather (rows it does not know: visited)
        table, rows = found
        known = rows >= 0
        forcing = np.flatnonzero(known & (singles_at_rows(table, np.where(known, rows, 0)) >= 0)).tolist()
        unknown = np.flatnonzero(~known).tolist()
        if unknown:
            forcing = sorted(forcing + [unknown[k] for k, _ in _rows_at([reqs[i] for i in unknown], _may_force)])
    else:
        forcing = [i for i, _ in _rows_at(reqs, _may_force)]
    picked = [i for i in forcing if rides_allowed(reqs[i])]
    if not picked:
        return None, None
    graphs = sched.runner.graph_runner
    spare = (graphs.max_bs - len(reqs)) if graphs is not None else MAX_RIDE * len(picked)
    context = sched.runner.context_len
    limits = []
    for i in picked:
        r = reqs[i]
        after = len(r.output_ids) + r.tokens_on_device + 1  # tokens once the next one is appended
        room = min(r.params.max_new_tokens - after, context - len(r.input_ids) - after) - 1
        limits.append(max(min(MAX_RIDE, room), 0))
    runs = forced_runs([reqs[i] for i in picked], limits)
    rides: list[list[int]] = [_NO_RIDE] * len(reqs)  # (one shared empty ride: no list a row a step)
    ends = [False] * len(reqs)
    any_ride = any_end = False
    for i, (ride, end) in zip(picked, runs):
        if ride:
            if len(ride) > spare:  # (cut: the row no longer ends with it)
                ride, end = ride[:spare], False
            spare -= len(ride)
            rides[i] = ride
            any_ride = any_ride or bool(ride)
        if end:
            ends[i] = any_end = True
    stats = sched.stats
    stats["forced_ride_tokens"] += sum(map(len, rides)) if any_ride else 0
    stats["forced_end_rows"] += sum(ends) if any_end else 0
    return (rides if any_ride else None), (ends if any_end else None)


def forced_runs(reqs: list[Req], limits: list[int]) -> list[tuple[list[int], bool]]:
    """Per request (its grammar advanced to its last token, its next mask not yet sampled from) the
    tokens that its next token forces after it and whether the row ends there (state_table.StateTable.
    forced_run): the next token is the first of the run, sampled as usual; the rest ride with it.
    At most `limits[i]` tokens after the first; rows without a healthy table: none."""
    out: list[tuple[list[int], bool]] = []
    none: tuple[list[int], bool] = ([], False)
    for req, limit in zip(reqs, limits):
        m = req.grammar
        table = getattr(m, "table", None)
        if m is None or req.finished or table is None or table.broken or m.ended or m.refused:
            out.append(none)
            continue
        run, ends = forced_run(table, m.state, limit + 1)
        # the first token is sampled, the ones after it ride; `ends`: the row's last token is among them
        # (or, with no run, the end token sampled next)
        out.append((run[1:], ends) if ends or len(run) > 1 else none)
    return out


def _rows_at(reqs: list[Req], lookup: Callable[[StateTable, int], Any]) -> list[tuple[int, Any]]:
    """(row, what `lookup` says of its grammar's table and state) for each constrained row with a state
    table where that is truthy: one dict lookup a row, the per-step filter in front of everything here."""
    out = []
    for i, r in enumerate(reqs):
        m = r.grammar
        table = getattr(m, "table", None) if m is not None else None
        if table is not None:
            hit = lookup(table, m.states[-1])
            if hit:
                out.append((i, hit))
    return out


def _may_force(table: StateTable, state: int) -> bool:
    """The state's row allows one token, or is not known yet to allow more."""
    return table._single.get(state, 0) >= 0


def _pairs(table: StateTable, state: int) -> dict[int, int] | None:
    return table.forced_after.get(state)


def plan_guesses(sched: Scheduler, todo: list[Req], rows: int) -> tuple[list[GuessRuns | None] | None, list[Any] | None]:
    """For a decode step about to run `todo` overlapped: per row whose token on the device was sampled at a
    state where some tokens lead to a forced run (`StateTable.forced_after`, followed by `guess_runs`), those
    runs, for the rows where a guess pays (`_worth`), else None; None where no row has one. Such a row
    computes `guess_widths[i]` more tokens, the run its sampled token names (picked on the device), and
    samples after the run where a pair matched. Without graphs (the CPU, where steps are not overlapped
    unless asked) every candidate row guesses. Second: the candidates left out, (request, state, runs,
    width) each, whose tokens `resolve_guesses` looks at too (None: none)."""
    pending = sched.uncommitted
    if (sched.grammars is None or not sched.args.enable_forced_rows or pending is None or sched.spec is not None
            or pending.prefill):
        return None, None
    context = sched.runner.context_len
    candidates: list[tuple[float, int, int, GuessRuns, int, int]] = []  # (tokens a row, row, state, runs, width, tries)
    for i, pairs in _rows_at(todo, _pairs):
        r = todo[i]
        m = r.grammar
        if r.tokens_on_device != 1 or m.table.broken or m.ended or m.refused:
            continue
        if not rides_allowed(r) or pending.ride_of(r) or pending.ends_row(r):
            continue
        # room for its token on the device, the run and a token after it
        room = min(r.params.max_new_tokens, context - len(r.input_ids)) - len(r.output_ids) - 2
        runs = guess_runs(m.table, m.state, pairs, MAX_PAIRS, MAX_GUESS) if room > 0 else None
        if runs is None:
            continue
        width = min(runs.width, room)
        tried, taken = m.table.guessed.get(m.state, (0, 0))
        candidates.append(((taken + PRIOR_HITS) / (tried + PRIOR_TRIES) / width, i, m.state, runs, width, tried))
    if not candidates:
        return None, None
    candidates.sort(key=lambda c: -c[0])
    graphs = sched.runner.graph_runner
    take = _worth([c[0] * c[4] for c in candidates], rows, len(todo), graphs.buckets if graphs is not None else None,
                  [c[4] for c in candidates])
    from radixlm.runtime.schedule_batch import ScheduledBatch

    if not sched.results.can_defer(ScheduledBatch(ForwardMode.DECODE, todo, [], [])):
        return None, None  # (only an overlapped step learns its rows' tokens before sampling them)
    # the rows left out are watched: what their tokens would have taken counts for their states' rates, so
    # that a state whose guesses would pay is found without guessing there first
    # (until a state has WATCH_TRIES of them: its yield is known well enough by then)
    seen = [(todo[i], state, runs, width) for _, i, state, runs, width, tried in candidates[take:]
            if tried < WATCH_TRIES] or None
    if not take:
        return None, seen
    out: list[GuessRuns | None] = [None] * len(todo)
    for _, i, state, runs, width, _ in candidates[:take]:
        out[i] = runs
        todo[i].guess_state, todo[i].guess_width = state, width
    return out, seen


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
    for req, state, runs, width in batch.guess_seen or ():
        if req.grammar is not None:
            _count(req.grammar.table.guessed, state, min(len(runs.runs.get(ids[req.uncommitted_row], ())), width))
    if batch.guesses is None:
        return None
    sched.stats["forced_guess_rows"] += sum(batch.guess_widths)
    chosen: list[int] = []
    slots = batch.new_slots[0] if len(batch.new_slots) == 1 else torch.cat(batch.new_slots)
    free: list[torch.Tensor] = []
    for i, (req, guess) in enumerate(zip(batch.reqs, batch.guesses)):
        row = batch.sample_rows[i]
        assert row is not None
        if guess is None:
            chosen.append(row)
            continue
        width = batch.guess_widths[i]
        run = guess.runs.get(ids[req.uncommitted_row], ())[:width] if not req.finished else ()
        if run and previous.rides is None:
            previous.rides = [_NO_RIDE] * len(previous.reqs)
        taken = len(run) if run and sched.grammars.ride_after(req, run) else 0
        _count(req.grammar.table.guessed, req.guess_state, taken)
        if taken:
            previous.rides[req.uncommitted_row] = list(run)  # type: ignore[index]
            req.tokens_on_device += taken
            sched.stats["forced_guess_hits"] += 1
            sched.stats["forced_guess_tokens"] += taken
        if taken < width:
            at = batch.guess_slots[i]
            free.append(slots[at + taken : at + width])
            req.kv_len -= width - taken
        chosen.append(batch.guess_rows[i] + taken - 1 if taken else row)
    if free:
        sched.kv_pool.free(free[0] if len(free) == 1 else torch.cat(free))
    return chosen


def _count(guessed: dict[int, list[int]], state: int, taken: int) -> None:
    """One guess seen at `state` that took (or would have taken) `taken` tokens. The counts change in place:
    a new pair of numbers a guess would be a long-lived object a step, and at 256 rows those made the
    cyclic collector's full passes ~3 ms a decode step on the CPU (benchmarks/RESULTS.md, jf15)."""
    counts = guessed.get(state)
    if counts is None:
        counts = guessed[state] = [0, 0]
    counts[0] += 1
    counts[1] += taken

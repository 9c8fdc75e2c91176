"""Grammar-forced tokens computed as extra rows of the next decode step, not each in a step of its own.

Where a constrained row's grammar allows exactly one token at its state, the masked draw can only
take that token, at any temperature and seed. With overlap scheduling, when step k+1's mask is
taken the host knows the run a row's next token starts: t1 (sampled by step k+1 as usual) and the
tokens t2..tm forced after it. They ride with t1: step k+1's commit appends t1..tm, and step k+2
computes their KV beside t1 as decode rows of the same request (each a one-token decode row whose
KV ends at it, as a verify step's drafts: the decode kernels and CUDA graphs, one bucket larger at
most), then samples the token after tm with the state after tm's mask. The row saves m - 1 steps,
and the extra decode rows cost little on a device where a decode step is bound by reading weights.
A run that ends on a forced end token (a JSON document's last) marks the row instead: the step
after leaves it out (it ends when that token is committed), so the run no longer needs a step to
find out that its last row ended.

Most forced tokens stand alone, right after a free one (a key's last piece after its first, `ue`
after `tr`): t1 is known only once the free token is, after step k+1 is launched. Guesses take
those: the state table remembers, per state, the tokens seen taken there that led to a state
forcing one token (`StateTable.forced_after`); a row at such a state computes one more decode row
in step k+1 whose token the device picks from those pairs by the sampled token (a padding token
where none matches). Once the host has the sampled token it knows whether the pair matched: if so
the forced token rides after it and step k+1 samples after it; if not, that row's slot goes back
to the pool and the step samples after the token as usual. Guess rows only fill the padding of the
CUDA graph the step replays anyway, so a miss costs nothing.

Outputs are unchanged: a ride holds only tokens each of whose states allows nothing else (state
table rows with one bit set), never an end token, never into a state that ends the grammar or is
not filled yet, and only for rows whose draw could not refuse it (no logit bias, no token bans of
min_new_tokens in force, no logprobs asked, no stop strings) and whose length and context leave
room for a token after it. Rows without a state table (llguidance's masks only) do not ride.
"""
from __future__ import annotations

import bisect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.constrained.state_table import StateTable
    from radixlm.runtime.schedule_batch import ScheduledBatch, UncommittedStep
    from radixlm.runtime.scheduler import Scheduler

# Forced tokens riding after one row's token (a JSON key literal of the benchmark's schema: 2-6 tokens).
MAX_RIDE = 16
# Pairs (token -> the token it forces) a guess row picks from on the device.
MAX_PAIRS = 64
# A state's guess hit rate starts at PRIOR_HITS / PRIOR_TRIES (item (f) on the CPU: 88 of 443 guesses taken).
PRIOR_HITS, PRIOR_TRIES = 1.0, 5.0
# The decode step's cost that does not grow with its rows, in rows' worth: the H200, 8B shape, item (f)'s JSON
# steps at 64 and 256 rows took 5.56 and 9.51 ms at the median (benchmarks/RESULTS.md, gmask5): 0.0206 ms a row
# above 4.24 ms.
DECODE_FIXED_ROWS = 206


def rides_allowed(req: Req) -> bool:
    """The row's draw takes a forced token whatever the logits (see the module docstring)."""
    p = req.params
    return (req.grammar is not None and not req.return_logprob and not p.stop and not p.stop_regex
            and not p.logit_bias and len(req.output_ids) + req.tokens_on_device >= p.min_new_tokens)


def plan_rides(sched: Scheduler, reqs: list[Req]) -> tuple[list[list[int]] | None, list[bool] | None]:
    """For a decode step about to sample `reqs` (their grammars at their last tokens): per row the forced
    tokens to ride after its next token, and whether that token is forced to be an end token. (None,
    None) where no row has either. The rows a step adds stay within the largest CUDA graph (a step past
    it would run eagerly, costing more than the steps it saves)."""
    grammars = sched.grammars
    if grammars is None or sched.args.disable_forced_rows:
        return None, None
    picked = [i for i, _ in _rows_at(reqs, _may_force) if rides_allowed(reqs[i])]
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
    runs = grammars.forced_runs([reqs[i] for i in picked], limits)
    rides: list[list[int]] = [[] for _ in reqs]
    ends = [False] * len(reqs)
    any_ride = any_end = False
    for i, (ride, end) in zip(picked, runs):
        if end:
            ends[i] = any_end = True
        if ride and spare > 0:
            ride = ride[:spare]
            spare -= len(ride)
            rides[i] = ride
            any_ride = True
    stats = sched.stats
    stats["forced_ride_tokens"] += sum(map(len, rides)) if any_ride else 0
    stats["forced_end_rows"] += sum(ends) if any_end else 0
    return (rides if any_ride else None), (ends if any_end else None)


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


def plan_guesses(sched: Scheduler, todo: list[Req], rows: int) -> list[dict[int, int] | None] | None:
    """For a decode step about to run `todo` overlapped: per row whose token on the device was sampled at a
    state where some tokens lead to a state forcing one token, those pairs (`StateTable.forced_after`), for
    the rows where a guess pays (`_worth`), else None; None where no row has one. Such a row computes one
    more token, the forced one its sampled token names (picked on the device), and samples after it where
    the pair matched. Without graphs (the CPU, where steps are not overlapped unless asked) every
    candidate row guesses."""
    pending = sched.uncommitted
    if (sched.grammars is None or sched.args.disable_forced_rows or pending is None or sched.spec is not None
            or pending.prefill):
        return None
    context = sched.runner.context_len
    candidates: list[tuple[float, int, int, dict[int, int]]] = []  # (hit rate, row, state, pairs)
    for i, pairs in _rows_at(todo, _pairs):
        r = todo[i]
        m = r.grammar
        if r.tokens_on_device != 1 or m.table.broken or m.ended or m.refused:
            continue
        if not rides_allowed(r) or pending.ride_of(r) or pending.ends_row(r):
            continue
        after = len(r.output_ids) + 2  # its token on the device and the guess
        if r.params.max_new_tokens - after < 1 or context - len(r.input_ids) - after < 1:
            continue
        tried, hits = m.table.guessed.get(m.state, (0, 0))
        candidates.append(((hits + PRIOR_HITS) / (tried + PRIOR_TRIES), i, m.state, pairs))
    if not candidates:
        return None
    candidates.sort(key=lambda c: -c[0])
    graphs = sched.runner.graph_runner
    take = _worth([c[0] for c in candidates], rows, len(todo), graphs.buckets if graphs is not None else None)
    if not take:
        return None
    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.schedule_batch import ScheduledBatch

    if not sched.results.can_defer(ScheduledBatch(ForwardMode.DECODE, todo, [], [])):
        return None  # (only an overlapped step learns its rows' tokens before sampling them)
    out: list[dict[int, int] | None] = [None] * len(todo)
    for _, i, state, pairs in candidates[:take]:
        picked = dict(list(pairs.items())[:MAX_PAIRS]) if len(pairs) > MAX_PAIRS else dict(pairs)
        out[i] = picked
        todo[i].guess_state = state
    return out


def _worth(rates: list[float], rows: int, batch: int, buckets: list[int] | None) -> int:
    """How many of the candidates (hit rates, best first) guess. A CUDA graph replays a whole bucket: guess
    rows in the padding of the bucket the step's `rows` replay anyway cost nothing; growing into the next
    bucket (n more rows) pays when the guesses it lets in are expected to save more row-steps than the n
    rows cost. A decode step costs about (DECODE_FIXED_ROWS + batch) rows' worth, so a row-step saved is worth
    (DECODE_FIXED_ROWS + batch) / batch rows of a step."""
    if buckets is None:
        return len(rates)
    at = bisect.bisect_left(buckets, rows)
    if at >= len(buckets):
        return 0
    take = min(buckets[at] - rows, len(rates))
    value = (DECODE_FIXED_ROWS + batch) / batch
    while take < len(rates) and at + 1 < len(buckets):
        grow = buckets[at + 1] - buckets[at]
        gain = sum(rates[take : take + grow]) * value
        if gain < grow:
            break
        take = min(take + grow, len(rates))
        at += 1
    return take


def resolve_guesses(sched: Scheduler, batch: ScheduledBatch, previous: UncommittedStep,
                    logits: torch.Tensor) -> torch.Tensor:
    """After the pending step's tokens went into the grammars (an overlapped step, before sampling): a
    guess row whose token matched a pair took the forced token it names, which now rides after that token
    (appended with it, committed to its grammar); the others' guess slot goes back to the pool. Returns
    one logits row per request: after the guess where it was taken."""
    assert batch.guesses is not None
    ids = previous._host_tokens()
    sched.stats["forced_guess_rows"] += sum(g is not None for g in batch.guesses)
    chosen: list[int] = []
    slots = batch.new_slots[0] if len(batch.new_slots) == 1 else torch.cat(batch.new_slots)
    for i, (req, guess) in enumerate(zip(batch.reqs, batch.guesses)):
        row = batch.sample_rows[i]
        assert row is not None
        if guess is None:
            chosen.append(row)
            continue
        forced = guess.get(ids[req.uncommitted_row], -1) if not req.finished else -1
        seen = req.grammar.table.guessed
        tried, hits = seen.get(req.guess_state, (0, 0))
        seen[req.guess_state] = (tried + 1, hits + (forced >= 0))
        if forced >= 0 and previous.rides is None:
            previous.rides = [[] for _ in previous.reqs]
        if forced >= 0 and sched.grammars.ride_after(req, forced):
            previous.rides[req.uncommitted_row] = [forced]  # type: ignore[index]
            req.tokens_on_device += 1
            sched.stats["forced_guess_hits"] += 1
            chosen.append(batch.guess_rows[i])
            continue
        at = batch.guess_slots[i]
        sched.kv_pool.free(slots[at : at + 1])
        req.kv_len -= 1
        chosen.append(row)
    if chosen == list(range(logits.shape[0])):
        return logits
    return logits.index_select(0, torch.tensor(chosen, dtype=torch.int64).to(logits.device, non_blocking=True))

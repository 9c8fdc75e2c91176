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

Outputs are unchanged: a ride holds only tokens each of whose states allows nothing else (state
table rows with one bit set), never an end token, never into a state that ends the grammar or is
not filled yet, and only for rows whose draw could not refuse it (no logit bias, no token bans of
min_new_tokens in force, no logprobs asked, no stop strings) and whose length and context leave
room for a token after it. Rows without a state table (llguidance's masks only) do not ride.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler

# Forced tokens riding after one row's token (a JSON key literal of the benchmark's schema: 2-6 tokens).
MAX_RIDE = 16


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
    picked = [i for i, r in enumerate(reqs) if r.grammar is not None and rides_allowed(r)]
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
    return (rides if any_ride else None), (ends if any_end else None)

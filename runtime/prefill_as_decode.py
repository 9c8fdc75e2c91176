"""A prefill step whose every row extends one token over its cached prefix, run as a decode step.

Item (f) runs the same prompts three times in one Engine: the JSON run and the same-lengths run find 127
of each 128-token prompt in the radix cache, so their first step computes one token a row (so do repeated
prompts, retries, n > 1 or a fork whose prompt is cached). Shape-wise that is a decode step, yet it ran
the eager extend path: on the H100 (2026-12-05, 256 rows) the JSON run's first step took 112 ms and the
plain run's 57 ms, the eager forward's launch alone 24.1 / 13.9 ms, where a decode step of the same 256
rows replays a CUDA graph in ~11 ms. With ONE_TOKEN_PREFILL_AS_DECODE such a step's forward runs as a
decode step (`ForwardMode.DECODE`: decode kernels, the decode graph of its batch size where there is
one); the scheduler still treats the batch as the prefill it is (prefix cache, forks, first-token
commit, overlap). On by default on every device: measured on the CPU (2026-12-05, 256 rows of item (f)'s
cached prompts: the first step's forward 1,832 -> 749 ms, outputs identical) and on an H100 (2026-12-05, the
jf19 A/B, one process: that step's launch 15-31 ms -> 0.4-0.7 ms, item (f)'s JSON run 0.761 -> 0.719 s at 64
rows and 1.207 -> 1.162 s at 256, its same-lengths run 0.736 -> 0.708 / 1.182 -> 1.114 s, 64/64 and 256/256
valid; RESULTS.md); `$RADIXLM_ONE_TOKEN_PREFILL_AS_DECODE=0` turns it off in a process started
with it (an Engine's scheduler process inherits it: the A/B's arms).

A row qualifies when it computes exactly one token and its logits are sampled (its prompt, or its
forced tokens, end there: a chunk's row ending short of its prompt samples nothing, and stays on the
extend path). The whole step qualifies only when every row does, decode rows mixed in included, and:
  - no verify rows (speculative drafts: several tokens a row, tree masks) nor grammar-forced guess rows;
  - no input logprobs: none exist for such a row (the last prompt token's logits predict the first
    output token), checked all the same;
  - no LoRA adapter on any row (a prefill's swap-in keeps the in-flight adapters' slots through
    `ForwardBatch.lora_keep`, which the decode path is not built for; not measured);
  - no draft model or EAGLE3 head (they prefill their own KV or keep the prompt's hidden states from
    the target's extend pass); NGRAM speculation reads only the host's tokens and may go;
  - multimodal inputs are refused at the request (generate_request.py): none reach a batch.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from radixlm.runtime.forward_batch import ForwardMode

if TYPE_CHECKING:
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.scheduler import Scheduler

ENV = "RADIXLM_ONE_TOKEN_PREFILL_AS_DECODE"
ONE_TOKEN_PREFILL_AS_DECODE: bool = os.environ.get(ENV, "1") != "0"


def runs_as_decode(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """This extend batch's forward runs as a decode step (see the module's docstring)."""
    if not ONE_TOKEN_PREFILL_AS_DECODE or batch.mode is not ForwardMode.EXTEND:
        return False
    if batch.has_drafts or batch.guesses is not None:
        return False
    if sched.spec is not None and sched.spec.model is not None:
        return False
    for req, prefix, ext in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        if ext != 1 or prefix + 1 != req.seq_len or req.tokens_on_device or req.lora_name is not None:
            return False
        if req.wants_input_logprobs:
            lo, hi = req.input_logprob_range(prefix, prefix + 1)
            if lo < hi:
                return False
    return bool(batch.reqs)

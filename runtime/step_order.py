"""Which step goes when: decode rows mixed into a prefill, a prefill step overlapped with the next, a
step scheduled ahead of the pending commit. The rules and their measured constants; the scheduler
reads them each step (tests and benchmarks set the constants on this module)."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.lora.admission import may_admit_any, slot_bound

if TYPE_CHECKING:
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.scheduler import Scheduler

# A prefill batch this small carries the running requests' decode rows (see should_mix) while their
# KV is at most MIX_MAX_DECODE_KV_TOKENS tokens in all.
MIX_ALWAYS_MAX_TOKENS = 256
MIX_MAX_DECODE_KV_TOKENS = 131072
# A prefill step of at least this many requests is overlapped (`step_results.launch_prefill`): the next chunk
# is scheduled and launched while it runs. The host's work between two prefill steps grows with their
# requests (~0.15 ms each on the H200's host: ~20 ms for the ~130 short questions of a shared-prefix chunk),
# while a device never left idle holds lower clocks (its prefill steps ran 3.7% slower, 2026-12-04
# afternoon, workload (e)). Chunks of workload (b)'s prompts (12-20 requests of 128-1,024 tokens in 8,192)
# still gain: 43.0-43.6k tok/s overlapped vs 40.9k synchronous on the H200 (2026-12-04 evening,
# benchmarks/b_levers.py: ~7.5 ms of host work a chunk hidden). Fewer, longer prompts a chunk — cache-off
# (e)'s ~8 of 1,088 tokens, (d)'s 4 of 2,048 — were not measured and stay synchronous.
OVERLAP_PREFILL_MIN_REQUESTS = 12
# A decode step may also go ahead of the commit when it needs cached KV evicted for its slots (free + evictable
# slots hold it), not only when free slots do. Replaying workload (b)'s schedule on the CPU, 105 of its 511 decode
# steps wait for the commit without it, none with it (thru9; benchmarks/b_schedule_cpu.py); on the H200
# (`benchmarks/b_levers.py --items evict`, 2026-12-05) the decode phase took 0.980x the time, same tokens: on.
AHEAD_WITH_EVICTION = True
# ... also with NGRAM speculation on (drafting reads the host's tokens only when it drafts): at batch 64 on the H200 the
# e2e cell is half prefill and spec on ran every chunk synchronously. Off until measured on the H200
# (`benchmarks/speculative.py --prefill-ab`, spec8); a draft model or head always keeps prefill synchronous.
OVERLAP_PREFILL_WITH_NGRAM = False
# An overlapped constrained decode step builds its rows' sampling values (`ResultProcessor.prepare_sampling`:
# SamplingBatch.build and its copy, ~0.65 ms at 256 rows on the H100's host) before it waits for the previous
# step's tokens, not between those tokens and the draw's launch, where the host's work after the wait delays
# the next forward's launch (item (f): the JSON step's host did ~2.6 ms more there than the unconstrained
# step's). Outputs are the same either way. `$RADIXLM_SAMPLING_BEFORE_TOKENS=0` turns it off (the GPU A/B, jf20).
SAMPLING_BEFORE_TOKENS = os.environ.get("RADIXLM_SAMPLING_BEFORE_TOKENS", "1") != "0"


def overlap_prefill_allowed(sched: Scheduler) -> bool:
    """Prompts-only extend steps of many requests overlapped too: the next prefill chunk is scheduled
    and launched before this one's first tokens are committed (not with adapters, nor a draft model or
    head: it keeps its own KV or the target's hidden states of each prompt; with NGRAM per
    OVERLAP_PREFILL_WITH_NGRAM: it reads the host's tokens only to draft, and a row whose token is still on
    the device drafts nothing, `SpecDecoder._limit`)."""
    spec = sched.spec
    ngram = spec is not None and spec.model is None
    return (sched.overlap and not sched.args.disable_overlap_prefill and sched.runner.lora is None
            and (spec is None or (ngram and OVERLAP_PREFILL_WITH_NGRAM)))


def overlaps_prefill(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """This extend step is overlapped with the next (`step_results.launch_prefill`)."""
    return (sched.overlap_prefill and len(batch.reqs) >= OVERLAP_PREFILL_MIN_REQUESTS
            and can_defer_prefill(batch, constrained_prefill_overlaps(sched, batch)))


def can_defer_prefill(batch: ScheduledBatch, grammars_ok: bool = False) -> bool:
    """Whether this extend batch's first tokens can be sampled on the device and committed a step later
    (its rows' tokens are all on the host): not with what `ResultProcessor.process` does beyond sampling:
    logprobs (read from the logits), a grammar unless `grammars_ok` (a jump right after the first token: the
    caller knows none pays), followers (n > 1: forks of the prompt's KV), max_new_tokens 0, decode or verify rows."""
    if batch.mode is not ForwardMode.EXTEND or batch.has_drafts or any(batch.decoding):
        return False
    return not any(r.return_logprob or (r.grammar is not None and not grammars_ok) or r.followers
                   or r.params.max_new_tokens == 0 for r in batch.reqs)


def constrained_prefill_overlaps(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """Constrained rows may be overlapped in a prompts-only step (unless --disable-overlap-constrained-prefill)
    when no jump-forward can follow their first token: synchronously, each row's jump is judged at the
    running rows plus this batch's (`ResultProcessor._append`), so the overlapped step's outputs are the
    synchronous step's. Then the first tokens' grammar commit and masks run while the next step's forward
    pass does, as a decode step's do; synchronously the device waits for them (item (f): its JSON runs'
    first step 112 vs 57 ms at 256 rows on the H100, 2026-12-05)."""
    if sched.args.disable_overlap_constrained_prefill:
        return False
    return sched.results.jump_check_tokens(len(sched.running) + len(batch.reqs)) == 0


def sampling_before_tokens(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """An overlapped constrained step's sampling values are built before the previous tokens are waited
    for (SAMPLING_BEFORE_TOKENS): not with forced rows (their rides and guesses are planned from those
    tokens' commit)."""
    return SAMPLING_BEFORE_TOKENS and not sched.args.enable_forced_rows


def should_mix(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """Run the decode rows in this prefill's forward pass. A small extension (grammar-forced
    tokens, the tail of a chunked prompt) costs about what a separate decode step would, so it
    rides along while the decode rows' KV is small: in the extend kernel each decode row is a
    tile of one query streaming its whole context (an (e) chunk's tiles on the H200: ~0.9 ms a
    layer for 4,096 of them over 1,088 tokens), so 511 rows of ~1,100 tokens cost a mixed step
    ~100 ms against ~27 ms for the extension alone and a separate 512-row decode step (workload
    (e)'s last prefill chunk). A large prefill only with --enable-mixed-chunk."""
    if sched.args.enable_mixed_chunk or lora_slot_bound(sched):
        return True
    return (sum(batch.extend_lens) <= MIX_ALWAYS_MAX_TOKENS
            and sum(r.seq_len for r in sched.running) <= MIX_MAX_DECODE_KV_TOKENS)


def lora_slot_bound(sched: Scheduler) -> bool:
    """LoRA requests want more adapters than a batch holds, and prefill then goes in chunks of
    --lora-prefill-chunk tokens that carry the decode rows: such a run is bound by decode steps
    (a request decodes only while its adapter holds a slot), and each chunk saves one."""
    if sched.runner.lora is None or not sched.args.lora_prefill_chunk:
        return False
    return slot_bound(sched.args.max_loras_per_batch, [*sched.running, *sched.partial], sched.waiting)


def can_schedule_before_commit(sched: Scheduler) -> bool:
    """The next step can go ahead before the uncommitted one is committed: nothing to admit or
    extend (unless the uncommitted step is a prefill step: `step_results.launch_prefill`), and no
    retraction needed (it would free the slots of a token on the device). With AHEAD_WITH_EVICTION,
    evicting cached KV too (no running request holds it; a slot the step in flight reads is rewritten
    only after it on the stream); without it, free slots alone decide.

    Scheduling a prefill ahead of a decode step's commit was tried (benchmarks/RESULTS.md,
    issue 8): on workload (b) it lost 5% on the H200, its prefill steps measuring ~10% slower.
    After a prompts-only prefill step the next prefill needs none of its tokens: it goes first,
    so the host's admission work runs while the device computes (shared-prefix workloads admit
    ~130 requests a chunk: ~20 ms of host time per step that the device otherwise waits for)."""
    if sched.jump_due:
        return False  # (a due jump is taken by the commit: its forced tokens need an extend step)
    after_prefill_step = sched.uncommitted is not None and sched.uncommitted.prefill
    if (sched.partial or may_admit(sched)) and not after_prefill_step:
        return False
    if sched.spec is not None and sched.spec.may_draft(sched.running):
        return False  # drafts continue the last token: it must be on the host
    pending = sched.uncommitted
    rides = sum(len(r) for r in pending.rides) if pending is not None and pending.rides is not None else 0
    return (sched._free_tokens() if AHEAD_WITH_EVICTION else sched.kv_pool.available()) >= len(sched.running) + rides


def may_admit(sched: Scheduler) -> bool:
    """Some waiting request could be admitted now (with LoRA, requests whose adapter cannot get a
    device slot cannot: with many adapters they wait most of the time, and must not turn every
    decode step into a synchronous one)."""
    if sched.runner.lora is None or not sched.waiting:
        return bool(sched.waiting)
    return may_admit_any(sched.args.max_loras_per_batch, sched.running, sched.waiting, sched.adapter_demand)

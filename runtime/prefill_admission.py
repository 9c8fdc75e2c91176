"""Prefill admission: which partial and waiting requests this step's extend batch takes.

Apart from the Scheduler because it is the scheduler's largest policy: chunk budgets, the decode
reserve, in-batch prefix deferral and LoRA slot budgets. Each candidate is checked (rows, tokens,
KV slots) before anything is committed; the Scheduler stays the owner of the queues and the KV.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from typing import TYPE_CHECKING

from radixlm.runtime import step_order
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.lora.admission import SlotBudget, longest_first, next_swap_in
from radixlm.runtime.request import Req
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.schedule_policy import InBatchPrefixes, order_waiting

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler

# The admitted requests' cached prefixes reach the device's req_to_token as one copy and one scatter after
# the loop (ReqToTokenPool.deferred_writes), not a pinned copy and a slice store each: on the H200's host a
# 256-request burst of cached prompts took 35 ms to admit against 10 ms uncached (2026-12-05,
# benchmarks/admission_cost.py). Off (`$RADIXLM_DEFER_ADMISSION_WRITES=1` on): on the H200 (2026-12-06) the device
# table equalled the host's in every burst, but the admission was no faster (medians 23.4 -> 21.3 ms plain, 32.0 ->
# 37.0 ms JSON, inside the bursts' spread). Nothing changes on the CPU, where the table is its own host mirror.
DEFER_ADMISSION_WRITES = os.environ.get("RADIXLM_DEFER_ADMISSION_WRITES", "0") == "1"


def schedule_prefill(sched: Scheduler) -> ScheduledBatch | None:
    if not sched.partial and not sched.waiting:
        return None  # the usual decode step: skip the reserve estimate, a pass over every running row
    if sched.runner.lora is not None and sched.waiting:
        prefetch_adapter(sched)
    budget = min(sched.max_prefill_tokens, sched.chunk_size)
    if sched.running and step_order.lora_slot_bound(sched):
        budget = min(budget, sched.args.lora_prefill_chunk)
    free = sched._free_tokens() - sched.reserve.reserve_for(sched.running)
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    sched.step_batches.append(batch)
    for req in list(sched.partial):
        ext = min(req.fill_len - req.kv_len, budget)
        slots = sched._alloc_slots(ext) if ext > 0 else None
        if slots is None:
            continue
        sched._add(batch, req, slots)
        budget -= ext
        free -= ext
        if req.kv_len == req.fill_len:
            sched.partial.remove(req)
    if budget <= 0 or (sched.runner.lora is not None and not step_order.may_admit(sched)):
        # (with many adapters most steps: every waiting request needs a slot that is taken,
        # and building the slot budget over the whole queue each step cost ~1 ms of host time)
        return batch if batch.reqs else None
    candidates = [r for r in sched.waiting if not r.grammar_pending]
    if not candidates:
        return batch if batch.reqs else None
    adapters = None if sched.runner.lora is None else SlotBudget(
        sched.args.max_loras_per_batch, [*sched.running, *sched.partial, *batch.reqs], candidates,
        sched.adapter_demand, sched.runner.lora.resident())
    if adapters is not None:  # only requests whose adapter fits this batch's device slots
        candidates = [r for r in candidates if adapters.admits(r)]
        if sched.adapter_loads is not None:  # an adapter evicted from host memory: read back on a thread first
            candidates = sched.adapter_loads.hold_unread(sched, candidates)
        if not candidates:
            return batch if batch.reqs else None
    ordered = order_waiting(candidates, sched.args.schedule_policy, sched._peek_prefix_len)
    if adapters is not None and adapters.bound:
        ordered = longest_first(ordered, lora_remaining([*sched.running, *sched.partial, *batch.reqs]))
    in_batch = None if sched.args.disable_radix_cache else InBatchPrefixes()
    with sched.req_to_token_pool.deferred_writes() if DEFER_ADMISSION_WRITES else nullcontext():
        admit_waiting(sched, batch, ordered, in_batch, adapters, budget, free)
    return batch if batch.reqs else None


def admit_waiting(sched: Scheduler, batch: ScheduledBatch, ordered: list[Req], in_batch: InBatchPrefixes | None,
                  adapters: SlotBudget | None, budget: int, free: int) -> None:
    """Waiting requests into `batch` in `ordered` order while rows, the token budget and KV slots last."""
    for req in ordered:
        # Check: room for the request's rows, its token budget, its KV slots.
        seqs = 1 + len(req.followers)
        if len(sched.running) + len(sched.partial) + len(batch.reqs) + seqs > sched.max_running or budget <= 0:
            break
        if sched.req_to_token_pool.available() < seqs:
            break
        prefix = sched.cache.match(req)
        if in_batch is not None and in_batch.should_defer(req, len(prefix)):
            sched.cache.unlock(req)  # next step its prefix is cached by a request admitted now
            continue
        ext = min(req.fill_len - len(prefix), budget)
        need = ext + int(min(req.remaining_new_tokens(), 4096) * sched.reserve.ratio)
        need += len(req.followers) * req.fill_len
        slots = None if need > free and (batch.reqs or sched.running) else sched._alloc_slots(ext)
        if slots is None:
            sched.cache.unlock(req)
            break
        # Commit: the step owns the new slots (fault isolation frees them), then the request
        # takes its row, its cached prefix and those slots.
        batch.add(req, slots, prefix_len=len(prefix))
        sched._admit(req, prefix, ext)
        if adapters is not None:
            adapters.add(req)
        sched.waiting.remove(req)
        if in_batch is not None:
            in_batch.add(req)
        budget -= ext
        free -= need
        if req.kv_len < req.fill_len:
            sched.partial.append(req)
            break


def lora_remaining(in_flight: list[Req]) -> dict[str, int]:
    """Per adapter in flight, the most new tokens one of its requests still has to make."""
    most: dict[str, int] = {}
    for r in in_flight:
        if r.lora_name is not None:
            most[r.lora_name] = max(most.get(r.lora_name, 0), r.remaining_new_tokens())
    return most


def prefetch_adapter(sched: Scheduler) -> None:
    """Every slot is held: copy the adapter that should take the next free one to the device now
    (beside the forwards; nothing when it is the one staged already). Asked every step: the pick
    changes as the queue does (an adapter staged early, many turns ahead, took 11 of 64 swap-ins
    in a chunked replay of (b); asked each step, 60)."""
    lora = sched.runner.lora
    name = next_swap_in(sched.args.max_loras_per_batch, [*sched.running, *sched.partial], sched.waiting,
                        sched.adapter_demand, lora.resident())
    if name is not None:
        lora.prefetch(name)

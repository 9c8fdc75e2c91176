"""Decode scheduling: one row per running request (plus its speculative drafts), retracting
requests when the KV pool cannot hold the step.

Apart from the Scheduler so the decode batch rule and preemption read as one piece; the Scheduler
still owns the queues and the KV these functions move requests and slots between.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from radixlm.runtime.forced_rows import plan_guesses
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.request import Req
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.speculative.drafts import Drafts

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)


def schedule_decode(sched: Scheduler, mixed: bool = False) -> ScheduledBatch | None:
    if not sched.running:
        return None
    while sched.kv_pool.available() + sched.cache.evictable_size() < len(sched.running):
        if len(sched.running) == 1:
            break
        retract_one(sched)
    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    sched.step_batches.append(batch)
    # A request whose last token is on the device finishes when that is committed: nothing to run
    # (nor for one whose token on the device is an end token its grammar forced).
    todo = [r for r in sched.running if r.params.max_new_tokens > len(r.output_ids) + r.tokens_on_device]
    forced = sched.args.enable_forced_rows  # (off: every row computes its last token alone, as before)
    pending = sched.uncommitted
    if forced and pending is not None and pending.ends is not None:
        todo = [r for r in todo if not (r.tokens_on_device and pending.ends_row(r))]
    # each row's pending tokens: its last one, and grammar-forced tokens riding after it (forced_rows.py),
    # and one more where the token on the device may force one (a guess)
    own = [r.seq_len - r.kv_len for r in todo] if forced else None
    drafts = propose_drafts(sched, todo, mixed, own)
    rows = sum(own) if own is not None else len(todo)
    picked, seen = plan_guesses(sched, todo, rows) if forced and not mixed and not drafts.total else ({}, None)
    guesses = [picked.get(id(r)) for r in todo] if picked else None
    if guesses is not None:
        rows += sum(g.width for g in guesses if g is not None)
    slots = sched._alloc_slots(rows + drafts.total)
    if slots is not None:  # the common case: one allocation for the whole batch
        parents = drafts.parents or [None] * len(todo)
        lanes = sched.tree_kv.take_lanes(todo, drafts.tokens, parents, slots, lanes=not mixed) if drafts.parents else None
        batch.set_decode_rows(todo, slots, drafts.tokens, drafts.masks, parents, lanes, own)
        batch.guess_seen = seen
        if guesses is not None:
            batch.set_guesses(guesses)
        for req, ext in zip(todo, batch.extend_lens):
            req.kv_len += ext
        sched.reserve.on_decode_step()
        return batch if todo else None
    for i, req in enumerate(todo):
        slot = sched._alloc_slots(own[i] if own is not None else 1)
        if slot is not None:
            sched._add(batch, req, slot, decoding=True)
            continue
        sched.running.remove(req)
        if sched.running or batch.reqs:
            retract(sched, req)  # still short: retry once others finish
        else:
            sched._finish(req, FinishReason.abort("KV cache is too small for this request; "
                                                  "raise --max-total-tokens or lower max_new_tokens"))
    sched.reserve.on_decode_step()
    return batch if batch.reqs else None


def propose_drafts(sched: Scheduler, todo: list[Req], mixed: bool = False, own: list[int] | None = None) -> Drafts:
    """Speculative decoding: the tokens each request verifies this step, if free slots hold them
    beyond one token per request (drafts never evict cached prefixes nor cause a retraction).
    Trees need a free request row per extra lane in a decode step (those that find none verify
    their first chain); in a mixed batch their verify rows are extend rows with a tree mask (no lanes).
    `own`: each row's pending tokens where grammar-forced rows are on (rows with forced tokens pending draft none)."""
    none = Drafts([[] for _ in todo], [None] * len(todo))
    if sched.spec is None or not todo:
        return none
    drafts = sched.spec.propose(todo, sched.grammars)
    if own is not None and any(n > 1 for n in own):  # forced tokens pending (forced_rows.py): no drafts for those rows
        keep = [n == 1 for n in own]
        drafts = Drafts([d if k else [] for d, k in zip(drafts.tokens, keep)],
                        [m if k else None for m, k in zip(drafts.masks, keep)],
                        None if drafts.parents is None else [p if k else None for p, k in zip(drafts.parents, keep)])
    if drafts.parents and not mixed:
        drafts = drafts.within_lanes(sched.req_to_token_pool.available())
    if drafts.total and sched.kv_pool.available() < len(todo) + drafts.total:
        return none
    return drafts


def retract_one(sched: Scheduler) -> None:
    victim = min(sched.running, key=lambda r: (len(r.output_ids), -len(r.input_ids)))
    sched.running.remove(victim)
    retract(sched, victim)


def retract(sched: Scheduler, req: Req) -> None:
    """Preempt: give the KV back (to the prefix cache, so recompute is cheap) and requeue."""
    sched._release_kv(req)
    if sched.spec is not None:
        sched.spec.forget(req)
    req.num_retractions += 1
    sched.stats["retractions"] += 1
    sched.reserve.on_retract()
    sched.waiting.insert(0, req)
    logger.info("retracted request %s after %d tokens (KV pool exhausted)", req.rid, len(req.output_ids))

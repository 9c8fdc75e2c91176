"""Applying a step's results: prefix-cache bookkeeping after a prefill, forking n > 1 followers,
and moving each request where its SeqEvent leaves it (finished, partial, running).

Apart from the Scheduler because it is the other half of a step (scheduling builds batches, this
applies their outcome); the queues and KV it updates are still the Scheduler's.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from radixlm.runtime.request import Req
from radixlm.runtime.result_processor import SeqEvent
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.uncommitted_step import UncommittedStep

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler


def launch_prefill(sched: Scheduler, batch: ScheduledBatch, logits: torch.Tensor) -> UncommittedStep | None:
    """A prompts-only extend step, overlapped: its KV goes into the prefix cache now (the next
    step may reuse it), its completed prompts' first tokens are sampled on the device and those
    requests run from now on with the token on the device; the host appends it a step later."""
    after_prefill(sched, batch)  # (no followers here: nothing to fork)
    done = [(req, row) for req, row in zip(batch.reqs, batch.sample_rows) if row is not None and not req.finished]
    if not done:
        return None  # chunks of longer prompts only
    reqs = [req for req, _ in done]
    rows = [row for _, row in done]
    for req in reqs:
        req.input_logprobs_done = True
    rows_logits = logits if rows == list(range(logits.shape[0])) else logits[rows]
    step = UncommittedStep.start(reqs, sched.results.sample(reqs, rows_logits, sched.grammars,
                                                            logits_needed_after=False), prefill=True)
    sched.running.extend(reqs)
    return step


def after_prefill(sched: Scheduler, batch: ScheduledBatch) -> dict[Req, list[Req]]:
    """KV bookkeeping once a synchronous step ran: a prefilled chunk, or a whole prompt, goes into
    the prefix cache (shareable now, not only once the request finishes); a completed prompt's
    followers (n > 1) get its KV. Returns the followers that sample from their leader's row;
    one that finds no room for a copy (cache off) is queued to prefill on its own."""
    forks: dict[Req, list[Req]] = {}
    for req, decoding, row in zip(batch.reqs, batch.decoding, batch.sample_rows):
        if decoding or req.finished:
            continue
        if row is None or req.params.max_new_tokens > 0:
            sched.cache.cache_unfinished(req)
        if row is None or not req.followers or req.params.max_new_tokens == 0:
            continue
        forks[req] = [f for f in req.followers if fork(sched, req, f)]
        req.followers = []
    return forks


def fork(sched: Scheduler, leader: Req, follower: Req) -> bool:
    follower.cached_tokens = leader.cached_tokens
    follower.admitted_once = True  # its prompt was counted with its leader's
    if follower.grammar is None and leader.grammar is not None:
        follower.grammar = leader.grammar.copy()
    follower.req_pool_idx = sched.req_to_token_pool.alloc()
    if follower.req_pool_idx is not None and sched.cache.share_prefix(leader, follower):
        return True
    if follower.req_pool_idx is not None:
        sched.req_to_token_pool.free(follower.req_pool_idx)
        follower.req_pool_idx = None
    sched.waiting.insert(0, follower)
    return False


def apply_events(sched: Scheduler, events: list[SeqEvent]) -> None:
    """Move each request where its step left it: finished (KV released, final output), forced
    tokens to extend (partial), decoding (running); stream what a client may see."""
    sched.record_generated(sum(e.sampled for e in events))
    sched.jump_due = False  # only the latest results say whether a jump waits for a commit
    for ev in events:
        req = ev.req
        if ev.drafted:
            assert sched.spec is not None
            if sched.tree_kv.holds(req):
                depth = sched.tree_kv.depth(req)
                sched.tree_kv.keep(req, ev.kept)
                sched.spec.on_verified(req, ev.drafted, ev.accepted, ev.sampled, depth)
            else:
                drop_unverified(sched, req, ev.unverified)
                sched.spec.on_verified(req, ev.drafted, ev.accepted, ev.sampled)
        elif ev.unverified and req.kv_len > req.fill_len:  # forced tokens a finish cut: a launched step's KV
            drop_unverified(sched, req, min(ev.unverified, req.kv_len - req.fill_len))
        if ev.was_running and (ev.finished is not None or ev.jumped):
            sched.running.remove(req)
        if ev.finished is not None:
            sched._finish(req, ev.finished)
            continue
        if ev.jump_due:
            sched.jump_due = True
        if ev.jumped:
            sched.partial.append(req)  # its forced tokens need an extend step
        elif not ev.was_running:
            sched.running.append(req)
        if req.stream and len(req.output_ids) - req.sent_output_len >= sched.args.stream_interval:
            sched.outputs.append(req.take_output())


def drop_unverified(sched: Scheduler, req: Req, n: int) -> None:
    """A verify step's rejected drafts: their KV slots go back to the pool at once (never to
    the prefix cache, which only ever sees verified tokens)."""
    if n <= 0:
        return
    assert req.req_pool_idx is not None and req.kv_len - n >= req.cache_protected_len
    sched.kv_pool.free(sched.req_to_token_pool.slots(req.req_pool_idx, req.kv_len - n, req.kv_len))
    req.kv_len -= n

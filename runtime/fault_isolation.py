"""Fault isolation for the scheduler loop: a step that raises fails only the requests it touched.

An exception while scheduling, running or processing a batch must not take every other request
down with the process. `recover_from_step_error` fails the requests of the batch (and of the
overlap batch in flight) with a clear error, frees their KV *without* caching it (its contents are
not trustworthy), then checks the KV accounting slot by slot. Only when the device or the pools may
be in an unknown state (a CUDA error, accounting that no longer adds up, a failure while
recovering) is the error fatal: `SchedulerFatalError` then stops the process, and the front answers
503 with the reason.
"""
from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import torch

from radixlm.runtime.io_struct import FinishReason, sequence_rids
from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.scheduler import Scheduler

logger = logging.getLogger(__name__)

# Messages of errors after which the device's state is unknown (sticky CUDA errors, failed kernels).
_DEVICE_ERROR_MARKERS = ("CUDA error", "CUBLAS_STATUS", "CUDNN_STATUS", "cuDNN error", "device-side assert",
                         "illegal memory access", "NCCL error", "HIP error", "unspecified launch failure")


MAX_IDLE_FAILURES = 3


class SchedulerFatalError(RuntimeError):
    """The scheduler cannot go on: its device or its pools are in an unknown state."""


def is_device_error(exc: BaseException) -> bool:
    """A failure of the accelerator itself (not a bad tensor shape): nothing on it can be trusted."""
    accel = getattr(torch, "AcceleratorError", None)
    if accel is not None and isinstance(exc, accel):
        return True
    if isinstance(exc, torch.OutOfMemoryError):
        return False  # the allocation failed cleanly; the batch fails, the device is fine
    text = str(exc)
    return isinstance(exc, RuntimeError) and any(m in text for m in _DEVICE_ERROR_MARKERS)


def describe(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:300]


def recover_from_step_error(sched: "Scheduler", exc: Exception) -> list[str]:
    """Fail the requests touched by the failed step and free their KV; returns their ids.
    Raises SchedulerFatalError when the state cannot be trusted afterwards."""
    reason = describe(exc)
    if isinstance(exc, SchedulerFatalError):  # e.g. the parallel ranks fell out of step (worker.py)
        raise exc
    if is_device_error(exc):
        raise SchedulerFatalError(f"device error in the scheduler: {reason}") from exc
    try:
        failed = _fail_touched(sched, reason)
        problem = kv_accounting_problem(sched)
    except Exception as inner:  # noqa: BLE001 - recovery itself failed: nothing is certain any more
        raise SchedulerFatalError(f"internal error in the scheduler ({reason}), then while recovering: "
                                  f"{describe(inner)}") from inner
    if problem is not None:
        raise SchedulerFatalError(f"internal error in the scheduler ({reason}) left the KV pool inconsistent: "
                                  f"{problem}") from exc
    sched.stats["failed_steps"] = sched.stats.get("failed_steps", 0) + 1
    # A step that fails without touching any request would fail the same way forever.
    sched.stats["failed_steps_in_a_row_idle"] = 0 if failed else sched.stats.get("failed_steps_in_a_row_idle", 0) + 1
    if sched.stats["failed_steps_in_a_row_idle"] >= MAX_IDLE_FAILURES:
        raise SchedulerFatalError(f"the scheduler step keeps failing with no request to fail: {reason}") from exc
    return failed


def reject_message(sched: "Scheduler", msg: object, exc: Exception) -> object | None:
    """A message the scheduler failed to take in: the request it carried fails alone (status 500);
    a control message is answered not-ok. Returns the ControlResp to send, if any."""
    from radixlm.runtime.io_struct import ControlReq, ControlResp, ReqOutput, TokenizedGenerateReq

    if is_device_error(exc):
        raise SchedulerFatalError(f"device error in the scheduler: {describe(exc)}") from exc
    logger.error("the scheduler could not take in %s", type(msg).__name__, exc_info=exc)
    if isinstance(msg, ControlReq):
        return ControlResp(msg.request_id, False, {"message": f"internal error: {describe(exc)}"})
    if isinstance(msg, TokenizedGenerateReq):
        for req in [r for r in sched.waiting if msg.rid in (r.rid, r.group_rid)]:
            sched.waiting.remove(req)
            if sched.grammars is not None:
                sched.grammars.forget(req)
        reason = FinishReason.abort(f"internal error while admitting this request: {describe(exc)}", status_code=500)
        for rid in sequence_rids(msg.rid, msg.params.n):
            sched.outputs.append(ReqOutput(rid=rid, output_ids=[], finished_reason=reason,
                                           prompt_tokens=len(msg.input_ids), cached_tokens=0, completion_tokens=0))
    return None


def _fail_touched(sched: "Scheduler", reason: str) -> list[str]:
    batches = [b for b in sched.step_batches if b.reqs]
    ahead, sched.ahead = sched.ahead, None  # a verify step launched ahead: its rows were touched too
    if ahead is not None:
        batches.append(ahead.batch)
    sched.step_batches = []
    # Slots of the positions each batch added, per request (the host mirror may not hold them yet).
    new_slots: dict[int, tuple[int, torch.Tensor]] = {}
    touched: dict[int, Req] = {}
    for batch in batches:
        _collect_new_slots(batch, new_slots, touched)
    for step in (sched.step_uncommitted, sched.uncommitted):
        for req in step.reqs if step is not None else ():
            touched.setdefault(id(req), req)
    sched.uncommitted = sched.step_uncommitted = None
    sched.tree_kv.release_lanes()  # a tree verify step's scratch rows (its node slots are its new slots)
    for queue in (sched.running, sched.partial, sched.waiting):
        for req in queue:
            # Tokens in flight with no in-flight batch left, or a waiting request holding a row
            # (admission stopped half-way): both were part of the failed step.
            if req.tokens_on_device or (queue is sched.waiting and req.req_pool_idx is not None):
                touched.setdefault(id(req), req)
    message = f"internal error while running this request's batch: {reason}"
    for key, req in touched.items():
        for queue in (sched.running, sched.partial, sched.waiting):
            if req in queue:
                queue.remove(req)
        if sched.grammars is not None:
            sched.grammars.forget(req)
        # a settled draft tree's row holds its kept path, not the step's slots in node order
        _free_unchecked(sched, req, None if key in sched.tree_kv.settled else new_slots.get(key))
        req.tokens_on_device = 0
        if not req.finished:
            sched._finish(req, FinishReason.abort(message, status_code=500))
    return [r.rid for r in touched.values()]


def _collect_new_slots(batch: "ScheduledBatch", out: dict[int, tuple[int, torch.Tensor]],
                       touched: dict[int, Req]) -> None:
    flat = torch.cat(batch.new_slots) if batch.new_slots else torch.empty(0, dtype=torch.int64)
    start = 0
    for req, prefix, ext in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
        touched.setdefault(id(req), req)
        out.setdefault(id(req), (prefix, flat[start : start + ext].to(torch.int64)))
        start += ext


def _free_unchecked(sched: "Scheduler", req: Req, added: tuple[int, torch.Tensor] | None) -> None:
    """Give back the request's own KV slots without inserting them into the prefix cache (their
    contents may never have been computed), unlock its cached prefix and free its row."""
    if req.req_pool_idx is None:  # admission stopped before it took its row: only the step's slots
        if added is not None:
            sched.kv_pool.free(added[1])
        sched.cache.unlock(req)
        return
    lo, hi = req.cache_protected_len, req.kv_len
    host = sched.req_to_token_pool.host[req.req_pool_idx]
    if added is None:
        own = host[lo:hi].to(torch.int64)
    else:
        prefix, slots = added  # positions [prefix, prefix + len(slots)) were allocated this step
        before = host[lo:min(prefix, hi)].to(torch.int64) if lo < prefix else torch.empty(0, dtype=torch.int64)
        # (positions past them: a verify step built ahead of this one, recorded when it was built)
        after = host[max(prefix + len(slots), lo):hi].to(torch.int64)
        own = torch.cat([before, slots[max(lo - prefix, 0):max(hi - prefix, 0)], after])
    sched.kv_pool.free(own)
    sched.cache.unlock(req)
    sched.req_to_token_pool.free(req.req_pool_idx)
    req.req_pool_idx = None
    req.kv_len = req.cache_protected_len = 0


def kv_accounting_problem(sched: "Scheduler") -> str | None:
    """None when every KV slot is exactly one of: free, in the prefix cache, owned by one live
    request; and every request row is free or held by one live request. Else what is wrong."""
    live = [r for r in (*sched.running, *sched.partial, *sched.waiting) if r.req_pool_idx is not None]
    pool = sched.kv_pool
    owned = [sched.req_to_token_pool.host[r.req_pool_idx, r.cache_protected_len : r.kv_len].to(torch.int64)
             for r in live]
    tree = getattr(sched.cache, "tree", None)
    in_tree = [tree.cached_slots()] if tree is not None else []
    every = torch.cat([pool._free[: pool._num_free], *in_tree, *owned])
    if every.numel() != pool.size or not torch.equal(every.sort().values, torch.arange(1, pool.size + 1)):
        return (f"{pool._num_free} free + {sum(int(v.numel()) for v in in_tree)} cached + "
                f"{sum(int(o.numel()) for o in owned)} owned slots do not cover the pool of {pool.size} exactly once")
    rows = {r.req_pool_idx for r in live}
    if len(rows) != len(live) or sched.req_to_token_pool.available() + len(live) != sched.req_to_token_pool.capacity:
        return "request rows are leaked or shared"
    return None

"""A new generate request's way into the waiting queue: its max_new_tokens clamped to the
context, seeds for its n sequences, its LoRA adapter bound, its grammar submitted.

Apart from the Scheduler so message handling stays short; the queue it appends to is the Scheduler's.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING

from radixlm.runtime.io_struct import FinishReason, TokenizedGenerateReq
from radixlm.runtime.request import Req

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler


def add_request(sched: Scheduler, msg: TokenizedGenerateReq) -> None:
    params = msg.params
    # Never grow past the context: the front process already rejected prompts that don't fit.
    room = sched.runner.context_len - len(msg.input_ids)
    if params.max_new_tokens > room:
        params = params.replace(max_new_tokens=max(room, 0), min_new_tokens=min(params.min_new_tokens, max(room, 0)))
    base_seed = params.seed if params.seed is not None else sched.rng.getrandbits(32)
    seeds = [base_seed] + [base_seed + i if params.seed is not None else sched.rng.getrandbits(32)
                           for i in range(1, params.n)]
    leader = Req.group_from_wire(dataclasses.replace(msg, params=params), seeds)
    if leader.lora_name is not None and not bind_adapter(sched, leader):
        return
    if sched.runner.lora is not None:
        sched.adapter_demand.stamp(leader)
    for seq in (leader, *leader.followers):
        seq.speculative = sched.spec is not None
    if params.constraint is not None:
        sched._grammar_runtime().submit(leader)
    sched.waiting.append(leader)


def bind_adapter(sched: Scheduler, leader: Req) -> bool:
    """Give a request naming a LoRA adapter that adapter's cache key; an adapter unloaded since
    the front checked it fails the request (400) instead."""
    lora = sched.runner.lora
    uid = None if lora is None else lora.uid(leader.lora_name)
    if uid is None:
        sched._finish(leader, FinishReason.abort(f"lora_path: unknown LoRA adapter {leader.lora_name!r}",
                                                 status_code=400))
        return False
    for seq in [leader, *leader.followers]:
        seq.lora_uid = uid
    return True

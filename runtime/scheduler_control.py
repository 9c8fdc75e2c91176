"""The scheduler's control messages (flush the cache, server info, LoRA load/unload) and the
info dict that /get_server_info, metrics and the periodic decode log read.

Apart from the Scheduler because none of it is on the step path.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from radixlm.runtime.io_struct import ControlReq, ControlResp

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler


def control(sched: Scheduler, msg: ControlReq) -> ControlResp | None:
    if msg.kind == "flush_cache":
        if not sched.idle:
            return ControlResp(msg.request_id, False, {"message": "Cache not flushed: requests are running"})
        sched.cache.flush()
        return ControlResp(msg.request_id, True, {"message": "Cache flushed."})
    if msg.kind == "get_info":
        return ControlResp(msg.request_id, True, info(sched))
    if msg.kind in ("load_lora_adapter", "unload_lora_adapter"):
        from radixlm.runtime.lora.control import handle_lora_control

        return handle_lora_control(sched, msg)
    return ControlResp(msg.request_id, False, {"message": f"unknown control {msg.kind!r}"})


def info(sched: Scheduler) -> dict:
    usage = sched.kv_pool.usage()
    prompt = max(sched.stats["prompt_tokens"], 1)
    return {
        "max_total_num_tokens": usage.total,
        "kv_free_tokens": usage.free,
        "kv_used_tokens": usage.in_use,
        "kv_cached_tokens": sched.cache.cached_size(),
        "kv_evictable_tokens": sched.cache.evictable_size(),
        "kv_locked_tokens": sched.cache.protected_size(),
        "num_running_reqs": len(sched.running) + len(sched.partial),
        "num_waiting_reqs": len(sched.waiting),
        "cache_hit_rate": sched.stats["cached_tokens"] / prompt,
        "radix_cache_enabled": not sched.args.disable_radix_cache,
        "gc_frozen_objects": sched.frozen_objects,  # start-up's heap, out of the collector's reach
        **sched.stats,
        **({"lora": sched.runner.lora.info()} if sched.runner.lora is not None else {}),
        **({"cuda_graph_capture_s": dict(sched.runner.graph_runner.capture_s)}
           if sched.runner.graph_runner is not None else {}),
        **(sched.spec.info() if sched.spec is not None else {}),
        **(sched.grammars.info() if sched.grammars is not None else {}),
    }

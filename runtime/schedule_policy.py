"""Which waiting requests to prefill next: cache-aware ordering and admission by token budget."""
from __future__ import annotations

from collections.abc import Callable

from radixlm.runtime.request import Req

# Matching every waiting request costs more than it saves past this queue length.
LPM_MAX_QUEUE = 128


def order_waiting(waiting: list[Req], policy: str, prefix_len: Callable[[Req], int]) -> list[Req]:
    """lpm: longest cached prefix first; dfs-weight: group requests by shared prefix;
    fcfs (and lpm on a long queue): arrival order."""
    if policy == "fcfs" or len(waiting) > LPM_MAX_QUEUE or len(waiting) < 2:
        return list(waiting)
    lens = {id(r): prefix_len(r) for r in waiting}
    if policy == "lpm":
        return sorted(waiting, key=lambda r: -lens[id(r)])  # stable: FCFS among equals
    # dfs-weight: requests sharing a prompt head run together, bigger groups first.
    groups: dict[tuple[int, ...], list[Req]] = {}
    for r in waiting:
        groups.setdefault(tuple(r.input_ids[:32]), []).append(r)
    ordered = sorted(groups.values(), key=lambda g: (-len(g), -max(lens[id(r)] for r in g)))
    return [r for g in ordered for r in g]


class DecodeReserve:
    """Estimate of how many KV slots running requests will still need (SGLang's new_token_ratio):
    admission keeps that much free so decode rarely has to retract."""

    def __init__(self, conservativeness: float = 1.0) -> None:
        self.init_ratio = min(0.7 * conservativeness, 1.0)
        self.min_ratio = min(0.14 * conservativeness, 1.0)
        self.decay = (self.init_ratio - self.min_ratio) / 600
        self.ratio = self.init_ratio

    def reserve_for(self, reqs: list[Req], clip: int = 4096) -> int:
        return int(sum(min(r.remaining_new_tokens(), clip) for r in reqs) * self.ratio)

    def on_decode_step(self) -> None:
        self.ratio = max(self.ratio - self.decay, self.min_ratio)

    def on_retract(self) -> None:
        self.ratio = min(self.ratio + 0.1, 1.0)


class InBatchPrefixes:
    """Requests admitted into the prefill batch being built, as a token tree (no KV).

    Two waiting requests that share a long uncached prefix would both compute it when admitted in
    the same step; deferring the second by one step lets it hit the cache instead (the first one's
    prompt is inserted right after its prefill)."""

    DEFER_MIN_TOKENS = 32

    def __init__(self) -> None:
        from radixlm.radix.radix_cache import RadixCache

        self.tree = RadixCache(free_slots=lambda slots: None)

    def should_defer(self, req: Req, cached_len: int) -> bool:
        key = req.fill_slice(0, req.max_prefix_len)
        shared = len(self.tree.match_prefix(key, extra_key=req.cache_namespace).indices)
        return shared - cached_len >= self.DEFER_MIN_TOKENS

    def add(self, req: Req) -> None:
        import torch

        key = req.fill_slice(0, req.fill_len)
        self.tree.insert(key, torch.zeros(len(key), dtype=torch.int64), extra_key=req.cache_namespace)

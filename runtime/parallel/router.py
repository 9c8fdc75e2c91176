"""Which data-parallel replica serves a request.

cache_aware (the default): the front keeps, per replica, an approximate radix tree of the prompts it
recently routed there (token ids only, no KV; LRU-trimmed to the replica's KV pool size). A prompt
whose longest match covers at least `cache_threshold` of it goes to the replica holding that match,
unless that replica is overloaded (more than `balance_abs` in-flight sequences above the least
loaded one, and more than `balance_rel` times as many); anything else goes to the least loaded
replica, ties broken by the smallest tree (the most cache room), then the lowest index.
round_robin: in turn. shortest_queue: the fewest in-flight sequences.
"""
from __future__ import annotations

import itertools

import torch

from radixlm.radix.radix_cache import RadixCache


def _drop(_: torch.Tensor) -> None:
    """The approximate trees own no KV slots: evicting them frees nothing."""


class Router:
    def __init__(self, method: str, capacities: list[int], cache_threshold: float = 0.3,
                 balance_abs: int = 16, balance_rel: float = 1.5) -> None:
        if method not in ("cache_aware", "round_robin", "shortest_queue"):
            raise ValueError(f"load_balance_method: {method!r} is not one of cache_aware, round_robin, shortest_queue")
        self.method = method
        self.capacities = capacities
        self.trees = [RadixCache(free_slots=_drop) for _ in capacities]
        self.cache_threshold = cache_threshold
        self.balance_abs = balance_abs
        self.balance_rel = balance_rel
        self._turn = itertools.count()

    def select(self, ids: list[int], extra_key: str | None, loads: list[int | None]) -> int:
        """The replica for prompt `ids`; `loads[i]` is replica i's in-flight sequences, None if it is dead."""
        alive = [i for i, load in enumerate(loads) if load is not None]
        if not alive:
            raise RuntimeError("no live replica")
        if self.method == "round_robin":
            choice = alive[next(self._turn) % len(alive)]
        elif self.method == "shortest_queue":
            choice = min(alive, key=lambda i: (loads[i], i))
        else:
            choice = self._cache_aware(ids, extra_key, loads, alive)
        if self.method == "cache_aware":
            self._remember(choice, ids, extra_key)
        return choice

    def _cache_aware(self, ids: list[int], extra_key: str | None, loads: list[int | None], alive: list[int]) -> int:
        least = min(loads[i] for i in alive)  # type: ignore[type-var]
        assert least is not None
        matches = {i: self.match_len(i, ids, extra_key) for i in alive}
        best = max(alive, key=lambda i: (matches[i], -loads[i], -i))  # type: ignore[operator]
        load = loads[best]
        assert load is not None
        overloaded = load - least > self.balance_abs and load > least * self.balance_rel
        if ids and matches[best] >= max(1, self.cache_threshold * len(ids)) and not overloaded:
            return best
        return min(alive, key=lambda i: (loads[i], self.trees[i].cached_size(), i))

    def match_len(self, replica: int, ids: list[int], extra_key: str | None = None) -> int:
        return len(self.trees[replica].match_prefix(ids, extra_key).indices)

    def _remember(self, replica: int, ids: list[int], extra_key: str | None) -> None:
        tree = self.trees[replica]
        tree.insert(ids, torch.zeros(len(ids), dtype=torch.int64), extra_key)
        over = tree.cached_size() - self.capacities[replica]
        if over > 0:  # trim to 90% at once: eviction walks the whole tree
            tree.evict(over + self.capacities[replica] // 10)

    def forget(self, replica: int) -> None:
        """A replica died: what it cached is gone."""
        self.trees[replica].reset()

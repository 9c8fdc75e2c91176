"""The scheduler's seam to the prefix cache: match on admission, insert after each prefill chunk
and at finish, evict when the pool is short. `NoPrefixCache` is `--disable-radix-cache`."""
from __future__ import annotations

from typing import Protocol

import torch

from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool
from radixlm.runtime.request import Req


class PrefixCache(Protocol):
    def match(self, req: Req) -> torch.Tensor: ...
    def lock(self, req: Req, node: object) -> None: ...
    def unlock(self, req: Req) -> None: ...
    def peek(self, key: list[int], extra_key: str | None) -> int: ...
    def cache_unfinished(self, req: Req) -> None: ...
    def release(self, req: Req) -> None: ...
    def share_prefix(self, leader: Req, follower: Req) -> bool: ...
    def evict(self, num_tokens: int) -> int: ...
    def evictable_size(self) -> int: ...
    def cached_size(self) -> int: ...
    def protected_size(self) -> int: ...
    def flush(self) -> None: ...


class NoPrefixCache:
    """Every request owns all its KV and frees it at finish."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, kv_pool: TokenToKVPool) -> None:
        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = kv_pool

    def match(self, req: Req) -> torch.Tensor:
        req.last_node = None
        return torch.empty(0, dtype=torch.int64)

    def lock(self, req: Req, node: object) -> None:
        req.last_node = node

    def unlock(self, req: Req) -> None:
        req.last_node = None

    def peek(self, key: list[int], extra_key: str | None) -> int:
        return 0

    def cache_unfinished(self, req: Req) -> None:
        pass

    def release(self, req: Req) -> None:
        assert req.req_pool_idx is not None
        self.kv_pool.free(self.req_to_token_pool.slots(req.req_pool_idx, req.cache_protected_len, req.kv_len))
        req.kv_len = req.cache_protected_len = 0

    def share_prefix(self, leader: Req, follower: Req) -> bool:
        """n > 1: the follower gets a copy of the leader's prompt KV, slot by slot (nothing is shared
        without a tree to count references). False if the pool has no room for the copy."""
        assert leader.req_pool_idx is not None and follower.req_pool_idx is not None
        n = leader.kv_len
        dst = self.kv_pool.alloc(n)
        if dst is None:
            return False
        self.kv_pool.copy_slots(self.req_to_token_pool.slots(leader.req_pool_idx, 0, n), dst)
        self.req_to_token_pool.write(follower.req_pool_idx, 0, dst)
        follower.kv_len = n
        follower.cache_protected_len = 0
        return True

    def evict(self, num_tokens: int) -> int:
        return 0

    def evictable_size(self) -> int:
        return 0

    def cached_size(self) -> int:
        return 0

    def protected_size(self) -> int:
        return 0

    def flush(self) -> None:
        pass


class RadixPrefixCache:
    """Adapter from the scheduler's request view to radix.RadixCache's token-level tree."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, kv_pool: TokenToKVPool) -> None:
        from radixlm.radix.radix_cache import RadixCache

        self.req_to_token_pool = req_to_token_pool
        self.kv_pool = kv_pool
        self.tree = RadixCache(free_slots=kv_pool.free)

    def match(self, req: Req) -> torch.Tensor:
        """Matched slots for the request's leading tokens; locks them until release()."""
        result = self.tree.match_prefix(req.fill_slice(0, req.max_prefix_len), extra_key=req.cache_namespace)
        self.lock(req, result.last_node)
        return result.indices

    def lock(self, req: Req, node: object) -> None:
        self.tree.inc_lock_ref(node)
        req.last_node = node

    def unlock(self, req: Req) -> None:
        if req.last_node is not None:
            self.tree.dec_lock_ref(req.last_node)
        req.last_node = None

    def peek(self, key: list[int], extra_key: str | None) -> int:
        return len(self.tree.match_prefix(key, extra_key=extra_key).indices)

    def _insert(self, req: Req) -> None:
        assert req.req_pool_idx is not None
        key = req.fill_slice(0, req.kv_len)
        slots = self.req_to_token_pool.slots(req.req_pool_idx, 0, req.kv_len)
        already = self.tree.insert(key, slots, extra_key=req.cache_namespace)
        if already > req.cache_protected_len:
            # Someone else cached these tokens meanwhile: drop our duplicate copies.
            self.kv_pool.free(slots[req.cache_protected_len : already])

    def cache_unfinished(self, req: Req) -> None:
        """Make a partly prefilled (or retracted) request's KV shareable, and re-point it at the tree."""
        self._insert(req)
        result = self.tree.match_prefix(req.fill_slice(0, req.kv_len), extra_key=req.cache_namespace)
        assert req.req_pool_idx is not None and len(result.indices) == req.kv_len
        self.req_to_token_pool.write(req.req_pool_idx, 0, result.indices)
        self.tree.inc_lock_ref(result.last_node)
        self.tree.dec_lock_ref(req.last_node)
        req.last_node = result.last_node
        req.cache_protected_len = req.kv_len

    def release(self, req: Req) -> None:
        """Finish or retract: hand all of the request's KV to the tree and unlock it."""
        self._insert(req)
        self.tree.dec_lock_ref(req.last_node)
        req.last_node = None
        req.kv_len = req.cache_protected_len = 0

    def share_prefix(self, leader: Req, follower: Req) -> bool:
        """n > 1: the follower points at the leader's just-prefilled prompt KV, both locking the
        same tree nodes. Never fails: nothing is allocated."""
        assert leader.req_pool_idx is not None and follower.req_pool_idx is not None
        n = leader.kv_len
        self.cache_unfinished(leader)
        self.req_to_token_pool.write(follower.req_pool_idx, 0, self.req_to_token_pool.slots(leader.req_pool_idx, 0, n))
        self.lock(follower, leader.last_node)
        follower.kv_len = follower.cache_protected_len = n
        return True

    def evict(self, num_tokens: int) -> int:
        return self.tree.evict(num_tokens)

    def evictable_size(self) -> int:
        return self.tree.evictable_size()

    def cached_size(self) -> int:
        return self.tree.cached_size()

    def protected_size(self) -> int:
        return self.tree.protected_size()

    def flush(self) -> None:
        self.tree.reset()


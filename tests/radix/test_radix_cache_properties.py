"""Property tests: random insert / match / lock / unlock / evict histories against a reference model.

The model maps every cached prefix `(namespace, tokens[:i])` to the slot of its last token, which
is exactly what a token-level prefix cache must answer; it also keeps a logical access time per
prefix to check the LRU order, and plays the caller's part in the slot ownership protocol.
Each history ends by releasing all locks and evicting (or resetting) everything.
"""
from __future__ import annotations

import torch
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from radixlm.radix.radix_cache import RadixCache, TreeNode

Prefix = tuple[str | None, tuple[int, ...]]

# Requests share prefixes in bulk (system prompts, few-shot examples, multi-turn chats): keys are a
# cut of one of a few documents plus a short random tail, so matches end at every possible offset
# and edges are split at every depth.
DOCUMENTS = ([0] * 8, [0, 1, 2, 3, 0, 1, 2, 3], [1, 1, 2, 2, 3, 3, 0, 0], [0, 1, 0, 1, 3, 2, 3, 2])
keys = st.builds(
    lambda doc, cut, tail: doc[:cut] + tail,
    st.sampled_from(DOCUMENTS),
    st.integers(1, 8),
    st.lists(st.integers(0, 3), max_size=3),
)
namespaces = st.sampled_from([None, "a", "b"])


class RadixCacheModel(RuleBasedStateMachine):
    finish_with_reset = False

    def __init__(self) -> None:
        super().__init__()
        self.tree_freed: list[int] = []  # slots passed to free_slots, in order
        self.cache = RadixCache(self._free_slots)
        self.caller_freed: list[int] = []  # duplicate slots the caller freed itself
        self.freed: set[int] = set()
        self.next_slot = 1
        self.model: dict[Prefix, int] = {}
        self.owner: dict[int, Prefix] = {}  # slot -> prefix, for slots the tree holds
        self.stamp: dict[Prefix, int] = {}
        self.clock = 0
        self.locks: list[tuple[TreeNode, Prefix]] = []

    # ---------------------------------------------------------------- model helpers

    def _free_slots(self, slots: torch.Tensor) -> None:
        assert slots.dtype == torch.int64
        for s in slots.tolist():
            assert s not in self.freed, f"slot {s} freed twice"
            self.freed.add(s)
            self.tree_freed.append(s)

    def _alloc(self, n: int) -> torch.Tensor:
        out = torch.arange(self.next_slot, self.next_slot + n, dtype=torch.int64)
        self.next_slot += n
        return out

    def _expected(self, key: list[int], ns: str | None) -> list[int]:
        out = []
        for i in range(1, len(key) + 1):
            slot = self.model.get((ns, tuple(key[:i])))
            if slot is None:
                break
            out.append(slot)
        return out

    def _touch(self, key: list[int], ns: str | None, n: int) -> None:
        self.clock += 1
        for i in range(1, n + 1):
            self.stamp[(ns, tuple(key[:i]))] = self.clock

    def _locked(self) -> set[Prefix]:
        out: set[Prefix] = set()
        for _, (ns, prefix) in self.locks:
            out.update((ns, prefix[:i]) for i in range(1, len(prefix) + 1))
        return out

    def _match(self, key: list[int], ns: str | None) -> tuple[TreeNode, int]:
        expected = self._expected(key, ns)
        m = self.cache.match_prefix(key, extra_key=ns)
        assert m.indices.dtype == torch.int64
        assert m.indices.tolist() == expected
        # last_node covers exactly the match: its path spells key[:matched].
        path: list[int] = []
        node = m.last_node
        while node.parent is not None:
            path[:0] = node.key
            node = node.parent
        assert path == key[: len(expected)]
        assert (m.last_node is self.cache.root) == (not expected)
        if expected:
            self._touch(key, ns, len(expected))
        return m.last_node, len(expected)

    # ---------------------------------------------------------------- operations

    @rule(key=keys, ns=namespaces, reuse_prefix=st.booleans())
    def insert(self, key: list[int], ns: str | None, reuse_prefix: bool) -> None:
        """A finished request: reuse the matched prefix (or not), allocate the rest, insert."""
        owned = self._match(key, ns)[1] if reuse_prefix else 0
        head = torch.tensor(self._expected(key, ns)[:owned], dtype=torch.int64)
        indices = torch.cat([head, self._alloc(len(key) - owned)])
        already = len(self._expected(key, ns))
        assert self.cache.insert(key, indices, extra_key=ns) == already
        duplicates = indices[owned:already].tolist()
        for s in duplicates:
            assert s not in self.owner and s not in self.freed
            self.freed.add(s)
        self.caller_freed.extend(duplicates)
        for i in range(already, len(key)):
            prefix = (ns, tuple(key[: i + 1]))
            self.model[prefix] = int(indices[i])
            self.owner[int(indices[i])] = prefix
        if key:
            self._touch(key, ns, len(key))

    @rule(key=keys, ns=namespaces, lock=st.booleans())
    def match(self, key: list[int], ns: str | None, lock: bool) -> None:
        node, matched = self._match(key, ns)
        if lock:
            self.cache.inc_lock_ref(node)
            self.locks.append((node, (ns, tuple(key[:matched]))))

    @precondition(lambda self: self.locks)
    @rule(pick=st.integers(0, 10**6))
    def unlock(self, pick: int) -> None:
        node, _ = self.locks.pop(pick % len(self.locks))
        self.cache.dec_lock_ref(node)

    @rule(num_tokens=st.integers(0, 8))
    def evict(self, num_tokens: int) -> None:
        before = self.cache.evictable_size()
        locked = self._locked()
        start = len(self.tree_freed)
        freed = self.cache.evict(num_tokens)
        new = self.tree_freed[start:]
        assert freed == len(new)
        assert freed >= min(num_tokens, before)
        if num_tokens == 0:
            assert freed == 0
        evicted = []
        for s in new:
            assert s in self.owner, f"evicted slot {s} was not held by the tree"
            prefix = self.owner.pop(s)
            assert prefix not in locked, f"locked prefix {prefix} evicted"
            del self.model[prefix]
            evicted.append(self.stamp.pop(prefix))
        if evicted:
            # Eviction goes leaf-upwards in access order: nothing evicted is newer than a leaf kept.
            parents = {(ns, p[:-1]) for ns, p in self.model}
            kept_leaves = [self.stamp[p] for p in self.model if p not in parents and p not in locked]
            assert not kept_leaves or max(evicted) <= min(kept_leaves)

    # ---------------------------------------------------------------- invariants

    @invariant()
    def sizes_match_the_model(self) -> None:
        protected = len(self._locked())
        assert self.cache.cached_size() == len(self.model)
        assert self.cache.protected_size() == protected
        assert self.cache.evictable_size() == len(self.model) - protected
        assert self.cache.cached_size() == self.cache.evictable_size() + self.cache.protected_size()

    @invariant()
    def tree_holds_exactly_the_model_slots(self) -> None:
        held: list[int] = []
        for node in self.cache._iter_nodes():
            for first, child in node.children.items():
                assert child.parent is node and child.key[0] == first
                assert len(child.key) == len(child.value) >= 1
                assert node.parent is None or node.lock_ref >= child.lock_ref
            held.extend(node.value.tolist())
        assert len(held) == len(set(held))
        assert set(held) == set(self.owner)
        assert not set(held) & self.freed

    def teardown(self) -> None:
        """Release every lock and drop everything: each slot ever allocated is freed exactly once."""
        while self.locks:
            self.cache.dec_lock_ref(self.locks.pop()[0])
        start = len(self.tree_freed)
        if self.finish_with_reset:
            self.cache.reset()
        else:
            self.cache.evict(10**9)
        assert sorted(self.tree_freed[start:]) == sorted(self.owner)
        assert self.cache.cached_size() == 0 and self.cache.evictable_size() == 0
        assert self.cache.match_prefix([0]).last_node is self.cache.root
        everything = self.tree_freed + self.caller_freed
        assert sorted(everything) == list(range(1, self.next_slot))


class RadixCacheModelReset(RadixCacheModel):
    """Same random histories, finished by `reset()` instead of eviction."""

    finish_with_reset = True


SETTINGS = settings(max_examples=200, stateful_step_count=30, deadline=None)
RadixCacheModel.TestCase.settings = SETTINGS
RadixCacheModelReset.TestCase.settings = SETTINGS
TestRadixCacheModel = RadixCacheModel.TestCase
TestRadixCacheModelReset = RadixCacheModelReset.TestCase

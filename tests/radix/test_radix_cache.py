"""Unit tests of the radix tree: splitting, ownership of slots, locking, LRU, namespaces, reset, disable."""
from __future__ import annotations

import pytest
import torch

from radixlm.radix.radix_cache import RadixCache


class FreeLog:
    """Stands in for the KV pool's free(): records every slot handed back."""

    def __init__(self) -> None:
        self.slots: list[int] = []

    def __call__(self, slots: torch.Tensor) -> None:
        assert slots.dtype == torch.int64 and slots.device.type == "cpu"
        self.slots.extend(slots.tolist())


def slots(*values: int) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int64)


def assert_sizes(cache: RadixCache, cached: int, protected: int) -> None:
    assert cache.cached_size() == cached
    assert cache.protected_size() == protected
    assert cache.evictable_size() == cached - protected


@pytest.fixture
def freed() -> FreeLog:
    return FreeLog()


@pytest.fixture
def cache(freed: FreeLog) -> RadixCache:
    return RadixCache(freed)


def test_empty_cache_matches_nothing(cache: RadixCache) -> None:
    m = cache.match_prefix([1, 2, 3])
    assert m.indices.tolist() == [] and m.indices.dtype == torch.int64
    assert m.last_node is cache.root
    assert cache.match_prefix([]).last_node is cache.root
    assert_sizes(cache, 0, 0)


def test_exact_and_longer_queries_match_the_whole_entry(cache: RadixCache) -> None:
    assert cache.insert([1, 2, 3], slots(10, 11, 12)) == 0
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == [10, 11, 12]
    m = cache.match_prefix([1, 2, 3, 4, 5])
    assert m.indices.tolist() == [10, 11, 12]
    assert m.last_node.key == [1, 2, 3]
    assert cache.match_prefix([2, 3]).last_node is cache.root
    assert_sizes(cache, 3, 0)


def test_match_ending_inside_an_edge_splits_it(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    (node,) = cache.root.children.values()
    m = cache.match_prefix([1, 2, 9])
    assert m.indices.tolist() == [10, 11]
    assert m.last_node.key == [1, 2] and m.last_node.value.tolist() == [10, 11]
    # The original object keeps the lower half, now a child of the new node.
    assert node.key == [3, 4] and node.value.tolist() == [12, 13]
    assert node.parent is m.last_node and m.last_node.children == {3: node}
    assert_sizes(cache, 4, 0)
    # A query that is a strict prefix of an edge also splits, so last_node covers exactly the match.
    m = cache.match_prefix([1])
    assert m.indices.tolist() == [10] and m.last_node.key == [1]


def test_insert_returns_the_length_already_cached(cache: RadixCache, freed: FreeLog) -> None:
    assert cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13)) == 0
    assert cache.insert([1, 2, 3, 4], slots(20, 21, 22, 23)) == 4
    assert cache.insert([1, 2, 7, 8], slots(30, 31, 32, 33)) == 2
    assert cache.insert([1, 2], slots(40, 41)) == 2
    assert freed.slots == []  # duplicates are the caller's to free
    # The tree keeps its own slots for the shared prefix and takes the new ones for the rest.
    assert cache.match_prefix([1, 2, 7, 8]).indices.tolist() == [10, 11, 32, 33]
    assert cache.match_prefix([1, 2, 3, 4]).indices.tolist() == [10, 11, 12, 13]
    assert_sizes(cache, 6, 0)


def test_insert_copies_the_callers_slots(cache: RadixCache) -> None:
    buf = torch.tensor([5, 6, 7], dtype=torch.int32)
    cache.insert([1, 2, 3], buf)
    buf[:] = 0
    indices = cache.match_prefix([1, 2, 3]).indices
    assert indices.tolist() == [5, 6, 7] and indices.dtype == torch.int64
    indices[:] = -1  # the result is a copy as well
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == [5, 6, 7]


def test_insert_rejects_mismatched_lengths(cache: RadixCache) -> None:
    with pytest.raises(ValueError):
        cache.insert([1, 2], slots(1))


def test_keys_may_be_any_int_sequence(cache: RadixCache) -> None:
    cache.insert((1, 2, 3), slots(10, 11, 12))
    assert cache.match_prefix(range(1, 4)).indices.tolist() == [10, 11, 12]
    assert cache.insert([1, 2], slots(0, 0)) == 2


def test_lock_protects_prefix_from_eviction(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    cache.insert([1, 2, 5, 6], slots(20, 21, 22, 23))
    m = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(m.last_node)
    assert_sizes(cache, 6, 4)
    assert cache.evict(100) == 2
    assert sorted(freed.slots) == [22, 23]
    assert cache.match_prefix([1, 2, 3, 4]).indices.tolist() == [10, 11, 12, 13]
    cache.dec_lock_ref(m.last_node)
    assert_sizes(cache, 4, 0)
    assert cache.evict(100) == 4
    assert sorted(freed.slots) == [10, 11, 12, 13, 22, 23]
    assert_sizes(cache, 0, 0)


def test_lock_survives_a_split_below_the_locked_node(cache: RadixCache) -> None:
    cache.insert([1, 2, 3, 4], slots(10, 11, 12, 13))
    m = cache.match_prefix([1, 2, 3, 4])
    cache.inc_lock_ref(m.last_node)
    cache.match_prefix([1, 2])  # splits the locked node; the upper half inherits the lock
    assert_sizes(cache, 4, 4)
    assert cache.evict(10) == 0
    cache.dec_lock_ref(m.last_node)
    assert_sizes(cache, 4, 0)


def test_nested_locks_count(cache: RadixCache) -> None:
    cache.insert([1, 2, 3], slots(10, 11, 12))
    a = cache.match_prefix([1, 2, 3]).last_node
    b = cache.match_prefix([1]).last_node
    cache.inc_lock_ref(a)
    cache.inc_lock_ref(b)
    assert_sizes(cache, 3, 3)
    cache.dec_lock_ref(a)
    assert_sizes(cache, 3, 1)
    assert cache.evict(10) == 2
    cache.dec_lock_ref(b)
    assert_sizes(cache, 1, 0)
    with pytest.raises(RuntimeError):
        cache.dec_lock_ref(b)


def test_locking_the_root_is_a_no_op(cache: RadixCache) -> None:
    cache.inc_lock_ref(cache.root)
    cache.dec_lock_ref(cache.root)
    assert_sizes(cache, 0, 0)


def test_locking_an_evicted_node_raises(cache: RadixCache) -> None:
    cache.insert([1, 2], slots(10, 11))
    node = cache.match_prefix([1, 2]).last_node
    cache.evict(2)
    with pytest.raises(ValueError):
        cache.inc_lock_ref(node)


def test_evicts_least_recently_used_first(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 1], slots(10, 11))
    cache.insert([2, 2], slots(20, 21))
    cache.insert([3, 3], slots(30, 31))
    cache.match_prefix([1, 1])  # [2, 2] is now the oldest
    assert cache.evict(1) == 2
    assert sorted(freed.slots) == [20, 21]
    assert cache.evict(3) == 4
    assert sorted(freed.slots[2:4]) == [30, 31] and sorted(freed.slots[4:]) == [10, 11]


def test_parents_become_leaves_during_eviction(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 2, 3], slots(10, 11, 12))
    cache.insert([1, 2, 4], slots(10, 11, 14))
    cache.insert([9], slots(90))
    cache.match_prefix([9])  # the [1, 2] subtree is older than [9]
    assert cache.evict(4) == 4
    assert sorted(freed.slots) == [10, 11, 12, 14]
    assert cache.match_prefix([9]).indices.tolist() == [90]
    assert_sizes(cache, 1, 0)


def test_evict_nothing(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1], slots(10))
    assert cache.evict(0) == 0
    assert freed.slots == []


def test_namespaces_are_isolated(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 2, 3], slots(10, 11, 12))
    assert cache.insert([1, 2, 3], slots(20, 21, 22), extra_key="tenant-a") == 0
    assert cache.insert([1, 2], slots(30, 31), extra_key="tenant-b") == 0
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == [10, 11, 12]
    assert cache.match_prefix([1, 2, 3], extra_key="tenant-a").indices.tolist() == [20, 21, 22]
    assert cache.match_prefix([1, 2, 3], extra_key="tenant-b").indices.tolist() == [30, 31]
    m = cache.match_prefix([1, 2, 3], extra_key="unknown")
    assert m.indices.tolist() == [] and m.last_node is cache.root
    assert_sizes(cache, 8, 0)
    # An emptied namespace is dropped instead of lingering.
    cache.match_prefix([1, 2, 3])
    cache.match_prefix([1, 2, 3], extra_key="tenant-a")
    assert cache.evict(1) == 2
    assert sorted(freed.slots) == [30, 31]
    assert "tenant-b" not in cache.pretty_print()
    assert cache.insert([1, 2], slots(40, 41), extra_key="tenant-b") == 0


def test_reset_frees_everything(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 2, 3], slots(10, 11, 12))
    cache.insert([1, 2, 4], slots(10, 11, 14))
    cache.insert([5], slots(50), extra_key="x")
    stale = cache.match_prefix([1, 2, 3]).last_node
    cache.reset()
    assert sorted(freed.slots) == [10, 11, 12, 14, 50]
    assert_sizes(cache, 0, 0)
    assert cache.match_prefix([1, 2, 3]).indices.tolist() == []
    assert cache.match_prefix([5], extra_key="x").indices.tolist() == []
    cache.reset()  # empty: frees nothing more
    assert len(freed.slots) == 5
    with pytest.raises(ValueError):
        cache.inc_lock_ref(stale)


def test_reset_refuses_while_locked(cache: RadixCache, freed: FreeLog) -> None:
    cache.insert([1, 2], slots(10, 11))
    node = cache.match_prefix([1, 2]).last_node
    cache.inc_lock_ref(node)
    with pytest.raises(RuntimeError):
        cache.reset()
    assert freed.slots == []
    cache.dec_lock_ref(node)
    cache.reset()
    assert sorted(freed.slots) == [10, 11]


def test_disabled_cache_holds_nothing(freed: FreeLog) -> None:
    cache = RadixCache(freed, disable=True)
    assert cache.insert([1, 2, 3], slots(10, 11, 12)) == 0
    m = cache.match_prefix([1, 2, 3])
    assert m.indices.tolist() == [] and m.last_node is cache.root
    cache.inc_lock_ref(m.last_node)
    cache.dec_lock_ref(m.last_node)
    assert cache.evict(10) == 0
    cache.reset()
    assert freed.slots == []  # the caller frees its own slots when the cache is disabled
    assert_sizes(cache, 0, 0)


def test_pretty_print_shows_structure(cache: RadixCache) -> None:
    cache.insert([1, 2, 3], slots(10, 11, 12))
    cache.insert([1, 2, 4], slots(10, 11, 14))
    cache.insert(list(range(100, 120)), torch.arange(20), extra_key="ns")
    lock = cache.match_prefix([1, 2, 4]).last_node
    cache.inc_lock_ref(lock)
    text = cache.pretty_print()
    lines = text.splitlines()
    assert lines[0].startswith("root (cached=24, evictable=21, protected=3)")
    assert lines[1].strip().startswith("[1, 2] slots=[10, 11] lock=1")
    assert any(line.strip().startswith("[4] slots=[14] lock=1") for line in lines)
    assert "namespace 'ns'" in text and "+12]" in text


def test_very_deep_tree_prints_and_evicts(cache: RadixCache, freed: FreeLog) -> None:
    # Each insert diverges one token later, making a chain of ~2000 nodes deep.
    depth = 2000
    key = [0] * depth
    for i in range(depth):
        k = key[:i] + [1]
        cache.insert(k, torch.arange(len(k)) + i * depth)
    assert len(cache.pretty_print().splitlines()) > depth
    # Unique prefixes: [0] * j for j in 1..depth-1, and one [..., 1] leaf per insert.
    assert cache.evict(10**9) == 2 * depth - 1
    assert len(freed.slots) == len(set(freed.slots)) == 2 * depth - 1

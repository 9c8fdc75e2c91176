"""Radix tree over token ids: KV slots shared between requests with a common prefix (RadixAttention).

Each edge holds a run of tokens and, position for position, the KV-pool slot of each token.
The tree owns the slots it holds and gives them back through `free_slots` when it evicts them.

Caller protocol (the scheduler), for a request with tokens `t`:

1. `m = cache.match_prefix(t)`; reuse `m.indices` as the KV of `t[:len(m.indices)]` and
   `cache.inc_lock_ref(m.last_node)` so the prefix cannot be evicted while the request runs.
2. Allocate slots for `t[len(m.indices):]` and run the model; `slots` is then the KV of all of `t`.
3. `n = cache.insert(t, slots)`: the tree now owns `slots[n:]` and already held `t[:n]`, so the
   caller frees its duplicates `slots[len(m.indices):n]`; then `cache.dec_lock_ref(m.last_node)`.

When the cache is built with `disable=True` it holds nothing: `match_prefix` matches nothing and
`insert` takes ownership of nothing (returns 0), so the caller simply frees all of `slots` itself.
"""
from __future__ import annotations

import heapq
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch


class TreeNode:
    """One compressed edge: token `key[i]` has its KV in slot `value[i]`.

    A node with `parent is None` is a root (the cache's root, or a namespace root); roots hold no
    tokens and are never evicted. Evicted nodes are detached (their `parent` set to None too).
    """

    __slots__ = ("children", "parent", "key", "value", "lock_ref", "last_access")

    def __init__(
        self, parent: TreeNode | None, key: list[int], value: torch.Tensor, last_access: int
    ) -> None:
        self.children: dict[int, TreeNode] = {}  # first token of the child's edge -> child
        self.parent = parent
        self.key = key
        self.value = value
        self.lock_ref = 0  # number of requests using this node (locks propagate to every ancestor)
        self.last_access = last_access  # logical clock of the cache, for LRU eviction

    def __repr__(self) -> str:
        return f"TreeNode(key={_short(self.key)}, lock_ref={self.lock_ref}, last_access={self.last_access})"


@dataclass(frozen=True, eq=False)  # eq=False: field-wise == on a tensor has no truth value
class MatchResult:
    """Longest cached prefix of a key."""

    indices: torch.Tensor  # int64 CPU, KV slot of every matched token (a copy: the caller may keep it)
    last_node: TreeNode  # deepest node, covering exactly the match; the cache's root if nothing matched


def _empty_slots() -> torch.Tensor:
    return torch.empty(0, dtype=torch.int64)


def _short(key: list[int], limit: int = 8) -> str:
    if len(key) <= limit:
        return str(key)
    return f"[{', '.join(map(str, key[:limit]))}, ... +{len(key) - limit}]"


def _common_prefix_len(edge: list[int], key: list[int], pos: int) -> int:
    """Length of the common prefix of `edge` and `key[pos:]`; the caller knows the first tokens agree."""
    n = len(edge)
    if key[pos : pos + n] == edge:  # common case: the whole edge matches, one C-level comparison
        return n
    limit = min(n, len(key) - pos)
    i = 1
    while i < limit and edge[i] == key[pos + i]:
        i += 1
    return i


class RadixCache:
    """Prefix cache of KV slots keyed by token ids, with LRU eviction of unlocked leaves.

    `extra_key` namespaces the cache (per-tenant cache salt, LoRA id, ...): every namespace has its
    own root, so keys of different namespaces never share a node.
    Sizes count tokens (= slots) and are kept up to date on every change, so reading them is O(1).
    """

    def __init__(self, free_slots: Callable[[torch.Tensor], None], disable: bool = False) -> None:
        self._free_slots = free_slots
        self.disable = disable
        # A logical clock rather than wall time: deterministic LRU order, and no ties within a tick.
        self._clock = 0
        self.root = TreeNode(None, [], _empty_slots(), 0)
        self._namespace_roots: dict[str, TreeNode] = {}
        self._evictable = 0
        self._protected = 0

    # ------------------------------------------------------------------ lookup / insert

    def match_prefix(self, key: Sequence[int], extra_key: str | None = None) -> MatchResult:
        """Longest cached prefix of `key`; splits an edge the match ends inside, and touches the path."""
        if self.disable or not key:
            return MatchResult(_empty_slots(), self.root)
        start = self.root if extra_key is None else self._namespace_roots.get(extra_key)
        if start is None:
            return MatchResult(_empty_slots(), self.root)
        node, matched, values = self._walk(start, key if isinstance(key, list) else list(key))
        if matched == 0:
            return MatchResult(_empty_slots(), self.root)
        return MatchResult(torch.cat(values), node)

    def insert(self, key: Sequence[int], indices: torch.Tensor, extra_key: str | None = None) -> int:
        """Store `key -> indices`; return how many leading tokens of `key` the tree already held.

        The tree keeps its own slots for that prefix and takes ownership of `indices[returned:]`.
        """
        if len(indices) != len(key):
            raise ValueError(f"insert: {len(key)} tokens but {len(indices)} slots")
        if self.disable or not key:
            return 0
        key = key if isinstance(key, list) else list(key)
        if extra_key is None:
            start = self.root
        else:
            start = self._namespace_roots.get(extra_key)
            if start is None:
                start = self._namespace_roots[extra_key] = TreeNode(None, [], _empty_slots(), self._clock)
        node, matched, _ = self._walk(start, key)
        if matched < len(key):
            # copy=True: the caller's tensor is often a view of a buffer it will overwrite.
            value = indices[matched:].to(device="cpu", dtype=torch.int64, copy=True)
            node.children[key[matched]] = TreeNode(node, key[matched:], value, self._clock)
            self._evictable += len(key) - matched
        return matched

    def _walk(self, start: TreeNode, key: list[int]) -> tuple[TreeNode, int, list[torch.Tensor]]:
        """Descend from `start` along `key`; the returned node covers exactly the matched tokens."""
        self._clock += 1
        stamp = self._clock
        node = start
        pos = 0
        n = len(key)
        values: list[torch.Tensor] = []
        while pos < n:
            child = node.children.get(key[pos])
            if child is None:
                break
            m = _common_prefix_len(child.key, key, pos)
            if m < len(child.key):
                child = self._split(child, m)
            child.last_access = stamp
            values.append(child.value)
            node = child
            pos += m
        return node, pos, values

    def _split(self, child: TreeNode, m: int) -> TreeNode:
        """Cut `child`'s edge after `m` tokens and return the new upper node.

        The existing object keeps the lower half, so a request that locked it still holds the same
        tokens; the upper half is an ancestor of it, so it inherits its lock count.
        """
        parent = child.parent
        assert parent is not None
        upper = TreeNode(parent, child.key[:m], child.value[:m].clone(), child.last_access)
        upper.lock_ref = child.lock_ref
        parent.children[child.key[0]] = upper
        upper.children[child.key[m]] = child
        child.parent = upper
        child.key = child.key[m:]
        child.value = child.value[m:].clone()
        return upper

    # ------------------------------------------------------------------ locking

    def inc_lock_ref(self, node: TreeNode) -> None:
        """Protect `node` and its ancestors from eviction (a request is using that prefix)."""
        if node.parent is None:
            if node is self.root:
                return
            raise ValueError("inc_lock_ref on a node that is no longer in the tree")
        while node.parent is not None:
            if node.lock_ref == 0:
                n = len(node.value)
                self._evictable -= n
                self._protected += n
            node.lock_ref += 1
            node = node.parent

    def dec_lock_ref(self, node: TreeNode) -> None:
        """Undo one `inc_lock_ref(node)`."""
        if node.parent is None:
            if node is self.root:
                return
            raise ValueError("dec_lock_ref on a node that is no longer in the tree")
        if node.lock_ref <= 0:  # ancestors count at least as many locks, so checking the node suffices
            raise RuntimeError("dec_lock_ref on a node that is not locked")
        while node.parent is not None:
            node.lock_ref -= 1
            if node.lock_ref == 0:
                n = len(node.value)
                self._protected -= n
                self._evictable += n
            node = node.parent

    # ------------------------------------------------------------------ eviction

    def evict(self, num_tokens: int) -> int:
        """Free at least `num_tokens` slots (fewer only if nothing else is evictable); return how many.

        Takes least-recently-used unlocked leaves first; a parent left childless becomes a candidate.
        Ancestors are touched whenever a descendant is, so the order is LRU over the whole tree.
        """
        if self.disable or num_tokens <= 0:
            return 0
        heap = [
            (n.last_access, id(n), n)
            for n in self._iter_nodes()
            if n.parent is not None and not n.children and n.lock_ref == 0
        ]
        heapq.heapify(heap)
        freed = 0
        values: list[torch.Tensor] = []
        while freed < num_tokens and heap:
            leaf = heapq.heappop(heap)[2]
            parent = leaf.parent
            assert parent is not None
            del parent.children[leaf.key[0]]
            leaf.parent = None
            values.append(leaf.value)
            freed += len(leaf.value)
            if parent.parent is not None and not parent.children and parent.lock_ref == 0:
                heapq.heappush(heap, (parent.last_access, id(parent), parent))
        if values:
            self._evictable -= freed
            for name in [name for name, root in self._namespace_roots.items() if not root.children]:
                del self._namespace_roots[name]
            self._free_slots(torch.cat(values))
        return freed

    def reset(self) -> None:
        """Drop everything and free every slot; the caller must have released all locks."""
        if self._protected:
            raise RuntimeError(f"reset with {self._protected} locked tokens in the tree")
        values: list[torch.Tensor] = []
        for node in self._iter_nodes():
            if node.parent is not None:
                values.append(node.value)
                node.parent = None  # detached: locking a stale MatchResult node now raises
        self.root = TreeNode(None, [], _empty_slots(), self._clock)
        self._namespace_roots = {}
        self._evictable = 0
        if values:
            self._free_slots(torch.cat(values))

    # ------------------------------------------------------------------ sizes / introspection

    def cached_size(self) -> int:
        """Tokens (= slots) held by the tree."""
        return self._evictable + self._protected

    def evictable_size(self) -> int:
        """Tokens in nodes no request has locked."""
        return self._evictable

    def protected_size(self) -> int:
        """Tokens in locked nodes."""
        return self._protected

    def cached_slots(self) -> torch.Tensor:
        """Every KV slot the tree holds (for audits of the pool's accounting, not the hot path)."""
        values = [n.value for n in self._iter_nodes() if n.parent is not None]
        return torch.cat(values) if values else _empty_slots()

    def _iter_nodes(self) -> Iterator[TreeNode]:
        """Every node, roots included, depth first."""
        stack = [self.root, *self._namespace_roots.values()]
        while stack:
            node = stack.pop()
            yield node
            stack.extend(node.children.values())

    def pretty_print(self) -> str:
        """The tree as indented text, one node per line (for debugging and logs)."""
        sizes = f"cached={self.cached_size()}, evictable={self._evictable}, protected={self._protected}"
        lines = [f"root ({sizes})"]
        # Iterative: a tree of long divergent sequences can be deeper than Python's recursion limit.
        stack: list[tuple[TreeNode, int]] = []
        for name in sorted(self._namespace_roots, reverse=True):
            stack.append((self._namespace_roots[name], 1))
        stack.append((self.root, 0))
        names = {id(root): name for name, root in self._namespace_roots.items()}
        while stack:
            node, depth = stack.pop()
            if node.parent is not None:
                lines.append(
                    f"{'  ' * depth}{_short(node.key)} slots={_short(node.value.tolist())} "
                    f"lock={node.lock_ref} t={node.last_access}"
                )
            elif node is not self.root:
                lines.append(f"  namespace {names[id(node)]!r}")
            children = sorted(node.children.values(), key=lambda c: c.key[0], reverse=True)
            stack.extend((c, depth + 1) for c in children)
        return "\n".join(lines)

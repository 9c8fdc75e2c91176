"""Which decode rows share a prefix, and whether cascade attention pays for this batch.

Every running request holds a lock on the radix-tree node that covers its prompt (`Req.last_node`);
requests below a common ancestor X have the same KV slots for X's `depth` tokens (the tree owns
them and each request's req_to_token row was pointed at them). Grouping all rows below X saves
(rows - 1) x depth token reads per layer. One level of groups per batch, chosen by a tree walk:
each node either forms a group of every row below it or leaves its subtrees to group themselves,
whichever saves more (a subtree's deeper, smaller groups may beat a shallow, large one).

The cost rule (per layer, in seconds): cascade runs a prefix stage and decode's merge stage that
plain decode skips at large batches, and writes/reads per-row partials; it pays when the saved KV
bytes take longer than that. Constants are measured by benchmarks/cascade_attention.py on the H200
(its "fit" line prints them).
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from radixlm.kernels.cascade_layout import CascadeGroup, CascadeLayout, CascadeShape, build_cascade_layout


@dataclass(frozen=True)
class CascadeCostRule:
    """When grouping pays. Times are per layer and per decode step.

    Fitted on the H200 (benchmarks/cascade_attention.py, Llama-8B heads, issue 22.1): plain decode
    attention reads a prefix that 8+ rows share at 1.3-2.8x the HBM copy rate because L2 serves the
    repeated reads, so a saved token costs much less than its bytes at 4 TB/s; the least-squares fit
    of (t_cascade - t_plain) on the byte difference gives 13.4 TB/s and 15.7 us fixed. Groups of
    fewer than 8 rows lost in every measured shape (2 rows: 0.66-0.80x, 4 rows: 0.71x) and never form.
    """

    kv_bytes_per_s: float = 1.34e13  # plain decode's effective read rate of a shared prefix (L2 reuse)
    fixed_s: float = 1.57e-5  # the prefix-stage launch, the merge stage and their partials' traffic
    min_group_saved_tokens: int = 256  # below this a group's task costs more than its saved reads
    min_group_rows: int = 8  # smaller groups lost on every measured shape
    margin: float = 1.25  # saved time must beat the added time by this factor: never lose

    def pays(self, saved_tokens: int, rows: int, kv_bytes_per_token: int, row_bytes: int) -> bool:
        saved_s = saved_tokens * kv_bytes_per_token / self.kv_bytes_per_s
        added_s = self.fixed_s + rows * row_bytes / self.kv_bytes_per_s
        return saved_s >= self.margin * added_s


ALWAYS = CascadeCostRule(fixed_s=0.0, min_group_saved_tokens=1, min_group_rows=2, margin=0.0)  # tests: group whatever shares


@dataclass
class _Node:
    node: Any
    depth: int  # tokens from the root to the end of this node's edge
    rows: list[int]
    children: dict[int, _Node]


class CascadePlanner:
    """Builds a batch's `CascadeLayout` (or None: plain decode) from its rows' prefix-tree nodes."""

    def __init__(self, shape: CascadeShape, kv_bytes_per_token: int, row_bytes: int,
                 rule: CascadeCostRule = CascadeCostRule()) -> None:
        self.shape = shape
        self.kv_bytes_per_token = kv_bytes_per_token  # one layer's K and V of one token
        self.row_bytes = row_bytes  # one row's partial outputs written and read back by the merge
        self.rule = rule

    @classmethod
    def for_model(cls, num_q_heads: int, num_kv_heads: int, head_dim: int, kv_itemsize: int,
                  device: torch.device, rule: CascadeCostRule = CascadeCostRule()) -> CascadePlanner:
        shape = CascadeShape.for_device(num_q_heads, num_kv_heads, device)
        # merge traffic: a suffix and (on average) two prefix partials of float32, written then read
        return cls(shape, 2 * num_kv_heads * head_dim * kv_itemsize, 3 * 2 * num_q_heads * head_dim * 4, rule)

    def groups(self, nodes: Sequence[Any], seq_lens: Sequence[int]) -> list[CascadeGroup]:
        """The most saving one-level grouping of rows by shared tree prefix, most saving first."""
        rows_below: dict[int, list[int]] = {}  # id(node) -> the rows at or below it
        node_of: dict[int, Any] = {}
        for b, node in enumerate(nodes):
            while node is not None and node.parent is not None:  # up to a root (the cache's or a namespace's)
                rows = rows_below.get(id(node))
                if rows is None:
                    rows_below[id(node)] = [b]
                    node_of[id(node)] = node
                else:
                    rows.append(b)
                node = node.parent
        # Only nodes above two or more rows can form a group; each one's depth and nearest such ancestor.
        shared = {k: _Node(node_of[k], 0, rows, {}) for k, rows in rows_below.items() if len(rows) >= 2}
        tops: list[_Node] = []
        for entry in shared.values():
            n, parent = entry.node.parent, None
            entry.depth = len(entry.node.key)
            while n is not None and n.parent is not None:
                entry.depth += len(n.key)
                if parent is None and id(n) in shared:
                    parent = shared[id(n)]
                n = n.parent
            if parent is None:
                tops.append(entry)
            else:
                parent.children[id(entry.node)] = entry
        found: list[tuple[int, CascadeGroup]] = []
        for top in tops:
            found += self._best(top, seq_lens)[1]
        found.sort(key=lambda x: -x[0])
        return [g for _, g in found]

    def _best(self, x: _Node, seq_lens: Sequence[int]) -> tuple[int, list[tuple[int, CascadeGroup]]]:
        """(saving, groups) of the best grouping of the rows below x; iterative over deep trees."""
        order, stack = [], [x]
        while stack:
            n = stack.pop()
            order.append(n)
            stack.extend(n.children.values())
        best: dict[int, tuple[int, list[tuple[int, CascadeGroup]]]] = {}
        for n in reversed(order):  # children before parents
            below = [best[id(c)] for c in n.children.values()]
            split_gain = sum(g for g, _ in below)
            prefix = min(n.depth, min(seq_lens[r] for r in n.rows) - 1)  # a row's new token is never shared
            own = (len(n.rows) - 1) * prefix
            big = len(n.rows) >= self.rule.min_group_rows
            if big and own >= self.rule.min_group_saved_tokens and own >= split_gain:
                best[id(n)] = (own, [(own, CascadeGroup(tuple(n.rows), prefix))])
            else:
                best[id(n)] = (split_gain, [grp for _, gs in below for grp in gs])
        return best[id(x)]

    def plan(self, nodes: Sequence[Any], req_pool_indices: Sequence[int], seq_lens: Sequence[int]) -> CascadeLayout | None:
        """Host layout for a decode batch whose row b runs under tree node nodes[b] (None: no node)."""
        if len(nodes) < 2:
            return None
        # Fast exit (most batches without shared prompts): every node hangs right under a root and
        # none is shared, so no two rows have a common ancestor.
        if all(n is None or n.parent is None or n.parent.parent is None for n in nodes) and \
                len({id(n) for n in nodes if n is not None}) == sum(n is not None for n in nodes):
            return None
        groups = self.groups(nodes, seq_lens)
        if not groups:
            return None
        layout = build_cascade_layout(groups, req_pool_indices, self.shape)
        saved = sum((len(g.rows) - 1) * g.prefix_len for g in layout.groups)
        if not layout.groups or not self.rule.pays(saved, len(nodes), self.kv_bytes_per_token, self.row_bytes):
            return None
        return layout

"""A request's drafts as a token tree: several candidate continuations verified in one pass.

Node i holds `tokens[i]` and hangs under `parents[i]` (-1: the request's last token, the root);
a parent always comes before its children, so any prefix of the node list is itself a tree (the
budget cuts trees that way). A chain is the tree whose parents are -1, 0, 1, ...

In a decode step every node is one decode row of its request at position prefix + depth, whose
attention must read the prompt, the root and the node's ancestors — and nothing else. Decode rows
read req_to_token[row, :seq_len], so each root-to-leaf path gets a request row of its own (a
*lane*): lane 0 is the request's own row, each further lane a scratch row holding the request's
KV prefix and the slots of its path. That is the tree attention mask, expressed in the rows the
decode kernels (the CPU one-call stack, the Triton decode kernel, the CUDA graphs) already read: no
kernel changes, and a chain is lane 0 alone, exactly as before. In a mixed batch (decode rows
riding along a prefill) a verify row is an extend row: root and nodes take consecutive places in
the request's own row, rotary positions prefix + depth, and the extend attention reads the tree's
ancestor matrix (`ancestor_mask`) in place of the causal mask over them.

Verification walks from the root: the target's token at a node is kept while it equals one of
the node's children, whose position is verified next; the first token that matches no child is the
bonus token. Each position's token is drawn exactly as decoding would draw it there (verify.py), so
a tree emits what speculation off emits, greedy or seeded.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DraftTree:
    tokens: list[int]
    parents: list[int]

    @classmethod
    def chain(cls, tokens: list[int]) -> "DraftTree":
        return cls(list(tokens), list(range(-1, len(tokens) - 1)))

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def is_chain(self) -> bool:
        return all(p == i - 1 for i, p in enumerate(self.parents))

    def cut(self, n: int) -> "DraftTree":
        """The first n nodes (a tree: parents come first)."""
        return DraftTree(self.tokens[:n], self.parents[:n])

    def depths(self) -> list[int]:
        """Depth of each node (1: a child of the root)."""
        out: list[int] = []
        for p in self.parents:
            out.append(1 if p < 0 else out[p] + 1)
        return out

    def path(self, node: int) -> list[int]:
        """Nodes from the root's child down to `node` (inclusive)."""
        out = []
        while node >= 0:
            out.append(node)
            node = self.parents[node]
        return out[::-1]

    def first_chain(self) -> list[int]:
        """Tokens of lane 0: from the root, each node's first child (the drafter's best candidate)."""
        out, cur = [], -1
        for i, p in enumerate(self.parents):
            if p == cur:
                out.append(self.tokens[i])
                cur = i
        return out

    def lanes(self) -> tuple[list[int], list[tuple[int, int]]]:
        """(each node's lane, each lane > 0's (parent lane, depth it branches at)): a node goes in its
        parent's lane when it is that parent's first child, else it opens a lane that shares the parent
        lane's first `depth` positions after the root (its ancestors)."""
        lane_of: list[int] = []
        branches: list[tuple[int, int]] = []
        has_child: set[int] = set()
        depths = self.depths()
        for i, p in enumerate(self.parents):
            if p not in has_child:
                lane_of.append(lane_of[p] if p >= 0 else 0)
                has_child.add(p)
            else:
                branches.append((lane_of[p] if p >= 0 else 0, depths[i] - 1))
                lane_of.append(len(branches))
        return lane_of, branches

    def accepted_path(self, targets: list[int]) -> tuple[list[int], list[int]]:
        """(emitted tokens, the nodes they keep): `targets[0]` is the target's token after the root,
        `targets[1 + i]` after node i. From the root, the target's token is emitted and, while it
        equals a child's token, that child is kept and its own target token emitted next."""
        children: dict[int, dict[int, int]] = {}
        for i, (tok, p) in enumerate(zip(self.tokens, self.parents)):
            children.setdefault(p, {}).setdefault(tok, i)
        emitted, kept, cur = [], [], -1
        while True:
            tok = targets[cur + 1]
            emitted.append(tok)
            nxt = children.get(cur, {}).get(tok)
            if nxt is None:
                return emitted, kept
            kept.append(nxt)
            cur = nxt

    def ancestor_mask(self) -> torch.Tensor:
        """[1 + n, 1 + n] bool: entry (i, j) when token j (0: the root, 1 + k: node k) is token i itself
        or one of its ancestors — the extend attention's mask over a tree's own tokens."""
        n = len(self.tokens) + 1
        mask = torch.zeros((n, n), dtype=torch.bool)
        mask[:, 0] = True
        for i, p in enumerate(self.parents):
            row = i + 1
            if p >= 0:
                mask[row] = mask[p + 1]
            mask[row, row] = True
        return mask


@dataclass(frozen=True)
class TreeRows:
    """Where a tree verify row's tokens go in one step: their rotary positions, each token's request
    row (decode: its lane's) and position in it, and the lane copies (decode) or mask (extend)."""

    positions: list[int]
    rows: list[int]
    kv_positions: list[int]
    lane_copies: list[tuple[int, int, int]]
    mask: torch.Tensor | None

    @classmethod
    def lay_out(cls, tree: DraftTree, prefix: int, row: int, lanes: list[int], decode: bool) -> "TreeRows":
        positions = [prefix] + [prefix + d for d in tree.depths()]
        if not decode:
            n = len(positions)
            return cls(positions, [row] * n, list(range(prefix, prefix + n)), [], tree.ancestor_mask())
        lane_rows = [row, *lanes]
        lane_of, branches = tree.lanes()
        rows = [row] + [lane_rows[lane] for lane in lane_of]
        # Lane L (> 0) holds the request's KV, the root and its ancestors' slots: copied from its
        # parent lane after this step's slots are written (lanes in order: parents first).
        copies = [(lane_rows[lane + 1], lane_rows[src], prefix + 1 + depth) for lane, (src, depth) in enumerate(branches)]
        return cls(positions, rows, positions, copies, None)

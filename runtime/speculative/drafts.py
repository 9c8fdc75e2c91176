"""One scheduler step's drafts: per running request the tokens it verifies (a chain, or a tree with
each token's parent), and a constrained request's masks of the positions to verify.

SpecDecoder (spec_decoder.py) makes them; the decode schedule (runtime/decode_schedule.py) trims them
to the rows a step can take (`within_lanes`) and the batch lays them out.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.speculative.draft_tree import DraftTree


@dataclass(frozen=True)
class Drafts:
    """One step's drafts, aligned with the requests it was asked about (empty: plain decode).
    `parents`: per request None for a chain, else each token's parent node (draft_tree.py)."""

    tokens: list[list[int]]
    masks: list[torch.Tensor | None]  # constrained rows: [len(tokens) + 1, W] masks to verify with
    parents: list[list[int] | None] | None = None

    def parents_of(self, i: int) -> list[int] | None:
        return self.parents[i] if self.parents is not None else None

    def within_lanes(self, rows: int) -> "Drafts":
        """Trees kept, in row order, while their extra lanes fit in `rows` free request rows; the
        others cut to their first chain (lane 0)."""
        if self.parents is None:
            return self
        tokens, parents = list(self.tokens), list(self.parents)
        for i, p in enumerate(parents):
            if p is None:
                continue
            tree = DraftTree(tokens[i], p)
            need = len(tree.lanes()[1])
            if need <= rows:
                rows -= need
            else:
                tokens[i], parents[i] = tree.first_chain(), None
        return Drafts(tokens, self.masks, parents if any(p is not None for p in parents) else None)

    @property
    def total(self) -> int:
        return sum(len(t) for t in self.tokens)

"""The KV of a draft tree's verify step: its lanes (scratch request rows) and the slots of its nodes.

Owned by the Scheduler, which owns all KV: a step that verifies trees takes one scratch request row
per extra lane (draft_tree.py) and one KV slot per node. Once the step's results are in, the kept
path's slots are written into the request's own row after its last token, every other node's slot
goes back to the pool and the lanes are freed — before anything can reach the radix tree, which so
only ever sees verified tokens. Nothing of a tree outlives its step.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool
from radixlm.runtime.request import Req
from radixlm.runtime.speculative.draft_tree import DraftTree


@dataclass(frozen=True)
class TreeStep:
    prefix: int  # the request's KV length before the step (its last token's position)
    slots: torch.Tensor  # [1 + nodes] int64 host: the last token's slot, then each node's
    lanes: list[int]  # scratch request rows of lanes 1..
    depth: int  # the tree's depth (acceptance is counted along a path)


class TreeKV:
    def __init__(self, req_pool: ReqToTokenPool, kv_pool: TokenToKVPool) -> None:
        self.req_pool = req_pool
        self.kv_pool = kv_pool
        self.steps: dict[int, TreeStep] = {}
        # requests whose tree this step already settled (their row holds the kept path): a failure
        # later in the step frees their KV from the row, not from the step's node-ordered slots
        self.settled: set[int] = set()

    def take_lanes(self, reqs: list[Req], tokens: list[list[int]], parents: list[list[int] | None],
                   slots: torch.Tensor, lanes: bool = True) -> list[list[int]]:
        """Rows for each tree's extra lanes (the caller kept them within the free rows;
        `lanes=False`: none, a mixed batch's extend rows take a tree mask instead); records each tree's
        step. `slots`: the batch's slots, 1 + len(tokens[i]) per request in order."""
        out: list[list[int]] = []
        start = 0
        for req, toks, par in zip(reqs, tokens, parents):
            n = 1 + len(toks)
            if par is None:
                out.append([])
            else:
                tree = DraftTree(toks, par)
                rows = [self.req_pool.alloc() for _ in tree.lanes()[1]] if lanes else []
                assert all(r is not None for r in rows), "Drafts.within_lanes kept the trees within the free rows"
                out.append(rows)  # type: ignore[arg-type]
                self.steps[id(req)] = TreeStep(req.kv_len, slots[start : start + n].to(torch.int64),
                                               rows, max(tree.depths()))  # type: ignore[arg-type]
            start += n
        return out

    def holds(self, req: Req) -> bool:
        return id(req) in self.steps

    def depth(self, req: Req) -> int:
        return self.steps[id(req)].depth

    def keep(self, req: Req, kept: tuple[int, ...]) -> None:
        """The verify result: the kept nodes' slots follow the last token in the request's row, the
        other nodes' slots and the lanes are freed."""
        step = self.steps.pop(id(req))
        self.settled.add(id(req))
        assert req.req_pool_idx is not None
        path = step.slots[[1 + k for k in kept]]
        keep = set(kept)
        drop = [1 + i for i in range(step.slots.numel() - 1) if i not in keep]
        if drop:
            self.kv_pool.free(step.slots[drop])
        if kept:
            self.req_pool.write(req.req_pool_idx, step.prefix + 1, path)
        for row in step.lanes:
            self.req_pool.free(row)
        req.kv_len = step.prefix + 1 + len(kept)

    def release_lanes(self) -> None:
        """A failed step: its lanes go back (its node slots are the step's new slots, which fault
        isolation frees with the request's)."""
        for step in self.steps.values():
            for row in step.lanes:
                self.req_pool.free(row)
        self.steps.clear()

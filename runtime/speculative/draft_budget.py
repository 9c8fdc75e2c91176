"""How many of its proposed tokens each request verifies this step: the adaptive turn-down.

A verify step costs what a decode step of (rows + draft tokens) costs. Modelled as
`1 + beta x tokens` (a weight-streaming unit plus a per-token share), a draft token at depth i of a
request whose drafts are accepted with rate a adds a^i expected tokens for beta of cost. Tokens are
granted greedily, most valuable first, while each one's expected gain per unit of cost beats the
step's average (tokens / cost so far): at batch 1 on a GPU nearly any draft pays, at batch 64 only
well-accepted ones, so speculation never slows a large batch down much. A request's acceptance
rate is an estimate that decays back to the prior while it does not draft, so it tries again later.

Only speed depends on these decisions: verification emits exactly the tokens decoding would.
"""
from __future__ import annotations

import heapq
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from radixlm.runtime.speculative.draft_tree import DraftTree

# Relative cost of one more token in a decode-shaped step, per device (against the step's fixed
# weight-streaming cost). CPU: the default model's step grows ~20% per extra token at batch 1, one
# thread (benchmarks/speculative.py, a loaded shared machine: indicative); CUDA: an estimate for the
# 8B shape on an H200 (decode ~4.7 ms at batch 1, ~5.5 ms at 64), to be replaced by the GPU run.
BETA = {"cpu": 0.2, "cuda": 0.005}
PRIOR_RATE = 0.6
PRIOR_WEIGHT = 2.0
DECAY = 0.9  # per verify: recent steps count most
IDLE_DECAY = 0.97  # per step without drafts: drift back to the prior, so a request probes again


@dataclass
class Acceptance:
    """Decayed counts of draft tokens accepted and of draft positions tried (geometric: a verify of
    k drafts that accepts a < k tried a + 1 positions, one that accepts all tried k)."""

    accepted: float = 0.0
    tried: float = 0.0

    @property
    def rate(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)

    def record(self, drafted: int, accepted: int) -> None:
        self.accepted = self.accepted * DECAY + accepted
        self.tried = self.tried * DECAY + accepted + (1 if accepted < drafted else 0)

    def idle(self) -> None:
        self.accepted *= IDLE_DECAY
        self.tried *= IDLE_DECAY


def grant(proposed: list[int], rates: list[float], beta: float, limit: int | None = None) -> list[int]:
    """Draft tokens granted per row, given how many each row proposed and its acceptance rate.
    The most valuable next token first (ties: the lowest row), from a heap: O(tokens x log rows)
    (a scan over every row per granted token cost ~1.5 ms of host time at batch 64, k = 3); at most
    `limit` in all (row_regimes.py: the step must stay in its decode batch's kernel regime)."""
    granted = [0] * len(proposed)
    tokens, cost = float(len(proposed)), 1.0 + beta * len(proposed)
    # (-expected tokens added by the row's next draft token, row)
    heap = [(-r, i) for i, (n, r) in enumerate(zip(proposed, rates)) if n > 0]
    heapq.heapify(heap)
    total = 0
    while heap:
        neg_gain, best = heap[0]
        gain = -neg_gain
        if gain * cost <= beta * tokens or (limit is not None and total >= limit):
            break
        granted[best] += 1
        total += 1
        tokens += gain
        cost += beta
        if granted[best] < proposed[best]:
            heapq.heapreplace(heap, (-(gain * rates[best]), best))
        else:
            heapq.heappop(heap)
    return granted


BRANCH_SHARE = 0.5  # of the mass a rejected parent-chain position leaves, what one more branch is expected to catch


def grant_tree_nodes(trees: list[DraftTree], rates: list[float], beta: float, limit: int | None = None) -> list[int]:
    """Nodes granted per draft tree (a prefix of its node list). Each tree's first chain (its first
    nodes) is granted as `grant` grants chains; a row whose chain was granted whole then adds its
    branch nodes, in order, while each one's expected gain beats the step's average by the same rule:
    a branch node at depth d is reached with a^(d-1) and right where its first-chain sibling was not,
    (1 - a) x BRANCH_SHARE — worth little against a costly verify row (the CPU), nearly always worth
    it where a row costs almost nothing (the GPU at batch 1)."""
    chains = [len(t.first_chain()) for t in trees]
    granted = grant(chains, rates, beta, limit)
    total = sum(granted)
    tokens = len(trees) + sum(sum(r**i for i in range(1, n + 1)) for n, r in zip(granted, rates))
    cost = 1.0 + beta * (len(trees) + total)
    for i, (tree, rate) in enumerate(zip(trees, rates)):
        if granted[i] < chains[i] or len(tree) == chains[i]:
            continue
        depths = tree.depths()
        for node in range(chains[i], len(tree)):
            gain = rate ** (depths[node] - 1) * (1.0 - rate) * BRANCH_SHARE
            if gain * cost <= beta * tokens or (limit is not None and total >= limit):
                break
            granted[i] = node + 1
            total += 1
            tokens += gain
            cost += beta
    return granted


def worth_drafting(rates: list[float], beta: float) -> bool:
    """Whether any row's first draft token would pay at this batch size (before drafting anything)."""
    n = len(rates)
    return n > 0 and max(rates) * (1.0 + beta * n) > beta * n

"""The target's projected hidden states that the EAGLE-3 head has not been fed yet.

After every target forward the drafter keeps the step's projected aux hidden states. Handing them
to each request as they come costs per-row Python every step, also while nothing drafts (the
payoff chose k = 0): on the H200 at batch 64 that work grew with the output length (each request's
chunk list was scanned on every add) and made a k = 0 step 8.7 ms against a plain 6.7 ms decode
step. So a step is kept whole (`HiddenLog`: its requests, positions and one tensor, O(1) per
step) and only split per request (`Pending`) when a step drafts. The log is bounded: past
LOG_ROWS rows its oldest steps go, which leaves a gap in the head's KV (lower acceptance, never
a wrong output: drafts are verified).
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import torch

from radixlm.runtime.request import Req

MAX_PENDING = 2048  # projected hidden states kept per request that has not drafted (the oldest go first)
LOG_ROWS = 1 << 16  # rows of whole steps kept unsplit (~512 MB at hidden 4096, bf16)


@dataclass
class Pending:
    """Projected target hidden states of positions not yet fed: (first position, [n, hidden]) chunks
    in increasing, contiguous-within-a-chunk position order."""

    chunks: list[tuple[int, torch.Tensor]] = field(default_factory=list)
    total: int = 0  # rows in chunks

    def add(self, start: int, rows: torch.Tensor) -> None:
        self.drop_from(start)
        self.chunks.append((start, rows))
        self.total += int(rows.shape[0])
        while self.total > MAX_PENDING:
            first, r = self.chunks[0]
            cut = min(self.total - MAX_PENDING, int(r.shape[0]))
            self.total -= cut
            if cut == r.shape[0]:
                self.chunks.pop(0)
            else:
                self.chunks[0] = (first + cut, r[cut:].clone())  # let go of the step's whole tensor

    def drop_from(self, position: int) -> None:
        """Forget positions >= `position` (they are about to be computed again). Chunks are in
        position order: only the last ones can hold such positions."""
        while self.chunks:
            start, r = self.chunks[-1]
            n = int(r.shape[0])
            if start >= position:
                self.chunks.pop()
                self.total -= n
                continue
            if start + n > position:
                self.chunks[-1] = (start, r[: position - start])
                self.total -= start + n - position
            return

    def take(self, after: int, upto: int) -> tuple[list[int], torch.Tensor] | None:
        """Positions in (after, upto] that are kept and their hidden states, when `upto` is among
        them (else None); positions below `upto` are then forgotten (`upto` is fed again next time)."""
        positions: list[int] = []
        parts: list[torch.Tensor] = []
        for start, r in self.chunks:
            lo, hi = max(start, after + 1), min(start + int(r.shape[0]), upto + 1)
            if lo < hi:
                positions += range(lo, hi)
                parts.append(r[lo - start : hi - start])
        if not positions or positions[-1] != upto:
            return None
        hidden = torch.cat(parts) if len(parts) > 1 else parts[0]
        self.chunks = [(s, r) for s, r in self.chunks if s + r.shape[0] > upto]
        if self.chunks and self.chunks[0][0] < upto:
            s, r = self.chunks[0]
            self.chunks[0] = (upto, r[upto - s :])
        self.total = sum(int(r.shape[0]) for _, r in self.chunks)
        return positions, hidden


class HiddenLog:
    """Whole steps' projected hidden states in step order: (requests, first positions, token counts,
    [sum of counts, hidden]); split per request only when drafting needs them (`drain`)."""

    def __init__(self, max_rows: int = LOG_ROWS) -> None:
        self.max_rows = max_rows
        self.steps: deque[tuple[list[Req], list[int], list[int], torch.Tensor]] = deque()
        self.rows = 0
        self.keys: set[int] = set()  # requests with a step here (the log is let go once none is live)

    def add(self, reqs: list[Req], starts: list[int], lens: list[int], hidden: torch.Tensor) -> None:
        self.steps.append((list(reqs), list(starts), list(lens), hidden))
        self.keys.update(map(id, reqs))
        self.rows += int(hidden.shape[0])
        while self.rows > self.max_rows and len(self.steps) > 1:
            self.rows -= int(self.steps.popleft()[3].shape[0])

    def drain(self, pending: dict[int, Pending]) -> None:
        """Hand every kept step to its live requests' Pending, oldest first (a position computed
        again replaces what an older step kept of it)."""
        for reqs, starts, lens, hidden in self.steps:
            offset = 0
            for req, start, n in zip(reqs, starts, lens):
                if n and not req.finished:
                    pending.setdefault(id(req), Pending()).add(start, hidden[offset : offset + n])
                offset += n
        self.clear()

    def forget(self, key: int) -> None:
        """A request is done: once no request with a kept step is live, the steps go."""
        self.keys.discard(key)
        if not self.keys:
            self.clear()

    def clear(self) -> None:
        self.steps.clear()
        self.rows = 0
        self.keys.clear()

"""A step sampled on the device whose tokens the host appends a step later (overlap scheduling): the
pinned host copy of its tokens, the rows' forced rides, and each request's count of tokens on the device."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from radixlm.runtime.request import Req


@dataclass
class UncommittedStep:
    """A step sampled on the device whose tokens the host has not appended yet (overlap
    scheduling): each of its requests counts one token on the device until `take_tokens`.
    `prefill`: the step was a prompts-only extend step (its rows' first tokens), after which the
    next prefill may be scheduled before the commit (`step_order.can_schedule_before_commit`)."""

    reqs: list[Req]
    next_ids: torch.Tensor  # [B] device
    host_ids: torch.Tensor  # [B] host copy, valid once `event` completes
    event: torch.cuda.Event | None
    prefill: bool = False
    _ids: list[int] | None = field(default=None, repr=False)  # host_ids as a list, once read
    # Per row (None: no row has any): the grammar-forced tokens that follow its sampled token (known on
    # the host, appended with it; the next step computes their KV beside it: forced_rows.py), and whether
    # its sampled token is forced to be an end token (the row's last: the next step leaves it out).
    rides: list[list[int]] | None = None
    ends: list[bool] | None = None
    # the rows whose token is sampled at a state where a guess may start (forced_rows.GuessCandidates; None:
    # none), from which the next step's guesses are picked (forced_rows.plan_guesses)
    guess_candidates: Any = None

    @classmethod
    def start(cls, reqs: list[Req], next_ids: torch.Tensor, prefill: bool = False,
              rides: list[list[int]] | None = None, ends: list[bool] | None = None,
              guess_candidates: Any = None) -> "UncommittedStep":
        for i, req in enumerate(reqs):
            req.tokens_on_device += 1
            req.uncommitted_row = i
        if rides is not None:
            for req, ride in zip(reqs, rides):
                req.tokens_on_device += len(ride)
        if next_ids.is_cuda:
            host = torch.empty(next_ids.shape, dtype=next_ids.dtype, pin_memory=True)
            host.copy_(next_ids, non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            return cls(reqs, next_ids, host, event, prefill, rides=rides, ends=ends, guess_candidates=guess_candidates)
        return cls(reqs, next_ids, next_ids, None, prefill, rides=rides, ends=ends, guess_candidates=guess_candidates)

    def ride_of(self, req: Req) -> list[int]:
        """The forced tokens riding after `req`'s token in this step (req must be one of its rows)."""
        return self.rides[req.uncommitted_row] if self.rides is not None else []

    def ends_row(self, req: Req) -> bool:
        """`req`'s token in this step is forced to be an end token."""
        return self.ends is not None and self.ends[req.uncommitted_row]

    def _host_tokens(self) -> list[int]:
        """The host copy as a list, read once (the first call waits for it)."""
        if self._ids is None:
            if self.event is not None:
                self.event.synchronize()
            self._ids = self.host_ids.tolist()
        return self._ids

    def peek_tokens(self) -> tuple[list[Req], list[int]]:
        """`take_tokens` without taking them: the requests still count these tokens as on the device
        (a sampling launched meanwhile numbers its draws as if they were appended)."""
        ids = self._host_tokens()
        live = [i for i, req in enumerate(self.reqs) if not req.finished]
        return [self.reqs[i] for i in live], [ids[i] for i in live]

    def live_rides(self) -> list[list[int]] | None:
        """`rides` of the rows `peek_tokens` returns (None: no row has any)."""
        if self.rides is None:
            return None
        return [ride for req, ride in zip(self.reqs, self.rides) if not req.finished]

    def take_tokens(self) -> tuple[list[Req], list[int]]:
        """Wait for the host copy; the requests still live and their tokens (one finished meanwhile
        was computed past its end: its token is dropped). The rows' rides: `live_rides`, read first."""
        live_reqs, live_ids = [], []
        rides = self.rides
        for i, (req, tok) in enumerate(zip(self.reqs, self._host_tokens())):
            req.tokens_on_device -= 1 if rides is None else 1 + len(rides[i])
            if not req.finished:
                live_reqs.append(req)
                live_ids.append(tok)
        return live_reqs, live_ids

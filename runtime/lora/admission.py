"""The scheduler's rule for LoRA: a batch holds at most --max-loras-per-batch different adapters.

Every running request decodes in each decode step, so the adapters of the running (and partly
prefilled) requests plus those of a new prefill batch must fit the device slots together. A
waiting request whose adapter would not fit is skipped this step (requests of adapters already
in, and of the base model, still go ahead); it is admitted once a running adapter's requests end.
"""
from __future__ import annotations

from collections.abc import Iterable

from radixlm.runtime.request import Req


class SlotBudget:
    def __init__(self, limit: int, in_flight: Iterable[Req]) -> None:
        self.limit = limit
        self.adapters = {r.lora_name for r in in_flight if r.lora_name is not None}

    def admits(self, req: Req) -> bool:
        return req.lora_name is None or req.lora_name in self.adapters or len(self.adapters) < self.limit

    def add(self, req: Req) -> None:
        if req.lora_name is not None:
            self.adapters.add(req.lora_name)


def requests_using(adapter: str, queues: Iterable[Iterable[Req]]) -> int:
    """Requests (with their n > 1 followers) that name `adapter` in the given queues."""
    return sum(1 + len(r.followers) for queue in queues for r in queue if r.lora_name == adapter)

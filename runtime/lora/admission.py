"""The scheduler's rule for LoRA: which adapters hold the --max-loras-per-batch device slots.

Every running request decodes in each decode step, so the adapters of the running (and partly
prefilled) requests plus those of a new prefill batch must fit the device slots together. A slot
is free as soon as no request in flight uses its adapter. Free slots go by demand: the waiting
adapters with the most waiting rows first, so the batch holds as many rows as the slots allow
(first come would fill the slots with whatever adapters the queue starts with, ~rows/adapter each).
Demand alone could starve an adapter with few requests; each time a slot goes to another adapter
while one waits, the waiting one gains a point (`AdapterDemand`), so its score grows until it
wins (ties: the adapter whose request waited longest). Requests of the base model and of adapters
already in flight are never held back.
"""
from __future__ import annotations

from collections.abc import Iterable, Sequence

from radixlm.runtime.request import Req


class AdapterDemand:
    """Owned by the scheduler across steps: how often each waiting adapter was passed over for a slot."""

    def __init__(self) -> None:
        self.passed: dict[str, int] = {}

    def granted(self, adapter: str, waiting: Iterable[str]) -> None:
        self.passed.pop(adapter, None)
        for other in waiting:
            if other != adapter:
                self.passed[other] = self.passed.get(other, 0) + 1


class SlotBudget:
    """One prefill step's view: the adapters in flight, and which waiting adapters take the free slots."""

    def __init__(self, limit: int, in_flight: Iterable[Req], waiting: Sequence[Req], demand: AdapterDemand) -> None:
        self.limit = limit
        self.demand = demand
        self.adapters = {r.lora_name for r in in_flight if r.lora_name is not None}
        rows: dict[str, int] = {}
        first: dict[str, int] = {}
        for i, req in enumerate(waiting):
            name = req.lora_name
            if name is not None and name not in self.adapters:
                rows[name] = rows.get(name, 0) + 1 + len(req.followers)
                first.setdefault(name, i)
        for name in [n for n in demand.passed if n not in rows]:  # no longer waiting: no aging kept
            del demand.passed[name]
        self.waiting = list(rows)
        ranked = sorted(rows, key=lambda n: (-(rows[n] + demand.passed.get(n, 0)), first[n]))
        self.chosen = set(ranked[:max(limit - len(self.adapters), 0)])

    def admits(self, req: Req) -> bool:
        return req.lora_name is None or req.lora_name in self.adapters or req.lora_name in self.chosen

    def add(self, req: Req) -> None:
        name = req.lora_name
        if name is not None and name not in self.adapters:
            self.adapters.add(name)
            self.demand.granted(name, (n for n in self.waiting if n not in self.adapters))


def requests_using(adapter: str, queues: Iterable[Iterable[Req]]) -> int:
    """Requests (with their n > 1 followers) that name `adapter` in the given queues."""
    return sum(1 + len(r.followers) for queue in queues for r in queue if r.lora_name == adapter)

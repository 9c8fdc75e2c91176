"""The scheduler's rule for LoRA: which adapters hold the --max-loras-per-batch device slots.

Every running request decodes in each decode step, so the adapters of the running (and partly
prefilled) requests plus those of a new prefill batch must fit the device slots together. A slot
is free as soon as no request in flight uses its adapter. Requests of the base model and of
adapters already in flight always pass (no swap needed).

Free slots go to the waiting adapters with the longest tenure first: an adapter holds its slot until
its longest request ends, so the run's decode steps are a scheduling of those tenures on
--max-loras-per-batch machines, and longest first (LPT) leaves the short ones to even out the end.
Workload (b)'s 64 adapters on 8 slots (1,000 requests, each adapter's longest output 415-512) need
3,901 decode steps at least; their tenures in the order of most waiting rows (the rule before) end at
3,988, in queue order at 3,963, longest first at 3,912 (benchmarks/RESULTS.md, lora9). Among equal
tenures: the most waiting rows (a swap brings in as many as it can), then an adapter already in a
device slot (no copy needed), then the one whose request waited longest (first come among equals).

No adapter waits without bound. Each time a slot goes to another adapter while one waits, the
waiting one ranks `AGE_TOKENS` longer (`AdapterDemand.passed`), so an adapter with longer requests
passes it a bounded number of times. And when no
slot ever frees (the adapters in flight keep receiving requests), an adapter that has waited
`starve_after` admission rounds is starving: if every in-flight adapter has requests waiting that
came after it took its slot (otherwise a slot frees by itself once that adapter's requests of then
are done: an offline batch of many adapters never drains a slot), the one with the
fewest rows in flight is drained (its new requests are held back until its running ones finish),
and the freed slot goes to the starving adapters first.

While more adapters are wanted than slots, an adapter holds its slot until its longest request ends,
so its requests are admitted longest first (`longest_first`: by max_new_tokens, within groups of
`LONGEST_FIRST_GROUP` consecutive arrivals of that adapter, so a short request is passed by at most
that many later ones), and the adapter predicted to take the next free slot (`next_swap_in`) is
copied to the device ahead of time (`LoRAManager.prefetch`), while the batches run.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence

from radixlm.runtime.request import Req

STARVE_AFTER_ROUNDS = 200  # admission rounds (~scheduler steps) an adapter may wait before a slot is drained for it
LONGEST_FIRST_GROUP = 64  # slot-bound admission: a request is passed by at most this many later ones of its adapter
AGE_TOKENS = 64  # a waiting adapter's tenure ranks this many tokens longer per slot it was passed over for


class AdapterDemand:
    """Owned by the scheduler across steps: how often each waiting adapter was passed over for a
    slot, how many rounds it has waited, and the adapter being drained for a starving one."""

    def __init__(self, starve_after: int = STARVE_AFTER_ROUNDS) -> None:
        self.starve_after = starve_after
        self.passed: dict[str, int] = {}
        self.waited: dict[str, int] = {}
        self.draining: str | None = None
        self.arrived: Counter[str | None] = Counter()  # requests per adapter so far (`Req.lora_arrival`)
        # per adapter, its arrivals when it last took a slot: requests numbered from there came while it held it
        self.cohort: dict[str, int] = {}

    def stamp(self, req: Req) -> None:
        """Number a new request (and its n > 1 followers) among its adapter's arrivals."""
        for seq in (req, *req.followers):
            seq.lora_arrival = self.arrived[req.lora_name]
        self.arrived[req.lora_name] += 1

    def granted(self, adapter: str, waiting: Iterable[str]) -> None:
        self.cohort[adapter] = self.arrived[adapter]
        self.passed.pop(adapter, None)
        self.waited.pop(adapter, None)
        for other in waiting:
            if other != adapter:
                self.passed[other] = self.passed.get(other, 0) + 1


class SlotBudget:
    """One prefill step's view: the adapters in flight, and which waiting adapters take the free slots.
    `resident`: adapters sitting in a device slot now (taking a slot needs no copy)."""

    def __init__(self, limit: int, in_flight: Iterable[Req], waiting: Sequence[Req], demand: AdapterDemand,
                 resident: Iterable[str] = ()) -> None:
        self.limit = limit
        self.demand = demand
        flight_rows = Counter(r.lora_name for r in in_flight if r.lora_name is not None)
        self.adapters = set(flight_rows)
        rows: dict[str, int] = {}
        first: dict[str, int] = {}
        longest: dict[str, int] = {}  # the tenure a slot would give: its longest waiting request
        # adapters in flight with requests waiting that came after they took their slot (their slot may never
        # free); the rest of what they had waiting then (a chunked ramp, a batch's tail) drains by itself
        fed = set()
        for i, req in enumerate(waiting):
            name = req.lora_name
            if name is not None and name not in self.adapters:
                rows[name] = rows.get(name, 0) + 1 + len(req.followers)
                first.setdefault(name, i)
                longest[name] = max(longest.get(name, 0), req.params.max_new_tokens)
            elif name is not None and req.lora_arrival >= demand.cohort.get(name, 0):
                fed.add(name)
        for table in (demand.passed, demand.waited):
            for name in [n for n in table if n not in rows]:  # no longer waiting: no aging kept
                del table[name]
        for name in rows:
            demand.waited[name] = demand.waited.get(name, 0) + 1
        if demand.draining not in self.adapters:
            demand.draining = None  # drained: its slot is free now
        self.waiting = list(rows)
        starving = {n for n in rows if demand.waited[n] >= demand.starve_after}
        free = max(limit - len(self.adapters), 0)
        if starving and free == 0 and demand.draining is None and flight_rows and set(flight_rows) <= fed:
            # every slot's adapter still has requests waiting, so none may ever free by itself
            demand.draining = min(flight_rows, key=lambda n: (flight_rows[n], n))
        resident = set(resident)
        ranked = sorted(rows, key=lambda n: (n not in starving, -tenure(longest[n], demand, n), -rows[n],
                                             n not in resident, first[n]))
        self.chosen = set(ranked[:free])
        # more adapters wanted than slots: each decodes only while it holds one (admit longest first)
        self.bound = len(self.adapters) + len(rows) > limit

    def admits(self, req: Req) -> bool:
        name = req.lora_name
        if name is None:
            return True
        if name == self.demand.draining:
            return False
        return name in self.adapters or name in self.chosen

    def add(self, req: Req) -> None:
        name = req.lora_name
        if name is not None and name not in self.adapters:
            self.adapters.add(name)
            self.demand.granted(name, (n for n in self.waiting if n not in self.adapters))


class WaitingQueue(list):
    """The scheduler's waiting requests (a list, used as one), counting them per adapter as they
    come and go: `may_admit_any` runs every step (twice), and with 64 adapters ~1,000 requests wait,
    so it reads which adapters wait from these counts (O(adapters)) instead of the whole queue."""

    def __init__(self, reqs: Iterable[Req] = ()) -> None:
        super().__init__(reqs)
        self._recount()

    def _added(self, req: Req) -> None:
        self.per_adapter[req.lora_name] += 1
        self.lengths.setdefault(req.lora_name, Counter())[req.params.max_new_tokens] += 1

    def _dropped(self, req: Req) -> None:
        self.per_adapter[req.lora_name] -= 1
        if not self.per_adapter[req.lora_name]:
            del self.per_adapter[req.lora_name]
        lengths = self.lengths[req.lora_name]
        lengths[req.params.max_new_tokens] -= 1
        if not lengths[req.params.max_new_tokens]:
            del lengths[req.params.max_new_tokens]
            if not lengths:
                del self.lengths[req.lora_name]

    def _recount(self) -> None:
        self.per_adapter: Counter[str | None] = Counter()
        self.lengths: dict[str | None, Counter[int]] = {}  # per adapter, its waiting requests' max_new_tokens
        for req in self:
            self._added(req)

    def longest(self, name: str | None) -> int:
        """The most new tokens a waiting request of `name` may make (0: none waits)."""
        return max(self.lengths.get(name, ()), default=0)

    def append(self, req: Req) -> None:
        super().append(req)
        self._added(req)

    def insert(self, index, req: Req) -> None:  # type: ignore[override]
        super().insert(index, req)
        self._added(req)

    def remove(self, req: Req) -> None:
        super().remove(req)
        self._dropped(req)

    def pop(self, index=-1) -> Req:  # type: ignore[override]
        req = super().pop(index)
        self._dropped(req)
        return req

    def extend(self, reqs: Iterable[Req]) -> None:
        for req in reqs:
            self.append(req)

    def __iadd__(self, reqs: Iterable[Req]):  # type: ignore[override]
        self.extend(reqs)
        return self

    def clear(self) -> None:
        super().clear()
        self.per_adapter.clear()
        self.lengths.clear()

    def __setitem__(self, index, value) -> None:  # type: ignore[override]
        super().__setitem__(index, value)
        self._recount()

    def __delitem__(self, index) -> None:  # type: ignore[override]
        super().__delitem__(index)
        self._recount()


def may_admit_any(limit: int, in_flight: Iterable[Req], waiting: Iterable[Req], demand: AdapterDemand) -> bool:
    """Could `SlotBudget` admit any of `waiting` now, as far as slots go? (Conservative: True when unsure.)
    Runs every step; a `WaitingQueue` gives the waiting adapters from its counts, another iterable
    is read whole (one set, no per-row test)."""
    adapters = {r.lora_name for r in in_flight}
    adapters.discard(None)
    if len(adapters) < limit:
        return any(True for _ in waiting)
    counts = getattr(waiting, "per_adapter", None)
    wanted = set(counts) if counts is not None else {r.lora_name for r in waiting}
    return None in wanted or bool(wanted & adapters - {demand.draining})


def longest_first(reqs: Sequence[Req], remaining: dict[str, int] | None = None,
                  group: int = LONGEST_FIRST_GROUP) -> list[Req]:
    """Slot-bound admission order of the adapters' requests (base requests keep their places): first those
    that would end after every request their adapter has in flight, by how much (`remaining`: per adapter,
    the most new tokens one of its requests in flight still has to make), so that the request that sets how
    long its adapter holds its slot starts as early as possible, a newly granted adapter's longest among the
    first; the others, which end within that anyway, after them, in the order given. Only within groups of
    `group` consecutive arrivals of an adapter: a request is passed by at most `group` - 1 later ones of its
    adapter. (Sorted by length alone across adapters, a slot-granted adapter's short requests waited behind
    others' long ones for the token budget: a (b) replay starved one for 400 steps; sorted within each
    adapter only, new adapters' longest requests waited behind other adapters' ramps: 4,187 steps against
    the bound's 3,901.)"""
    remaining = remaining or {}
    places = [i for i, r in enumerate(reqs) if r.lora_name is not None]

    def key(i: int) -> tuple[int, int, int]:
        r = reqs[i]
        return r.lora_arrival // group, -max(r.params.max_new_tokens - remaining.get(r.lora_name, 0), 0), i

    out = list(reqs)
    for place, i in zip(places, sorted(places, key=key)):
        out[place] = reqs[i]
    return out


def next_swap_in(limit: int, in_flight: Iterable[Req], waiting: WaitingQueue, demand: AdapterDemand,
                 resident: Iterable[str]) -> str | None:
    """The adapter `SlotBudget` would give the next free slot (from the queue's per-adapter counts:
    O(adapters)), when every slot is held and it is not in one: the one worth copying to the device now."""
    resident = set(resident)
    if all(n is None or n in resident for n in waiting.per_adapter):
        return None  # nothing waits that needs a copy (base requests, adapters in slots): no pass over in_flight
    flight = {r.lora_name for r in in_flight}
    if len(flight - {None}) < limit:
        return None  # a slot is free: admission takes it this step
    names = [n for n in waiting.per_adapter if n is not None and n not in flight]
    if not names:
        return None
    starving = {n for n in names if demand.waited.get(n, 0) >= demand.starve_after}
    # as SlotBudget ranks them: starving ones first; the longest (aged) tenure, then most waiting requests, then
    # resident (no copy), then first in the queue
    pool = starving or set(names)
    top = max((tenure(waiting.longest(n), demand, n), waiting.per_adapter[n]) for n in pool)
    tied = {n for n in pool if (tenure(waiting.longest(n), demand, n), waiting.per_adapter[n]) == top}
    tied = (tied & resident) or tied
    name = next((r.lora_name for r in waiting if r.lora_name in tied), min(tied))
    return None if name in resident else name


def tenure(longest: int, demand: AdapterDemand, name: str) -> int:
    """A waiting adapter's rank: the slot tenure its longest waiting request sets, aged by the slots it missed."""
    return longest + AGE_TOKENS * demand.passed.get(name, 0)


def requests_using(adapter: str, queues: Iterable[Iterable[Req]]) -> int:
    """Requests (with their n > 1 followers) that name `adapter` in the given queues."""
    return sum(1 + len(r.followers) for queue in queues for r in queue if r.lora_name == adapter)


def slot_bound(limit: int, in_flight: Iterable[Req], waiting: Iterable[Req]) -> bool:
    """More adapters are wanted (in flight or waiting) than a batch may hold: requests then decode
    only while their adapter holds a slot, so decode steps, not prefill, bound the run."""
    wanted = {r.lora_name for r in in_flight if r.lora_name is not None}
    for r in waiting:
        if r.lora_name is not None and r.lora_name not in wanted:
            wanted.add(r.lora_name)
            if len(wanted) > limit:
                return True
    return len(wanted) > limit

"""More adapters than device slots: longest-first admission (bounded), and the next adapter copied to the
device ahead of its slot (`next_swap_in`, `LoRAManager.prefetch`), through the real scheduler."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.lora.admission import AdapterDemand, SlotBudget, WaitingQueue, longest_first, next_swap_in
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from tests.fixtures.lora_adapters import make_peft_adapter
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion

PROMPT = [5, 17, 33, 8, 90, 41, 7, 66, 12, 3, 150, 200, 31, 9, 44, 18, 72, 11, 60, 2, 80, 101, 13, 6] * 2


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    return model_dir, {f"a{i}": make_peft_adapter(model_dir, root / f"a{i}", seed=40 + i, r=4) for i in range(4)}


def _sched(model_dir: Path, adapters: dict[str, Path], **options):
    options.setdefault("cpu_threads", 1)
    return make_scheduler(model_dir, lora_paths=tuple(f"{n}={p}" for n, p in adapters.items()), **options)


def _req(rid: str, ids: list[int], lora: str | None, max_new: int):
    return dataclasses.replace(greedy_req(rid, ids, max_new), lora_path=lora)


def _reqs(*specs: tuple[str | None, int], demand: AdapterDemand | None = None) -> list[Req]:
    demand = demand or AdapterDemand()
    reqs = [Req(f"w{i}", [1, 2, 3], SamplingParams(max_new_tokens=m), 0, lora_name=n) for i, (n, m) in enumerate(specs)]
    for r in reqs:
        demand.stamp(r)
    return reqs


def test_longest_first_starts_what_would_extend_a_slot_first_and_passes_a_request_by_at_most_a_group() -> None:
    reqs = _reqs(("a", 10), ("b", 50), ("a", 30), ("a", 30), (None, 20), ("b", 60), (None, 90))
    # nothing in flight: the adapters' requests, in their places (0-3, 5), longest first; base ones stay put
    assert [r.rid for r in longest_first(reqs)] == ["w5", "w1", "w2", "w3", "w4", "w0", "w6"]
    # b has a request in flight with 55 tokens to go: w5 would hold b's slot 5 steps longer, w1 not at all
    assert [r.rid for r in longest_first(reqs, {"b": 55})] == ["w2", "w3", "w0", "w5", "w4", "w1", "w6"]
    # Groups of 2 arrivals per adapter: a's third request (w3) comes after a's first two whatever its length.
    assert [r.rid for r in longest_first(reqs, group=2)] == ["w5", "w1", "w2", "w0", "w4", "w3", "w6"]
    # A short request with a stream of long ones of its adapter behind it: at most group - 1 pass it.
    stream = _reqs(*[("a", 5)] + [("a", 100)] * 20)
    assert [r.rid for r in longest_first(stream, group=4)].index("w0") == 3


def test_next_swap_in_is_the_adapter_admission_would_pick_when_every_slot_is_held() -> None:
    demand = AdapterDemand()
    running = _reqs(("a", 8), ("b", 8))
    waiting = WaitingQueue(_reqs(("c", 8), ("d", 8), ("d", 8), ("a", 8), (None, 8)))
    assert next_swap_in(2, running, waiting, demand, resident={"a", "b"}) == "d", "most waiting requests"
    assert next_swap_in(3, running, waiting, demand, resident={"a", "b"}) is None, "a slot is free: admitted now"
    assert next_swap_in(2, running, waiting, demand, resident={"a", "b", "d"}) is None, "already on the device"
    demand.passed["c"] = 2  # passed over twice: it ranks first now, as in SlotBudget
    assert next_swap_in(2, running, waiting, demand, resident={"a", "b"}) == "c"
    demand.waited["c"], demand.passed["d"] = demand.starve_after, 10
    assert next_swap_in(2, running, waiting, demand, resident=set()) == "c", "a starving adapter first"
    assert next_swap_in(2, running, WaitingQueue(_reqs(("a", 8), (None, 8))), demand, set()) is None
    tied = WaitingQueue(_reqs(("z", 8), ("d", 8), ("d", 8), ("z", 8)))
    assert next_swap_in(2, running, tied, AdapterDemand(), set()) == "z", "a tie: whose request came first"
    assert next_swap_in(2, running, tied, AdapterDemand(), {"d"}) is None, "a tie: the resident one (no copy)"


    def untouched():
        raise AssertionError("the rows in flight are read: with 8 adapters on 8 slots that is every row, every step")
        yield

    in_slots = WaitingQueue(_reqs(("a", 8), (None, 8), ("b", 8)))
    assert next_swap_in(2, untouched(), in_slots, demand, resident={"a", "b"}) is None
    old = AdapterDemand()
    old.waited.update(z=old.starve_after, d=old.starve_after + 50)
    assert next_swap_in(2, running, tied, old, set()) == "z", "starving ones: whose request came first, as SlotBudget"


def test_a_slot_is_drained_only_for_requests_that_came_after_its_adapter_took_it() -> None:
    """Offline, 64 adapters wait thousands of rounds for 8 slots and all starve; an in-flight adapter whose
    waiting requests were already there when it took its slot (a chunked ramp) frees the slot by itself and
    is not drained (a drain would split its requests over two turns in a slot: more decode steps)."""
    demand = AdapterDemand(starve_after=1)
    a0, a1, a2, late = _reqs(("a", 8), ("a", 8), ("a", 8), ("late", 8), demand=demand)
    SlotBudget(1, [], [a0, a1, a2, late], demand).add(a0)
    for _ in range(3):
        SlotBudget(1, [a0], [a1, a2, late], demand)
    assert demand.waited["late"] >= 1 and demand.draining is None, "a's waiting requests are its own ramp"
    (fresh,) = _reqs(("a", 8), demand=demand)
    SlotBudget(1, [a0], [a1, a2, late, fresh], demand)
    assert demand.draining == "a", "a keeps receiving requests: drained for the starving adapter"


def _recorded(sched):
    """Wrap the pool's copies and the forward (the real ones run) to log, per forward, the adapters it used,
    and the copies issued (a forward's swaps come after it: its setup issues them): ("stage", name) into
    the staging row, ("slot", source) into a slot; and the requests in the order they are admitted."""
    log: list[tuple[str, object]] = []
    admitted: list[str] = []
    lora = sched.runner.lora
    stage, write, forward = lora.pool.stage, lora.pool.write, sched.runner.forward

    def staging(packed):
        log.append(("stage", next(n for n, e in lora.adapters.items() if e.host is packed)))
        return stage(packed)

    def writing(slot, packed, after=None):
        log.append(("slot", "staged" if packed is None else "host"))
        return write(slot, packed, after)

    def forwarding(batch):
        log.append(("forward", (batch.mode, frozenset(n for n in batch.lora_names or [] if n))))
        return forward(batch)

    admit = sched._admit

    def admitting(req, prefix, ext):
        admitted.append(req.rid)
        return admit(req, prefix, ext)

    lora.pool.stage, lora.pool.write, sched.runner.forward, sched._admit = staging, writing, forwarding, admitting
    return log, admitted


def test_slot_bound_run_copies_the_next_adapter_ahead_and_admits_longest_first(setup) -> None:
    """4 adapters, 2 slots: a1 and a3 wait while a0 and a2 decode; each is copied to the device while
    forwards of other adapters run (a stage copy, then forwards without it, then its slot filled from the
    staged copy), and each adapter's requests are admitted longest first while more adapters are wanted than
slots. Outputs equal each alone."""
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=2)
    specs = [("a0", 6), ("a0", 20), ("a2", 18), ("a1", 5), ("a1", 16), ("a3", 4), ("a3", 12), ("a2", 3), (None, 7)]
    reqs = [_req(f"s{i}", PROMPT[i:i + 14], n, m) for i, (n, m) in enumerate(specs)]
    log, admitted = _recorded(sched)
    results = run_to_completion(sched, reqs)
    lora = sched.runner.lora
    assert lora.swaps_staged >= 2 and lora.swaps == 4, lora.info()
    for name in ("a1", "a3"):
        staged_at = log.index(("stage", name))
        used_at = next(i for i, (kind, what) in enumerate(log) if kind == "forward" and name in what[1])
        assert any(kind == "forward" for kind, _ in log[staged_at + 1:used_at]), f"{name}: staged, then other forwards"
        assert log[used_at + 1] == ("slot", "staged"), f"{name}: its forward fills its slot from the staged copy"
    for name in ("a0", "a1", "a2", "a3"):
        order = [r for r in admitted if reqs[int(r[1:])].lora_path == name]
        news = [reqs[int(r[1:])].params.max_new_tokens for r in order]
        # a3 comes last, when the adapters wanted fit the slots again: first come, first admitted
        assert news == sorted(news, reverse=name != "a3"), (name, order)
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert_pool_idle(sched)


def test_adapters_within_the_slots_keep_arrival_order_and_stage_nothing(setup) -> None:
    """As many adapters as slots (and base requests): no staging row, no copy ahead, first come first
    admitted, as before: the new rules cost the unbound rows (8 adapters on 8 slots, base) nothing."""
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=4)
    specs = [("a0", 3), ("a1", 9), ("a0", 12), (None, 10), ("a3", 2), ("a2", 8)]
    reqs = [_req(f"u{i}", PROMPT[i:i + 10], n, m) for i, (n, m) in enumerate(specs)]
    log, admitted = _recorded(sched)
    results = run_to_completion(sched, reqs)
    assert admitted == [r.rid for r in reqs]
    first = next(what for kind, what in log if kind == "forward")
    assert first[0] is ForwardMode.EXTEND and first[1] == {"a0", "a1", "a2", "a3"}
    assert sched.runner.lora.pool.staging is None and not any(kind == "stage" for kind, _ in log)
    assert sorted(results) == sorted(r.rid for r in reqs)
    assert_pool_idle(sched)


def test_a_prefill_without_the_decode_rows_never_takes_the_slot_of_an_adapter_in_flight(setup) -> None:
    """2 slots: a0 decodes long, a1 ends, then a2's long prompt prefills alone (no decode rows in that
    forward). Its swap takes a1's slot, not a0's (both last used by the same decode step), so a0 is
    not copied in again for the next decode step: 3 swaps for 3 adapters."""
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=2)
    reqs = [_req("k0", PROMPT[:12], "a0", 24), _req("k1", PROMPT[3:15], "a1", 3), _req("k2", PROMPT * 7, "a2", 2)]
    log, _ = _recorded(sched)
    results = run_to_completion(sched, reqs)
    alone_prefill = [what for kind, what in log if kind == "forward" and what == (ForwardMode.EXTEND, {"a2"})]
    assert alone_prefill, "a2's prompt prefills in a forward of its own"
    assert sched.runner.lora.swaps == 3, sched.runner.lora.info()
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert_pool_idle(sched)


def test_free_slots_go_longest_tenure_first_aged_by_the_slots_missed() -> None:
    """The free slot goes to the adapter whose longest request would hold it longest (LPT: the short tenures
    are left to even out the end), not to the first in the queue nor the one with most rows, starving or not
    (starving ones first); each slot an adapter is passed over for ranks it AGE_TOKENS longer, so a later,
    longer one passes it a bounded number of times. `next_swap_in` names the same adapter."""
    demand = AdapterDemand(starve_after=1)
    running = _reqs(("x", 8))
    waiting = _reqs(("a", 100), ("b", 300), ("a", 50), ("c", 200), ("b", 20), ("c", 250))
    demand.waited.update(a=5, b=5, c=5)
    assert SlotBudget(2, running, waiting, demand).chosen == {"b"}, "b's 300 tokens: the longest tenure"
    queue = WaitingQueue(waiting)
    assert next_swap_in(1, running, queue, demand, resident=set()) == "b"
    assert SlotBudget(3, running, waiting, demand).chosen == {"b", "c"}
    # not starving: the same order; a starving adapter goes first whatever its tenure
    fresh = AdapterDemand()
    assert SlotBudget(2, running, waiting, fresh).chosen == {"b"}
    assert next_swap_in(1, running, queue, fresh, resident=set()) == "b"
    fresh.waited["a"] = fresh.starve_after
    assert SlotBudget(2, running, waiting, fresh).chosen == {"a"}
    # equal tenures: the most waiting rows
    assert SlotBudget(2, running, _reqs(("d", 300), ("b", 300), ("b", 10)), AdapterDemand()).chosen == {"b"}
    # aged: a was passed over 4 times (100 + 4 x 64 = 356 > 300): a ranks first now
    demand.passed["a"] = 4
    assert SlotBudget(2, running, waiting, demand).chosen == {"a"}
    assert next_swap_in(1, running, queue, demand, resident=set()) == "a"
    # a tie: the resident one (no copy), then the first in the queue
    demand.passed["a"] = 0
    tied = _reqs(("d", 300), ("b", 300))
    demand.waited["d"] = 5
    assert SlotBudget(2, running, tied, demand).chosen == {"d"}
    assert SlotBudget(2, running, tied, demand, resident={"b"}).chosen == {"b"}
    assert next_swap_in(1, running, WaitingQueue(tied), demand, resident={"x"}) == "d"
    assert next_swap_in(1, running, WaitingQueue(tied), demand, resident={"x", "b"}) is None, "b is on the device"


def test_waiting_queue_keeps_each_adapters_longest_request_through_every_change() -> None:
    reqs = _reqs(("a", 10), ("a", 40), ("b", 7), (None, 99), ("a", 40))
    queue = WaitingQueue(reqs[:2])
    queue.extend(reqs[2:])
    assert (queue.longest("a"), queue.longest("b"), queue.longest(None), queue.longest("z")) == (40, 7, 99, 0)
    queue.remove(reqs[1])
    assert queue.longest("a") == 40, "another request of 40 still waits"
    queue.remove(reqs[4])
    assert queue.longest("a") == 10
    queue.pop(0)
    assert queue.longest("a") == 0 and "a" not in queue.lengths
    queue[0] = reqs[1]
    assert queue.longest("a") == 40 and queue.longest("b") == 0
    queue.clear()
    assert not queue.lengths


def test_an_offline_batch_of_more_adapters_than_slots_gives_later_slots_longest_tenure_first(setup) -> None:
    """4 adapters on 1 slot, all starving from the first round (starve_after 1): the slot goes to the adapters
    longest request first (a2's 9 tokens, a0's 6, a3's 4, a1's 3), not in queue order (a0, a1, a3, a2),
    through the real scheduler; outputs equal each alone."""
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=1)
    sched.adapter_demand.starve_after = 1
    specs = [("a0", 6), ("a1", 3), ("a3", 4), ("a2", 9), ("a1", 2)]
    reqs = [_req(f"t{i}", PROMPT[i:i + 12], n, m) for i, (n, m) in enumerate(specs)]
    log, admitted = _recorded(sched)
    results = run_to_completion(sched, reqs)
    used = []
    for kind, what in log:
        if kind == "forward":
            for name in sorted(what[1]):
                if name not in used:
                    used.append(name)
    assert used == ["a2", "a0", "a3", "a1"], used
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert_pool_idle(sched)

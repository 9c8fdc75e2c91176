"""LoRA through the scheduler: mixed batches, device-slot and host-memory eviction, the prefix cache
per adapter, loading and unloading while requests run, unknown adapters."""
from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from radixlm.runtime import step_order
from radixlm.runtime.io_struct import ControlReq
from radixlm.runtime.lora.admission import AdapterDemand, SlotBudget, WaitingQueue, may_admit_any
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from tests.fixtures.lora_adapters import make_peft_adapter
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory) -> tuple[Path, dict[str, Path]]:
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    adapters = {f"a{i}": make_peft_adapter(model_dir, root / f"a{i}", seed=20 + i, r=4 * (1 + i % 2)) for i in range(5)}
    return model_dir, adapters


def _sched(model_dir: Path, adapters: dict[str, Path], **options):
    paths = tuple(f"{n}={p}" for n, p in adapters.items())
    options.setdefault("cpu_threads", 1)
    return make_scheduler(model_dir, lora_paths=paths, **options)


def _req(rid: str, ids: list[int], lora: str | None, max_new: int = 6):
    return dataclasses.replace(greedy_req(rid, ids, max_new), lora_path=lora)


PROMPT = [5, 17, 33, 8, 90, 41, 7, 66, 12, 3, 150, 200, 31, 9, 44, 18, 72, 11, 60, 2, 80, 101, 13, 6] * 2


def test_mixed_batch_equals_each_request_alone_and_evicts_beyond_limits(setup) -> None:
    model_dir, adapters = setup
    names = [None, "a0", "a1", "a2", "a3", "a4", "a0", None]
    reqs = [_req(f"r{i}", PROMPT[i:i + 20], n) for i, n in enumerate(names)]
    # 5 adapters, 2 device slots and host room for 2: admission holds requests back, slots and host
    # copies are evicted and read again from their folders.
    sched = _sched(model_dir, adapters, max_loras_per_batch=2, max_loaded_loras=2, lora_eviction_policy="fifo")
    mixed = run_to_completion(sched, reqs)
    info = sched.info()["lora"]
    assert len(info["in_host_memory"]) == 2 and sorted(info["adapters"]) == sorted(adapters)
    assert_pool_idle(sched)
    alone_sched = _sched(model_dir, adapters, disable_radix_cache=True)
    outs = {}
    for r in reqs:
        outs.update(run_to_completion(alone_sched, [r]))
    for r in reqs:
        assert mixed[r.rid]["output_ids"] == outs[r.rid]["output_ids"], r.rid
    base = outs["r0"]["output_ids"]
    plain = run_to_completion(alone_sched, [_req("p", PROMPT[1:21], None)])["p"]["output_ids"]
    assert plain != outs["r1"]["output_ids"] or base != outs["r1"]["output_ids"], "adapters must change outputs"


def test_prefix_cache_is_per_adapter(setup) -> None:
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters)
    first = run_to_completion(sched, [_req("x1", PROMPT, "a0")])["x1"]
    again = run_to_completion(sched, [_req("x2", PROMPT, "a0")])["x2"]
    other = run_to_completion(sched, [_req("x3", PROMPT, "a1")])["x3"]
    base = run_to_completion(sched, [_req("x4", PROMPT, None)])["x4"]
    assert first["cached_tokens"] == 0 and again["cached_tokens"] >= len(PROMPT) - 1
    assert other["cached_tokens"] == 0 and base["cached_tokens"] == 0
    assert again["output_ids"] == first["output_ids"]
    fresh = run_to_completion(_sched(model_dir, adapters), [_req("y", PROMPT, "a1")])["y"]
    assert other["output_ids"] == fresh["output_ids"]


def test_load_and_unload_while_serving(setup, tmp_path) -> None:
    model_dir, adapters = setup
    sched = _sched(model_dir, {"a0": adapters["a0"]}, max_lora_rank=8)
    resp = sched.handle(ControlReq("load_lora_adapter", 1, {"lora_name": "new", "lora_path": str(adapters["a3"])}))
    assert resp.ok and "new" in resp.payload["loaded_adapters"]
    bad = sched.handle(ControlReq("load_lora_adapter", 2, {"lora_name": "bad", "lora_path": str(tmp_path)}))
    assert not bad.ok and "no adapter_config.json" in bad.payload["message"]
    sched.handle(_req("long", PROMPT[:10], "new", max_new=30))
    for _ in range(3):
        sched.step()
    busy = sched.handle(ControlReq("unload_lora_adapter", 3, {"lora_name": "new"}))
    assert not busy.ok and busy.payload["status"] == 409 and "1 request(s)" in busy.payload["message"]
    results: dict = {}
    while not sched.idle:
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
    assert len(results["long"]["output_ids"]) == 30
    done = sched.handle(ControlReq("unload_lora_adapter", 4, {"lora_name": "new"}))
    assert done.ok and "new" not in done.payload["loaded_adapters"]
    late = run_to_completion(sched, [_req("late", PROMPT[:10], "new")])["late"]
    assert late["finished_reason"]["status_code"] == 400 and "'new'" in late["finished_reason"]["message"]
    # The same name again, from another folder: a new cache namespace, so no stale prefix is reused.
    assert sched.handle(ControlReq("load_lora_adapter", 5, {"lora_name": "new", "lora_path": str(adapters["a1"])})).ok
    again = run_to_completion(sched, [_req("again", PROMPT[:10], "new")])["again"]
    assert again["cached_tokens"] == 0
    assert_pool_idle(sched)


def _waiting(*names: str | None) -> list[Req]:
    return [Req(f"w{i}", [1, 2, 3], SamplingParams(), 0, lora_name=n) for i, n in enumerate(names)]


def test_free_slots_go_to_the_most_demanded_adapters_and_none_starves() -> None:
    demand = AdapterDemand()
    running = _waiting("a0")
    # 3 slots, a0 in flight, requests of one length (equal tenures): the 2 free ones go to the adapters with
    # most waiting rows (not to the first in the queue); base rows and a0's own requests always pass.
    waiting = _waiting("x", None, "b", "c", "b", "c", "b", "a0", "c")
    budget = SlotBudget(3, running, waiting, demand)
    assert budget.chosen == {"b", "c"}
    assert [budget.admits(r) for r in waiting] == [False, True, True, True, True, True, True, True, True]
    for r in waiting[2:4]:
        budget.add(r)
    assert demand.passed == {"x": 2}, "x waited while two slots went to others"
    # One slot; x (1 request, oldest) against a busy adapter with 3 waiting each round, all of one length: x
    # ranks AGE_TOKENS longer per slot it misses and wins the second round (one missed slot outranks more rows).
    demand = AdapterDemand()
    rounds = []
    for _ in range(5):
        waiting = _waiting("x", "busy", "busy", "busy")
        budget = SlotBudget(1, [], waiting, demand)
        rounds.append(sorted(budget.chosen)[0])
        budget.add(next(r for r in waiting if r.lora_name == rounds[-1]))
        if rounds[-1] == "x":
            break
    assert rounds == ["busy", "x"], rounds
    assert "x" not in demand.passed and demand.passed == {"busy": 1}
    SlotBudget(1, [], _waiting(None), demand)
    assert demand.passed == {}, "adapters no longer waiting keep no aging"


def test_admission_by_demand_through_the_scheduler(setup) -> None:
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=2)
    # a0 is first in the queue with one request; a1 and a2 have three each: they take the 2 slots.
    names = ["a0", "a1", "a2", "a1", "a2", "a1", "a2", None]
    reqs = [_req(f"q{i}", PROMPT[i:i + 12], n, max_new=4) for i, n in enumerate(names)]
    for r in reqs:
        sched.handle(r)
    sched.step()
    admitted = {r.lora_name for r in [*sched.running, *sched.partial]}
    assert admitted == {"a1", "a2", None}, admitted
    results: dict = {}
    while not sched.idle:
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
    assert sorted(results) == sorted(r.rid for r in reqs) and all(len(v["output_ids"]) == 4 for v in results.values())
    assert_pool_idle(sched)


def test_ties_go_to_the_resident_adapter_then_first_come() -> None:
    waiting = _waiting("b", "c", "d", "c", "d", "b")
    # Two free slots; b, c and d have two rows each: d sits in a device slot (no copy), so it wins
    # the tie; then b, whose request came first.
    budget = SlotBudget(2, [], waiting, AdapterDemand(), resident={"d", "x"})
    assert budget.chosen == {"d", "b"}
    # No residency: first come among equals.
    assert SlotBudget(2, [], waiting, AdapterDemand()).chosen == {"b", "c"}


def test_a_starving_adapter_gets_a_drained_slot_within_the_bound() -> None:
    """Two slots held by adapters that keep receiving requests: no slot ever frees by itself. After
    `starve_after` rounds the in-flight adapter with fewest rows stops taking new requests; once its
    running ones finish, its slot goes to the starving adapter, and the drained one waits its turn."""
    demand = AdapterDemand(starve_after=3)
    running = _waiting("busy", "busy", "busy", "small")
    waiting_for, draining = {}, {}
    for round_ in range(1, 10):
        waiting = _waiting("late", "busy", "small")
        budget = SlotBudget(2, running, waiting, demand)
        waiting_for[round_] = [r.lora_name for r in waiting if budget.admits(r)]
        draining[round_] = demand.draining
        if "late" in waiting_for[round_]:
            break
        if demand.draining == "small" and round_ == 5:
            running = [r for r in running if r.lora_name != "small"]  # its requests finished
    assert waiting_for[1] == waiting_for[2] == ["busy", "small"], "in-flight adapters pass; late waits"
    assert draining[3] == draining[5] == "small" and waiting_for[3] == ["busy"], "drained from the bound on"
    assert waiting_for[6] == ["late", "busy"] and draining[6] is None, "the freed slot goes to late"
    assert max(waiting_for) == 6
    # An in-flight adapter with nothing waiting frees its slot by itself: no drain for that.
    quiet = AdapterDemand(starve_after=1)
    SlotBudget(2, _waiting("busy", "done"), _waiting("late", "busy"), quiet)
    assert quiet.draining is None and quiet.waited == {"late": 1}
    budget = SlotBudget(2, running, _waiting("late", "small"), demand)
    budget.add(_waiting("late")[0])
    assert "late" not in demand.waited and demand.waited == {"small": 2}, "small waits from round 6 on"


@pytest.mark.parametrize("queue", [list, WaitingQueue])
def test_may_admit_any_is_false_only_when_every_waiting_request_needs_a_slot_that_is_taken(queue) -> None:
    demand = AdapterDemand()
    running = _waiting("a", "b")

    def waiting(*names):
        return queue(_waiting(*names))

    assert not may_admit_any(2, running, waiting("c", "d"), demand)
    assert may_admit_any(2, running, waiting("c", None), demand), "base requests always pass"
    assert may_admit_any(2, running, waiting("c", "a"), demand), "an adapter in flight passes"
    assert may_admit_any(3, running, waiting("c"), demand), "a free slot"
    assert not may_admit_any(3, running, waiting(), demand), "nothing waits"
    demand.draining = "a"
    assert not may_admit_any(2, running, waiting("c", "a"), demand), "a drained adapter waits"


def test_waiting_queue_counts_requests_per_adapter_through_every_change() -> None:
    """The counts `may_admit_any` reads instead of the queue follow each way the scheduler changes it."""
    reqs = _waiting("a", "b", None, "a", "c")
    queue = WaitingQueue()
    for r in reqs[:3]:
        queue.append(r)
    queue.insert(0, reqs[3])
    queue.extend(reqs[4:])
    assert queue.per_adapter == {"a": 2, "b": 1, None: 1, "c": 1} and list(queue) == [reqs[3], *reqs[:3], reqs[4]]
    queue.remove(reqs[0])
    assert queue.pop() is reqs[4] and queue.per_adapter == {"a": 1, "b": 1, None: 1}, "emptied adapters leave"
    del queue[0]
    queue[0] = reqs[4]
    assert queue.per_adapter == {"c": 1, None: 1} and list(queue) == [reqs[4], reqs[2]]
    queue.clear()
    assert not queue.per_adapter and not queue


def test_decode_runs_ahead_of_the_commit_while_waiting_requests_cannot_get_a_slot(setup) -> None:
    """Overlap scheduling stays on when every waiting request's adapter is kept out by the slots
    (with many adapters that is most of the time); outputs stay those of each request alone."""
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=1, enable_overlap_schedule_on_cpu=True)
    reqs = [_req("o0", PROMPT[:12], "a0", max_new=8), _req("o1", PROMPT[2:14], "a1", max_new=3)]
    for r in reqs:
        sched.handle(r)
    ahead = []
    results: dict = {}
    while not sched.idle:
        if sched.uncommitted is not None:
            ahead.append(sched._can_schedule_before_commit())
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
    assert ahead and ahead[0] and any(ahead), "a1 waits for a0's slot: decode steps overlap meanwhile"
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"]
    assert_pool_idle(sched)


def test_through_the_scheduler_a_stream_for_one_adapter_does_not_starve_another(setup) -> None:
    """One device slot, a new request for `busy` every step (so its slot never frees by itself) and
    one request for `late`: with the bound at 4 rounds, `late` gets the slot and finishes while busy's
    stream goes on, and every output equals the request alone."""
    model_dir, adapters = setup
    sched = _sched(model_dir, {"busy": adapters["a0"], "late": adapters["a1"]}, max_loras_per_batch=1)
    sched.adapter_demand = AdapterDemand(starve_after=4)
    reqs = [_req("b0", PROMPT[:10], "busy", max_new=6)]
    sched.handle(reqs[0])
    sched.step()
    late = _req("late", PROMPT[3:13], "late", max_new=3)
    sched.handle(late)
    reqs.append(late)
    results: dict = {}
    late_done_at = None
    for step in range(1, 60):
        if late_done_at is None:
            nxt = _req(f"b{step}", PROMPT[step % 7:step % 7 + 10], "busy", max_new=6)
            sched.handle(nxt)
            reqs.append(nxt)
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
        if late_done_at is None and results.get("late", {}).get("finished_reason"):
            late_done_at = step
    while not sched.idle:
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
    assert late_done_at is not None and late_done_at < 30, late_done_at
    alone = _sched(model_dir, {"busy": adapters["a0"], "late": adapters["a1"]}, disable_radix_cache=True)
    for r in (reqs[0], late, reqs[-1]):
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert len(results) == len(reqs)
    assert_pool_idle(sched)


def test_slot_bound_prefill_goes_in_small_chunks_carrying_the_decode_rows(setup) -> None:
    """More adapters wanted than slots: prefill chunks of at most --lora-prefill-chunk tokens, each
    with the running requests' decode rows in the same forward; outputs equal each request alone."""
    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.lora.admission import slot_bound

    assert slot_bound(2, _waiting("a"), _waiting("a", "b", None)) is False
    assert slot_bound(2, _waiting("a"), _waiting("b", "c")) is True
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=2, lora_prefill_chunk=16)
    names = ["a0", "a1", "a2", "a3", "a0", "a4"]
    # slots go longest tenure first: a0 and a1, then a2 while a0 decodes, a3 while a2 does, a4 once they fit
    lengths = [15, 9, 8, 7, 5, 6]
    reqs = [_req(f"c{i}", (PROMPT * 2)[i:i + 40], n, max_new=m) for i, (n, m) in enumerate(zip(names, lengths))]
    seen: list[tuple[int, int, bool]] = []  # (prefill tokens, decode rows, slot-bound) of each forward with prefill
    forward = sched.runner.forward

    def recording(batch):
        if batch.mode is ForwardMode.EXTEND:
            lens = batch.extend_seq_lens_cpu
            decode_rows = sum(1 for n in lens if n == 1)
            seen.append((sum(lens) - decode_rows, decode_rows, step_order.lora_slot_bound(sched)))
        return forward(batch)

    sched.runner.forward = recording
    results = run_to_completion(sched, reqs)
    assert seen[0][0] > 16, "nothing runs yet: the first prefill is not held to the small chunk"
    bound = [(p, d) for p, d, b in seen[1:] if b]
    assert len(bound) >= 4 and all(p <= 16 and d > 0 for p, d in bound), seen
    assert any(p > 16 for p, _, b in seen[1:] if not b), "once the adapters fit the slots: whole prefills again"
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert_pool_idle(sched)


def test_steps_that_can_admit_nothing_skip_the_slot_budget(setup, monkeypatch) -> None:
    """With every slot held and only other adapters waiting, a step builds no SlotBudget (a pass
    over the whole queue, ~1 ms of host time a step with 1,000 requests); outputs are unchanged."""
    from radixlm.runtime import prefill_admission

    built = []
    real = prefill_admission.SlotBudget

    def counting(*args, **kwargs):
        built.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(prefill_admission, "SlotBudget", counting)
    model_dir, adapters = setup
    sched = _sched(model_dir, adapters, max_loras_per_batch=1)
    reqs = [_req(f"k{i}", PROMPT[i:i + 10], f"a{i % 3}", max_new=12) for i in range(3)]
    results = run_to_completion(sched, reqs)
    steps = sched.stats["forward_steps"]
    assert steps >= 30 and len(built) <= 8, (steps, len(built))
    alone = _sched(model_dir, adapters, disable_radix_cache=True)
    for r in reqs:
        assert results[r.rid]["output_ids"] == run_to_completion(alone, [r])[r.rid]["output_ids"], r.rid
    assert_pool_idle(sched)

"""Overlap scheduling (device samples step k+1 before the host commits step k) changes nothing
in the outputs: greedy and seeded sampling, stop tokens, retraction under a tiny pool."""
from __future__ import annotations

import random

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion


def _workload() -> list[TokenizedGenerateReq]:
    rng = random.Random(0)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 100))] for _ in range(20)]
    reqs = [greedy_req(f"g{i}", p, [5, 9, 17, 30][i % 4]) for i, p in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
        temperature=0.9, top_p=0.9, max_new_tokens=12, seed=i, stop_token_ids=(7,))) for i, p in enumerate(prompts[:6])]
    return reqs


def test_overlap_schedule_gives_identical_outputs(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    plain = make_scheduler(model_dir, chunked_prefill_size=32)
    expected = run_to_completion(plain, _workload())
    for pool in (4096, 300):
        overlapped = make_scheduler(model_dir, chunked_prefill_size=32, max_total_tokens=pool,
                                    enable_overlap_schedule_on_cpu=True)
        assert overlapped.overlap
        got = run_to_completion(overlapped, _workload())
        for rid, res in expected.items():
            assert got[rid]["output_ids"] == res["output_ids"], rid
            assert got[rid]["finished_reason"] == res["finished_reason"], rid
        if pool == 300:
            assert overlapped.stats["retractions"] > 0
        assert_pool_idle(overlapped)


def test_decode_overlaps_while_requests_wait_for_room(tiny_model_dir) -> None:
    """Requests queued behind a full batch must not stop the overlap: the pending decode step is
    committed only when a prefill is launched (or KV is short), and outputs stay identical."""
    model_dir = tiny_model_dir("llama")
    expected = run_to_completion(make_scheduler(model_dir, max_running_requests=4), _workload())
    sched = make_scheduler(model_dir, max_running_requests=4, enable_overlap_schedule_on_cpu=True)
    for r in _workload():
        sched.handle(r)
    overlapped_with_waiting = 0
    forward = sched.runner.forward

    def counting_forward(batch):  # launched while the previous step is still uncommitted?
        nonlocal overlapped_with_waiting
        overlapped_with_waiting += sched.inflight is not None and bool(sched.waiting)
        return forward(batch)

    sched.runner.forward = counting_forward
    results: dict[str, dict] = {}
    while not sched.idle:
        sched.step()
        for out in sched.pop_outputs():
            merge(results, out)
    assert overlapped_with_waiting > 10
    for rid, res in expected.items():
        assert results[rid]["output_ids"] == res["output_ids"], rid
        assert results[rid]["finished_reason"] == res["finished_reason"], rid
    assert_pool_idle(sched)

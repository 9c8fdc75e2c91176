"""Mixed batches: running requests' decode rows ride along in a prefill's forward pass (always for
small extensions, for every chunk with enable_mixed_chunk). Outputs must not change."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


def _workload() -> list[TokenizedGenerateReq]:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 300) for _ in range(rng.randint(1, 120))] for _ in range(16)]
    reqs = [greedy_req(f"g{i}", p, rng.randint(1, 24)) for i, p in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
        temperature=0.8, max_new_tokens=10, seed=i)) for i, p in enumerate(prompts[:5])]
    return reqs


def _count_mixed(sched) -> list[int]:
    """Counts forward passes that carried both extension rows and decode rows."""
    counter = [0]
    forward = sched.runner.forward

    def counting(batch):
        if batch.mode is ForwardMode.EXTEND and 1 in batch.extend_seq_lens_cpu and max(batch.extend_seq_lens_cpu) > 1:
            counter[0] += 1
        return forward(batch)

    sched.runner.forward = counting
    return counter


@pytest.mark.parametrize("overlap", [False, True])
def test_mixed_chunks_change_no_output(tiny_model_dir, overlap: bool) -> None:
    model_dir = tiny_model_dir("llama")
    options = dict(chunked_prefill_size=24, max_running_requests=6, max_total_tokens=2048,
                   enable_overlap_schedule_on_cpu=overlap)
    expected = run_to_completion(make_scheduler(model_dir, **options), _workload())
    sched = make_scheduler(model_dir, enable_mixed_chunk=True, **options)
    mixed = _count_mixed(sched)
    got = run_to_completion(sched, _workload())
    assert mixed[0] > 5
    # the scheduler's own count of forward steps by kind (/server_info)
    stats = sched.stats
    assert stats["prefill_steps"] + stats["mixed_steps"] + stats["decode_steps"] == stats["forward_steps"]
    assert stats["mixed_steps"] > 5 and stats["decode_steps"] > 0
    assert (stats["overlapped_steps"] > 0) == overlap and stats["overlapped_steps"] <= stats["decode_steps"]
    for rid, res in expected.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid
    assert_pool_idle(sched)


def test_small_extensions_always_carry_the_decode_rows(tiny_model_dir) -> None:
    """Short prompts admitted while others decode share their forward pass by default, which
    saves forward passes and changes no output."""
    model_dir = tiny_model_dir("llama")
    reqs = lambda: [greedy_req(f"r{i}", [5 + i] * 12, 5 + 3 * i) for i in range(12)]  # noqa: E731
    unmixed = make_scheduler(model_dir, max_running_requests=4)
    unmixed._should_mix = lambda batch: False  # type: ignore[method-assign]
    expected = run_to_completion(unmixed, reqs())
    sched = make_scheduler(model_dir, max_running_requests=4)
    mixed = _count_mixed(sched)
    got = run_to_completion(sched, reqs())
    assert mixed[0] >= 4  # each request that finishes lets a waiting one in, alongside the decoders
    assert sched.stats["forward_steps"] <= unmixed.stats["forward_steps"] - 4
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in expected.items()}
    assert_pool_idle(sched)


def test_small_extensions_leave_large_decode_batches_alone(tiny_model_dir, monkeypatch) -> None:
    """Past MIX_MAX_DECODE_KV_TOKENS of decode rows' KV a small extension runs on its own (decode
    rows in the extend kernel stream their whole context in tiles of one query): no mixed step,
    the same outputs."""
    from radixlm.runtime import step_order

    model_dir = tiny_model_dir("llama")
    reqs = lambda: [greedy_req(f"r{i}", [5 + i] * 12, 5 + 3 * i) for i in range(12)]  # noqa: E731
    expected = run_to_completion(make_scheduler(model_dir, max_running_requests=4), reqs())
    monkeypatch.setattr(step_order, "MIX_MAX_DECODE_KV_TOKENS", 3 * 12)  # fewer than 3 running rows' KV
    sched = make_scheduler(model_dir, max_running_requests=4)
    mixed = _count_mixed(sched)
    got = run_to_completion(sched, reqs())
    assert mixed[0] == 0 and sched.stats["mixed_steps"] == 0
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in expected.items()}
    assert_pool_idle(sched)

"""Overlap scheduling (device samples step k+1 before the host commits step k) changes nothing
in the outputs: greedy and seeded sampling, stop tokens, retraction under a tiny pool."""
from __future__ import annotations

import random

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


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


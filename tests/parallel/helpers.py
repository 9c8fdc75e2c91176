"""Shared by the scale-out tests: a TP=1 in-process reference and the near-tie comparison rule of
tests/runtime/test_scheduler_greedy.py (identical, except where the reference's top-2 gap is a near tie)."""
from __future__ import annotations

import random
from pathlib import Path

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import make_scheduler, run_to_completion

NEAR_TIE = 1e-3
# Small pools and one thread per process: several ranks share two loaded cores.
ENGINE_OPTIONS = {"device": "cpu", "cpu_threads": 1, "max_total_tokens": 2048, "context_length": 512}


def random_prompts(count: int, vocab: int, seed: int = 0, max_len: int = 60) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, max_len))] for _ in range(count)]


def reference(model_dir: Path, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[float]]]:
    """TP=1 greedy outputs (an in-process scheduler) and the top-2 logprob gap at each step. Weights
    as the parallel ranks load them (dequantized: a GGUF file stays 4-bit only on one rank), so the
    two differ only in how the sums are split, not in the precision of the matmuls."""
    sched = make_scheduler(model_dir, max_total_tokens=4096, context_length=512, quantization="none")
    params = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
    reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=ids, params=params, return_logprob=True, top_logprobs_num=2)
            for i, ids in enumerate(prompts)]
    got = run_to_completion(sched, reqs)
    out = []
    for i in range(len(prompts)):
        r = got[f"r{i}"]
        out.append((r["output_ids"], [top[0][0] - top[1][0] for top in r["output_top_logprobs"]]))
    return out


def assert_same_or_near_tie(outputs: list[list[int]], refs: list[tuple[list[int], list[float]]]) -> None:
    assert len(outputs) == len(refs)
    for n, (ours, (ref, gaps)) in enumerate(zip(outputs, refs)):
        for i, (a, b) in enumerate(zip(ours, ref)):
            if a != b:
                assert gaps[i] < NEAR_TIE, f"prompt {n} diverged at step {i} ({a} vs {b}) with top-2 gap {gaps[i]}"
                break
        else:
            assert len(ours) == len(ref), n


def greedy(engine, prompts: list[list[int]], max_new: int) -> list[list[int]]:
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": max_new,
                                                               "ignore_eos": True})
    return [o["output_ids"] for o in outs]

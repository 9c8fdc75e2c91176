"""Greedy outputs equal transformers', alone and inside a big mixed batch with chunked prefill,
and survive retraction when the KV pool is tiny."""
from __future__ import annotations

import random

import pytest
import torch

from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion

NEAR_TIE = 1e-3


def hf_greedy(model_dir, prompts: list[list[int]], max_new: int) -> list[tuple[list[int], list[torch.Tensor]]]:
    """transformers' greedy continuation plus the logits it chose from at each step."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            gen = model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, min_new_tokens=max_new,
                                 output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            outs.append((gen.sequences[0, len(ids):].tolist(), [step[0] for step in gen.logits]))
    return outs


def assert_same_or_near_tie(ours: list[int], ref: list[int], ref_logits: list[torch.Tensor]) -> None:
    """Identical, except where at the first divergence the reference's top-2 gap is a near tie."""
    for i, (a, b) in enumerate(zip(ours, ref)):
        if a != b:
            top2 = torch.log_softmax(ref_logits[i].float(), -1).topk(2).values
            gap = (top2[0] - top2[1]).item()
            assert gap < NEAR_TIE, f"diverged at step {i} ({a} vs {b}) with top-2 gap {gap}"
            return
    assert len(ours) == len(ref)


@pytest.fixture(scope="module")
def prompts(tiny_model_dir) -> list[list[int]]:
    rng = random.Random(0)
    from transformers import AutoTokenizer

    vocab = len(AutoTokenizer.from_pretrained(str(tiny_model_dir("llama"))))
    return [[rng.randrange(3, vocab) for _ in range(rng.randint(1, 200))] for _ in range(36)]


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_matches_transformers_alone_and_batched(tiny_model_dir, prompts, kind: str) -> None:
    model_dir = tiny_model_dir(kind)
    max_new = 12
    ref = hf_greedy(model_dir, prompts[:6], max_new)
    sched = make_scheduler(model_dir, chunked_prefill_size=64)
    alone = {}
    for i, ids in enumerate(prompts[:6]):
        alone.update(run_to_completion(sched, [greedy_req(f"a{i}", ids, max_new)]))
    batched = run_to_completion(sched, [greedy_req(f"b{i}", ids, max_new) for i, ids in enumerate(prompts)])
    for i in range(6):
        ref_ids, ref_logits = ref[i]
        assert_same_or_near_tie(alone[f"a{i}"]["output_ids"], ref_ids, ref_logits)
        assert_same_or_near_tie(batched[f"b{i}"]["output_ids"], ref_ids, ref_logits)
    assert_pool_idle(sched)


def test_batch_invariance_with_and_without_radix_cache(tiny_model_dir, prompts) -> None:
    model_dir = tiny_model_dir("llama")
    max_new = 16
    base = make_scheduler(model_dir, chunked_prefill_size=-1, disable_radix_cache=True, max_running_requests=1)
    alone = run_to_completion(base, [greedy_req(f"r{i}", ids, max_new) for i, ids in enumerate(prompts)])
    assert_pool_idle(base)
    # Shared prefixes make the radix cache actually hit.
    shared = [prompts[0][:50] + p for p in prompts]
    for disable in (False, True):
        sched = make_scheduler(model_dir, chunked_prefill_size=48, disable_radix_cache=disable)
        batch = run_to_completion(sched, [greedy_req(f"r{i}", ids, max_new) for i, ids in enumerate(prompts)])
        for i in range(len(prompts)):
            assert batch[f"r{i}"]["output_ids"] == alone[f"r{i}"]["output_ids"], i
        again = run_to_completion(sched, [greedy_req(f"s{i}", ids, max_new) for i, ids in enumerate(shared)])
        ref = run_to_completion(base, [greedy_req(f"s{i}", ids, max_new) for i, ids in enumerate(shared)])
        for i in range(len(shared)):
            assert again[f"s{i}"]["output_ids"] == ref[f"s{i}"]["output_ids"], i
        if not disable:
            assert sum(r["cached_tokens"] for r in again.values()) > 40 * len(shared)
        assert_pool_idle(sched)


def test_tiny_pool_forces_retraction_and_all_complete(tiny_model_dir, prompts) -> None:
    model_dir = tiny_model_dir("llama")
    max_new = 40
    reqs = [greedy_req(f"r{i}", ids[:60], max_new) for i, ids in enumerate(prompts[:16])]
    roomy = make_scheduler(model_dir, max_total_tokens=8192)
    expected = run_to_completion(roomy, reqs)
    for disable in (False, True):
        tiny = make_scheduler(model_dir, max_total_tokens=400, chunked_prefill_size=64, disable_radix_cache=disable)
        got = run_to_completion(tiny, reqs)
        assert tiny.stats["retractions"] > 0
        for r in reqs:
            assert got[r.rid]["output_ids"] == expected[r.rid]["output_ids"]
            assert got[r.rid]["finished_reason"] == {"type": "length", "length": max_new}
        assert_pool_idle(tiny)


def test_request_larger_than_pool_aborts_cleanly(tiny_model_dir) -> None:
    sched = make_scheduler(tiny_model_dir("llama"), max_total_tokens=64, chunked_prefill_size=16)
    got = run_to_completion(sched, [greedy_req("big", list(range(5, 45)), 100)])
    assert got["big"]["finished_reason"]["type"] == "abort"
    assert "KV cache is too small" in got["big"]["finished_reason"]["message"]
    assert_pool_idle(sched)

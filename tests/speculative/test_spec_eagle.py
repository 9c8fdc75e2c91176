"""EAGLE3 drafting inside the scheduler, with random-weight heads in speculators' layout: outputs
identical to speculation off (greedy over mixed lengths, chunked prefill, stop strings, n > 1,
max_new_tokens, json_schema; seeded sampling), KV exact and the radix tree free of unverified tokens
after every step, retraction churn, and the head's KV pool, rows and kept hidden states all given
back. A random head's drafts are rejected: the budget turns drafting down."""
from __future__ import annotations

import json

import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server_args import ServerArgs
from tests.fixtures.eagle3_heads import build_eagle3_head
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def head(tiny, tmp_path_factory):
    return build_eagle3_head(tiny, tmp_path_factory.mktemp("eagle3") / "head", seed=5, draft_vocab_size=160,
                             aux_layer_ids=[0, 1])


def eagle(model_dir, head_dir, beta: float = 0.005, **options):
    sched = make_scheduler(model_dir, speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head_dir),
                           **options)
    sched.spec.beta = beta  # price drafts as on a GPU: they are tried, then turned down
    return sched


def assert_head_idle(sched) -> None:
    drafter = sched.spec.eagle
    assert not drafter.rows and not drafter.pending and not drafter.log.steps and not drafter.log.keys
    assert drafter.pool.available() == drafter.pool.size
    assert drafter.rows_pool.available() == drafter.rows_pool.capacity


def test_greedy_identical_mixed_batch_stops_n_and_lengths(tiny, head) -> None:
    from transformers import AutoTokenizer

    prompts = copy_prompts(tiny, 10)
    free = run_to_completion(make_scheduler(tiny), [greedy_req("f", prompts[0], 20)])["f"]["output_ids"]
    stop = AutoTokenizer.from_pretrained(str(tiny)).decode(free[6:8])
    reqs = [greedy_req(f"r{i}", ids, 12 + (i % 4) * 7) for i, ids in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid="stop", input_ids=prompts[0], params=SamplingParams(
                 temperature=0.0, max_new_tokens=30, stop=[stop], ignore_eos=True)),
             TokenizedGenerateReq(rid="n", input_ids=prompts[1], params=SamplingParams(
                 temperature=0.0, max_new_tokens=18, n=3)),
             TokenizedGenerateReq(rid="one", input_ids=prompts[2], params=SamplingParams(
                 temperature=0.0, max_new_tokens=1)),
             TokenizedGenerateReq(rid="seeded", input_ids=prompts[3], params=SamplingParams(
                 temperature=0.6, top_p=0.9, seed=11, max_new_tokens=20))]
    ref = run_to_completion(make_scheduler(tiny, chunked_prefill_size=32), reqs)
    sched = eagle(tiny, head, chunked_prefill_size=32, max_running_requests=6)
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert got["stop"]["finished_reason"]["type"] == "stop" and {"n-0", "n-1", "n-2"} <= got.keys()
    assert sched.info()["spec_draft_tokens"] > 0
    assert_pool_idle(sched)
    assert_head_idle(sched)


def test_rejected_drafts_are_turned_down(tiny, head) -> None:
    """Priced as on this CPU, a random head's drafts are tried, rejected, and then only probed now and then
    (the budget's acceptance estimate drifts back to its prior while idle): far fewer than the 4 per token
    it may propose. (On a GPU the measured payoff, draft_payoff.py, turns drafting off when steps that
    carry drafts are slower end to end.)"""
    prompts = copy_prompts(tiny, 2)
    reqs = [greedy_req(f"r{i}", ids, 60) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = eagle(tiny, head, beta=0.2, max_running_requests=1)
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    info = sched.info()
    assert info["spec_draft_tokens"] > 0 and info["spec_accepted_tokens"] < info["spec_draft_tokens"]
    assert info["spec_draft_tokens"] < 120 / 2


def test_json_schema_identical(tiny, head) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer"}},
              "required": ["name", "size"], "additionalProperties": False}
    prompts = copy_prompts(tiny, 4)
    reqs = [TokenizedGenerateReq(rid=f"j{i}", input_ids=ids, params=SamplingParams(
        temperature=0.0 if i % 2 == 0 else 0.8, seed=i, max_new_tokens=30, json_schema=json.dumps(schema)))
        for i, ids in enumerate(prompts)]
    base, sched = make_scheduler(tiny), eagle(tiny, head)
    try:
        ref = run_to_completion(base, reqs)
        got = run_checked(sched, reqs)
    finally:
        for s in (base, sched):
            if s.grammars is not None:
                s.grammars.close()
    assert_same(got, ref)
    assert sched.info()["spec_draft_tokens"] > 0
    assert_pool_idle(sched)
    assert_head_idle(sched)


@pytest.mark.parametrize("disable_cache", [False, True])
def test_retraction_churn_keeps_kv_exact(tiny, head, disable_cache: bool) -> None:
    prompts = [ids[:60] for ids in copy_prompts(tiny, 14, seed=3)]
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny, max_total_tokens=8192), reqs)
    sched = eagle(tiny, head, max_total_tokens=420, chunked_prefill_size=64, disable_radix_cache=disable_cache)
    got = run_checked(sched, reqs)
    assert sched.stats["retractions"] > 0 and sched.info()["spec_draft_tokens"] > 0
    assert_same(got, ref)
    assert_pool_idle(sched)
    assert_head_idle(sched)


def test_overlap_and_abort_give_the_head_back(tiny, head) -> None:
    prompts = copy_prompts(tiny, 6)
    reqs = [greedy_req(f"a{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = eagle(tiny, head, enable_overlap_schedule_on_cpu=True)
    got = run_checked(sched, reqs, abort_after={"a1": 5})
    assert got["a1"]["finished_reason"]["type"] == "abort"
    assert all(got[r]["output_ids"] == ref[r]["output_ids"] for r in ref if r != "a1")
    assert_pool_idle(sched)
    assert_head_idle(sched)


def test_default_model_json_and_stop(default_model_dir, tmp_path) -> None:
    """The default model (4-bit GGUF on the CPU, quantized shared embedding, default aux layers [2, 15, 27])."""
    from transformers import AutoTokenizer

    head_dir = build_eagle3_head(default_model_dir, tmp_path / "head", seed=7, draft_vocab_size=2048)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    ids = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Alice lives in Paris. Give her as JSON."}],
                                             add_generation_prompt=True, tokenize=False))
    reqs = [TokenizedGenerateReq(rid="json", input_ids=ids, params=SamplingParams(
                temperature=0.0, max_new_tokens=30, json_schema=json.dumps(schema))),
            TokenizedGenerateReq(rid="stop", input_ids=ids, params=SamplingParams(
                temperature=0.0, max_new_tokens=30, stop=["Paris"])),
            greedy_req("plain", ids[:20], 16)]
    base = make_scheduler(default_model_dir, max_total_tokens=4096)
    sched = eagle(default_model_dir, head_dir, max_total_tokens=4096)
    assert sched.runner.model.aux_layers == (2, 15, 27)
    try:
        ref = run_to_completion(base, reqs)
        got = run_checked(sched, reqs)
    finally:
        for s in (base, sched):
            if s.grammars is not None:
                s.grammars.close()
    assert_same(got, ref)
    assert sched.info()["spec_draft_tokens"] > 0
    assert_pool_idle(sched)
    assert_head_idle(sched)


def test_flags() -> None:
    with pytest.raises(ValueError, match="speculative_draft_model_path: required with STANDALONE and EAGLE3"):
        ServerArgs(speculative_algorithm="EAGLE3")
    with pytest.raises(ValueError, match="runs on one rank"):
        ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="x", tp_size=2)
    args = ServerArgs(speculative_algorithm="EAGLE3", speculative_draft_model_path="x", speculative_num_steps=5)
    assert args.speculative_max_drafts == 5

"""STANDALONE drafting: a draft model with its own paged KV. Outputs identical to speculation off
with a perfect draft (the target itself) and a useless one (another random model with the same
tokenizer), under greedy and seeded sampling, retraction and chunked prefill; the draft's KV pool
and rows come back whole."""
from __future__ import annotations

import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.fixtures.tiny_models import build_tiny_model
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked


@pytest.fixture(scope="module")
def models(tiny_model_dir, tmp_path_factory):
    target = tiny_model_dir("llama")
    other = build_tiny_model("llama", tmp_path_factory.mktemp("tiny-draft"), seed=1)
    return target, other


def assert_draft_idle(sched) -> None:
    model = sched.spec.model
    assert not model.rows
    assert model.pool.available() == model.pool.size
    assert model.rows_pool.available() == model.rows_pool.capacity


@pytest.mark.parametrize("draft", ["self", "other"])
def test_standalone_greedy_and_seeded_identical(models, draft: str) -> None:
    target, other = models
    prompts = copy_prompts(target, 8)
    reqs = [greedy_req(f"g{i}", ids, 20 + i) for i, ids in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid=f"s{i}", input_ids=ids, params=SamplingParams(
        temperature=0.7, top_p=0.9, seed=i, max_new_tokens=24)) for i, ids in enumerate(prompts[:4])]
    ref = run_to_completion(make_scheduler(target, chunked_prefill_size=32), reqs)
    sched = make_scheduler(target, chunked_prefill_size=32, max_running_requests=4, speculative_algorithm="STANDALONE",
                           speculative_draft_model_path=str(target if draft == "self" else other))
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    info = sched.info()
    if draft == "self":  # the target drafting for itself: greedy drafts are all accepted
        greedy = [r for r in reqs if r.params.is_greedy]
        assert info["avg_spec_accept_length"] > 2.5 and len(greedy)
    else:  # a random draft: rejected, and turned down after a few tries
        assert info["spec_accepted_tokens"] < info["spec_draft_tokens"]
        assert info["spec_verify_steps"] < sum(r.params.max_new_tokens for r in reqs) / 2
    assert_pool_idle(sched)
    assert_draft_idle(sched)


def test_standalone_retraction_frees_draft_kv(models) -> None:
    target, _ = models
    prompts = [ids[:60] for ids in copy_prompts(target, 14, seed=3)]
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(target, max_total_tokens=8192), reqs)
    sched = make_scheduler(target, max_total_tokens=420, chunked_prefill_size=64, speculative_algorithm="STANDALONE",
                           speculative_draft_model_path=str(target))
    got = run_checked(sched, reqs)
    assert sched.stats["retractions"] > 0 and sched.info()["spec_accepted_tokens"] > 0
    assert_same(got, ref)
    assert_pool_idle(sched)
    assert_draft_idle(sched)


def test_draft_with_another_vocabulary_is_refused(models, tiny_model_dir) -> None:
    target, _ = models
    from transformers import AutoConfig

    qwen = tiny_model_dir("qwen3")
    if AutoConfig.from_pretrained(str(qwen)).vocab_size == AutoConfig.from_pretrained(str(target)).vocab_size:
        cfg = (qwen / "config.json").read_text()
        import json

        data = json.loads(cfg)
        data["vocab_size"] += 8
        bad = qwen.parent / "qwen-bigger-vocab"
        bad.mkdir(exist_ok=True)
        (bad / "config.json").write_text(json.dumps(data))
        qwen = bad
    with pytest.raises(ValueError, match="speculative_draft_model_path: its vocabulary"):
        make_scheduler(target, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(qwen),
                       load_format="dummy")

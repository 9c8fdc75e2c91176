"""The EAGLE-3 drafting graph's body (runtime/speculative/eagle_graphs.py) run eagerly on the CPU over
its static buffers: it drafts exactly what the eager head passes draft, step by step, over mixed
lengths, long catch-ups (fed partly by the eager extend), stop strings, n > 1, json_schema and
retraction; outputs stay those of speculation off, KV exact, the radix tree free of unverified tokens,
the head's pool given back. On CUDA the same body is what each graph captures."""
from __future__ import annotations

import json

import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.speculative.eagle_graphs import EagleGraphs
from tests.fixtures.eagle3_heads import build_eagle3_head
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_eagle import assert_head_idle, eagle
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def head(tiny, tmp_path_factory):
    return build_eagle3_head(tiny, tmp_path_factory.mktemp("eagle3g") / "head", seed=5, draft_vocab_size=160,
                             aux_layer_ids=[0, 1])


def recorded(sched, graphs_bs: int | None) -> list[list[list[int]]]:
    """Route drafting through the graph body (bucket cap `graphs_bs`) or the eager passes, and record
    every step's drafts."""
    drafter = sched.spec.eagle
    drafter.graphs = None if graphs_bs is None else EagleGraphs(drafter, graphs_bs, capture=False)
    log: list[list[list[int]]] = []
    propose = drafter.propose

    def logged(reqs, limits):
        drafts = propose(reqs, limits)
        log.append(drafts)
        return drafts

    drafter.propose = logged
    return log


def test_graph_body_drafts_what_the_eager_passes_draft(tiny, head) -> None:
    from transformers import AutoTokenizer

    prompts = copy_prompts(tiny, 9)
    free = run_to_completion(make_scheduler(tiny), [greedy_req("f", prompts[0], 20)])["f"]["output_ids"]
    stop = AutoTokenizer.from_pretrained(str(tiny)).decode(free[6:8])
    reqs = [greedy_req(f"r{i}", ids, 10 + (i % 4) * 9) for i, ids in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid="stop", input_ids=prompts[0], params=SamplingParams(
                 temperature=0.0, max_new_tokens=30, stop=[stop], ignore_eos=True)),
             TokenizedGenerateReq(rid="n", input_ids=prompts[1], params=SamplingParams(
                 temperature=0.0, max_new_tokens=18, n=3)),
             TokenizedGenerateReq(rid="seeded", input_ids=prompts[3], params=SamplingParams(
                 temperature=0.6, top_p=0.9, seed=11, max_new_tokens=20))]
    ref = run_to_completion(make_scheduler(tiny, chunked_prefill_size=32), reqs)
    logs, infos = {}, {}
    for mode in (None, 4):  # eager passes; graph body with buckets up to 4 rows (larger batches: eager)
        sched = eagle(tiny, head, chunked_prefill_size=32, max_running_requests=6, speculative_num_steps=3)
        logs[mode] = recorded(sched, mode)
        got = run_checked(sched, reqs)
        assert_same(got, ref)
        assert_pool_idle(sched)
        assert_head_idle(sched)
        infos[mode] = sched.info()
    assert logs[4] == logs[None] and any(len(d) > 1 for step in logs[4] for d in step)
    assert infos[4]["spec_draft_tokens"] == infos[None]["spec_draft_tokens"] > 0


def test_graph_body_with_json_and_retraction(tiny, head) -> None:
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                               "size": {"type": "integer"}},
              "required": ["name", "size"], "additionalProperties": False}
    prompts = [ids[:60] for ids in copy_prompts(tiny, 14, seed=3)]
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid=f"j{i}", input_ids=prompts[i], params=SamplingParams(
        temperature=0.0, max_new_tokens=30, json_schema=json.dumps(schema))) for i in range(2)]
    ref = run_to_completion(make_scheduler(tiny, max_total_tokens=8192), reqs)
    logs = {}
    for mode in (None, 16):
        sched = eagle(tiny, head, max_total_tokens=420, chunked_prefill_size=64, speculative_num_steps=2)
        logs[mode] = recorded(sched, mode)
        try:
            got = run_checked(sched, reqs)
        finally:
            sched.grammars.close()
        assert sched.stats["retractions"] > 0
        assert_same(got, ref)
        assert_pool_idle(sched)
        assert_head_idle(sched)
    assert logs[16] == logs[None]


def test_graph_buckets_and_fit(tiny, head) -> None:
    sched = eagle(tiny, head, speculative_num_steps=3)
    graphs = EagleGraphs(sched.spec.eagle, 300, capture=False)
    assert graphs.max_bs == 256 and graphs.C == 4  # capped; catch-up of up to k + 1 entries per row
    assert graphs.fits(256, 3) and not graphs.fits(257, 1) and not graphs.fits(4, 4) and not graphs.fits(4, 0)

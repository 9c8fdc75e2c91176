"""Speculative decoding under tensor parallelism (gloo, TP=2): verify steps are decode batches with
several rows per request, broadcast to the other rank like any batch; greedy outputs match TP=1
without speculation (near ties aside, as for every TP test)."""
from __future__ import annotations

import radixlm
from tests.parallel.helpers import ENGINE_OPTIONS, assert_same_or_near_tie, reference
from tests.speculative.test_spec_scheduler import copy_prompts


def test_ngram_under_tp2_matches_tp1(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    prompts = copy_prompts(model_dir, 4)
    refs = reference(model_dir, prompts, 24)
    # every step may draft (--speculative-adaptive off): this checks verify steps under TP, not whether the
    # measured payoff, within its exploring budget, finds drafting worth it on a loaded CPU in 24 tokens
    with radixlm.Engine(str(model_dir), tp_size=2, speculative_algorithm="NGRAM", speculative_adaptive="off",
                        **ENGINE_OPTIONS) as e:
        outs = e.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
        info = e.get_server_info()
    assert_same_or_near_tie([o["output_ids"] for o in outs], refs)
    assert sum(o["meta_info"]["spec_accepted_tokens"] for o in outs) > 0
    assert info["avg_spec_accept_length"] > 1.0  # the scheduler's get_info (the Engine has no HTTP layer)

"""benchmarks/speculative.py's audit of spec on/off differences (run on the H200 in bf16): it finds
each differing request's first differing position and the spec-off top-2 logprob gap there."""
from __future__ import annotations

import torch

from radixlm.benchmarks.speculative import NEAR_TIE, divergence_audit, run
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import make_scheduler


def test_audit_finds_the_first_differing_position_and_its_gap(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    sched = make_scheduler(model)
    prompts = [list(range(5, 20)), list(range(40, 47)) * 2, [9, 8, 7, 6]]
    reqs = [TokenizedGenerateReq(rid=f"0-{i}", input_ids=p, params=SamplingParams(temperature=0.0, max_new_tokens=8,
                                                                                    ignore_eos=True))
            for i, p in enumerate(prompts)]
    _, off = run(sched, reqs)
    on = {rid: list(toks) for rid, toks in off.items()}
    on["0-1"][5] = (on["0-1"][5] + 1) % 100  # as if a verify step's rounding had flipped position 5
    audit = divergence_audit(sched, prompts, len(prompts), 8, {False: off, True: on})
    assert audit["differing"] == 1 and audit["rerun_reproduces_off"]
    (case,) = audit["cases"]
    assert case["rid"] == "0-1" and case["position"] == 5 and case["off_token"] == off["0-1"][5]
    # the gap is the model's own at that position: top-1 minus top-2 logprob, as transformers has it
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([prompts[1] + off["0-1"][:5]])).logits[0, -1]
    top = torch.log_softmax(logits, -1).topk(2).values
    assert abs(case["gap"] - float(top[0] - top[1])) < 1e-3
    assert case["near_tie"] == (case["gap"] < NEAR_TIE)
    assert divergence_audit(sched, prompts, len(prompts), 8, {False: off, True: off})["differing"] == 0

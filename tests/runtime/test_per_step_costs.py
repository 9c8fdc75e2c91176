"""Per-request work the scheduler repeats at every step is made once per request or bounded at the
front: a whole-vocabulary logit_bias and the repetition penalty's prompt tokens (rebuilt each step,
13 ms and 3.7 ms a row a step on the 2-core VM; x128 for n=128), stop strings and stop token ids."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.result_processor import ResultProcessor
from radixlm.runtime.sampler import SampleRow, SamplingBatch, apply_logit_adjustments
from radixlm.runtime.sampling_params import (
    MAX_STOP_CHARS,
    MAX_STOP_STRINGS,
    MAX_STOP_TOKEN_IDS,
    InvalidRequestError,
    SamplingParams,
)

V = 64


def _adjust(rows: list[SampleRow], logits: torch.Tensor) -> torch.Tensor:
    return apply_logit_adjustments(logits.clone(), SamplingBatch.build(rows, V, logits.device))


def test_logit_bias_tensors_are_made_once_per_request() -> None:
    params = SamplingParams.from_dict({"logit_bias": {str(t): 0.5 * t - 10 for t in range(V)}}, vocab_size=V)
    first = params.logit_bias_tensors("cpu")
    assert params.logit_bias_tensors("cpu")[0] is first[0] and params.logit_bias_tensors("cpu")[1] is first[1]
    assert params == SamplingParams.from_dict({"logit_bias": {str(t): 0.5 * t - 10 for t in range(V)}}, vocab_size=V)
    out = _adjust([SampleRow(params, 1, 0, [], [])], torch.zeros(1, V))
    assert torch.equal(out[0], torch.tensor([0.5 * t - 10 for t in range(V)]))


def test_the_repetition_penalty_reads_the_requests_prompt_mask_made_once() -> None:
    gen = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, V, (300,), generator=gen).tolist()
    output = [1, 2, 2, 63]
    params = SamplingParams(repetition_penalty=1.7)
    req = Req.from_wire(TokenizedGenerateReq(rid="r", input_ids=prompt, params=params), seed=1)
    mask = req.prompt_mask(V, "cpu")
    assert req.prompt_mask(V, "cpu") is mask and mask.sum() == len(set(prompt))
    logits = torch.randn(1, V, generator=gen)
    with_mask = _adjust([SampleRow(params, 1, 4, output, prompt, (), mask)], logits)
    from_ids = _adjust([SampleRow(params, 1, 4, output, prompt)], logits)
    assert torch.equal(with_mask, from_ids)


def test_a_requests_n_sequences_share_one_prompt_mask() -> None:
    msg = TokenizedGenerateReq(rid="g", input_ids=list(range(10, 40)), params=SamplingParams(repetition_penalty=1.2, n=4))
    leader = Req.group_from_wire(msg, [1, 2, 3, 4])
    mask = leader.followers[2].prompt_mask(V, "cpu")
    assert all(seq.prompt_mask(V, "cpu") is mask for seq in (leader, *leader.followers))
    other = Req.group_from_wire(dataclasses.replace(msg, rid="h"), [1, 2, 3, 4])
    assert other.prompt_mask(V, "cpu") is not mask


def test_the_result_processor_hands_the_sampler_the_prompt_mask(monkeypatch) -> None:
    seen: list[SampleRow] = []
    monkeypatch.setattr(ResultProcessor, "sample_rows",
                        staticmethod(lambda rows, logits, *a, **k: seen.extend(rows) or torch.zeros(len(rows))))
    params = SamplingParams(repetition_penalty=1.3, temperature=0.0)
    plain = SamplingParams(temperature=0.7)
    prompts = ([3, 4, 5, 6, 7, 8], [3, 4, 5, 6, 7, 8], [3])  # the last is under V / 16 tokens: its ids are cheaper
    reqs = [Req.from_wire(TokenizedGenerateReq(rid=f"r{i}", input_ids=ids, params=p), seed=1)
            for i, (ids, p) in enumerate(zip(prompts, (params, plain, params)))]
    proc = ResultProcessor.__new__(ResultProcessor)
    proc.eos_ids = {0}
    proc.sample(reqs, torch.zeros(3, V), None)
    mask = reqs[0].prompt_mask(V, "cpu")
    assert mask is not None and seen[0].prompt_mask is mask
    assert seen[1].prompt_mask is None and seen[2].prompt_mask is None


@pytest.mark.parametrize("raw, field", [
    ({"stop": [f"s{i}" for i in range(MAX_STOP_STRINGS + 1)]}, "stop"),
    ({"stop": ["x" * (MAX_STOP_CHARS // 2 + 1)] * 2}, "stop"),
    ({"stop_token_ids": list(range(MAX_STOP_TOKEN_IDS + 1))}, "stop_token_ids"),
])
def test_stop_lists_the_scheduler_checks_each_step_are_bounded_with_a_400_naming_them(raw: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict(raw)
    assert err.value.field == f"sampling_params.{field}"


def test_repeated_stop_token_ids_are_kept_once_and_looked_up_in_a_set() -> None:
    params = SamplingParams.from_dict({"stop_token_ids": [5, 9] * 100_000})
    assert params.stop_token_ids == (5, 9) and params.stop_token_set == frozenset({5, 9})
    proc = ResultProcessor.__new__(ResultProcessor)
    proc.eos_ids, proc.tokenizer, proc.context_len = frozenset({0}), None, 100
    req = Req.from_wire(TokenizedGenerateReq(rid="r", input_ids=[1, 2], params=params), seed=1)
    req.output_ids = [9]
    object.__setattr__(params, "stop_token_ids", ())  # the check reads the set, made once
    assert proc.check_finish(req, 9, None).matched == 9


def test_speculative_verify_rows_take_the_prompt_mask_too() -> None:
    from radixlm.runtime.speculative.draft_tree import DraftTree
    from radixlm.runtime.speculative.verify import position_rows

    reqs = [Req.from_wire(TokenizedGenerateReq(rid=f"r{i}", input_ids=list(range(10, 20)), params=p), seed=1)
            for i, p in enumerate((SamplingParams(repetition_penalty=1.3), SamplingParams()))]
    rows = position_rows(reqs, [DraftTree.chain([3, 4]), DraftTree.chain([5])], {0}, (V, "cpu"))
    mask = reqs[0].prompt_mask(V, "cpu")
    assert [r.prompt_mask is mask for r in rows] == [True, True, True, False, False]

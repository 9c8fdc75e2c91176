"""Every sampling parameter changes what the batched sampler does, as specified."""
from __future__ import annotations

import math

import pytest
import torch

from radixlm.runtime.sampler import SampleRow, SamplingBatch, apply_logit_adjustments, sample, seeded_uniform, token_logprobs
from radixlm.runtime.sampling_params import InvalidRequestError, SamplingParams

V = 50


def batch_of(params: list[SamplingParams], seeds: list[int] | None = None, steps: list[int] | None = None,
             outputs: list[list[int]] | None = None, prompts: list[list[int]] | None = None,
             banned: list[tuple[int, ...]] | None = None) -> SamplingBatch:
    n = len(params)
    rows = [SampleRow(params=p, seed=(seeds or [0] * n)[i], step=(steps or [0] * n)[i],
                      output_ids=(outputs or [[]] * n)[i], prompt_ids=(prompts or [[]] * n)[i],
                      banned_ids=(banned or [()] * n)[i]) for i, p in enumerate(params)]
    return SamplingBatch.build(rows, V, torch.device("cpu"))


def logits_row(seed: int = 0) -> torch.Tensor:
    return torch.randn(V, generator=torch.Generator().manual_seed(seed)) * 3


def draw_many(logits: torch.Tensor, params: SamplingParams, n: int = 4000) -> torch.Tensor:
    b = batch_of([params] * n, seeds=list(range(n)))
    return sample(logits.expand(n, V).clone(), b)


def test_greedy_is_argmax_and_top_k_1_is_greedy() -> None:
    logits = torch.stack([logits_row(i) for i in range(4)])
    b = batch_of([SamplingParams(temperature=0.0), SamplingParams(top_k=1), SamplingParams(temperature=0.0),
                  SamplingParams(top_k=1, temperature=5.0)], seeds=[1, 2, 3, 4])
    assert sample(logits.clone(), b).tolist() == logits.argmax(-1).tolist()


def test_temperature_matches_softmax_distribution() -> None:
    logits = logits_row(1)
    for temp in (0.5, 1.0, 2.0):
        draws = draw_many(logits, SamplingParams(temperature=temp))
        empirical = torch.bincount(draws, minlength=V).float() / len(draws)
        expected = torch.softmax(logits / temp, -1)
        assert (empirical - expected).abs().max() < 0.03, temp


def test_top_k_top_p_min_p_restrict_support() -> None:
    logits = logits_row(2)
    order = logits.argsort(descending=True)
    draws = set(draw_many(logits, SamplingParams(top_k=3)).tolist())
    assert draws <= set(order[:3].tolist()) and len(draws) > 1
    probs = torch.softmax(logits, -1)[order]
    p = 0.7
    allowed = int((probs.cumsum(0) - probs < p).sum())
    draws = set(draw_many(logits, SamplingParams(top_p=p)).tolist())
    assert draws <= set(order[:allowed].tolist())
    min_p = 0.2
    allowed_minp = set(order[probs >= min_p * probs[0]].tolist())
    assert set(draw_many(logits, SamplingParams(min_p=min_p)).tolist()) <= allowed_minp


def test_seed_reproducible_and_batch_independent() -> None:
    logits = torch.stack([logits_row(i) for i in range(3)])
    p = SamplingParams(temperature=1.0)
    a = sample(logits.clone(), batch_of([p] * 3, seeds=[7, 8, 9], steps=[0, 5, 9]))
    alone = [sample(logits[i : i + 1].clone(), batch_of([p], seeds=[s], steps=[st])).item()
             for i, (s, st) in enumerate([(7, 0), (8, 5), (9, 9)])]
    assert a.tolist() == alone
    u1 = seeded_uniform(torch.tensor([1, 2]), torch.tensor([0, 0]), V)
    assert not torch.equal(u1[0], u1[1]) and (u1 > 0).all() and (u1 < 1).all()


def test_seeded_uniform_is_the_hash_of_seed_step_and_token_with_the_token_part_made_once(monkeypatch) -> None:
    """The token ids' hash is kept per vocabulary and device (not recomputed each step: its kernels are
    host launches); the uniforms equal the hash of (seed, step, token) written out."""
    from radixlm.runtime import sampler

    monkeypatch.setattr(sampler, "_TOKEN_MIX", {})

    def mix(x: int) -> int:
        for _ in range(2):
            x = ((x >> 16) ^ x) * 0x45D9F3B & 0xFFFFFFFF
        return (x >> 16) ^ x

    seeds, steps = [3, 2**32 - 1, 0], [0, 7, 123456]
    u = seeded_uniform(torch.tensor(seeds), torch.tensor(steps), V)
    for i, (seed, step) in enumerate(zip(seeds, steps)):
        base = mix(seed ^ mix((step * 0x9E3779B9 + 0x7F4A7C15) & 0xFFFFFFFF))
        want = [(mix(base ^ mix(t * 0x27D4EB2F & 0xFFFFFFFF)) + 0.5) / 2.0**32 for t in range(V)]
        assert u[i].tolist() == want
    assert list(sampler._TOKEN_MIX) == [(V, torch.device("cpu"))]
    made = sampler._TOKEN_MIX[(V, torch.device("cpu"))]
    seeded_uniform(torch.tensor([1]), torch.tensor([1]), V)
    assert sampler._TOKEN_MIX[(V, torch.device("cpu"))] is made


def test_rows_hash_is_made_on_the_host_and_only_what_the_draw_reads_goes_to_the_device() -> None:
    """SamplingBatch.build hashes (seed, step) with numpy, equal to the torch hash, and converts on the
    device only the columns the batch's draw reads."""
    from radixlm.runtime import sampler

    seeds, steps = [0, 1, 2**32 - 1, 123456789, 7], [0, 1, 5, 99999, 2**20]
    rows = [SampleRow(SamplingParams(temperature=0.7), s, st, [], []) for s, st in zip(seeds, steps)]
    b = SamplingBatch.build(rows, V, torch.device("cpu"))
    want = sampler._row_hash(torch.tensor(seeds), torch.tensor(steps))
    assert b.row_hashes is not None and b.row_hashes.tolist() == want.tolist()
    assert b.top_ps is None and b.top_ks is None and b.min_ps is None and b.greedy is None  # temperature only
    greedy = SamplingBatch.build([SampleRow(SamplingParams(temperature=0.0), 1, 0, [], [])] * 2, V, torch.device("cpu"))
    assert (greedy.temperatures, greedy.row_hashes, greedy.greedy) == (None, None, None) and greedy.all_greedy
    mixed = batch_of([SamplingParams(temperature=0.0), SamplingParams(top_p=0.5), SamplingParams(min_p=0.1)])
    assert mixed.greedy is not None and mixed.greedy.tolist() == [True, False, False]
    assert mixed.top_ps is not None and mixed.top_ks is not None and mixed.min_ps is not None
    assert mixed.top_ks.tolist() == [V, V, V]


def test_a_batch_without_greedy_rows_takes_no_argmax_of_the_logits(monkeypatch) -> None:
    """Sampled rows draw the same tokens whether a greedy row is in their batch or not; without one, the
    logits' argmax (the greedy rows' token) is not computed."""
    from radixlm.runtime import sampler

    logits = torch.stack([logits_row(i) for i in range(4)])
    hot, greedy = SamplingParams(temperature=0.8), SamplingParams(temperature=0.0)
    mixed = sample(logits.clone(), batch_of([hot, greedy, hot, hot], seeds=[1, 2, 3, 4], steps=[5, 5, 5, 5]))
    assert mixed[1].item() == int(logits[1].argmax())
    calls: list[int] = []
    real = sampler.greedy_argmax
    monkeypatch.setattr(sampler, "greedy_argmax", lambda x: (calls.append(x.shape[0]), real(x))[1])
    rows = [0, 2, 3]
    alone = sample(logits[rows].clone(), batch_of([hot] * 3, seeds=[1, 3, 4], steps=[5, 5, 5]))
    assert alone.tolist() == mixed[rows].tolist() and calls == []


def test_penalties_and_bias_and_banned() -> None:
    logits = torch.ones(4, V)
    params = [
        SamplingParams(frequency_penalty=0.5),
        SamplingParams(presence_penalty=0.5),
        SamplingParams(repetition_penalty=2.0),
        SamplingParams(logit_bias=((3, 10.0),)),
    ]
    b = batch_of(params, outputs=[[5, 5, 6], [5, 5, 6], [5], []], prompts=[[], [], [7], []], banned=[(), (), (), (9,)])
    out = apply_logit_adjustments(logits.clone(), b)
    assert out[0, 5] == pytest.approx(0.0) and out[0, 6] == pytest.approx(0.5) and out[0, 1] == 1.0
    assert out[1, 5] == pytest.approx(0.5) and out[1, 6] == pytest.approx(0.5)
    assert out[2, 5] == pytest.approx(0.5) and out[2, 7] == pytest.approx(0.5) and out[2, 1] == 1.0
    assert out[3, 3] == pytest.approx(11.0) and out[3, 9] == -math.inf
    neg = apply_logit_adjustments(-torch.ones(1, V), batch_of([SamplingParams(repetition_penalty=2.0)], outputs=[[1]]))
    assert neg[0, 1] == pytest.approx(-2.0)


def test_vocab_mask_is_respected() -> None:
    logits = logits_row(3).expand(8, V).clone()
    mask = torch.ones(8, V, dtype=torch.bool)
    mask[:, [4, 11]] = False
    out = sample(logits, batch_of([SamplingParams(temperature=1.5)] * 8, seeds=list(range(8))), mask)
    assert set(out.tolist()) <= {4, 11}


def test_token_logprobs_are_log_softmax() -> None:
    logits = torch.stack([logits_row(i) for i in range(2)])
    chosen, vals, ids = token_logprobs(logits, torch.tensor([3, 4]), 2)
    ref = torch.log_softmax(logits, -1)
    assert torch.allclose(chosen, ref[[0, 1], [3, 4]])
    assert torch.allclose(vals, ref.topk(2).values) and torch.equal(ids, ref.topk(2).indices)


@pytest.mark.parametrize("bad, field", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": 0}, "top_k"),
    ({"min_p": 2}, "min_p"), ({"max_new_tokens": -1}, "max_new_tokens"), ({"n": 0}, "n"),
    ({"frequency_penalty": 3}, "frequency_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"stop": [1]}, "stop[0]"), ({"stop": 1}, "stop"), ({"regex": "a", "json_schema": "{}"}, "regex"),
    ({"stop_token_ids": ["x"]}, "stop_token_ids[0]"), ({"stop_token_ids": 3}, "stop_token_ids"),
    ({"stop_regex": "("}, "stop_regex"), ({"temperature": "hot"}, "temperature"),
    ({"min_new_tokens": 5, "max_new_tokens": 2}, "min_new_tokens"),
])
def test_invalid_sampling_params_name_the_field(bad: dict, field: str) -> None:
    with pytest.raises(InvalidRequestError) as err:
        SamplingParams.from_dict(bad, vocab_size=1000)
    assert err.value.field == f"sampling_params.{field}"


def test_unknown_sampling_params_are_ignored() -> None:
    """Unknown fields are ignored with a log warning (SGLang / vLLM behaviour), not a 400."""
    assert SamplingParams.from_dict({"bogus": 1, "max_new_tokens": 3}, vocab_size=1000).max_new_tokens == 3


def test_sampling_params_accept_sglang_frontend_body() -> None:
    body = {"skip_special_tokens": True, "spaces_between_special_tokens": True, "max_new_tokens": 16,
            "min_new_tokens": 0, "n": 1, "stop": "\n", "stop_token_ids": [], "stop_regex": [], "temperature": 0, "top_p": 1.0,
            "top_k": -1, "min_p": 0.0, "frequency_penalty": 0.0, "presence_penalty": 0.0, "ignore_eos": False,
            "regex": None, "json_schema": None}
    p = SamplingParams.from_dict(body)
    assert p.is_greedy and p.stop == ("\n",) and p.max_new_tokens == 16


def test_result_processor_greedy_paths_take_the_samplers_argmax(monkeypatch) -> None:
    """The greedy fast paths (no adjustments, no grammar) go through sampler.greedy_argmax, which on a GPU at <= 16
    rows is the two-stage kernel (kernels/argmax.py: ~17 vs ~33 µs for a 128k-vocab row on the H200), not torch's."""
    from radixlm.runtime import result_processor
    from radixlm.runtime.request import Req

    calls: list[tuple[int, ...]] = []

    def spy(logits: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(logits.shape))
        return logits.argmax(dim=-1)

    monkeypatch.setattr(result_processor, "greedy_argmax", spy)
    proc = result_processor.ResultProcessor(None, {0}, 4096, jump_forward=False, decode_graphs=True)
    logits = torch.randn(2, 50)
    reqs = [Req(str(i), [5, 6], SamplingParams(temperature=0.0, max_new_tokens=4), 0) for i in range(2)]
    assert torch.equal(proc.sample(reqs, logits, None), logits.argmax(-1))
    rows = [SampleRow(r.params, r.seed, 0, r.output_ids, r.input_ids, ()) for r in reqs]
    assert torch.equal(proc.sample_rows(rows, logits, None), logits.argmax(-1))
    assert calls == [(2, 50), (2, 50)]

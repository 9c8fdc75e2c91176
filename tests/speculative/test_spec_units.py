"""Speculative decoding's pure parts: the n-gram index, the draft budget, the flags, and a
chi-square check that verification preserves the target distribution (rejection sampling)."""
from __future__ import annotations

import pytest
import torch
from scipy.stats import chisquare

from radixlm.runtime.result_processor import ResultProcessor
from radixlm.runtime.sampler import SampleRow, SamplingBatch, _filter_probs
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.speculative.draft_budget import Acceptance, grant, worth_drafting
from radixlm.runtime.speculative.draft_payoff import EXPLORE_STEPS, PROBE_EVERY, RUN_STEPS, DraftPayoff
from radixlm.runtime.speculative.ngram import NgramIndex
from radixlm.runtime.speculative.verify import accepted_run


def test_ngram_proposes_what_followed_the_latest_longest_match() -> None:
    idx = NgramIndex()
    idx.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [1, 2, 3])
    # suffix (1, 2, 3) occurred at 0..2, followed by 4, 5, ...; (2, 3) later at 6..7 followed by 7, but
    # the longer match wins.
    assert idx.propose(3) == [4, 5, 9]
    idx.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [1, 2, 3, 6, 6])
    assert idx.propose(4) == []  # (3, 6, 6), (6, 6) never occurred before
    idx.sync([1, 2, 3, 4, 5, 9, 2, 3, 7, 8], [1, 2, 3, 6, 6, 2, 3])
    assert idx.propose(2) == [6, 6]  # (3, 6, 6, 2, 3)... suffix (6, 2, 3) no; (2, 3): latest at output 1..2


def test_ngram_index_rebuilds_when_the_output_is_rewritten() -> None:
    idx = NgramIndex()
    idx.sync([5, 6, 7, 5, 6], [7, 8])
    idx.sync([5, 6, 7, 5, 6], [9, 5, 6])  # jump-forward re-tokenized the output
    assert idx.tokens == [5, 6, 7, 5, 6, 9, 5, 6]
    assert idx.propose(3) == [9, 5, 6]  # (5, 6) latest earlier occurrence is at 3..4, followed by 9


def test_budget_grants_at_batch_one_and_turns_down_weak_rows_at_large_batch() -> None:
    beta = 0.005
    assert grant([4], [0.6], beta) == [4]
    many = grant([4] * 64, [0.05] * 64, beta)
    assert sum(many) == 0
    strong = grant([4] * 64, [0.95] + [0.05] * 63, beta)
    assert strong[0] >= 3 and sum(strong[1:]) == 0
    assert worth_drafting([0.6], beta) and not worth_drafting([0.01] * 64, 0.15)
    acc = Acceptance()
    for _ in range(20):
        acc.record(4, 0)
    low = acc.rate
    assert low < 0.15
    for _ in range(200):
        acc.idle()
    assert acc.rate > 0.5  # drifted back to the prior: the request will probe again


def _serve(payoff: DraftPayoff, steps: int, running: int, step_s: dict[bool, float], tokens: dict[bool, int],
           plain_decode: bool = True) -> list[bool]:
    """Drive the meter with a fake clock: a step of each arm takes step_s[arm] and yields tokens[arm]."""
    arms, now, generated = [], 0.0, 0
    for _ in range(steps):
        arm = payoff.begin_step(now, generated, running)
        payoff.scheduled(plain_decode, arm)
        arms.append(arm)
        now += step_s[arm]
        generated += tokens[arm]
    return arms


def test_draft_payoff_keeps_the_faster_arm_and_probes_the_other() -> None:
    # Batch 64 as measured on the H200: a drafting step emits 1.43 tokens per row but, synchronous,
    # takes 1.68x a plain overlapped step: drafting must be turned off after measuring both arms.
    payoff = DraftPayoff()
    arms = _serve(payoff, 600, 64, {True: 1.68, False: 1.0}, {True: 92, False: 64})
    assert arms[: RUN_STEPS - 1] == [True] * (RUN_STEPS - 1)  # measured first
    steady = arms[3 * RUN_STEPS:]
    assert steady.count(True) <= len(steady) * (RUN_STEPS + 1) / PROBE_EVERY + RUN_STEPS  # probes only
    assert True in steady  # ... but it does re-measure
    # Batch 1 on a GPU: drafting wins (a verify step costs ~1.05x, 2.5 tokens per step).
    other = DraftPayoff()
    arms = _serve(other, 600, 1, {True: 1.05, False: 1.0}, {True: 5, False: 2})
    steady = arms[3 * RUN_STEPS:]
    assert steady.count(False) <= len(steady) * (RUN_STEPS + 1) / PROBE_EVERY + RUN_STEPS
    # Buckets are separate, and steps that are not plain decode steps are never measured.
    assert set(payoff.buckets) == {64 .bit_length()} and set(other.buckets) == {1}
    idle = DraftPayoff()
    _serve(idle, 50, 8, {True: 1.0, False: 1.0}, {True: 8, False: 8}, plain_decode=False)
    assert all(a.samples == 0 for b in idle.buckets.values() for a in b.arms.values())
    assert idle.begin_step(0.0, 0, 0) is False  # nothing running: nothing to draft for
    # Drafting allowed but nothing proposed (no n-gram matches yet): explored longer, then judged
    # on what those synchronous steps achieved.
    quiet = DraftPayoff()
    arms, now, generated = [], 0.0, 0
    for _ in range(200):
        arm = quiet.begin_step(now, generated, 4)
        quiet.scheduled(True, False)
        arms.append(arm)
        now += 1.2 if arm else 1.0
        generated += 4
    assert arms[: EXPLORE_STEPS] == [True] * EXPLORE_STEPS and arms[-50:].count(True) <= RUN_STEPS


def test_speculative_flags_are_checked() -> None:
    with pytest.raises(ValueError, match="speculative_num_steps: needs --speculative-algorithm"):
        ServerArgs(speculative_num_steps=3)
    with pytest.raises(ValueError, match="speculative_num_draft_tokens"):
        ServerArgs(speculative_algorithm="NGRAM", speculative_num_steps=3, speculative_num_draft_tokens=5)
    with pytest.raises(ValueError, match="speculative_algorithm"):
        ServerArgs(speculative_algorithm="MEDUSA")
    assert ServerArgs(speculative_algorithm="NGRAM").speculative_max_drafts == 4
    assert ServerArgs(speculative_algorithm="NGRAM", speculative_num_draft_tokens=3).speculative_max_drafts == 2


def test_accepted_run_keeps_matching_drafts_then_the_next_target() -> None:
    assert accepted_run([5, 6, 7], [5, 6, 7, 8]) == [5, 6, 7, 8]
    assert accepted_run([5, 6, 7], [5, 9, 7, 8]) == [5, 9]
    assert accepted_run([5], [4, 1]) == [4]


PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20, top_p=0.9),
    SamplingParams(temperature=1.3, min_p=0.05),
]


@pytest.mark.parametrize("params", PARAMS)
def test_verification_preserves_the_target_distribution(params: SamplingParams) -> None:
    """Chi-square over 40,000 seeded verify rows of two positions with a fixed draft: the first
    emitted token follows the target's (filtered) distribution, the draft is accepted with its
    probability, and the bonus token after an accepted draft follows position 1's distribution.
    40,000 draws detect a 1% absolute bias on the draft token (the check below shows the power)."""
    vocab = 64
    gen = torch.Generator().manual_seed(7)
    logits = torch.randn(2, vocab, generator=gen, dtype=torch.float32) * 2.0
    n = 40_000
    ref_rows = [SampleRow(params=params, seed=0, step=0, output_ids=[], prompt_ids=[])] * 2
    ref = SamplingBatch.build(ref_rows, vocab, torch.device("cpu"))
    probs = torch.softmax(logits / ref.temperatures, dim=-1).double()
    if ref.need_top_k or ref.need_top_p or ref.need_min_p:
        probs = _filter_probs(probs, ref)
    probs = probs / probs.sum(-1, keepdim=True)
    draft = int(torch.argsort(probs[0], descending=True)[2])  # a plausible but not the likeliest token
    firsts, bonus = [], []
    for lo in range(0, n, 10_000):
        rows = []
        for seed in range(lo, lo + 10_000):
            rows += [SampleRow(params=params, seed=seed, step=0, output_ids=[], prompt_ids=[]),
                     SampleRow(params=params, seed=seed, step=1, output_ids=[], prompt_ids=[])]
        targets = ResultProcessor.sample_rows(rows, logits.repeat(10_000, 1), None).view(-1, 2).tolist()
        for t0, t1 in targets:
            run = accepted_run([draft], [t0, t1])
            firsts.append(run[0])
            if len(run) == 2:
                bonus.append(run[1])
    p0 = probs[0]
    support = (p0 > 0).nonzero().flatten().tolist()
    observed = torch.bincount(torch.tensor(firsts), minlength=vocab).double()
    assert observed[(p0 == 0)].sum() == 0
    assert chisquare(observed[support].numpy(), (p0[support] * n).numpy()).pvalue > 1e-3
    accept_rate = len(bonus) / n
    assert abs(accept_rate - p0[draft].item()) < 4 * (p0[draft].item() / n) ** 0.5 + 1e-9
    # Power: draft-vs-rest counts pass against the target, fail against a target 1% off on the draft.
    hits = observed[draft].item()
    pd = p0[draft].item()
    assert chisquare([hits, n - hits], [pd * n, (1 - pd) * n]).pvalue > 1e-3
    assert chisquare([hits, n - hits], [(pd + 0.01) * n, (0.99 - pd) * n]).pvalue < 1e-3
    p1 = probs[1]
    sup1 = (p1 > 0).nonzero().flatten().tolist()
    obs1 = torch.bincount(torch.tensor(bonus), minlength=vocab).double()
    assert chisquare(obs1[sup1].numpy(), (p1[sup1] * len(bonus)).numpy()).pvalue > 1e-3

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
from radixlm.runtime.speculative.draft_payoff import PROBE_EVERY, RUN_STEPS, DraftPayoff
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


def test_ngram_continues_a_loop_with_its_period() -> None:
    idx = NgramIndex()
    idx.sync([4, 7, 7], [7, 7])  # a fixed point: one token repeated
    assert idx.propose(4) == [7, 7, 7, 7]
    idx = NgramIndex()
    idx.sync([9, 1, 2, 3, 1, 2, 3], [1, 2, 3])  # period 3: (1, 2, 3, 1, 2, 3) last occurred at 1..6
    assert idx.propose(5) == [1, 2, 3, 1, 2]
    idx = NgramIndex(occurrences=4)
    idx.sync([5, 6, 8, 5, 6, 9, 9, 5, 6], [])  # (5, 6): followed by 9, 9, 5, 6 (runs into the end), 8, 5, 6, 9
    assert idx.candidates(6) == [([9, 9, 5, 6, 9, 9], 2), ([8, 5, 6, 9, 9, 5], 2)]


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


def _serve(payoff: DraftPayoff, steps: int, running: int, step_s: dict[int, float], tokens: dict[int, int],
           accept: float = 0.0, plain_decode: bool = True) -> list[int]:
    """Drive the meter with a fake clock: a step of arm k takes step_s[k] and yields tokens[k]; each
    row's chain of k drafts is verified with acceptance `accept` per position (deterministic pattern)."""
    arms, now, generated = [], 0.0, 0
    for step in range(steps):
        k = payoff.begin_step(now, generated, running)
        payoff.scheduled(plain_decode, k > 0)
        arms.append(k)
        for row in range(running if k else 0):
            accepted = 0
            while accepted < k and ((step * 7 + row * 3 + accepted * 5) % 100) < accept * 100:
                accepted += 1
            payoff.on_verified(k, accepted)
        now += step_s[k]
        generated += tokens[k]
    return arms


def test_draft_payoff_plain_decoding_at_batch_64_when_drafts_are_rejected() -> None:
    # Batch 64 with a head whose drafts are rejected (a random EAGLE-3 head): every drafting arm is
    # slower (synchronous verify step + drafting), so after k = 0 is measured and k = 1 is tried
    # (one step: 64 positions without an accepted one end its run) the bucket decodes plainly; k = 1
    # is probed again every PROBE_EVERY steps, the interval doubling while probes accept nothing
    # (test_draft_payoff.py).
    payoff = DraftPayoff(3)
    arms = _serve(payoff, 2000, 64, {0: 1.0, 1: 1.5, 2: 1.8, 3: 2.1}, {0: 64, 1: 64, 2: 64, 3: 64})
    first = arms.index(1)  # once plain decoding earned the room for a measuring run (draft_payoff.py)
    assert RUN_STEPS <= first < 400 and 0 in arms[first + 1 : first + 3]
    steady = arms[first + 1:]
    assert 0 < sum(k > 0 for k in steady) <= len(steady) / PROBE_EVERY  # it does re-measure, one step a probe
    assert set(steady) == {0, 1}
    assert payoff.info()["bs<128"]["k"] == 0 and payoff.accept_rate < 0.3


def test_draft_payoff_picks_the_depth_that_pays() -> None:
    # Batch 1 on a GPU, well-accepted drafts: each depth costs a few percent more, the deepest wins.
    deep = DraftPayoff(3)
    arms = _serve(deep, 1500, 1, {0: 1.0, 1: 1.04, 2: 1.07, 3: 1.1}, {0: 1, 1: 2, 2: 2, 3: 3}, accept=0.8)
    steady = arms[5 * RUN_STEPS:]
    assert steady.count(3) >= len(steady) * (1 - RUN_STEPS / PROBE_EVERY) - RUN_STEPS
    assert deep.info()["bs<2"]["k"] == 3
    # Batch 8, middling acceptance: one draft per row pays, deeper chains cost more than they add.
    mid = DraftPayoff(3)
    arms = _serve(mid, 1500, 8, {0: 1.0, 1: 1.2, 2: 1.5, 3: 1.9}, {0: 8, 1: 13, 2: 15, 3: 17}, accept=0.6)
    steady = arms[5 * RUN_STEPS:]
    assert steady.count(1) >= len(steady) * (1 - RUN_STEPS / PROBE_EVERY) - RUN_STEPS
    # Buckets are separate, and steps that are not plain decode steps are never measured.
    assert set(deep.buckets) == {1} and set(mid.buckets) == {8 .bit_length()}
    idle = DraftPayoff(3)
    _serve(idle, 50, 8, {k: 1.0 for k in range(4)}, {k: 8 for k in range(4)}, plain_decode=False)
    assert all(a.samples == 0 for b in idle.buckets.values() for a in b.arms.values())
    assert idle.begin_step(0.0, 0, 0) == 0  # nothing running: nothing to draft for
    assert DraftPayoff(0).begin_step(0.0, 0, 4) == 0 and DraftPayoff(0).begin_step(1.0, 0, 4) == 0


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

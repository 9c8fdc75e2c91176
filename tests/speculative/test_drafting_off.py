"""Speculation on, drafting off (batch 64 on the H200: the payoff keeps plain decoding): a spec-on step does
what a spec-off step does. The n-gram indexes are warmed only near a step the payoff may let draft
(`DraftPayoff.steps_to_draft`), and drafting still turns back on when the payoff probes; with
OVERLAP_PREFILL_WITH_NGRAM prefill steps of many requests are overlapped with NGRAM as without speculation (not
with a draft model: it prefills its own KV)."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime import step_order
from radixlm.runtime.speculative import spec_decoder
from radixlm.runtime.speculative.draft_payoff import MAX_PROBE_EVERY, DraftPayoff
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler
from tests.speculative.test_draft_payoff import COSTS
from tests.speculative.test_payoff_replay import block_prompts, requests, timed_run, vocab_of
from tests.speculative.test_spec_scheduler import assert_same, run_checked


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def test_ngram_prefill_steps_are_overlapped(tiny, monkeypatch) -> None:
    """Prompts of a repeated block in chunks: with OVERLAP_PREFILL_WITH_NGRAM (off by default until measured on
    the H200) the prefill steps are overlapped with NGRAM on as without speculation (the next chunk launched before
    the first tokens are committed), outputs equal speculation off, drafting follows, and no slot is left behind."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 2)
    assert not make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True).overlap_prefill
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_WITH_NGRAM", True)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 250) for _ in range(24)] * 4 for _ in range(24)]
    reqs = [greedy_req(f"p{i}", ids, 20 + i) for i, ids in enumerate(prompts)]
    options = dict(enable_overlap_schedule_on_cpu=True, chunked_prefill_size=600)  # (chunks too large to mix)
    plain = make_scheduler(tiny, **options)
    ref = run_checked(plain, reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", **options)
    assert sched.overlap_prefill
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sched.stats["overlapped_prefill_steps"] == plain.stats["overlapped_prefill_steps"] >= 2, sched.stats
    assert sched.spec.verify_steps > 0
    assert_pool_idle(sched)


def test_a_draft_model_keeps_prefill_synchronous(tiny, monkeypatch) -> None:
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_WITH_NGRAM", True)
    sched = make_scheduler(tiny, speculative_algorithm="STANDALONE", speculative_draft_model_path=str(tiny),
                           enable_overlap_schedule_on_cpu=True)
    assert not sched.overlap_prefill


def serve_predicting(payoff: DraftPayoff, steps: int, running: int, accept_from: int) -> tuple[list[int], list[float]]:
    """test_draft_payoff.serve's loop (a step of arm k costs COSTS[k]; every drafted position accepted from
    step `accept_from` on, none before), with the payoff's steps_to_draft read after each begin_step."""
    arms, predicted, now, generated = [], [], 0.0, 0
    for step in range(steps):
        k = payoff.begin_step(now, generated, running)
        payoff.scheduled(True, k > 0)
        arms.append(k)
        predicted.append(payoff.steps_to_draft())
        for _ in range(running):
            accepted = k if step >= accept_from else 0
            if k:
                payoff.on_verified(k, accepted)
            generated += accepted + 1
        now += COSTS[k]
    return arms, predicted


@pytest.mark.parametrize("accept_from", [10**9, 6000])
def test_steps_to_draft_foresees_each_drafting_step(accept_from: int) -> None:
    """Batch 64, drafting twice as dear as plain decoding: probes wait for the exploring budget, then back off
    while nothing is accepted (or come back once drafts are). Each plain step's forecast is 0 where it drafts,
    and before each drafting step never later than it (the indexes are warm in time) nor more than a few
    steps early (they are not warmed all along)."""
    arms, predicted = serve_predicting(DraftPayoff(3), 20000, 64, accept_from)
    starts = [i for i, k in enumerate(arms) if k]
    assert len(starts) >= 4
    assert all(predicted[i] == 0 for i in starts)
    previous = 0
    for start in starts:
        for i in range(previous, start):
            ahead = start - i  # steps from i to the next drafting step
            assert predicted[i] <= ahead + 1 and predicted[i] >= ahead - max(3, ahead // 20), (i, start, predicted[i])
        previous = start + 1
    assert max(b - a for a, b in zip(starts, starts[1:])) >= 2048 or accept_from < 20000
    assert MAX_PROBE_EVERY >= 2048


def test_indexes_are_not_warmed_while_drafting_is_off(tiny) -> None:
    """test_payoff_replay's batch-64 run (the H200's step costs: the payoff never lets a step draft) with the
    overlap schedule: no n-gram index is built, where warming every step (before) indexed every prompt; the
    outputs equal speculation off either way."""
    reqs = requests(block_prompts(vocab_of(tiny), 64, seed=1), 48)
    _, ref, _ = timed_run(tiny, reqs, False, overlap=True)
    indexed = {}
    for lazy in (True, False):
        made = spec_decoder.SpecDecoder.warm

        def warm(self, running, made=made):
            before = sum(len(index.tokens) for index in self.drafter.indexes.values())
            self.lazy_warm = lazy
            made(self, running)
            indexed[lazy] = indexed.get(lazy, 0) + sum(len(i.tokens) for i in self.drafter.indexes.values()) - before
        spec_decoder.SpecDecoder.warm = warm
        try:
            _, got, sched = timed_run(tiny, reqs, True, overlap=True)
        finally:
            spec_decoder.SpecDecoder.warm = made
        assert got == ref
        assert sched.spec.verify_steps == 0 and sched.spec.payoff.info()["bs<128"]["k"] == 0
    assert indexed[True] == 0 and indexed[False] >= 16 * 512, indexed


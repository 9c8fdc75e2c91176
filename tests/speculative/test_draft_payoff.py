"""DraftPayoff on a fake clock: probing backs off while drafts are rejected and comes back when they
are accepted again (runtime/speculative/draft_payoff.py); the draft budget's grant() equals its
greedy rule written as a plain scan."""
from __future__ import annotations

import random
from collections.abc import Callable

import pytest

from radixlm.runtime.speculative.arm_rate import MIN_SAMPLES, WINDOW, ArmRate
from radixlm.runtime.speculative.draft_budget import grant
from radixlm.runtime.speculative.draft_payoff import (
    ABORT_TRIES,
    LOSS_SHARE,
    MAX_PROBE_EVERY,
    PROBE_EVERY,
    RUN_STEPS,
    SLACK_STEPS,
    DraftPayoff,
)


def serve(payoff: DraftPayoff, steps: int, running: int, step_s: dict[int, float],
          accept: Callable[[int], float]) -> list[int]:
    """A step of arm k takes step_s[k]; each row's chain of k drafts is verified with acceptance
    accept(step) per position (deterministic pattern) and emits its accepted drafts plus one token."""
    arms, now, generated = [], 0.0, 0
    for step in range(steps):
        k = payoff.begin_step(now, generated, running)
        payoff.scheduled(True, k > 0)
        arms.append(k)
        for row in range(running):
            accepted = 0
            while accepted < k and ((step * 7 + row * 3 + accepted * 5) % 100) < accept(step) * 100:
                accepted += 1
            if k:
                payoff.on_verified(k, accepted)
            generated += accepted + 1
        now += step_s[k]
    return arms


def drafting_starts(arms: list[int]) -> list[int]:
    return [i for i, k in enumerate(arms) if k and (i == 0 or not arms[i - 1])]


COSTS = {0: 1.0, 1: 1.9, 2: 2.0, 3: 2.1}  # batch 64 on the H200: a drafting step costs about two decode steps


def lost_against_plain(arms: list[int], step_s: dict[int, float], tokens: list[int], plain_rate: float) -> float:
    """What the drafting steps lost against plain decoding's rate (the payoff's own accounting)."""
    return sum(step_s[k] - t / plain_rate for k, t in zip(arms, tokens) if k)


def test_probes_back_off_while_nothing_is_accepted() -> None:
    payoff = DraftPayoff(3)
    arms = serve(payoff, 40000, 64, COSTS, lambda step: 0.0)
    starts = drafting_starts(arms)
    # The first try waits until plain decoding has earned the room for a measuring run (the prior: a
    # step that may draft costs ~2x at 64 rows, LOSS_SHARE of the time so far); each run of drafting
    # steps is one step (64 positions tried, none accepted: ABORT_TRIES), and the gap to the next
    # doubles from PROBE_EVERY up to MAX_PROBE_EVERY.
    assert 64 >= ABORT_TRIES and RUN_STEPS < starts[0] < 400
    assert all(arms[s + 1] == 0 for s in starts)
    gaps = [b - a for a, b in zip(starts, starts[1:])]
    assert all(b >= a - 2 for a, b in zip(gaps, gaps[1:])), gaps
    assert gaps[-1] >= MAX_PROBE_EVERY - 2 and sum(k > 0 for k in arms) == len(starts) <= 10
    # Probes never measured a drafting arm, so nothing but plain decoding is ever chosen, and what
    # they lost stays within the budget.
    assert payoff.info()["bs<128"]["k"] == 0 and payoff.buckets[7].probe_every == MAX_PROBE_EVERY
    lost = sum(COSTS[k] - 1.0 for k in arms if k)
    assert lost <= LOSS_SHARE * len(arms) + SLACK_STEPS, (lost, len(arms))


def test_probing_comes_back_when_drafts_are_accepted_again() -> None:
    payoff = DraftPayoff(3)
    switch = 6000  # the text changes: from here on drafts are accepted (a copy-heavy stretch, say)
    arms = serve(payoff, switch + 4000, 64, COSTS, lambda step: 0.0 if step < switch else 0.9)
    bucket = payoff.buckets[7]
    before = [s for s in drafting_starts(arms) if s < switch]
    assert len(before) <= 6 and bucket.probe_every == PROBE_EVERY  # reset by the probe that accepted
    # The first probe after the switch keeps its whole run, then the deeper arms are measured and the
    # one that pays is chosen: at 0.9 acceptance, 1 + .9 + .81 + .73 tokens per row for 2.1x the cost.
    after = arms[switch:]
    first = next(i for i, k in enumerate(after) if k)
    assert first <= MAX_PROBE_EVERY and after[first : first + RUN_STEPS] == [1] * RUN_STEPS
    assert payoff.info()["bs<128"]["k"] == 3
    assert after[-1000:].count(3) >= 1000 * (1 - RUN_STEPS / PROBE_EVERY) - RUN_STEPS


@pytest.mark.parametrize("deep_first_rows", [1, 0])
def test_one_row_measures_within_its_budget(deep_first_rows: int) -> None:
    # Batch 1, nothing accepted, a drafting step 1.25x a plain one: the prior (1.16x at one row) lets
    # the first drafting arm start at once (at batch 1 the deepest, k = 3; k = 1 as before where deep-first
    # is off); the losses end its run once they use up the budget, but not before it measured MIN_SAMPLES
    # intervals, and the bucket goes back to plain decoding.
    payoff = DraftPayoff(3, deep_first_rows=deep_first_rows)
    first = 3 if deep_first_rows else 1
    arms = serve(payoff, 4 * RUN_STEPS, 1, {0: 1.0, 1: 1.25, 2: 1.25, 3: 1.25}, lambda step: 0.0)
    assert arms[:RUN_STEPS] == [0] * RUN_STEPS and arms[RUN_STEPS] == first
    ran = next(i for i in range(RUN_STEPS, len(arms)) if arms[i] != first) - RUN_STEPS
    assert MIN_SAMPLES + 1 <= ran <= RUN_STEPS
    assert payoff.buckets[1].arm(first).explored() and not payoff.buckets[1].arm(first).abandoned
    assert set(arms[RUN_STEPS + ran:]) == {0} and payoff.buckets[1].probe_every == 2 * PROBE_EVERY
    assert payoff.lost_s <= LOSS_SHARE * payoff.decode_s + SLACK_STEPS * 1.0 + 0.25  # (+ the step that crossed it)


def greedy_scan(proposed: list[int], rates: list[float], beta: float) -> list[int]:
    """grant()'s rule written as the plain scan: the row whose next draft token adds the most
    expected tokens (the lowest row on ties), while it beats the step's tokens per unit of cost."""
    granted, gains = [0] * len(proposed), list(rates)
    tokens, cost = float(len(proposed)), 1.0 + beta * len(proposed)
    while True:
        open_rows = [i for i in range(len(proposed)) if granted[i] < proposed[i]]
        if not open_rows:
            return granted
        best = max(open_rows, key=gains.__getitem__)
        if gains[best] * cost <= beta * tokens:
            return granted
        granted[best] += 1
        tokens += gains[best]
        cost += beta
        gains[best] *= rates[best]


def test_grant_equals_the_greedy_scan() -> None:
    rng = random.Random(0)
    for _ in range(2000):
        n = rng.randrange(0, 70)
        proposed = [rng.randrange(0, 6) for _ in range(n)]
        rates = [rng.choice([0.0, 0.05, 0.6, 0.95, 1.0]) if rng.random() < 0.5 else rng.random() for _ in range(n)]
        beta = rng.choice([0.005, 0.05, 0.2])
        assert grant(proposed, rates, beta) == greedy_scan(proposed, rates, beta), (proposed, rates, beta)


def test_an_idle_gap_after_the_last_request_is_not_an_arm_step() -> None:
    """A step that finishes every request is followed by an idle wait (the next request's arrival):
    that interval is not the arm's step time, else one slow-looking sample can rank the arm last."""
    payoff = DraftPayoff(1)
    now = 0.0
    for _ in range(RUN_STEPS):  # arm 0's run at batch 1: the first interval of a run is dropped
        payoff.begin_step(now, 0, 1)
        payoff.scheduled(True, False)
        now += 0.01
    arm = payoff.buckets[1].arm(0)
    samples, recent = arm.samples, list(arm.recent)
    payoff.begin_step(now + 5.0, 1, 0)  # the request finished; the next one arrives 5 s later
    assert arm.samples == samples and list(arm.recent) == recent


def test_deeper_arms_are_not_explored_when_arm_one_gains_nothing_overall() -> None:
    """Batch 8 on the CPU: the one row that drafts is always right (acceptance ~1), the other seven
    never draft, and a drafting step costs 1.5x. Arm 1 measured 9 tokens a step against 8: the deeper
    arms can at best reach 8 + 4 = 12 tokens for >= 1.5x the time, so they are not explored."""
    payoff = DraftPayoff(4)
    arms, now, generated = [], 0.0, 0
    for _ in range(600):
        k = payoff.begin_step(now, generated, 8)
        payoff.scheduled(True, k > 0)
        arms.append(k)
        if k:
            payoff.on_verified(k, k)  # row 0: all accepted
        generated += 8 + k
        now += {0: 1.0, 1: 1.5, 2: 1.6, 3: 1.7, 4: 1.8}[k]
    assert payoff.accept_rate > 0.8  # the acceptance alone would have every arm explored
    assert not any(k >= 2 for k in arms), "an arm deeper than 1 was explored at a loss"
    assert payoff.info()["bs<16"]["k"] == 0


@pytest.mark.parametrize("deep_first_rows", [1, 0])
def test_arms_that_cannot_beat_the_deepest_are_not_explored(deep_first_rows: int) -> None:
    """Batch 1 in a loop the drafter follows (every draft accepted), step times as the H200 measured
    them (T(1)..T(4) within 5% of each other, 1.25x a decode step): once k = 4 is measured at ~5
    tokens a step, k = 2 and 3 (3 and 4 tokens for at least T(1)) cannot beat it and are not run. At
    batch 1 k = 4 is measured first and k = 1 not at all (the run of k = 1 first, as before, where
    deep-first is off)."""
    payoff = DraftPayoff(4, deep_first_rows=deep_first_rows)
    arms = serve(payoff, 200, 1, {0: 1.0, 1: 1.26, 2: 1.25, 3: 1.24, 4: 1.25}, lambda step: 1.0)
    ones = [1] * RUN_STEPS if not deep_first_rows else []
    assert arms[: 2 * RUN_STEPS + len(ones)] == [0] * RUN_STEPS + ones + [4] * RUN_STEPS
    assert set(arms[2 * RUN_STEPS + len(ones):]) == {4} and payoff.info()["bs<2"]["k"] == 4
    # where the deeper steps cost much more, the middle arms are still measured (deep-first: bounded by T(0))
    payoff = DraftPayoff(4, deep_first_rows=deep_first_rows)
    arms = serve(payoff, 200, 1, {0: 1.0, 1: 1.1, 2: 1.5, 3: 2.5, 4: 4.0}, lambda step: 1.0)
    assert {2, 3} <= set(arms) and payoff.info()["bs<2"]["k"] == 2


def test_a_disturbed_plain_measurement_is_taken_again() -> None:
    """Batch 64 on the H200: plain decoding's first run was disturbed (26 ms a step against 6 ms
    later), so every drafting arm looked faster and arm 3 ran at 0.83x. Here plain decoding's first
    run takes 4x its time; a drafting step is 2x a plain one and about half the draft positions are
    accepted. Plain decoding keeps running (exploring waits for its budget), its window of intervals
    refills with true steps, and once a drafting arm is measured, plain decoding still wins."""
    payoff = DraftPayoff(3)
    arms, now, generated, plain_steps = [], 0.0, 0, 0
    for step in range(3000):
        k = payoff.begin_step(now, generated, 64)
        payoff.scheduled(True, k > 0)
        arms.append(k)
        for row in range(64):
            accepted = min(k, (step + row) % 3)  # about half the draft positions accepted
            if k:
                payoff.on_verified(k, accepted)
            generated += accepted + 1
        if k == 0:
            plain_steps += 1
        now += 4.0 if k == 0 and plain_steps <= RUN_STEPS else {0: 1.0, 1: 1.9, 2: 2.0, 3: 2.1}[k]
    bucket = payoff.buckets[7]
    assert bucket.arm(0).step_s == 1.0 and bucket.arm(1).explored()
    assert payoff.info()["bs<128"]["k"] == 0
    # plain decoding, but for probes, which the budget paces (arms that about break even cost it
    # nothing, so they are probed more often): what they lose stays within it
    assert arms[-1000:].count(0) >= 800 and payoff.lost_s <= LOSS_SHARE * payoff.decode_s + SLACK_STEPS * 1.0


def test_a_single_slow_step_does_not_move_an_arm() -> None:
    """An arm's step time is the median of its latest intervals: one 150 ms stall among 6 ms steps
    (a GC pause, a compile) leaves it at 6 ms, where the mean read 26 ms on the H200."""
    arm = ArmRate()
    for seconds in (0.006, 0.006, 0.150, 0.006, 0.0061, 0.006):
        arm.record(64, seconds)
    assert arm.step_s == 0.006 and abs(arm.rate - 64 / 0.006) < 1.0
    for _ in range(WINDOW):
        arm.record(64, 0.010)  # the step got slower: the window follows
    assert arm.step_s == 0.010


def test_arm_statistics_are_computed_once_per_interval(monkeypatch):
    """The payoff reads an arm's median interval and mean tokens several times a step (host time under every
    decode step, drafting or not): they are computed once per recorded interval, and `Bucket.arm` makes no
    ArmRate for an arm it has."""
    from radixlm.runtime.speculative import arm_rate, draft_payoff

    calls = []
    real = arm_rate.statistics.median
    monkeypatch.setattr(arm_rate.statistics, "median", lambda xs: calls.append(1) or real(xs))
    arm = arm_rate.ArmRate()
    assert (arm.step_s, arm.tokens_per_step) == (0.0, 0.0)
    for tokens, seconds in [(1, 0.004), (3, 0.009), (2, 0.005)]:
        arm.record(tokens, seconds)
        for _ in range(5):
            assert arm.step_s == real(s for _, s in arm.recent)
            assert arm.tokens_per_step == sum(t for t, _ in arm.recent) / len(arm.recent)
    assert len(calls) == 3  # once per interval, not per read
    bucket = draft_payoff.Bucket(4)
    made = []
    monkeypatch.setattr(draft_payoff, "ArmRate", lambda: made.append(1) or real_arm())
    real_arm = type(arm)
    first = bucket.arm(2)
    assert all(bucket.arm(2) is first for _ in range(5)) and len(made) == 1

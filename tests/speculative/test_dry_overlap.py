"""Speculation on, text the n-gram index cannot follow: decode steps stay overlapped (as without
speculation) while every running request's last lookup found nothing, and drafting resumes once its
text repeats (SpecDecoder.dry / refresh); outputs identical to speculation off."""
from __future__ import annotations

import random

import pytest

import tests.speculative.test_payoff_replay as replay
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_payoff_replay import block_prompts, requests, timed_run, vocab_of
from tests.speculative.test_spec_scheduler import assert_same, run_checked


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def test_dry_requests_decode_overlapped_then_draft_again(tiny) -> None:
    rng = random.Random(3)
    prompts = [[rng.randrange(3, 250) for _ in range(40)] for _ in range(2)]  # nothing repeats
    reqs = [greedy_req(f"d{i}", ids, 60) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=1)
    ahead_of_commit = []  # steps scheduled before the overlapped step before them was committed
    check = sched._can_schedule_before_commit
    sched._can_schedule_before_commit = lambda: ahead_of_commit.append(check()) or ahead_of_commit[-1]
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    # the tiny model's greedy text falls into a loop part-way: plain steps before it, verify steps after
    assert sum(ahead_of_commit) >= 10
    assert sched.spec.verify_steps > 0 and not sched.spec.dry
    assert_pool_idle(sched)


def test_batch_1_loop_on_the_replayed_h200_clock_drafts_deeper(tiny) -> None:
    """test_payoff_replay's batch-1 loop with the overlap schedule (as on a GPU): dry steps cost a plain
    step and are not charged to the drafting arms, so the payoff keeps a deep arm and the run gains more
    than with them synchronous and measured (dry_overlap off: the steps as before)."""
    reqs = requests(block_prompts(vocab_of(tiny), 4, seed=2), 128)
    off, ref, _ = timed_run(tiny, reqs, False, one_at_a_time=True, overlap=True)
    on, got, sched = timed_run(tiny, reqs, True, one_at_a_time=True, overlap=True)
    assert {r: v["output_ids"] for r, v in got.items()} == {r: v["output_ids"] for r, v in ref.items()}
    assert sched.spec.dry_overlap and sched.spec.payoff.info()["bs<2"]["k"] >= 3, sched.spec.payoff.info()
    made = replay.make_scheduler  # the same run with dry_overlap off (benchmarks/speculative.py --dry-ab's switch)

    def without_dry(*a, **k):
        sched = made(*a, **k)
        if sched.spec is not None:
            sched.spec.dry_overlap = False
        return sched
    replay.make_scheduler = without_dry
    try:
        on_before, got_before, _ = timed_run(tiny, reqs, True, one_at_a_time=True, overlap=True)
    finally:
        replay.make_scheduler = made
    assert got_before == got
    assert off / on > 1.15 * off / on_before, (off / on, off / on_before)

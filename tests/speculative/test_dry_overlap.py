"""Speculation on, text the n-gram index cannot follow: decode steps stay overlapped (as without
speculation) while every running request's last lookup found nothing, and drafting resumes once its
text repeats (SpecDecoder.dry / refresh); outputs identical to speculation off."""
from __future__ import annotations

import random

import pytest

from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
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

"""Batch 1 on a GPU (the overlap schedule), with FULL_DEPTH_ROWS (on by default since the H200 A/B of 2026-12-05): NGRAM
chains as deep as the step's k allows (the SpecDecoder's floor under each request's DraftDepth: a verify step costs
about the same at any k there), not a request's own depth, which falls to the accepted count + 1 after each
rejection."""
from __future__ import annotations

import pytest

from radixlm.runtime.speculative import spec_decoder
from radixlm.runtime.speculative.ngram import LONG_MATCH, NgramDrafter
from tests.runtime.helpers import make_scheduler
from tests.speculative.test_payoff_replay import block_prompts, requests, timed_run, vocab_of


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def test_drafter_depth_floor_applies_to_every_lookup() -> None:
    """`NgramDrafter.min_depth` (the step's k at batch 1 on a GPU) floors every request's draft depth: after a
    rejection the next chain is still k deep on a long match, also when built ahead (guess_after, propose_after);
    a short match still drafts at most what it matched."""
    text = list(range(300, 340))
    drafter = NgramDrafter()
    out = text[:LONG_MATCH + 2]
    drafter.propose(1, text + [5], out, 6)
    drafter.on_verified(1, 6, 0)  # rejected at once: the request's own depth falls to 1
    assert len(drafter.propose(1, text + [5], out, 6)) == 1
    drafter.min_depth = 4
    assert drafter.propose(1, text + [5], out, 6) == text[len(out) : len(out) + 4]
    assert len(drafter.guess_after(1, text + [5], out, text[len(out) : len(out) + 2], 8)) == 1 + 4
    assert drafter.depth_after(1, 4, 1) == 4 and len(drafter.propose_after(1, text + [5], out, [text[len(out)]], 4, 6)) == 4
    short = NgramDrafter()
    short.min_depth = 4
    assert len(short.propose(2, [7, 8, 9, 7, 8], [], 6)) <= 2  # a 2-token match


def test_batch_1_chains_as_deep_as_the_step_allows(tiny) -> None:
    """Batch 1 with the overlap schedule (as on a GPU) on the repeated block the tiny model loops on: every
    verify step drafts the step's k where the n-gram match is long (the SpecDecoder's floor), more tokens a verify
    step than with each request's own depth (full_depth_rows 0); outputs equal speculation off either way, and
    a batch of two rows keeps the requests' own depths."""
    reqs = requests(block_prompts(vocab_of(tiny), 2, seed=4), 96)
    _, ref, _ = timed_run(tiny, reqs, False, one_at_a_time=True, overlap=True)
    drafted = {}
    for rows in (1, 0):
        made = spec_decoder.SpecDecoder.begin_step

        def begin_step(self, *a, made=made, rows=rows):
            self.full_depth_rows = rows
            if self.payoff is not None:  # (both runs: the deepest arm measured first, so k is deep from the start)
                self.payoff.deep_first_rows = 1
            made(self, *a)
        spec_decoder.SpecDecoder.begin_step = begin_step
        try:
            _, got, sched = timed_run(tiny, reqs, True, one_at_a_time=True, overlap=True)
        finally:
            spec_decoder.SpecDecoder.begin_step = made
        assert got == ref
        drafted[rows] = sched.spec.draft_tokens / sched.spec.verify_steps
    assert drafted[1] > drafted[0] + 0.3, drafted
    assert make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True).spec.full_depth_rows \
        == spec_decoder.FULL_DEPTH_ROWS == 1  # (on for batch 1 since the H200 A/B of 2026-12-05)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True)
    assert make_scheduler(tiny, speculative_algorithm="NGRAM").spec.full_depth_rows == 0  # (no overlap: the CPU)
    sched.spec.begin_step(0.0, 0, 2)
    assert sched.spec.full_depth_rows == 1 and sched.spec.drafter.min_depth == 0
    sched.spec.begin_step(0.0, 0, 1)
    assert sched.spec.drafter.min_depth == sched.spec.max_drafts

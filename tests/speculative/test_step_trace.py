"""benchmarks/spec_step_trace.py, where a batch-1 spec-on run's time goes: on the replayed H200 clock
(test_payoff_replay.DeviceClock) every token and verify result is accounted for, the step kinds' terms add up to
the run's a x T_on / T_off - 1 (x/accept = 1 / (1 + their sum)), and the trace leaves the clock's own wrapper of
the forward in place, so later runs are still timed."""
from __future__ import annotations

import pytest

from radixlm.benchmarks.spec_step_trace import StepTrace, goal_terms
from radixlm.runtime.speculative.draft_budget import BETA
from radixlm.runtime.speculative.draft_payoff import DraftPayoff
from tests.runtime.helpers import make_scheduler, run_to_completion
from tests.speculative.test_payoff_replay import DeviceClock, block_prompts, requests, vocab_of


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def traced_runs(model_dir, reqs, spec: bool) -> tuple[list[dict], list[float], object]:
    options = dict(max_total_tokens=65536, enable_overlap_schedule_on_cpu=True)
    if spec:
        options.update(speculative_algorithm="NGRAM", speculative_num_steps=4)
    sched = make_scheduler(model_dir, **options)
    clock = DeviceClock(sched)
    if spec:
        sched.spec.beta, sched.spec.payoff, sched.spec.clock = BETA["cuda"], DraftPayoff(sched.spec.max_drafts), clock
    splits, seconds = [], []
    for req in reqs:
        with StepTrace(sched, clock) as trace:
            start = clock()
            run_to_completion(sched, [req])
            end = clock()
        splits.append(trace.split(start, end))
        seconds.append(end - start)
    return splits, seconds, sched


def test_the_step_kinds_account_for_the_whole_run(tiny) -> None:
    reqs = requests(block_prompts(vocab_of(tiny), 2, seed=2), 96)
    off_splits, off_s, _ = traced_runs(tiny, reqs, False)
    on_splits, on_s, sched = traced_runs(tiny, reqs, True)
    assert all(s > 0 for s in on_s + off_s)  # (the second request is timed too: the clock's wrapper was kept)
    verify_steps = verify_tokens = 0
    for split, off, on in zip(on_splits, off_splits, on_s):
        assert sum(c["tokens"] for c in split.values()) == 96
        assert abs(sum(c["ms"] for c in split.values()) / 1e3 - on) < 1e-5  # (ms rounded to 3 places per kind)
        verify = [c for k, c in split.items() if k.startswith("verify")]
        verify_steps += sum(c["n"] for c in verify)
        verify_tokens += sum(c["tokens"] for c in verify)
        terms = goal_terms(split, off)
        a, t_off = terms["accept"], terms["off_s"]
        assert abs(sum(terms["loss_share"].values()) - (a * on / t_off - 1)) < 1e-3, terms
        assert terms["x_per_accept"] == round(t_off / (a * on), 3) and 0 < terms["verify_x_per_accept"] < 1.5
    assert (verify_steps, verify_tokens) == (sched.spec.verify_steps, sched.spec.verify_tokens) and verify_steps > 0
    assert set(off_splits[0]) <= {"setup", "prefill", "plain_k0"}

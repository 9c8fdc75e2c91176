"""A draft row's cost at batch 1 without overlap scheduling, measured (runtime/speculative/row_cost.py), prices
the draft budget there, and the payoff leaves batch 1 to the budget (DraftPayoff(measure_from=2))."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.speculative.draft_budget import grant
from radixlm.runtime.speculative.draft_payoff import DraftPayoff
from radixlm.runtime.speculative.row_cost import MAX_BETA, MIN_SAMPLES, RowCost
from tests.runtime.helpers import make_scheduler, run_to_completion


def feed(cost: RowCost, steps: list[tuple[int, int, bool, float]]) -> None:
    """(running, rows, plain decode, seconds) per scheduler step, on a fake clock."""
    now = 0.0
    for running, rows, plain, seconds in steps:
        cost.begin_step(now, running)
        cost.scheduled(plain, rows)
        now += seconds


def test_rho_is_the_slope_of_single_row_decode_steps() -> None:
    cost = RowCost()
    assert cost.beta(0.2) == 0.2  # nothing measured: the prior
    steps = [(1, 1, True, 0.010)] * 4 + [(1, 3, True, 0.014)] * 4  # two drafts: 1.4x a one-row step
    steps += [(1, 5, True, 0.018)] * 4 + [(1, 5, True, 0.500)]  # four: 1.8x; one disturbed step
    steps += [(4, 4, True, 0.900)] * 4  # batch 4: not measured here
    steps += [(1, 1, False, 0.900)] * 4  # a prefill (or mixed) step: not a decode step
    steps += [(1, 3, True, 0.900), (0, 0, False, 0.0)]  # the last step before an idle gap
    feed(cost, steps)
    assert sorted(cost.times) == [1, 3, 5]
    assert cost.relative_row_cost() == pytest.approx(0.2)
    assert cost.beta(0.2) == pytest.approx(0.25)  # rho / (1 - rho)


def test_a_row_count_counts_once_measured_enough() -> None:
    cost = RowCost()
    feed(cost, [(1, 1, True, 0.010)] * 4 + [(1, 2, True, 0.030)] * (MIN_SAMPLES - 1) + [(1, 1, True, 0.010)])
    assert cost.relative_row_cost() is None and cost.beta(0.2) == 0.2
    feed(cost, [(1, 2, True, 0.030), (1, 1, True, 0.010)])
    assert cost.relative_row_cost() == pytest.approx(2.0)
    assert cost.beta(0.2) == MAX_BETA


def test_a_step_recomputes_only_its_own_row_count(monkeypatch) -> None:
    """beta() is read every drafting step: the medians are kept, only the recorded count's taken again."""
    import radixlm.runtime.speculative.row_cost as row_cost

    calls = []
    median = row_cost.statistics.median
    monkeypatch.setattr(row_cost.statistics, "median", lambda data: calls.append(1) or median(data))
    cost = RowCost()
    feed(cost, [(1, r, True, 0.010 * (1 + 0.1 * (r - 1))) for r in (1, 2, 3, 4, 5) * 5])
    assert len(calls) == 5 * (5 - MIN_SAMPLES + 1) - 1  # the last step's interval is still open
    for _ in range(10):
        cost.beta(0.2)
    assert len(calls) == 5 * (5 - MIN_SAMPLES + 1) - 1
    assert cost.relative_row_cost() == pytest.approx(0.1)


def test_the_budget_drafts_where_acceptance_beats_the_measured_row_cost() -> None:
    """At batch 1 the first draft pays exactly where its acceptance beats rho: beta = rho / (1 - rho)."""
    for rho in (0.1, 0.2, 0.5, 0.8):
        beta = rho / (1 - rho)
        assert grant([4], [rho + 0.01], beta)[0] >= 1
        assert grant([4], [rho - 0.01], beta)[0] == 0
    assert grant([4], [0.99], MAX_BETA) == [0]


def test_the_payoff_leaves_batch_one_to_the_budget() -> None:
    payoff = DraftPayoff(3, measure_from=2)
    now, generated = 0.0, 0
    for _ in range(50):
        assert payoff.begin_step(now, generated, 1) == 3
        payoff.scheduled(True, True)
        payoff.on_verified(3, 1)
        generated += 2
        now += 0.01
    assert "bs<2" not in payoff.info()
    assert payoff.tried > 0 and payoff.accept_rate < 0.6  # its verify results still count: 1 of 2 tried
    assert payoff.begin_step(now, generated, 4) == 0  # batch 4: measured, plain decoding first
    assert "bs<8" in payoff.info()
    measured = DraftPayoff(3)
    assert measured.begin_step(0.0, 0, 1) == 0 and "bs<2" in measured.info()


class RowClock:
    """A simulated CPU: a decode step costs 10 ms plus `per_row` of that per row beyond the first."""

    def __init__(self, sched, per_row: float) -> None:
        self.t, self.per_row, self.forward = 0.0, per_row, sched.runner.forward
        sched.runner.forward = self._forward

    def __call__(self) -> float:
        return self.t

    def _forward(self, fb):
        rows = int(fb.input_ids.shape[0])
        self.t += 0.010 * ((1 + self.per_row * (rows - 1)) if fb.mode == ForwardMode.DECODE else 2.0)
        return self.forward(fb)


@pytest.mark.parametrize("per_row", [0.05, 1.0])
def test_batch_one_stops_drafting_where_a_draft_row_costs_a_whole_row(tiny_model_dir, per_row: float) -> None:
    """On the CPU (no overlap scheduling) at batch 1: where each verify row costs a whole decode step (a CPU
    without the multi-row GEMV) drafting stops once that is measured, though the drafts are accepted (the
    constant beta of 0.2 kept drafting); where a row costs 5% drafting goes on. Outputs stay spec off's."""
    model = tiny_model_dir("llama")
    rng = random.Random(5)
    prompt = [rng.randrange(10, 200) for _ in range(32)] * 4

    def run(spec: bool):
        options = dict(speculative_algorithm="NGRAM", speculative_num_steps=4) if spec else {}
        sched = make_scheduler(model, **options)
        if spec:
            sched.spec.row_cost = RowCost()  # (make_scheduler leaves it and the payoff out)
            sched.spec.payoff = DraftPayoff(sched.spec.max_drafts, 2)
            sched.spec.clock = RowClock(sched, per_row)
        reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=prompt, params=SamplingParams(
            temperature=0.0, max_new_tokens=48, ignore_eos=True)) for i in range(3)]
        out = {}
        drafts = []
        for req in reqs:  # one at a time: batch 1
            out.update(run_to_completion(sched, [req]))
            drafts.append(sched.spec.info()["spec_draft_tokens"] if spec else 0)
        return out, drafts, sched

    ref, _, _ = run(False)
    got, drafts, sched = run(True)
    assert {r: v["output_ids"] for r, v in got.items()} == {r: v["output_ids"] for r, v in ref.items()}
    rho = sched.spec.row_cost.relative_row_cost()
    assert rho == pytest.approx(per_row, rel=0.05)
    accepted = sched.spec.info()["spec_accepted_tokens"]
    assert accepted > 0.5 * drafts[-1]  # the drafts were good ones
    if per_row == 1.0:
        assert drafts[-1] == drafts[0]  # measured during the first request; none after it
    else:
        assert drafts[-1] - drafts[1] > 20  # the last request drafted on


def test_ceiling_replays_a_copy_as_verification_would() -> None:
    """benchmarks/spec_ceiling.py: an output that goes on copying its prompt is accepted k tokens a step by the
    oracle (the last step only what is left), the runtime drafter's steps emit the output exactly, and with free
    verify rows the speed-up is the tokens per step."""
    from radixlm.benchmarks.spec_ceiling import ceiling, ngram_steps, oracle_steps

    block = list(range(10, 30))
    prompt, output = block + block[:2], block[2:]  # 18 tokens, each following its earlier occurrence
    assert oracle_steps(prompt, output, 4, 2) == [4, 4, 4, 2]
    assert oracle_steps(prompt, output, 4, 1) == [4, 4, 4, 2]
    assert oracle_steps([1, 2, 3], [7, 8, 9], 4, 1) == [0, 0, 0]  # nothing to copy
    steps = ngram_steps(prompt, output, 4, 0.25)
    assert sum(a + 1 for _, a in steps) == len(output) and all(a <= d for d, a in steps)
    assert sum(a for _, a in steps) > len(output) // 2
    free = ceiling([(prompt, output)], [1.0] * 9, 4)
    assert all(c["speedup"] == c["tokens_per_step"] for c in free.values())
    assert free["oracle_n2"]["tokens_per_step"] == 9.0  # the oracles draft up to the table: 8 + 1, twice
    priced = ceiling([(prompt, output)], [1.0 + 0.25 * k for k in range(9)], 4)
    assert priced["oracle_n2"]["speedup"] < free["oracle_n2"]["speedup"]

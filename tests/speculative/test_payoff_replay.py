"""The payoff (draft_payoff.py) inside the real scheduler, on a replayed H200 clock.

A tiny random-weight model runs the real scheduler, NGRAM drafter, budget and verification; the
payoff's clock is not the CPU's but a simulated device clock that advances, per forward pass, by
what such a step cost on the H200 (8B shape, benchmarks/RESULTS.md, e96362f at 15:14): a plain decode
step T0(batch) (4.2 ms at batch 1 to 6.3 ms at 64, overlapped: host work hidden) and a step that may
draft T0 x (1 + 1.5% per draft depth) + the exposed host work (0.7 ms + 0.075 ms a row: 5.5 ms at 64,
so a drafting step costs ~2x a plain one there), with a 150 ms stall (a GC pause, a compile) in the
third plain step at batch 64. Spec off and on are timed on the same clock: drafting must
pay where it can (a repeated block the model loops on), and must never lose more than the exploring
budget where it cannot (drafting made 3x dearer, or sampled text drafts are rarely right)."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.speculative.draft_budget import BETA
from radixlm.runtime.speculative.draft_payoff import LOSS_SHARE, SLACK_STEPS, DraftPayoff
from tests.runtime.helpers import make_scheduler, run_to_completion

PLAIN_MS = {1: 4.16, 2: 4.15, 4: 4.3, 8: 4.3, 16: 5.1, 32: 5.3, 64: 6.3}  # H200, 8B shape, bf16 (start to start)


def plain_ms(rows: int) -> float:
    return next(ms for b, ms in sorted(PLAIN_MS.items()) if rows <= b) if rows <= 64 else PLAIN_MS[64] * rows / 64


class DeviceClock:
    """Seconds of a simulated device: each forward pass adds what it would have cost on the H200."""

    def __init__(self, sched, host_ms_per_row: float = 0.075, stall_ms: float = 150.0) -> None:
        self.t = 0.0
        self.sched = sched
        self.host_ms_per_row = host_ms_per_row
        self.stall_ms = stall_ms  # once, in the third plain decode step at batch >= 64
        self.plain_at_64 = 0
        self.forward = sched.runner.forward
        sched.runner.forward = self._forward

    def __call__(self) -> float:
        return self.t

    def _forward(self, fb, *staged):
        running = len(self.sched.running)
        spec = self.sched.spec
        if fb.mode != ForwardMode.DECODE:
            ms = 5.0 + 0.02 * int(fb.input_ids.shape[0])  # prefill: dropped by the payoff, counted end to end
        elif spec is not None and spec.step_k > 0 and spec.may_draft(self.sched.running):
            ms = plain_ms(running) * (1 + 0.015 * spec.step_k) + 0.7 + self.host_ms_per_row * running
        else:
            ms = plain_ms(running)
            if running >= 64:
                self.plain_at_64 += 1
                ms += self.stall_ms if self.plain_at_64 == 3 else 0.0
        self.t += ms / 1e3
        return self.forward(fb, *staged)


def timed_run(model_dir, reqs: list[TokenizedGenerateReq], spec: bool, one_at_a_time: bool = False,
              overlap: bool = False, **clock_options) -> tuple[float, dict, object]:
    options = dict(max_total_tokens=65536, max_running_requests=128, enable_overlap_schedule_on_cpu=overlap)
    if spec:
        options.update(speculative_algorithm="NGRAM", speculative_num_steps=4)
    sched = make_scheduler(model_dir, **options)
    clock = DeviceClock(sched, **clock_options)
    if spec:
        sched.spec.beta = BETA["cuda"]  # the GPU's draft budget: the payoff decides
        sched.spec.payoff = DraftPayoff(sched.spec.max_drafts)  # (make_scheduler leaves it out)
        sched.spec.clock = clock
    out: dict = {}
    for group in ([r] for r in reqs) if one_at_a_time else [reqs]:
        out.update(run_to_completion(sched, group))
    return clock.t, out, sched


def block_prompts(vocab: int, batch: int, seed: int = 0) -> list[list[int]]:
    """speculative.py's repeat set: a random 64-token block repeated 8 times per request."""
    rng = random.Random(seed)
    return [[rng.randrange(10, vocab - 10) for _ in range(64)] * 8 for _ in range(batch)]


def requests(prompts: list[list[int]], new_tokens: int, **params) -> list[TokenizedGenerateReq]:
    return [TokenizedGenerateReq(rid=f"r{i}", input_ids=p, params=SamplingParams(
        max_new_tokens=new_tokens, ignore_eos=True, **{"temperature": 0.0, **params})) for i, p in enumerate(prompts)]


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def vocab_of(model_dir) -> int:
    import json

    return json.loads((model_dir / "config.json").read_text())["vocab_size"]


def test_batch_16_drafts_where_it_pays(tiny) -> None:
    """Batch 16 on the loop: a drafting step costs ~1.4x a plain one, and k = 4 emits ~4 tokens a row:
    the payoff explores within the first request's tokens and ends on a deep arm."""
    reqs = requests(block_prompts(vocab_of(tiny), 16), 128)
    off, ref, _ = timed_run(tiny, reqs, False)
    on, got, sched = timed_run(tiny, reqs, True)
    assert {r: v["output_ids"] for r, v in got.items()} == {r: v["output_ids"] for r, v in ref.items()}
    info = sched.spec.payoff.info()
    assert info["bs<32"]["k"] >= 2 and info["bs<32"]["k4_tok_s"] > 2 * info["bs<32"]["k0_tok_s"], info
    assert off / on > 1.05, (off, on, info)


@pytest.mark.parametrize("case", ["h200", "dear", "sampled"])
def test_batch_64_never_loses_more_than_the_exploring_budget(tiny, case: str) -> None:
    """h200: the repeat set at batch 64 with the H200's step costs (drafting ~2x a plain step);
    dear: every drafting step costs 3x a plain one (host work 0.2 ms a row); sampled: temperature 1,
    the text rarely repeats, drafts are rarely right. The 150 ms stall lands in plain decoding's run."""
    prompts = block_prompts(vocab_of(tiny), 64, seed=1)
    params = {"temperature": 1.0, "seed": 7} if case == "sampled" else {}
    clock = {"host_ms_per_row": 0.2} if case == "dear" else {}
    reqs = requests(prompts, 128, **params)
    off, ref, _ = timed_run(tiny, reqs, False, **clock)
    on, got, sched = timed_run(tiny, reqs, True, **clock)
    assert {r: v["output_ids"] for r, v in got.items()} == {r: v["output_ids"] for r, v in ref.items()}
    payoff = sched.spec.payoff
    bucket = payoff.info()["bs<128"]
    assert bucket["k"] == 0 and bucket["k0_step_ms"] == PLAIN_MS[64], payoff.info()  # the median ignored the stall
    # at most what the budget allows: LOSS_SHARE of the decode time + SLACK_STEPS plain steps
    assert on <= off + LOSS_SHARE * payoff.decode_s + SLACK_STEPS * PLAIN_MS[64] / 1e3, (off, on, payoff.exploring())


def test_batch_1_drafts_deep_at_once(tiny) -> None:
    """Batch 1, one request after another on the loop (one payoff, as a server keeps it): the payoff
    reaches a deep arm, and the run keeps most of what the tokens per verify step allow."""
    reqs = requests(block_prompts(vocab_of(tiny), 4, seed=2), 128)
    off, ref, _ = timed_run(tiny, reqs, False, one_at_a_time=True)
    on, got, sched = timed_run(tiny, reqs, True, one_at_a_time=True)
    assert {r: v["output_ids"] for r, v in got.items()} == {r: v["output_ids"] for r, v in ref.items()}
    accept = sched.spec.info()["avg_spec_accept_length"]
    assert sched.spec.payoff.info()["bs<2"]["k"] >= 2, sched.spec.payoff.info()
    assert off / on > 1.4 and accept > 3, (off, on, accept, sched.spec.payoff.info())

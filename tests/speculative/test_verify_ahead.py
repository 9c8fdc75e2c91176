"""Verify steps launched ahead of the previous one's results (runtime/speculative/verify_ahead.py):
the guess-built step runs where its guess holds, outputs stay identical to speculation off, KV stays
exact (an undone step gives its slots back; a launched one's slots are owned while in flight) and the
radix tree never holds an unverified token."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import FinishReason, TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.result_processor import ResultProcessor
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.speculative import verify_ahead
from radixlm.runtime.speculative.ngram import NgramDrafter, NgramIndex
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def loop_prompts(count: int) -> list[list[int]]:
    """Prompts that repeat a block: the tiny model's greedy output follows the loop for a while."""
    return [[70 + i, 300 + i, 41, 290, 120 + i, 55] * 6 for i in range(count)]


def test_lookup_after_reads_unindexed_tokens_as_appended() -> None:
    index = NgramIndex()
    cycle = [11, 12, 13, 14, 15]
    index.sync(cycle * 3, [])
    assert index.lookup_after([], 4) == index.lookup(4)
    # the tokens after a guessed run: the loop goes on past it, the extra tokens part of its period
    assert index.lookup_after([11, 12], 6)[0] == [13, 14, 15, 11, 12, 13]
    # matched among indexed n-grams only, nothing indexed by the guess
    before = (list(index.tokens), dict(index.follow))
    assert index.lookup_after([99, 98], 3) == ([], 0)
    assert (index.tokens, index.follow) == before
    # equal to indexing the extra tokens, where the match lies in the indexed text
    fresh = NgramIndex()
    fresh.sync(cycle * 3 + [11, 12], [])
    assert index.lookup_after([11, 12], 6)[0] == fresh.lookup(6)[0]


def test_guess_after_is_the_bonus_then_the_deeper_drafts() -> None:
    drafter = NgramDrafter()
    prompt = [21, 22, 23, 24] * 5
    first = drafter.propose(1, prompt, [], 8)
    assert first == [21, 22]  # START_DEPTH
    after = drafter.guess_after(1, prompt, [], first, 9)
    assert after == [23, 24, 21, 22, 23]  # bonus 23, then START_DEPTH + DEPTH_STEP drafts
    assert drafter.indexes[1].tokens == prompt  # the guess indexed nothing


def test_ahead_steps_run_and_outputs_are_identical(tiny) -> None:
    prompts = loop_prompts(3) + copy_prompts(tiny, 3)
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=1, speculative_num_steps=4)
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sched.stats["ahead_steps"] > 0
    assert sched.ahead is None
    assert_pool_idle(sched)
    off = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                         max_running_requests=1, speculative_num_steps=4, disable_speculative_ahead=True)
    assert_same(run_checked(off, reqs), ref)
    assert off.stats["ahead_steps"] == 0
    # about the same steps (a step built ahead drafts the guessed continuation, not a fresh lookup's)
    assert abs(sched.stats["forward_steps"] - off.stats["forward_steps"]) <= off.stats["forward_steps"] // 10


class ScriptedDrafter(NgramDrafter):
    """Drafts a scripted continuation (the model's own output with every 5th token changed): drafts are
    rejected at the changed tokens, and the script always has a continuation after any run."""

    def __init__(self, script: list[int]) -> None:
        super().__init__()
        self.script = script

    def propose(self, key: int, prompt: list[int], output: list[int], max_tokens: int) -> list[int]:
        return self.script[len(output) : len(output) + max(max_tokens, 0)]

    def guess_after(self, key: int, prompt: list[int], output: list[int], drafts: list[int], max_tokens: int
                    ) -> list[int]:
        return self.propose(key, prompt, output + drafts, max_tokens)

    def propose_after(self, key: int, prompt: list[int], output: list[int], run: list[int], drafted: int,
                      max_tokens: int) -> list[int]:
        return self.propose(key, prompt, output + run, max_tokens)


def test_a_wrong_guess_rebuilds_the_next_step_before_the_results(tiny) -> None:
    """Drafts rejected part-way: the step built on the guess is undone, the next one built from the actual
    outcome (rejected slots freed first) and launched before the results are processed; outputs, KV
    accounting and the tree stay exact."""
    [ids] = loop_prompts(1)
    ref = run_to_completion(make_scheduler(tiny), [greedy_req("z", ids, 48)])["z"]["output_ids"]
    script = [t if i % 5 != 3 else (t + 1) % 256 for i, t in enumerate(ref)]
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=1, speculative_num_steps=3)
    sched.spec.drafter = ScriptedDrafter(script)
    got = run_checked(sched, [greedy_req("z", ids, 48)])
    assert got["z"]["output_ids"] == ref
    assert sched.stats["ahead_rebuilt_steps"] > 0
    assert sched.stats["ahead_steps"] > sched.stats["ahead_rebuilt_steps"]  # right guesses too
    assert_pool_idle(sched)


def test_wrong_guesses_are_undone_and_batches_stay_exact(tiny, monkeypatch) -> None:
    """Two rows, sampled and greedy, stops at max_new_tokens: guesses fail often (every row's must hold);
    each failed one gives back what it built, and outputs match speculation off."""
    built, undone = [], []
    build, undo = verify_ahead.build_next, verify_ahead.undo
    monkeypatch.setattr(verify_ahead, "build_next", lambda s, b: built.append(1) or build(s, b))
    monkeypatch.setattr(verify_ahead, "undo", lambda s, n: undone.append(1) or undo(s, n))
    prompts = loop_prompts(4) + copy_prompts(tiny, 2)
    reqs = [TokenizedGenerateReq(rid=f"s{i}", input_ids=ids, params=SamplingParams(
        max_new_tokens=23 + 3 * i, temperature=0.0 if i % 2 else 0.3, seed=5 + i)) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=2, speculative_num_steps=3)
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    guessed = sched.stats["ahead_steps"] - sched.stats["ahead_rebuilt_steps"]
    assert undone  # (right guesses of every row at once are rare here: test_ahead_steps_run... has them)
    assert len(built) >= len(undone) + guessed
    assert_pool_idle(sched)


def test_abort_while_a_step_runs_ahead(tiny) -> None:
    """An abort settles the step in flight first: the aborted request's KV (and the tree) hold only
    verified tokens; the other requests run on and match speculation off."""
    prompts = loop_prompts(2)
    reqs = [greedy_req(f"a{i}", ids, 60) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=1)
    aborted_in_flight = []
    original = sched.settle

    def settle() -> None:
        aborted_in_flight.append(sched.ahead is not None)
        original()
    sched.settle = settle  # type: ignore[method-assign]
    for step in range(3, 40, 4):
        got = run_checked(sched, reqs, abort_after={"a0": step})
        if got["a0"]["finished_reason"]["type"] == "abort" and any(aborted_in_flight):
            break
    assert any(aborted_in_flight)
    assert got["a1"] == {**got["a1"], "output_ids": ref["a1"]["output_ids"]}
    assert ref["a0"]["output_ids"][: len(got["a0"]["output_ids"])] == got["a0"]["output_ids"]
    assert_pool_idle(sched)


def test_targets_drawn_for_every_row_skip_a_finished_row() -> None:
    """Targets drawn ahead cover every verify row; a row that finished meanwhile is skipped with its
    own targets, the others keep theirs."""
    reqs = [Req(rid=f"q{i}", input_ids=[1, 2, 3], params=SamplingParams(temperature=0.0, max_new_tokens=10), seed=0)
            for i in range(2)]
    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    batch.set_decode_rows(reqs, torch.arange(1, 6), [[5, 6], [7]], [None, None])
    batch.verify_rows = [[0, 1, 2], [3, 4]]
    reqs[0].finished_reason = FinishReason.abort("gone")
    results = ResultProcessor(None, [0], 100, jump_forward=False, decode_graphs=False)
    events = results.process(batch, torch.zeros(5, 16), {}, None, 2, targets=[5, 6, 9, 7, 8])
    assert [e.req for e in events] == [reqs[1]]
    assert reqs[1].output_ids == [7, 8] and events[0].accepted == 1 and reqs[0].output_ids == []


def test_a_failure_while_a_step_runs_ahead_frees_its_kv(tiny) -> None:
    """Result processing raises after the step built ahead was launched: the request fails alone (500),
    every slot it held — the launched step's too — goes back, nothing unverified enters the tree, and
    the scheduler serves the next request as speculation off would."""
    from radixlm.runtime.fault_isolation import kv_accounting_problem

    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=1)
    process, failed, launched = sched.results.process, [], [0]

    def process_then_fail(*a, **k):
        events = process(*a, **k)
        # a step launched since the last results: it runs ahead of these (verify_ahead.run)
        in_flight, launched[0] = sched.stats["ahead_steps"] > launched[0], sched.stats["ahead_steps"]
        if in_flight and launched[0] >= 2 and not failed:
            failed.append(True)
            raise RuntimeError("injected")
        return events
    sched.results.process = process_then_fail  # type: ignore[method-assign]
    [ids] = loop_prompts(1)
    got = run_checked(sched, [greedy_req("x", ids, 60)])
    assert failed and got["x"]["finished_reason"]["type"] == "abort"
    assert sched.ahead is None and kv_accounting_problem(sched) is None
    assert_pool_idle(sched)
    ref = run_to_completion(make_scheduler(tiny), [greedy_req("y", ids, 30)])
    assert_same(run_checked(sched, [greedy_req("y", ids, 30)]), ref)

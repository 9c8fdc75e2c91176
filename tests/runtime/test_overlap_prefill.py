"""Overlapped prefill: after a prompts-only extend step the next prefill chunk is scheduled and
launched before that step's first tokens are committed. Outputs, finish reasons and the KV pool
must be what the synchronous schedule gives: shared prefixes (the next chunk reuses the KV that
the step in flight writes), chunked prompts, seeded sampling with stops, penalties and
min_new_tokens (host state complete at a prompt's first token), and requests that cannot be
deferred (logprobs, n > 1, max_new_tokens 0) mixed in."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime import step_order
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import AbortReq, TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion

POOL = 500  # KV tokens: both schedules retract on this workload
DEFAULT_MIN_REQUESTS = step_order.OVERLAP_PREFILL_MIN_REQUESTS  # (read before any fixture patches it)


@pytest.fixture(autouse=True)
def any_prefill_step(monkeypatch):
    """These small workloads hold a few requests a step: overlap every prompts-only prefill step
    (the default threshold is tested on its own below)."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 1)


def _shared(rng: random.Random, groups: int, per: int, prefix: int) -> list[list[int]]:
    prompts = []
    for _ in range(groups):
        head = [rng.randrange(3, 300) for _ in range(prefix)]
        prompts += [head + [rng.randrange(3, 300) for _ in range(rng.randint(3, 30))] for _ in range(per)]
    rng.shuffle(prompts)
    return prompts


def _workload(special: bool = True) -> list[TokenizedGenerateReq]:
    rng = random.Random(1)
    prompts = _shared(rng, 3, 6, 200) + [[rng.randrange(3, 300) for _ in range(rng.randint(1, 300))] for _ in range(8)]
    reqs = [greedy_req(f"g{i}", p, [1, 4, 9, 16][i % 4]) for i, p in enumerate(prompts)]
    reqs += [TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
        temperature=0.8, top_p=0.9, max_new_tokens=10, seed=i, stop_token_ids=(7, 11), min_new_tokens=i % 3,
        repetition_penalty=1.2 if i % 2 else 1.0)) for i, p in enumerate(prompts[:8])]
    if special:  # batches holding one of these are processed synchronously
        reqs += [TokenizedGenerateReq(rid="lp", input_ids=prompts[3], params=SamplingParams(temperature=0, max_new_tokens=5),
                                      return_logprob=True, logprob_start_len=2, top_logprobs_num=2),
                 TokenizedGenerateReq(rid="n2", input_ids=prompts[5], params=SamplingParams(temperature=0.7, seed=3, n=2,
                                                                                          max_new_tokens=6)),
                 greedy_req("zero", prompts[6], 0)]
    return reqs


def _run(model_dir, reqs: list[TokenizedGenerateReq], overlap_prefill: bool, **options) -> tuple[dict, object]:
    sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=True, disable_overlap_prefill=not overlap_prefill,
                           **options)
    assert sched.overlap_prefill == overlap_prefill
    got = run_to_completion(sched, reqs)
    assert_pool_idle(sched)
    return got, sched


def test_overlapped_prefill_gives_identical_outputs(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    for options in ({"chunked_prefill_size": 300}, {"chunked_prefill_size": 300, "max_total_tokens": POOL}):
        want, plain = _run(model_dir, _workload(), False, **options)
        got, sched = _run(model_dir, _workload(), True, **options)
        assert sched.stats["overlapped_prefill_steps"] > 0 and plain.stats["overlapped_prefill_steps"] == 0
        assert sched.stats["cached_tokens"] > 0  # the shared prefixes were reused
        assert sorted(got) == sorted(want)
        for rid, res in want.items():
            assert got[rid]["output_ids"] == res["output_ids"], rid
            assert got[rid]["finished_reason"] == res["finished_reason"], rid
            if "max_total_tokens" not in options:  # (a tight pool evicts at other moments)
                assert got[rid]["cached_tokens"] == res["cached_tokens"], rid
        for key in ("output_token_logprobs", "input_token_logprobs"):  # (other batches: other summation orders)
            pairs = list(zip(got["lp"][key], want["lp"][key], strict=True))
            assert all(g[1] == w[1] and (g[0] == w[0] or abs(g[0] - w[0]) < 1e-4) for g, w in pairs), key
        if "max_total_tokens" in options:
            assert sched.stats["retractions"] > 0


def test_next_prefill_is_scheduled_before_the_commit(tiny_model_dir) -> None:
    """Two prompts-only chunks in a row: the second is scheduled while the first's tokens are
    still on the device, and committed only after the second is launched."""
    model_dir = tiny_model_dir("llama")
    sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=True, chunked_prefill_size=300)
    calls: list[str] = []
    for name in ("_schedule_prefill", "_commit_step"):
        fn = getattr(sched, name)

        def traced(*a, _fn=fn, _name=name, **k):
            if _name == "_commit_step" and not (a[0] if a else sched.uncommitted):
                return _fn(*a, **k)  # nothing to commit
            calls.append(_name)
            return _fn(*a, **k)

        setattr(sched, name, traced)
    rng = random.Random(2)
    reqs = [greedy_req(f"r{i}", [rng.randrange(3, 300) for _ in range(200)], 3) for i in range(4)]
    got = run_to_completion(sched, reqs)
    assert all(len(r["output_ids"]) == 3 for r in got.values())
    # chunk 1 (r0, part of r1) -> chunk 2 scheduled -> chunk 1's tokens committed after its launch
    assert calls[:3] == ["_schedule_prefill", "_schedule_prefill", "_commit_step"], calls
    # (the last chunk, r3's 200 tokens, is small enough to carry the decode rows: a mixed step)
    assert sched.stats["overlapped_prefill_steps"] == 2 and sched.stats["mixed_steps"] == 1
    assert_pool_idle(sched)


def test_abort_while_the_first_token_is_on_the_device(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=True, chunked_prefill_size=64)
    rng = random.Random(3)
    for i in range(3):
        sched.handle(greedy_req(f"r{i}", [rng.randrange(3, 300) for _ in range(40)], 8))
    sched.step()
    assert sched.uncommitted is not None and sched.uncommitted.prefill
    victim = sched.uncommitted.reqs[0]
    sched.handle(AbortReq(victim.rid, "client went away"))
    assert victim.finished and victim not in sched.running
    results = run_to_completion(sched, [])
    assert_pool_idle(sched)
    assert victim.rid not in results or results[victim.rid]["output_ids"] == []
    assert all(len(r["output_ids"]) == 8 for rid, r in results.items() if rid != victim.rid)


def _req(**params) -> Req:
    lp = params.pop("return_logprob", False)
    msg = TokenizedGenerateReq(rid="x", input_ids=[5, 6, 7], return_logprob=lp,
                               params=SamplingParams(max_new_tokens=4, **params))
    return Req.group_from_wire(msg, list(range(msg.params.n)))


def test_which_extend_batches_are_deferred() -> None:
    def batch(*reqs: Req, mode: ForwardMode = ForwardMode.EXTEND, decoding: bool = False) -> ScheduledBatch:
        b = ScheduledBatch(mode, list(reqs), [3] * len(reqs), [0] * len(reqs))
        b.decoding = [decoding] * len(reqs)
        b.drafts = [[] for _ in reqs]
        return b

    can = step_order.can_defer_prefill
    assert can(batch(_req(), _req(temperature=0.7, seed=1, repetition_penalty=1.3, min_new_tokens=2)))
    assert not can(batch(_req(), _req(return_logprob=True)))
    assert not can(batch(_req(n=2)))
    zero = _req()
    zero.params = zero.params.replace(max_new_tokens=0)
    assert not can(batch(zero))
    assert not can(batch(_req(), decoding=True))  # a mixed batch: decode rows ride along
    assert not can(batch(_req(), mode=ForwardMode.DECODE))


def test_only_prefill_steps_of_many_requests_are_overlapped(tiny_model_dir, monkeypatch) -> None:
    """By default a prefill step is overlapped from OVERLAP_PREFILL_MIN_REQUESTS requests (the
    host's admission work grows with them); fewer stay synchronous."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 32)  # (the default: 12)
    model_dir = tiny_model_dir("llama")
    rng = random.Random(4)
    for n, overlapped in ((40, True), (20, False)):
        sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=True, chunked_prefill_size=512)
        reqs = [greedy_req(f"r{i}", [rng.randrange(3, 300) for _ in range(8)], 2) for i in range(n)]
        got = run_to_completion(sched, reqs)
        assert all(len(r["output_ids"]) == 2 for r in got.values())
        assert sched.stats["prefill_steps"] == 1 and sched.stats["overlapped_prefill_steps"] == int(overlapped)
        assert_pool_idle(sched)


def test_chunks_of_b_like_prompts_are_overlapped_by_default(tiny_model_dir, monkeypatch) -> None:
    """The default threshold overlaps prefill chunks of 12+ requests, as workload (b)'s chunks of ~600-token
    prompts (12-20 a chunk; 5% faster overlapped on the H200, RESULTS.md 2026-12-04 evening); a chunk of fewer
    requests stays synchronous."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", DEFAULT_MIN_REQUESTS)
    model_dir = tiny_model_dir("llama")
    rng = random.Random(5)
    for n, overlapped in ((14, 1), (6, 0)):
        sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=True, chunked_prefill_size=512)
        reqs = [greedy_req(f"b{i}", [rng.randrange(3, 300) for _ in range(30)], 3) for i in range(n)]
        got = run_to_completion(sched, reqs)
        assert all(len(r["output_ids"]) == 3 for r in got.values())
        assert sched.stats["prefill_steps"] == 1 and sched.stats["overlapped_prefill_steps"] == overlapped
        assert_pool_idle(sched)

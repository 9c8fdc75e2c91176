"""A prefill step whose every row extends one sampled token over its cached prefix runs as a decode step
with ONE_TOKEN_PREFILL_AS_DECODE (runtime/prefill_as_decode.py): outputs are token for token those of the
extend path (greedy, seeded, n > 1, max_new_tokens 0, output logprobs, JSON-schema rows, decode rows mixed
in), the KV pool is exact afterwards, and the step goes the decode way only when every row qualifies."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch

from radixlm.runtime import prefill_as_decode, step_order
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 12},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 8}, "maxItems": 3}},
    "required": ["id", "name", "tags"], "additionalProperties": False}


def _prompts(n: int = 8, seed: int = 3) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 250) for _ in range(rng.randint(5, 40))] for _ in range(n)]


def _second_round(prompts: list[list[int]], special: bool = True) -> list[TokenizedGenerateReq]:
    """The cached prompts again: greedy, seeded with penalties and stops; `special`: n = 2, max_new_tokens 0,
    logprobs too (a step holding them is not overlapped: step_order.can_defer_prefill)."""
    reqs = [greedy_req(f"g{i}", p, 6) for i, p in enumerate(prompts[:3])]
    reqs += [TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
        temperature=0.8, top_p=0.9, seed=i, max_new_tokens=8, stop_token_ids=(7, 11), repetition_penalty=1.2))
        for i, p in enumerate(prompts[3:6])]
    if not special:
        return reqs
    reqs += [TokenizedGenerateReq(rid="n2", input_ids=prompts[6], params=SamplingParams(
                 temperature=0.7, seed=5, n=2, max_new_tokens=6)),
             greedy_req("zero", prompts[7], 0),
             TokenizedGenerateReq(rid="lp", input_ids=prompts[0], params=SamplingParams(temperature=0, max_new_tokens=4),
                                  return_logprob=True, logprob_start_len=len(prompts[0]), top_logprobs_num=2)]
    return reqs


def _run(model_dir, on: bool, monkeypatch, rounds: list[list[TokenizedGenerateReq]],
         **options) -> tuple[dict, dict, list[tuple[ForwardMode, list[int]]]]:
    """Each round to completion in one scheduler; the last round's outputs and step counters, and the
    mode and rows' token counts of every forward of the last round."""
    monkeypatch.setattr(prefill_as_decode, "ONE_TOKEN_PREFILL_AS_DECODE", on)
    sched = make_scheduler(model_dir, **options)
    forwards: list[tuple[ForwardMode, list[int]]] = []
    forward = sched.runner.forward

    def recorded(fb, *args, **kwargs):
        forwards.append((fb.mode, list(fb.extend_seq_lens_cpu)))
        return forward(fb, *args, **kwargs)

    sched.runner.forward = recorded
    try:
        for reqs in rounds:
            forwards.clear()
            sched.stats.update({k: 0 for k in sched.stats if k.endswith("_steps")})
            got = run_to_completion(sched, reqs)
        assert_pool_idle(sched)
        return got, dict(sched.stats), forwards
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


def _same(got: dict, want: dict) -> None:
    assert sorted(got) == sorted(want)
    for rid, res in want.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid
        assert got[rid]["cached_tokens"] == res["cached_tokens"], rid
        for key in ("output_token_logprobs", "output_top_logprobs", "input_token_logprobs", "input_top_logprobs"):
            assert len(got[rid][key]) == len(res[key]), (rid, key)
        for (a, ta), (b, tb) in zip(got[rid]["output_token_logprobs"], res["output_token_logprobs"]):  # (other kernels)
            assert ta == tb and a == pytest.approx(b, abs=1e-4), rid


@pytest.mark.parametrize("overlap,special", [(False, True), (True, True), (True, False)])
def test_cached_prompts_prefill_as_one_decode_step(tiny_model_dir, monkeypatch, overlap, special) -> None:
    """Every prompt of the second round is cached but its last token: its first step is one forward in
    decode mode (one token a row, n = 2's leader once), with the outputs of the extend path. With overlap
    and no request that needs the host (logprobs, n > 1, max_new_tokens 0) the prompts-only step is also
    overlapped with the next (step_results.launch_prefill), as item (f)'s plain runs are."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 1)
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()
    rounds = [[greedy_req(f"c{i}", p, 2) for i, p in enumerate(prompts)], _second_round(prompts, special)]
    rows = len(rounds[1])
    options = {"dtype": "float32", "enable_overlap_schedule_on_cpu": overlap}
    want, off_stats, off_forwards = _run(model_dir, False, monkeypatch, rounds, **options)
    got, on_stats, on_forwards = _run(model_dir, True, monkeypatch, rounds, **options)
    _same(got, want)
    assert off_stats["prefill_as_decode_steps"] == 0 and off_forwards[0] == (ForwardMode.EXTEND, [1] * rows)
    assert on_stats["prefill_as_decode_steps"] == 1 and on_forwards[0] == (ForwardMode.DECODE, [1] * rows)
    assert on_stats["prefill_steps"] == off_stats["prefill_steps"] == 1  # (the scheduler's view: a prefill)
    overlapped = int(overlap and not special)
    assert on_stats["overlapped_prefill_steps"] == off_stats["overlapped_prefill_steps"] == overlapped
    assert len(on_forwards) == len(off_forwards)
    assert all(mode is ForwardMode.DECODE for mode, _ in on_forwards)


def test_a_row_of_more_tokens_keeps_the_extend_path(tiny_model_dir, monkeypatch) -> None:
    """One prompt of the round is new: its row extends many tokens, so the step stays an extend step."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts()
    fresh = [9, 8, 7, 6, 5, 4, 3, 200, 201, 202]
    rounds = [[greedy_req(f"c{i}", p, 2) for i, p in enumerate(prompts)],
              _second_round(prompts) + [greedy_req("fresh", fresh, 5)]]
    want, _, _ = _run(model_dir, False, monkeypatch, rounds, dtype="float32")
    got, stats, forwards = _run(model_dir, True, monkeypatch, rounds, dtype="float32")
    _same(got, want)
    assert stats["prefill_as_decode_steps"] == 0
    assert forwards[0] == (ForwardMode.EXTEND, [1] * 9 + [len(fresh)])


def test_decode_rows_mixed_with_one_token_prefills(tiny_model_dir, monkeypatch) -> None:
    """A request decoding while a cached prompt arrives: the step carries its decode row and the new
    prompt's one token (a mixed step), all one token a row, so it runs as a decode step."""
    model_dir = tiny_model_dir("llama")
    prompts = _prompts(3)

    def run(on: bool) -> tuple[dict, dict, list]:
        monkeypatch.setattr(prefill_as_decode, "ONE_TOKEN_PREFILL_AS_DECODE", on)
        sched = make_scheduler(model_dir, dtype="float32")
        run_to_completion(sched, [greedy_req(f"c{i}", p, 1) for i, p in enumerate(prompts)])
        modes: list = []
        forward = sched.runner.forward
        sched.runner.forward = lambda fb, *a, **k: modes.append((fb.mode, list(fb.extend_seq_lens_cpu))) or forward(fb, *a, **k)
        out: dict = {}
        sched.handle(greedy_req("long", prompts[0] + [17, 18], 12))
        for _ in range(3):
            sched.step()
        sched.handle(TokenizedGenerateReq(rid="late", input_ids=prompts[1], params=SamplingParams(
            temperature=0.9, seed=4, max_new_tokens=6)))
        while not sched.idle:
            sched.step()
            for o in sched.pop_outputs():
                merge(out, o)
        for o in sched.pop_outputs():
            merge(out, o)
        assert_pool_idle(sched)
        return out, dict(sched.stats), modes

    want, off_stats, off_modes = run(False)
    got, on_stats, on_modes = run(True)
    _same(got, want)
    assert off_stats["mixed_steps"] == on_stats["mixed_steps"] == 1
    assert on_stats["prefill_as_decode_steps"] == 1 and off_stats["prefill_as_decode_steps"] == 0
    mixed = off_modes.index((ForwardMode.EXTEND, [1, 1]))
    assert on_modes[mixed] == (ForwardMode.DECODE, [1, 1])


def test_json_schema_rows_on_cached_prompts(default_model_dir, monkeypatch) -> None:
    """Item (f)'s order in one scheduler: the prompts cached by an unconstrained run, then JSON-schema
    requests on them (first tokens under the schema's masks; greedy and seeded rows), and unconstrained
    ones to the same lengths."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 4)
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(24)] for _ in range(6)]

    def run(on: bool) -> tuple[dict, dict, dict]:
        monkeypatch.setattr(prefill_as_decode, "ONE_TOKEN_PREFILL_AS_DECODE", on)
        sched = make_scheduler(model_dir=default_model_dir, load_format="dummy", dtype="float32", max_total_tokens=8192,
                               enable_overlap_schedule_on_cpu=True, grammar_state_table="complete")
        try:
            run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=[5, 6, 7], params=SamplingParams(
                max_new_tokens=3, json_schema=json.dumps(SCHEMA)))])
            deadline = time.monotonic() + 120
            while sched.grammars.info()["grammar_tables_completing"] and time.monotonic() < deadline:
                sched.grammars.file_completed_rows()
                time.sleep(0.05)
            run_to_completion(sched, [greedy_req(f"u{i}", p, 2) for i, p in enumerate(prompts)])
            sched.stats.update({k: 0 for k in sched.stats if k.endswith("_steps")})
            js = run_to_completion(sched, [TokenizedGenerateReq(rid=f"j{i}", input_ids=p, params=SamplingParams(
                temperature=i % 2, seed=i, max_new_tokens=24, json_schema=json.dumps(SCHEMA))) for i, p in enumerate(prompts)])
            stats = dict(sched.stats)
            same = run_to_completion(sched, [TokenizedGenerateReq(rid=f"s{i}", input_ids=p, params=SamplingParams(
                temperature=i % 2, seed=i, max_new_tokens=max(len(js[f"j{i}"]["output_ids"]), 1), ignore_eos=True))
                for i, p in enumerate(prompts)])
            assert_pool_idle(sched)
            return js, same, stats
        finally:
            sched.grammars.close()

    want_js, want_same, off = run(False)
    got_js, got_same, on = run(True)
    _same(got_js, want_js)
    _same(got_same, want_same)
    assert off["prefill_as_decode_steps"] == 0 and on["prefill_as_decode_steps"] >= 1


def _req(rid: str, prompt: list[int], **kw) -> Req:
    return Req.from_wire(TokenizedGenerateReq(rid=rid, input_ids=prompt, params=SamplingParams(max_new_tokens=4), **kw), 0)


def _batch(rows: list[tuple[Req, int, int]]) -> ScheduledBatch:
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    for req, prefix, ext in rows:
        batch.add(req, torch.arange(ext), prefix_len=prefix)
    return batch


class _Sched:
    spec = None


def test_each_disqualifier(monkeypatch) -> None:
    """Only a step whose every row computes one sampled token qualifies; the constant gates it all."""
    monkeypatch.setattr(prefill_as_decode, "ONE_TOKEN_PREFILL_AS_DECODE", True)
    runs = prefill_as_decode.runs_as_decode
    ok = _batch([(_req("a", [5, 6, 7]), 2, 1), (_req("b", [5, 6, 8, 9]), 3, 1)])
    assert runs(_Sched(), ok)
    assert not runs(_Sched(), _batch([(_req("a", [5, 6, 7]), 2, 1), (_req("b", [5, 6, 8, 9]), 2, 2)]))
    assert not runs(_Sched(), _batch([(_req("chunk", [5, 6, 7, 8]), 2, 1)]))  # a chunk short of its prompt
    assert not runs(_Sched(), _batch([(_req("lora", [5, 6, 7], lora_path="ad"), 2, 1)]))
    drafted = _batch([(_req("a", [5, 6, 7]), 2, 1)])
    drafted.drafts[0] = [9]
    assert not runs(_Sched(), drafted)
    model_spec = _Sched()
    model_spec.spec = type("Spec", (), {"model": object()})()
    assert not runs(model_spec, ok)
    ngram = _Sched()
    ngram.spec = type("Spec", (), {"model": None})()
    assert runs(ngram, ok)
    assert not runs(_Sched(), ScheduledBatch(ForwardMode.DECODE, [], [], []))
    monkeypatch.setattr(prefill_as_decode, "ONE_TOKEN_PREFILL_AS_DECODE", False)
    assert not runs(_Sched(), ok)


def test_the_environment_turns_it_on_in_a_new_process() -> None:
    """On by default; an Engine's scheduler process starts with the front's environment: `=0` turns it off."""
    code = "from radixlm.runtime import prefill_as_decode as m; print(m.ONE_TOKEN_PREFILL_AS_DECODE)"
    for value, want in (("1", "True"), ("0", "False"), ("", "True")):
        env = {**os.environ, prefill_as_decode.ENV: value}
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == want, out.stderr

"""The overlapped constrained prefill (on unless --disable-overlap-constrained-prefill): a prompts-only prefill
step of constrained requests is overlapped with the next step (step_order.constrained_prefill_overlaps) where no
jump-forward can follow the first token; outputs equal the synchronous step's (greedy and seeded), the KV pool is
exact afterwards."""
from __future__ import annotations

import json
import time

import jsonschema
import pytest

from radixlm.runtime import step_order
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.result_processor import ResultProcessor
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import _tokenizer, assert_pool_idle, make_scheduler, run_to_completion

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def _run(model_dir, overlap: bool, params: list[dict], graphs: bool = False, prompts: list[list[int]] | None = None,
         **options) -> tuple[dict, dict]:
    sched = make_scheduler(model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True,
                           disable_overlap_constrained_prefill=not overlap, grammar_state_table="complete", **options)
    sched.results.decode_graphs = graphs  # (jump-forward's worth as beside CUDA graphs: judged by the running rows)
    try:
        tok = sched.tokenizer
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Answer as JSON."}],
                                                    add_generation_prompt=True, tokenize=False))
        run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=prompt, params=SamplingParams(
            **{**params[0], "max_new_tokens": 4}))])
        deadline = time.monotonic() + 120
        while sched.grammars.info()["grammar_tables_completing"] and time.monotonic() < deadline:
            sched.grammars.file_completed_rows()
            time.sleep(0.05)
        sched.stats.update({k: 0 for k in sched.stats if k.endswith("_steps")})
        reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=prompts[i] if prompts else prompt + [100 + i],
                                     params=SamplingParams(**p))
                for i, p in enumerate(params)]
        got = run_to_completion(sched, reqs)
        assert_pool_idle(sched)
        return {rid: (r["output_ids"], r["finished_reason"]["type"]) for rid, r in got.items()}, dict(sched.stats)
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_constrained_prefill_overlapped_with_identical_outputs(default_model_dir, sampling, monkeypatch) -> None:
    """Off, a prefill step of JSON requests is synchronous (the device idles while the host samples under
    the first masks and commits the first tokens); on, the next step is launched before that commit, and
    every request's tokens are the same."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 4)
    temp = {"temperature": 0.0} if sampling == "greedy" else {"temperature": 1.0}
    params = [{**temp, "seed": i, "max_new_tokens": 80, "json_schema": json.dumps(SCHEMA)} for i in range(4)]
    off, off_stats = _run(default_model_dir, False, params, disable_jump_forward=True)
    on, on_stats = _run(default_model_dir, True, params, disable_jump_forward=True)
    assert off_stats["prefill_steps"] == on_stats["prefill_steps"] == 1
    assert off_stats["overlapped_prefill_steps"] == 0 and on_stats["overlapped_prefill_steps"] == 1
    assert on == off
    tok = _tokenizer(str(default_model_dir))
    ended = [ids for ids, reason in on.values() if reason == "stop"]  # (the others hit max_new_tokens)
    assert ended
    for ids in ended:
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), SCHEMA)


def test_only_where_no_jump_can_follow_the_first_token(default_model_dir, monkeypatch) -> None:
    """With jump-forward on and decode graphs, a jump pays below 32 running rows: a prefill of fewer
    constrained requests stays synchronous (its first tokens may jump at once), one of more is overlapped."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 4)
    params = [{"temperature": 0.0, "max_new_tokens": 3, "json_schema": json.dumps(SCHEMA)}]
    _, few = _run(default_model_dir, True, params * 4, graphs=True)
    _, many = _run(default_model_dir, True, params * 32, graphs=True)
    assert few["overlapped_prefill_steps"] == 0 and many["overlapped_prefill_steps"] == 1


def test_prompt_rows_count_as_running_when_a_jump_is_judged(monkeypatch) -> None:
    """A jump's extend step takes every row of the next decode step off the graph path, those whose prompt
    just completed included: with the overlap (the default), every row of a prefill batch is judged at the running rows plus
    the batch's (the count the overlap's gate reads); without it, as before."""
    proc = ResultProcessor(None, {0}, 4096, jump_forward=True, decode_graphs=True)
    proc.prompt_rows_running = True  # (the scheduler sets it unless --disable-overlap-constrained-prefill)
    seen: list[int] = []
    monkeypatch.setattr(proc, "_jump_forward", lambda req, grammars, n: seen.append(n) and False)
    reqs = []
    for i in range(4):
        req = Req.group_from_wire(TokenizedGenerateReq(rid=f"x{i}", input_ids=[5, 6, 7], params=SamplingParams(
            max_new_tokens=8)), [0])
        req.grammar = object()  # (committed already: `advanced`)
        reqs.append(req)
    proc._append(reqs, [9] * 4, {}, [False] * 4, None, 10, allow_jump=True, advanced=set())
    assert seen == [14] * 4
    seen.clear()
    proc._append(reqs, [9] * 4, {}, [True] * 4, None, 10, allow_jump=True, advanced=set())
    assert seen == [10] * 4  # (decode rows: as before)
    seen.clear()
    proc.prompt_rows_running = False  # (off: each prompt row judged at the rows before it, as before)
    proc._append(reqs, [9] * 4, {}, [False] * 4, None, 10, allow_jump=True, advanced=set())
    assert seen == [10, 11, 12, 13]


def test_synchronous_constrained_step_masks_the_logits_in_place(default_model_dir, monkeypatch) -> None:
    """A synchronous step (here: no overlap) reads its logits after the draw only for logprobs: without them
    the grammar mask goes into the logits in place, no [B, V] copy; with them, into a copy."""
    needed: list[bool] = []
    inner = ResultProcessor.sample_rows
    monkeypatch.setattr(ResultProcessor, "sample_rows", staticmethod(
        lambda rows, logits, bitmask, after=True, sbatch=None: needed.append(after) or inner(rows, logits, bitmask, after,
                                                                                        sbatch)))
    sched = make_scheduler(default_model_dir, grammar_mask_threads=0)
    try:
        spec = json.dumps(SCHEMA)
        run_to_completion(sched, [TokenizedGenerateReq(rid=f"r{i}", input_ids=[5, 6, 7 + i], params=SamplingParams(
            temperature=0.0, max_new_tokens=3, json_schema=spec)) for i in range(2)])
        assert needed and not any(needed)
        needed.clear()
        got = run_to_completion(sched, [TokenizedGenerateReq(rid="lp", input_ids=[5, 6, 9], return_logprob=True,
                                                             params=SamplingParams(temperature=0.0, max_new_tokens=3,
                                                                                   json_schema=spec))])
        assert needed and all(needed) and len(got["lp"]["output_token_logprobs"]) == 3
    finally:
        sched.grammars.close()


def test_chunked_constrained_prefill_overlapped_with_identical_outputs(default_model_dir, monkeypatch) -> None:
    """Prompts split over several prefill steps: the first chunk's step is overlapped, the later chunks carry
    the decode rows (mixed steps, synchronous) and take its pending first tokens with their grammar commit;
    rows committed in different steps are sampled under their own masks, and the tokens are the synchronous
    schedule's."""
    monkeypatch.setattr(step_order, "OVERLAP_PREFILL_MIN_REQUESTS", 1)
    params = [{"temperature": 1.0, "seed": i, "max_new_tokens": 40, "json_schema": json.dumps(SCHEMA)} for i in range(5)]
    prompts = [[300 + 17 * i + j for j in range(40)] for i in range(5)]  # (nothing cached: 200 tokens in chunks of 48)
    off, off_stats = _run(default_model_dir, False, params, prompts=prompts, disable_jump_forward=True,
                          chunked_prefill_size=48)
    on, on_stats = _run(default_model_dir, True, params, prompts=prompts, disable_jump_forward=True,
                        chunked_prefill_size=48)
    assert off_stats["prefill_steps"] + off_stats["mixed_steps"] >= 3 and off_stats["overlapped_prefill_steps"] == 0
    assert on_stats["overlapped_prefill_steps"] >= 1 and on_stats["mixed_steps"] >= 1
    assert on == off

"""Constrained decoding inside the scheduler on the real default model: outputs validate, masks
hold under random sampling, jump-forward skips forced text, bad specs fail the request cleanly."""
from __future__ import annotations

import json
import re

import jsonschema
import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 20},
        "age": {"type": "integer", "minimum": 0, "maximum": 150},
        "city": {"type": "string", "enum": ["Paris", "Berlin", "Tokyo"]},
    },
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
IPV4 = r"(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])(\.(25[0-5]|2[0-4][0-9]|1?[0-9]?[0-9])){3}"


@pytest.fixture(scope="module")
def sched(default_model_dir):
    s = make_scheduler(default_model_dir, max_total_tokens=8192)
    yield s
    if s.grammars is not None:
        s.grammars.close()


@pytest.fixture(scope="module")
def prompt_ids(sched) -> list[int]:
    tok = sched.tokenizer
    text = tok.apply_chat_template([{"role": "user", "content": "Describe a person as JSON."}],
                                   add_generation_prompt=True, tokenize=False)
    return tok.encode(text)


def _req(rid: str, ids: list[int], **params) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid=rid, input_ids=ids, params=SamplingParams(**params))


def test_json_schema_outputs_validate_under_random_sampling(sched, prompt_ids) -> None:
    reqs = [_req(f"j{i}", prompt_ids, temperature=1.0, max_new_tokens=80, seed=i, json_schema=json.dumps(PERSON))
            for i in range(8)]
    out = run_to_completion(sched, reqs)
    tok = sched.tokenizer
    stopped = 0
    for r in reqs:
        res = out[r.rid]
        if res["finished_reason"]["type"] != "stop":
            continue  # finished by length: counted, not validated
        stopped += 1
        jsonschema.validate(json.loads(tok.decode(res["output_ids"], skip_special_tokens=True)), PERSON)
    assert stopped >= 6
    assert_pool_idle(sched)


def test_regex_and_jump_forward(sched, prompt_ids) -> None:
    tok = sched.tokenizer
    out = run_to_completion(sched, [_req("ip", prompt_ids, temperature=0.0, max_new_tokens=30, regex=IPV4)])
    assert re.fullmatch(IPV4, tok.decode(out["ip"]["output_ids"], skip_special_tokens=True))
    # A schema with long forced runs ("{"key": ...) is jumped over instead of decoded token by token.
    forced = {"type": "object", "properties": {"the_answer_to_the_question": {"type": "integer"}},
              "required": ["the_answer_to_the_question"], "additionalProperties": False}
    res = run_to_completion(sched, [_req("jf", prompt_ids, temperature=0.0, max_new_tokens=40,
                                         json_schema=json.dumps(forced))])["jf"]
    text = tok.decode(res["output_ids"], skip_special_tokens=True)
    assert json.loads(text)["the_answer_to_the_question"] is not None
    assert res["forced_tokens"] > 0


def test_bad_schema_fails_request_with_400_and_nothing_else(sched, prompt_ids) -> None:
    bad = {"type": "object", "properties": {"a": {"type": "string", "format": "idn-hostname"}}}  # not enforced
    reqs = [_req("bad", prompt_ids, max_new_tokens=5, json_schema=json.dumps(bad)),
            _req("ok", prompt_ids, temperature=0.0, max_new_tokens=5)]
    out = run_to_completion(sched, reqs)
    assert out["bad"]["finished_reason"]["type"] == "abort"
    assert out["bad"]["finished_reason"]["status_code"] == 400
    assert out["ok"]["finished_reason"]["type"] == "length"
    assert_pool_idle(sched)


def test_overlapped_constrained_decode_matches_synchronous(default_model_dir, prompt_ids) -> None:
    """With overlap, constrained rows are sampled one step later on the host's schedule: step k's
    tokens are committed (matchers advanced) while step k+1's forward runs, then masks are filled.
    Seeded outputs must equal the synchronous path's, and stay valid; the synchronous run fills
    masks row by row on the scheduler's thread, the overlapped one on 3 threads in the background."""
    reqs = lambda: [_req(f"o{i}", prompt_ids, temperature=1.0, max_new_tokens=40, seed=i,  # noqa: E731
                         json_schema=json.dumps(PERSON)) for i in range(4)]
    plain = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True, grammar_mask_threads=0)
    expected = run_to_completion(plain, reqs())
    overlapped = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True,
                                enable_overlap_schedule_on_cpu=True, grammar_mask_threads=3)
    deferred = 0
    launch = overlapped._launch

    def counting_launch(batch, logits):
        nonlocal deferred
        deferred += any(r.grammar is not None for r in batch.reqs)
        return launch(batch, logits)

    overlapped._launch = counting_launch
    got = run_to_completion(overlapped, reqs())
    assert deferred > 15
    for rid, res in expected.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid
    assert_pool_idle(overlapped)
    for s in (plain, overlapped):
        s.grammars.close()


def test_overlap_hands_over_to_jump_forward_as_the_batch_shrinks(default_model_dir, prompt_ids) -> None:
    """On the GPU constrained rows are overlapped only while the batch is large (jump-forward would
    not pay); as requests finish the next batch is processed synchronously while the previous
    step is still pending, and requests that step finishes must be skipped, not committed twice."""
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True)
    sched.results.jump_min_tokens = lambda running: 100 if running > 3 else 1  # GPU-like rule, small batch
    reqs = [_req(f"h{i}", prompt_ids, temperature=1.0, max_new_tokens=24 + 4 * i, seed=i,
                 json_schema=json.dumps(PERSON)) for i in range(8)]
    handovers = 0
    pending_at_launch = False
    forward, process = sched.runner.forward, sched.process_results

    def noting_forward(batch):
        nonlocal pending_at_launch
        pending_at_launch = sched.uncommitted is not None
        return forward(batch)

    def counting_process(batch, logits):  # a synchronous step launched before the pending one's commit
        nonlocal handovers
        handovers += pending_at_launch
        return process(batch, logits)

    sched.runner.forward, sched.process_results = noting_forward, counting_process
    out = run_to_completion(sched, reqs)
    assert handovers >= 1
    tok = sched.tokenizer
    for r in reqs:
        res = out[r.rid]
        assert res["finished_reason"]["type"] in ("stop", "length"), res["finished_reason"]
        if res["finished_reason"]["type"] == "stop":
            jsonschema.validate(json.loads(tok.decode(res["output_ids"], skip_special_tokens=True)), PERSON)
    assert_pool_idle(sched)
    sched.grammars.close()

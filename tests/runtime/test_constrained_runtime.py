"""Constrained decoding inside the scheduler on the real default model: outputs validate, masks
hold under random sampling, jump-forward skips forced text, bad specs fail the request cleanly."""
from __future__ import annotations

import json
import re
import time

import jsonschema
import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, make_scheduler, merge, run_to_completion

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


def _validate(tok, res: dict, schema: dict) -> bool:
    """A stopped output must parse and validate; one cut by length is not checked."""
    if res["finished_reason"]["type"] != "stop":
        return False
    jsonschema.validate(json.loads(tok.decode(res["output_ids"], skip_special_tokens=True)), schema)
    return True


def _mixed(prompt_ids: list[int], prefix: str = "m") -> list[TokenizedGenerateReq]:
    """Constrained rows (seeded sampling) beside unconstrained ones (seeded and greedy) in one batch."""
    person = json.dumps(PERSON)
    return ([_req(f"{prefix}j{i}", prompt_ids, temperature=1.0, max_new_tokens=48, seed=i, json_schema=person)
             for i in range(4)]
            + [_req(f"{prefix}u0", prompt_ids, temperature=1.0, max_new_tokens=20, seed=9),
               _req(f"{prefix}u1", prompt_ids, temperature=0.0, max_new_tokens=30)])


def _count_deferred(sched) -> dict[str, int]:
    counts = {"deferred_constrained": 0}
    launch = sched._launch

    def counting_launch(batch, logits, *args):
        counts["deferred_constrained"] += any(r.grammar is not None for r in batch.reqs)
        return launch(batch, logits, *args)

    sched._launch = counting_launch
    return counts


@pytest.fixture(scope="module")
def synchronous_mixed(default_model_dir, prompt_ids) -> dict[str, dict]:
    """The synchronous path's outputs for _mixed(): the reference of every overlapped variant below
    (the same scheduler settings and seeded requests each time, so computed once)."""
    plain = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True, grammar_mask_threads=0)
    expected = run_to_completion(plain, _mixed(prompt_ids))
    assert_pool_idle(plain)
    plain.grammars.close()
    return expected


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_overlapped_mixed_batch_matches_synchronous(default_model_dir, prompt_ids, synchronous_mixed,
                                                    threads: int) -> None:
    """With overlap, constrained rows are sampled one step later on the host's schedule: step k's
    tokens are committed (matchers advanced) while step k+1's forward runs, then masks are filled
    (inline, or on a background thread beside the scheduler's bookkeeping; with 3 threads over
    three matcher families). Seeded outputs of a batch mixing constrained and unconstrained rows
    equal the synchronous path's, and validate."""
    expected = synchronous_mixed
    overlapped = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True,
                                enable_overlap_schedule_on_cpu=True, grammar_mask_threads=threads)
    counts = _count_deferred(overlapped)
    got = run_to_completion(overlapped, _mixed(prompt_ids))
    assert counts["deferred_constrained"] > 15
    if threads == 3:  # matchers dealt round-robin over three families: every family decoded
        assert overlapped.grammars.workers.threads == 3 and overlapped.grammars._families_made >= 3
    for rid, res in expected.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid
    assert sum(_validate(overlapped.tokenizer, got[f"mj{i}"], PERSON) for i in range(4)) >= 3
    assert_pool_idle(overlapped)
    overlapped.grammars.close()


def test_overlapped_constrained_step_is_sampled_before_the_commit_bookkeeping(default_model_dir, prompt_ids) -> None:
    """An overlapped step with constrained rows: the matchers take step k's tokens, step k+1 is sampled
    under the masks they give, and only then does the rest of step k's commit run (appends, finish
    checks, outputs: host work the device's step no longer waits for), as for unconstrained rows."""
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True,
                           enable_overlap_schedule_on_cpu=True, grammar_mask_threads=1)
    after_launch: list[bool] = []  # per overlapped commit of constrained rows: was the next step launched?
    commit = sched.results.commit

    def noting_commit(reqs, ids, *args, **kwargs):
        if any(r.grammar is not None for r in reqs):
            after_launch.append(any(r.tokens_on_device for r in reqs))  # step k+1's token is on the device
        return commit(reqs, ids, *args, **kwargs)

    sched.results.commit = noting_commit
    reqs = [_req(f"o{i}", prompt_ids, temperature=1.0, seed=i, max_new_tokens=48, json_schema=json.dumps(PERSON))
            for i in range(3)]
    got = run_to_completion(sched, reqs)
    assert sum(after_launch) >= 10
    assert sum(_validate(sched.tokenizer, got[f"o{i}"], PERSON) for i in range(3)) >= 2
    assert_pool_idle(sched)
    sched.grammars.close()


def test_overlap_keeps_constrained_rows_and_takes_due_jumps(default_model_dir, prompt_ids) -> None:
    """The GPU's jump rule (decode graphs: a jump must save 1 + 2 x running tokens). Constrained rows
    stay overlapped on every plain decode step, at any batch size; a row whose grammar forces a run
    worth jumping is flagged at the overlapped commit, and the scheduler commits before the next
    step, where the jump is taken (one token later than without overlap)."""
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True,
                           grammar_mask_threads=1)
    sched.results.decode_graphs = True
    regex = "[0-9]{1,2}" + re.escape(" is the answer to the ultimate question of life, the universe and everything")
    reqs = [_req("lit", prompt_ids, temperature=1.0, seed=3, max_new_tokens=40, regex=regex),
            _req("p0", prompt_ids, temperature=1.0, seed=4, max_new_tokens=64, json_schema=json.dumps(PERSON)),
            _req("p1", prompt_ids, temperature=1.0, seed=5, max_new_tokens=64, json_schema=json.dumps(PERSON))]
    counts = _count_deferred(sched)
    due_commits = 0
    step = sched.step

    def noting_step():
        nonlocal due_commits
        due_commits += sched.jump_due and sched.uncommitted is not None
        return step()

    sched.step = noting_step
    out: dict[str, dict] = {}

    def step_until(done) -> None:
        deadline = time.monotonic() + 240  # grammar compiles run in a worker process
        while time.monotonic() < deadline:
            if done():
                return
            if not sched.step():
                time.sleep(0.002)
            for o in sched.pop_outputs():
                merge(out, o)
        raise AssertionError("scheduler did not get there")

    # The JSON rows decode (overlapped) before the regex request arrives, so its forced run shows
    # up at an overlapped commit, not in a synchronous prefill step.
    sched.handle(reqs[1])
    sched.handle(reqs[2])
    step_until(lambda: sum(len(r.output_ids) >= 2 for r in sched.running) == 2)
    sched.handle(reqs[0])
    step_until(lambda: sched.idle)
    tok = sched.tokenizer
    assert re.fullmatch(regex, tok.decode(out["lit"]["output_ids"], skip_special_tokens=True))
    assert out["lit"]["forced_tokens"] >= 7 and due_commits >= 1
    assert counts["deferred_constrained"] >= 15  # synchronous before: 3 rows, a jump could pay
    assert sum(_validate(tok, out[r], PERSON) for r in ("p0", "p1")) >= 1
    assert_pool_idle(sched)
    sched.grammars.close()


def test_abort_mid_stream_with_overlap_leaks_no_kv_or_matcher(default_model_dir, prompt_ids) -> None:
    """Aborts while a constrained step is on the device (uncommitted) and its masks may be computing
    in the background: the aborted rows' tokens are dropped, their KV freed, and the grammar runtime
    keeps no reference to them; the other rows finish valid."""
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, disable_jump_forward=True,
                           enable_overlap_schedule_on_cpu=True, grammar_mask_threads=1)
    person = json.dumps(PERSON)
    # The grammar compiled first (a cache hit from here on), so that every row starts decoding at once
    # and the unconstrained survivor au0 needs no more budget than the JSON rows to outlive the aborts.
    warm = run_to_completion(sched, [_req("warm", prompt_ids, max_new_tokens=1, json_schema=person)])
    assert warm["warm"]["finished_reason"]["type"] == "length"
    reqs = ([_req(f"aj{i}", prompt_ids, temperature=1.0, max_new_tokens=48, seed=i, json_schema=person) for i in range(4)]
            + [_req(f"au{i}", prompt_ids, temperature=1.0, max_new_tokens=n, seed=i, ignore_eos=True)
               for i, n in enumerate((64, 400))])
    for r in reqs:
        sched.handle(r)
    results: dict[str, dict] = {}
    aborted = ["aj0", "aj2", "au1"]

    def mid_stream() -> bool:  # every row to abort decoding for a few steps, one step on the device
        live = {r.rid: r for r in sched.running}
        return sched.uncommitted is not None and all(rid in live and len(live[rid].output_ids) >= 4 for rid in aborted)

    steps = 0
    while not mid_stream():  # (constrained rows start once their grammar compiled)
        if not sched.step():
            time.sleep(0.002)
        steps += 1
        assert steps < 2000
        for o in sched.pop_outputs():
            merge(results, o)
    live = {r.rid: r for r in sched.running}
    assert "au0" in live  # an unconstrained row decodes on beside the aborts
    grammar_rows = {id(live[rid]) for rid in ("aj0", "aj2")}
    for rid in aborted:
        sched.abort(rid, "client went away")
    gr = sched.grammars
    assert not grammar_rows & set(gr._terminated) and not grammar_rows & set(gr.pending)
    assert gr._prefetch is None or not grammar_rows & set(gr._prefetch.rows)
    while not sched.idle:
        if not sched.step():
            time.sleep(0.002)
        steps += 1
        assert steps < 2000
        for o in sched.pop_outputs():
            merge(results, o)
    for rid in aborted:
        assert results[rid]["finished_reason"]["type"] == "abort", results[rid]
    assert results["au0"]["finished_reason"]["type"] == "length" and len(results["au0"]["output_ids"]) == 64
    assert sum(_validate(sched.tokenizer, results[rid], PERSON) for rid in ("aj1", "aj3")) >= 1
    assert not gr._terminated and not gr.pending and (gr._prefetch is None or not gr._prefetch.rows)
    assert_pool_idle(sched)
    gr.close()

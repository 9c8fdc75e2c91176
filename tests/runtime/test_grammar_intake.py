"""A batch of new JSON requests on the scheduler's loop (issue 14 item 4: item (f)'s first steps): a spec
served before gets its matchers when the request is received (no compile service round trip, nothing left
for the next poll), a schema with a state table makes no llguidance matcher for rows that walk filled
states, and the outputs, seeded, equal the path without either (KV exact)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm.constrained.backends.llguidance_backend import LLGuidanceGrammar
from radixlm.runtime import grammar_runtime
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

ITEM_F = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}
OTHER = {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"], "additionalProperties": False}


def _batch(prefix: str, n: int, schema: Any, tokens: int = 12) -> list[TokenizedGenerateReq]:
    spec = json.dumps(schema)
    return [TokenizedGenerateReq(rid=f"{prefix}{i}", input_ids=[100 + i, 7, 8, 9], params=SamplingParams(
        temperature=1.0, seed=i, max_new_tokens=tokens, json_schema=spec)) for i in range(n)]


def _run(default_model_dir: Any, monkeypatch: pytest.MonkeyPatch, ready: int) -> tuple[dict, dict[str, int]]:
    """Warm requests (the grammar compiled, its table's rows filled along their walks), then a batch of the
    same schema and one of another; counts the compile service's submits and llguidance's matchers."""
    monkeypatch.setattr(grammar_runtime, "MAX_READY", ready, raising=False)
    counts = {"submits": 0, "matchers": 0}
    made = LLGuidanceGrammar.matcher

    def counted(self: Any, family: int = 0) -> Any:
        counts["matchers"] += 1
        return made(self, family)

    monkeypatch.setattr(LLGuidanceGrammar, "matcher", counted)
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto",
                           enable_overlap_schedule_on_cpu=True, disable_jump_forward=True)
    try:
        out = run_to_completion(sched, _batch("warm", 3, ITEM_F, tokens=40))
        submit = sched.grammars.service.submit

        def counted_submit(*args: Any, **kwargs: Any) -> None:
            counts["submits"] += 1
            submit(*args, **kwargs)

        sched.grammars.service.submit = counted_submit
        counts["matchers"] = 0
        batch = _batch("j", 8, ITEM_F)
        for msg in batch:
            sched.handle(msg)
        waiting = {r.rid: r for r in sched.waiting}
        counts["pending_after_receive"] = sum(r.grammar_pending for r in waiting.values())
        counts["matchers_in_receive"] = counts["matchers"]
        sched.grammars.poll()  # what the step's poll hands over (the request's matchers)
        counts["matchers_in_poll"] = counts["matchers"] - counts["matchers_in_receive"]
        waiting = [r for r in sched.waiting if r.rid.startswith("j")]
        counts["without_backend_matcher"] = sum(r.grammar._inner is None for r in waiting)
        out |= run_to_completion(sched, [])
        out |= run_to_completion(sched, _batch("o", 2, OTHER))
        assert_pool_idle(sched)
        assert not sched.grammars.pending and not sched.grammars._terminated
        return out, counts
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


def test_a_served_spec_gets_its_matchers_at_receive_and_tables_make_none(default_model_dir, monkeypatch) -> None:
    base, before = _run(default_model_dir, monkeypatch, 0)  # (no spec remembered: every request queued and polled)
    assert before["submits"] == 10 and before["pending_after_receive"] == 8
    assert before["matchers_in_receive"] == 0 and before["without_backend_matcher"] == 8
    got, after = _run(default_model_dir, monkeypatch, grammar_runtime.MAX_READY or 64)
    assert after["submits"] == 2 and after["pending_after_receive"] == 0  # only the new schema's requests queued
    # Their rows stand at the table's start state: an llguidance matcher is made on a row's first need (a state
    # whose row is not filled, ...), not when the request's grammar is handed over (the poll made one per request,
    # each deep-copied from the grammar's template, before the prefill could launch).
    assert after["matchers_in_receive"] == after["matchers_in_poll"] == 0 and after["without_backend_matcher"] == 8
    assert got.keys() == base.keys()
    for rid, res in base.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid


def test_the_remembered_specs_are_bounded(default_model_dir, monkeypatch) -> None:
    monkeypatch.setattr(grammar_runtime, "MAX_READY", 1, raising=False)
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto")
    try:
        run_to_completion(sched, _batch("a", 1, ITEM_F, tokens=2) + _batch("b", 1, OTHER, tokens=2))
        assert list(sched.grammars._ready) == [("json_schema", json.dumps(OTHER))]
        sched.handle(_batch("c", 1, ITEM_F, tokens=2)[0])
        assert sched.waiting[-1].grammar_pending  # forgotten: queued again (the service's cache answers)
        run_to_completion(sched, [])
        assert list(sched.grammars._ready) == [("json_schema", json.dumps(ITEM_F))]
    finally:
        sched.grammars.close()

"""A batch of new JSON requests on the scheduler's loop (issue 14 item 4: item (f)'s first steps): a spec
in the compile service's cache gets its matchers when the request is received (answered by the service's
submit: no round trip, nothing left for the next poll; one cache, the service's), a schema with a state
table makes no llguidance matcher for rows that walk filled states, and the outputs, seeded, equal the
path without either (KV exact)."""
from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm.constrained.backends.llguidance_backend import LLGuidanceGrammar
from radixlm.constrained.compiler import GrammarCache
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


def _run(default_model_dir: Any, monkeypatch: pytest.MonkeyPatch, cached: bool) -> tuple[dict, dict[str, int]]:
    """Warm requests (the grammar compiled, its table's rows filled along their walks), then a batch of the
    same schema and one of another; counts the requests queued for a compile and llguidance's matchers.
    `cached` False: the compile service keeps nothing (every request queued, compiled and polled)."""
    counts = {"matchers": 0}
    made = LLGuidanceGrammar.matcher

    def counted(self: Any, family: int = 0) -> Any:
        counts["matchers"] += 1
        return made(self, family)

    monkeypatch.setattr(LLGuidanceGrammar, "matcher", counted)
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto",
                           enable_overlap_schedule_on_cpu=True, disable_jump_forward=True)
    try:
        sched._grammar_runtime().service.cache = GrammarCache(256 if cached else 0)  # (not the process's)
        out = run_to_completion(sched, _batch("warm", 3, ITEM_F, tokens=40))
        counts["matchers"] = 0
        batch = _batch("j", 8, ITEM_F)
        for msg in batch:
            sched.handle(msg)
        waiting = {r.rid: r for r in sched.waiting}
        counts["pending_after_receive"] = sum(r.grammar_pending for r in waiting.values())
        counts["attached_at_receive"] = sum(r.grammar is not None for r in waiting.values())
        counts["matchers_in_receive"] = counts["matchers"]
        polled = sched.grammars.poll()  # what the step's poll hands over (the request's matchers)
        counts["polled"] = len(polled)
        counts["matchers_in_poll"] = counts["matchers"] - counts["matchers_in_receive"]
        waiting = [r for r in sched.waiting if r.rid.startswith("j")]
        counts["without_backend_matcher"] = sum(r.grammar is not None and r.grammar._inner is None for r in waiting)
        for req, error in polled:  # (handed back to the scheduler's own poll: none is lost)
            assert error is None and req.grammar is not None
        out |= run_to_completion(sched, [])
        others = _batch("o", 2, OTHER)
        for msg in others:
            sched.handle(msg)
        counts["other_pending_after_receive"] = sum(r.grammar_pending for r in sched.waiting)
        out |= run_to_completion(sched, [])
        assert_pool_idle(sched)
        assert not sched.grammars.pending and not sched.grammars._terminated
        return out, counts
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


def test_a_served_spec_gets_its_matchers_at_receive_and_tables_make_none(default_model_dir, monkeypatch) -> None:
    base, before = _run(default_model_dir, monkeypatch, cached=False)  # every request queued, compiled, polled
    assert before["pending_after_receive"] == 8 and before["attached_at_receive"] == 0
    got, after = _run(default_model_dir, monkeypatch, cached=True)
    # The compile service's cache answers at submit: matchers attached when the request is received,
    # nothing queued, nothing for the poll; a schema not served yet is still queued.
    assert after["pending_after_receive"] == 0 and after["attached_at_receive"] == 8 and after["polled"] == 0
    assert after["other_pending_after_receive"] == 2
    # Their rows stand at the table's start state: an llguidance matcher is made on a row's first need (a state
    # whose row is not filled, ...), not when the request's grammar is handed over (the poll made one per request,
    # each deep-copied from the grammar's template, before the prefill could launch).
    assert after["matchers_in_receive"] == after["matchers_in_poll"] == 0 and after["without_backend_matcher"] == 8
    assert got.keys() == base.keys()
    for rid, res in base.items():
        assert got[rid]["output_ids"] == res["output_ids"], rid
        assert got[rid]["finished_reason"] == res["finished_reason"], rid


def test_a_spec_compiled_before_this_runtime_is_answered_at_receive(default_model_dir) -> None:
    """The service's cache is the only one: a schema another scheduler of the process compiled (the
    process-wide cache) is answered at a new scheduler's first request of it, before any step ran."""
    cache = GrammarCache()
    first = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto")
    try:
        first._grammar_runtime().service.cache = cache
        done = run_to_completion(first, _batch("a", 2, ITEM_F, tokens=6))
        assert_pool_idle(first)
    finally:
        first.grammars.close()
    second = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto")
    try:
        second._grammar_runtime().service.cache = cache
        for msg in _batch("a", 2, ITEM_F, tokens=6):
            second.handle(msg)
        assert all(not r.grammar_pending and r.grammar is not None for r in second.waiting)
        assert not second.grammars.pending and second.grammars.poll() == []
        again = run_to_completion(second, [])
        assert {k: v["output_ids"] for k, v in again.items()} == {k: v["output_ids"] for k, v in done.items()}
        assert_pool_idle(second)
    finally:
        second.grammars.close()


def test_a_spec_the_cache_dropped_is_compiled_again(default_model_dir) -> None:
    sched = make_scheduler(default_model_dir, max_total_tokens=8192, grammar_state_table="auto")
    try:
        sched._grammar_runtime().service.cache = GrammarCache(1)
        # one after the other: two compile workers finish a batch's specs in either order, and the cache keeps one
        first = run_to_completion(sched, _batch("a", 1, ITEM_F, tokens=2))
        first |= run_to_completion(sched, _batch("b", 1, OTHER, tokens=2))
        sched.handle(_batch("c", 1, ITEM_F, tokens=2)[0])
        assert sched.waiting[-1].grammar_pending  # dropped for OTHER: queued again (the worker's cache answers)
        sched.handle(_batch("d", 1, OTHER, tokens=2)[0])
        assert not sched.waiting[-1].grammar_pending  # still cached
        out = run_to_completion(sched, [])
        assert out["c0"]["output_ids"] == first["a0"]["output_ids"]
        assert out["d0"]["output_ids"] == first["b0"]["output_ids"]
        assert_pool_idle(sched)
    finally:
        sched.grammars.close()

"""An overlapped constrained decode step builds its rows' sampling values (SamplingBatch) before it waits for
the previous step's tokens (step_order.SAMPLING_BEFORE_TOKENS), so the host's work between those tokens and
the draw's launch is the grammar commit, the masks and the draw alone (issue 14 item 4, item (f)'s JSON step).
Outputs, greedy and seeded, are the same with it off, and the KV pool is exact afterwards."""
from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm.runtime import step_order
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampler import SamplingBatch
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.uncommitted_step import UncommittedStep
from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def _run(model_dir: Any, monkeypatch: pytest.MonkeyPatch, before: bool, temperature: float) -> tuple[dict, list[str]]:
    """Six JSON rows and two plain ones, overlapped; per step the order of the sampling values' build and the
    wait for the previous step's tokens ("build" / "wait")."""
    monkeypatch.setattr(step_order, "SAMPLING_BEFORE_TOKENS", before)
    events: list[str] = []
    build, host_tokens = SamplingBatch.build.__func__, UncommittedStep._host_tokens  # type: ignore[attr-defined]

    def recorded_build(cls: Any, *args: Any, **kwargs: Any) -> Any:
        events.append("build")
        return build(cls, *args, **kwargs)

    def recorded_wait(self: Any) -> list[int]:
        if self._ids is None:
            events.append("wait")
        return host_tokens(self)

    monkeypatch.setattr(SamplingBatch, "build", classmethod(recorded_build))
    monkeypatch.setattr(UncommittedStep, "_host_tokens", recorded_wait)
    sched = make_scheduler(model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True,
                           grammar_state_table="auto", disable_jump_forward=True)
    step = sched.step

    def marked_step() -> bool:
        events.append("|")
        return step()

    sched.step = marked_step  # type: ignore[method-assign]
    try:
        tok = sched.tokenizer
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Answer as JSON."}],
                                                    add_generation_prompt=True, tokenize=False))
        run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=prompt, params=SamplingParams(
            max_new_tokens=2, json_schema=json.dumps(SCHEMA)))])  # (compiled: both arms' batches start alike)
        events.clear()
        reqs = [TokenizedGenerateReq(rid=f"j{i}", input_ids=prompt + [100 + i], params=SamplingParams(
            temperature=temperature, seed=i, max_new_tokens=60, json_schema=json.dumps(SCHEMA))) for i in range(6)]
        reqs += [TokenizedGenerateReq(rid=f"p{i}", input_ids=[200 + i, 7, 8], params=SamplingParams(
            temperature=temperature, seed=10 + i, max_new_tokens=30)) for i in range(2)]
        out = run_to_completion(sched, reqs)
        assert sched.stats["overlapped_steps"] > 10
        assert_pool_idle(sched)
        return {rid: (r["output_ids"], r["finished_reason"]["type"]) for rid, r in out.items()}, events
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_sampling_values_are_built_before_the_wait_with_the_same_outputs(default_model_dir, monkeypatch,
                                                                         temperature) -> None:
    off, off_events = _run(default_model_dir, monkeypatch, False, temperature)
    on, on_events = _run(default_model_dir, monkeypatch, True, temperature)
    assert on == off
    assert any(reason == "stop" for _, reason in on.values())  # (JSON rows ended by their grammar)
    # Per step (the events between two "|"): an overlapped constrained step waits for the previous step's tokens
    # and builds this step's sampling values; off in that order (the build between the tokens and the draw),
    # on the other way round. Every such step of the run does it.
    def steps(events: list[str]) -> list[tuple[str, ...]]:
        return [tuple(part.split()) for part in " ".join(events).split("|")]

    assert steps(off_events).count(("wait", "build")) > 10 and ("build", "wait") not in steps(off_events)
    assert steps(on_events).count(("build", "wait")) == steps(off_events).count(("wait", "build"))
    assert ("wait", "build") not in steps(on_events)

"""benchmarks/spec_divergence.py, the audit of spec on/off differences run on the H200 in bf16: with
a correct tree path it sees no difference and no drift (float32), on every origin including branch
lanes; with a broken one (lanes left without their KV prefix) it names the request, the step, the
branch origin and spec off's top-2 gap there — the model's own, as transformers computes it."""
from __future__ import annotations

import pytest
import torch

from radixlm.benchmarks.spec_divergence import NEAR_TIE, audit_lines, divergence_audit
from radixlm.runtime.speculative import draft_tree
from tests.runtime.helpers import greedy_req, make_scheduler, run_to_completion
from tests.speculative.test_spec_tree import TREE, oracle_trees

PROMPTS = [list(range(5, 20)) * 2, list(range(40, 47)) * 3, [9, 8, 7, 6, 9, 8, 7, 6]]
NEW = 16


def audited(model, spec_sched, ref_sched):
    from radixlm.benchmarks.speculative import run
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams

    def reqs():
        return [TokenizedGenerateReq(rid=f"0-{i}", input_ids=p, params=SamplingParams(
            temperature=0.0, max_new_tokens=NEW, ignore_eos=True)) for i, p in enumerate(PROMPTS)]

    _, off = run(ref_sched, reqs())
    _, on = run(spec_sched, reqs())
    return divergence_audit(spec_sched, PROMPTS, len(PROMPTS), NEW, {False: off, True: on}), off


def oracle_scheduler(model):
    sched = make_scheduler(model, **TREE)
    sched.spec.beta = 0.001
    ref = run_to_completion(make_scheduler(model), [greedy_req(f"r{i}", p, NEW + 8) for i, p in enumerate(PROMPTS)])
    oracle_trees(sched, {tuple(p): ref[f"r{i}"]["output_ids"] for i, p in enumerate(PROMPTS)}, sched.runner.vocab_size)
    return sched


def test_audit_of_correct_trees_sees_no_drift_on_any_lane(tiny_model_dir) -> None:
    model = tiny_model_dir("llama")
    sched = oracle_scheduler(model)
    audit, _ = audited(model, sched, sched)
    assert audit["differing"] == audit["timed_differing"] == 0
    assert audit["rerun_reproduces_off"] and audit["rerun_reproduces_on"]
    assert audit["positions"]["branch"] >= 10 and audit["positions"]["lane0"] >= 3
    assert max(audit["drift"].values()) < 1e-4, audit["drift"]
    assert "branch lanes" in audit_lines(audit)[0]


def test_audit_names_a_broken_branch_and_the_models_gap_there(tiny_model_dir, monkeypatch: pytest.MonkeyPatch) -> None:
    model = tiny_model_dir("llama")
    sched = oracle_scheduler(model)
    lay_out = draft_tree.TreeRows.lay_out.__func__

    def without_lane_copies(cls, tree, prefix, row, lanes, decode):  # a branch lane sees no prompt
        out = lay_out(cls, tree, prefix, row, lanes, decode)
        return draft_tree.TreeRows(out.positions, out.rows, out.kv_positions, [], out.mask)

    monkeypatch.setattr(draft_tree.TreeRows, "lay_out", classmethod(without_lane_copies))
    audit, off = audited(model, sched, make_scheduler(model))
    assert audit["rerun_reproduces_off"] and audit["differing"] >= 1
    case = audit["cases"][0]
    assert case["origin"] == "branch" and case["on_token"] != case["off_token"]
    rid, pos = case["rid"], case["position"]
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(model), dtype=torch.float32)
    with torch.no_grad():
        logits = hf(torch.tensor([PROMPTS[int(rid.split("-")[1])] + off[rid][:pos]])).logits[0, -1]
    top = torch.log_softmax(logits, -1).topk(2)
    assert abs(case["gap"] - float(top.values[0] - top.values[1])) < 1e-3
    assert case["off_top2"][0][0] == int(top.indices[0]) == case["off_token"]
    assert case["near_tie"] == (case["gap"] < NEAR_TIE)
    assert any("branch" in line and f"step {pos}" in line for line in audit_lines(audit))

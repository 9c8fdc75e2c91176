"""Grammar-forced tokens as extra decode rows (runtime/forced_rows.py), overlap scheduling on the CPU:
outputs equal those decoded token by token (greedy and seeded sampling), fewer decode steps, the KV
pool and radix tree exact afterwards."""
from __future__ import annotations

import json
import time

import jsonschema
import pytest

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

# gpu_suite item (f)'s schema: regular (a state table mirrors it), keys in any order, bounded strings.
SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def _run(model_dir, forced_rows: bool, reqs_params: list[dict], repeats: int = 1, prompts: list[list[int]] | None = None,
         **options) -> tuple[list[dict], dict]:
    # (complete: the schema's state table is filled ahead by a background walk, as on a server that served it;
    # a ride needs the rows of the states it crosses)
    sched = make_scheduler(model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True,
                           disable_jump_forward=True, enable_forced_rows=forced_rows, grammar_state_table="complete",
                           **options)
    try:
        tok = sched.tokenizer
        prompt = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Answer as JSON."}],
                                                    add_generation_prompt=True, tokenize=False))
        prompts = prompts or [prompt] * len(reqs_params)
        warm = {**reqs_params[0], "max_new_tokens": 4}
        run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=prompt, params=SamplingParams(**warm))])
        deadline = time.monotonic() + 120
        while sched.grammars.info()["grammar_tables_completing"] and time.monotonic() < deadline:
            sched.grammars.file_completed_rows()
            time.sleep(0.05)
        sched.stats.update({k: 0 for k in sched.stats if k.startswith("forced_") or k.endswith("_steps")})
        outs = []
        for k in range(repeats):
            reqs = [TokenizedGenerateReq(rid=f"r{k}-{i}", input_ids=prompts[i], params=SamplingParams(**p))
                    for i, p in enumerate(reqs_params)]
            got = run_to_completion(sched, reqs)
            outs.append({r.rid.split("-")[1]: got[r.rid]["output_ids"] for r in reqs})
            assert_pool_idle(sched)
        return outs, dict(sched.stats)
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


@pytest.mark.parametrize("sampling", ["greedy", "seeded"])
def test_forced_tokens_computed_beside_sampled_ones_with_identical_outputs(default_model_dir, sampling,
                                                                          monkeypatch) -> None:
    """The second batch of the schema finds the (state, token) moves the first took into states that force
    one token: its rows compute that token beside the sampled one (picked on the device), sample after it
    where it was taken, and the batch needs fewer decode steps for the very same tokens. In the usual step the
    forced rows' planning takes its candidates from the commit's own pass (`TableStep.forced`): no row is
    visited, no row found by identity (`rows_after_commit`)."""
    from radixlm.runtime import forced_rows
    from radixlm.runtime.grammar_runtime import GrammarRuntime

    answers: list[bool] = []
    inner = forced_rows._forced_candidates
    monkeypatch.setattr(forced_rows, "_forced_candidates", lambda sched, reqs: answers.append(
        sched.grammars.committed_step() is not None and sched.grammars.committed_step().reqs == reqs) or inner(sched, reqs))
    found: list[int] = []
    rows_of = GrammarRuntime.rows_after_commit
    monkeypatch.setattr(GrammarRuntime, "rows_after_commit", lambda self, reqs: found.append(1) or rows_of(self, reqs))
    temp = {"temperature": 0.0} if sampling == "greedy" else {"temperature": 1.0}
    params = [{**temp, "seed": i, "max_new_tokens": 90, "json_schema": json.dumps(SCHEMA)} for i in range(4)]
    off, off_stats = _run(default_model_dir, False, params, repeats=2)
    assert not answers  # (off: no per-step filter at all)
    on, on_stats = _run(default_model_dir, True, params, repeats=2)
    assert answers and sum(answers) > 0.8 * len(answers) and len(found) == len(answers) - sum(answers)
    assert on == off  # token for token, every request, both batches
    assert on_stats["forced_guess_hits"] > 0 and off_stats["forced_guess_rows"] == 0
    assert on_stats["decode_steps"] < off_stats["decode_steps"]
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    for ids in on[1].values():
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), SCHEMA)


def test_rows_whose_forced_run_ends_them_leave_the_step_after_with_every_token(default_model_dir) -> None:
    """Random weights (benchmarks/forced_rows.py's rows 39, 44 and 48) spend the schema's whitespace budget, so
    a document's closing brace is the only token left: the row ends with it (sampled, or taken in a guess's
    run) and the step after leaves the row out. Every token is still appended: the matcher, which has taken
    the whole run when the commit appends it, must not end the row at the token before its last."""
    rows = (39, 44, 48)
    prompts = [[100 + (i * 7 + j) % 30000 for j in range(128)] for i in rows]
    params = [{"temperature": 1.0, "seed": i, "max_new_tokens": 128, "json_schema": json.dumps(SCHEMA)} for i in rows]
    off, _ = _run(default_model_dir, False, params, prompts=prompts, load_format="dummy")
    on, on_stats = _run(default_model_dir, True, params, prompts=prompts, load_format="dummy")
    assert on == off
    assert on_stats["forced_end_rows"] + on_stats["forced_guess_tokens"] > 0
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    for ids in on[0].values():
        jsonschema.validate(json.loads(tok.decode(ids, skip_special_tokens=True)), SCHEMA)


def test_guess_rows_fill_the_graph_bucket_and_grow_it_only_where_they_pay() -> None:
    from radixlm.runtime.cuda_graph_runner import batch_size_buckets
    from radixlm.runtime.forced_rows import _worth

    buckets = batch_size_buckets(512)  # ..., 48, 64, 80, 96, ...
    assert _worth([0.05] * 10, 60, 60, buckets) == 4  # the padding of bucket 64: free, whatever the rate
    assert _worth([0.05] * 10, 64, 64, buckets) == 0  # a full bucket: 16 more rows for ~0.5 row-steps saved
    assert _worth([0.9] * 10, 64, 64, buckets) == 10  # ~38 row-steps' worth saved for 16 rows
    assert _worth([0.9] * 40, 64, 64, buckets) == 40  # (80, then 96, then 112 rows: each growth pays)
    # at 256 rows a step's fixed part weighs less per row: the same growth needs surer guesses
    assert _worth([0.4] * 32, 256, 256, buckets) == 0 and _worth([0.4] * 32, 64, 64, buckets) == 32
    assert _worth([0.9] * 3, 5, 5, None) == 3  # no graphs (the CPU): every candidate


def _runs(runs: dict[int, tuple[int, ...]]):
    from radixlm.constrained.forced_tokens import GuessRuns

    return GuessRuns(len(runs), runs, max(map(len, runs.values())), 4)


def test_forced_and_guess_rows_in_one_decode_step() -> None:
    """decode_rows_forward_batch: a plain row, a row whose device token has forced tokens riding after it, a row
    whose ride was appended already (a synchronous commit), and a guess row whose forced token the device picks
    by its sampled token: one decode row per token, KV ending at it; the plain step's rows first (one a request,
    the pending step's tokens as they are), the extra tokens after them; logits at each row's last token (a
    guess row's: its own, then each guess token's, after every request's)."""
    import torch

    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.request import Req
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.uncommitted_step import UncommittedStep

    def req(rid: str, prompt: list[int], out: list[int], row: int) -> Req:
        r = Req(rid=rid, input_ids=prompt, params=SamplingParams(max_new_tokens=50), seed=0)
        r.output_ids, r.req_pool_idx, r.kv_len = list(out), row, len(prompt) + len(out)
        return r

    plain, ride, host, guess, miss = (req("p", [5, 6], [7], 3), req("r", [1, 2], [9], 1), req("h", [8], [3], 7),
                                      req("g", [4, 4], [], 2), req("m", [6], [6], 5))
    step = UncommittedStep.start([plain, ride, guess, miss], torch.tensor([41, 42, 43, 44]),
                                 rides=[[], [50, 51], [], []])
    host.output_ids += [60, 61]  # a ride committed before the step: tokens appended, their KV not computed
    host.kv_len -= 1
    batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    reqs = [plain, ride, host, guess, miss]
    own = [r.fill_len + r.tokens_on_device - r.kv_len for r in reqs]  # (decode_schedule's, forced rows on)
    batch.set_decode_rows(reqs, torch.arange(100, 112), [[] for _ in reqs], [None] * len(reqs), own=own)
    # the guess row's token 43 names a run of two forced tokens; the miss row's 44 names none
    batch.guesses = [None, None, None, _runs({43: (70, 73), 99: (71,)}), _runs({43: (72,)})]
    batch.guess_widths = [0, 0, 0, 2, 1]
    batch.extend_lens = [e + w for e, w in zip(batch.extend_lens, batch.guess_widths)]
    assert batch.extend_lens == [1, 3, 3, 3, 2]
    fb, writes = batch.to_forward_batch(torch.device("cpu"), step)
    assert fb.input_ids.tolist() == [41, 42, 3, 43, 44, 50, 51, 60, 61, 70, 73, 0]  # (the miss row: a padding token)
    assert fb.positions.tolist() == [3, 3, 1, 2, 2, 4, 5, 2, 3, 3, 4, 3]
    assert fb.seq_lens_cpu == [p + 1 for p in fb.positions.tolist()]
    assert fb.req_pool_indices_cpu == [3, 1, 7, 2, 5, 1, 1, 7, 7, 2, 2, 5]
    assert fb.logits_indices.tolist() == [0, 6, 8, 3, 4, 9, 10, 11]  # (a guess row: after each of its tokens)
    assert batch.sample_rows == [0, 1, 2, 3, 4] and batch.guess_rows == [-1, -1, -1, 5, 7]
    assert batch.guess_slots == [-1, -1, -1, 8, 11] and batch.guess_index == [3, 4]  # (slots: request by request)
    assert writes.rows.tolist() == fb.req_pool_indices_cpu
    assert writes.slots.tolist() == [100, 101, 104, 107, 110, 102, 103, 105, 106, 108, 109, 111]
    assert fb.out_cache_loc.tolist() == writes.slots.tolist()

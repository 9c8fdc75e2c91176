"""State tables inside the scheduler (runtime/grammar_tables.py): a batch's masks gathered from the
table equal the masks llguidance fills row by row; seeded outputs are the same with
--grammar-state-table auto and off (overlap on, speculative NGRAM drafts checked against the
grammar), they validate, and neither KV nor matchers leak."""
from __future__ import annotations

import json
import time
from types import SimpleNamespace
from typing import Any

import jsonschema
import pytest
import torch

from radixlm import constrained as C
from radixlm.constrained.mask_workers import MaskWorkers
from radixlm.constrained.table_grammar import TableGrammar
from radixlm.runtime.grammar_tables import DeviceTables
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

ITEM_F = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def _encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_gathered_masks_equal_llguidance_rows(default_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    grammar = C.compile(tok, json_schema=ITEM_F, backend="llguidance", cache=None)
    table = TableGrammar.wrap(grammar)
    assert table is not None
    doc = _encode(tok, '{"id": 42, "name": "Ada Lovelace", "tags": ["x", "y"], "active": true}')
    cuts = [0, 1, 3, 7, 12, len(doc), len(doc) + 1]  # the last one: the end token consumed
    rows, refs = [], []
    for k in cuts:
        mine, ref = table.matcher(), grammar.matcher()
        for tid in (doc + [tok.eos_token_id])[:k]:
            assert mine.advance(tid) and ref.advance(tid)
        rows.append(SimpleNamespace(grammar=mine, finished=False))
        refs.append(ref)
    rows.insert(2, SimpleNamespace(grammar=None, finished=False))  # unconstrained: all allowed
    rows.append(SimpleNamespace(grammar=table.matcher(), finished=True))  # finished meanwhile: all allowed
    tables, workers = DeviceTables(), MaskWorkers(0)
    for _ in range(2):  # the second time every row is a table row already filled
        got = tables.gather(rows, torch.device("cpu"), workers)
        assert got is not None and got.shape == (len(rows), (grammar.info.vocab_size + 31) // 32)
        want = C.allocate_token_bitmask(len(rows), grammar.info.vocab_size)
        C.fill_next_token_bitmasks([(r, i if i < 2 else i + 1) for i, r in enumerate(refs)], want)
        assert torch.equal(got, want)
    plain = [*rows, SimpleNamespace(grammar=grammar.matcher(), finished=False)]
    assert tables.gather(plain, torch.device("cpu"), workers) is None  # a row without a table: host path


def _reqs(prompt: list[int], n: int, prefix: str, schema_obj: Any = ITEM_F) -> list[TokenizedGenerateReq]:
    schema = json.dumps(schema_obj)
    out = [TokenizedGenerateReq(rid=f"{prefix}{i}", input_ids=prompt, params=SamplingParams(
        temperature=1.0, seed=i, max_new_tokens=72, json_schema=schema)) for i in range(n)]
    out.append(TokenizedGenerateReq(rid=f"{prefix}u", input_ids=prompt, params=SamplingParams(
        temperature=1.0, seed=99, max_new_tokens=24, ignore_eos=True)))
    return out


@pytest.mark.parametrize("mode", ["overlap", "ngram"])
def test_outputs_equal_with_and_without_tables(default_model_dir, mode: str) -> None:
    options: dict[str, Any] = {"max_total_tokens": 8192, "grammar_mask_threads": 1}
    if mode == "overlap":
        options |= {"enable_overlap_schedule_on_cpu": True, "disable_jump_forward": True}
    else:
        options |= {"speculative_algorithm": "NGRAM"}
    results = {}
    for setting in ("off", "auto"):
        sched = make_scheduler(default_model_dir, grammar_state_table=setting, **options)
        prompt = _encode(sched.tokenizer, "Write a JSON record of a person with tags:")
        results[setting] = run_to_completion(sched, _reqs(prompt, 4, "t"))
        gr = sched.grammars
        with_table = [w for _, w in gr._tables._wrapped.values() if w is not None]
        assert len(with_table) == (setting == "auto")
        if with_table:
            assert with_table[0].table.dfa.num_states > 20 and not with_table[0].table.broken
        stopped = 0
        for i in range(4):
            res = results[setting][f"t{i}"]
            if res["finished_reason"]["type"] == "stop":
                stopped += 1
                jsonschema.validate(json.loads(sched.tokenizer.decode(res["output_ids"], skip_special_tokens=True)), ITEM_F)
        assert stopped >= 2
        assert not gr._terminated and not gr.pending and (gr._prefetch is None or not gr._prefetch.rows)
        assert_pool_idle(sched)
        gr.close()
    for rid, res in results["off"].items():
        assert results["auto"][rid]["output_ids"] == res["output_ids"], rid
        assert results["auto"][rid]["finished_reason"] == res["finished_reason"], rid


def test_outputs_equal_with_a_completed_table(default_model_dir) -> None:
    """--grammar-state-table complete: once the background process has filed every state's row, the
    scheduler's outputs are those of the backend's own masks (off), and no row is filled on the way."""
    options: dict[str, Any] = {"max_total_tokens": 8192, "grammar_mask_threads": 1,
                               "enable_overlap_schedule_on_cpu": True, "disable_jump_forward": True}
    small = {"type": "object", "properties": {  # item (f)'s shape, fewer states (its walk: seconds on 2 cores)
        "name": {"type": "string", "maxLength": 6}, "tags": {"type": "array", "items": {"type": "string", "maxLength": 3},
                                                             "maxItems": 2}, "active": {"type": "boolean"}},
        "required": ["name", "tags", "active"], "additionalProperties": False}
    results = {}
    for setting in ("off", "complete"):
        sched = make_scheduler(default_model_dir, grammar_state_table=setting, **options)
        prompt = _encode(sched.tokenizer, "Write a JSON record of a person with tags:")
        run_to_completion(sched, _reqs(prompt, 1, "warm", small)[:1])  # compiles the grammar (and starts the completion)
        gr = sched.grammars
        if setting == "complete":
            completion = gr._completion
            deadline = time.monotonic() + 240
            assert sched.info()["grammar_tables_completing"] == 1  # queued or walking: its tokenizer loads first
            while not completion.has_news() and time.monotonic() < deadline:  # the worker's "ready"
                time.sleep(0.02)
            gr.file_completed_rows()  # reads it and sends the walk
            while not completion.has_news() and time.monotonic() < deadline:  # its first rows
                time.sleep(0.02)
            # A step with a forward pass to run files them after launching it (the device's time hides them).
            order: list[str] = []
            forward, poll = sched.runner.forward, completion.poll
            sched.runner.forward = lambda *a, **k: (order.append("forward"), forward(*a, **k))[1]
            completion.poll = lambda: (order.append("filed"), poll())[1]
            sched.handle(_reqs(prompt, 1, "during", small)[0])
            sched.step()
            sched.runner.forward, completion.poll = forward, poll
            assert order == ["forward", "filed"] and completion.merged > 0
            while sched.info()["grammar_tables_completing"] and time.monotonic() < deadline:  # what item (f) waits on
                sched.step()  # an idle turn files what the completion sent
                time.sleep(0.02)
            assert completion._inflight is None and not completion._queue
            run_to_completion(sched, [])  # the request started above
            sched.pop_outputs()
            (table,) = [w.table for _, w in gr._tables._wrapped.values() if w is not None]
            assert completion.merged > 100 and not completion._dead
            assert all(table.ready[2 : table.dfa.num_states + 2])  # every state the DFA knows has its row
            assert all(-2 not in row for row in table.dfa.move_table())  # ... and its moves (UNKNOWN: -2)
            states = table.dfa.num_states
        results[setting] = run_to_completion(sched, _reqs(prompt, 4, "t", small))
        if setting == "complete":
            assert table.dfa.num_states == states and not table.broken  # no state unseen by the completion
        assert_pool_idle(sched)
        gr.close()
    assert results["off"] == results["complete"]


def test_fresh_rows_reach_the_device_from_staged_memory(default_model_dir, monkeypatch) -> None:
    """Every host-to-device copy of a table goes through `stage_rows` (pinned on a GPU host: a pageable
    copy waits for the forward pass in flight): the first upload, the rows filed since the last step, and
    a grown table, whose device copy keeps its old rows on the device; the copy equals the host table."""
    from transformers import AutoTokenizer

    from radixlm.runtime import grammar_tables

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    table = TableGrammar.wrap(C.compile(tok, json_schema=ITEM_F, backend="llguidance", cache=None)).table
    tables = DeviceTables()
    staged: set[int] = set()
    real_stage = grammar_tables.stage_rows

    def stage(rows: torch.Tensor, picked: Any, pin: bool) -> tuple[torch.Tensor, torch.Tensor]:
        assert not pin  # (a CPU "device" here)
        out = real_stage(rows, picked, pin)
        staged.update(t.data_ptr() for t in out)
        return out

    moved: list[int] = []
    real_to = torch.Tensor.to

    def to(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        moved.append(self.data_ptr())
        return real_to(self, *args, **kwargs)

    monkeypatch.setattr(grammar_tables, "stage_rows", stage)
    monkeypatch.setattr(torch.Tensor, "to", to)
    device = torch.device("cpu")  # `_synced` as on a GPU, its copies observable
    filled = [0, 1]
    for rows in ([5, 9, 7], [3], [table.rows.shape[0] + 40, 11]):  # the last one grows the table
        table.row_of(max(rows) - 2)
        table.rows[rows] = torch.randint(-2**31, 2**31 - 1, (len(rows), table.words), dtype=torch.int32)
        table.fresh += rows
        filled += rows
        moved.clear()
        copy = tables._synced(table, device)
        assert moved and set(moved) <= staged and not table.fresh
        assert copy.shape == table.rows.shape and torch.equal(copy[filled], table.rows[filled])
    index, rows = real_stage(table.rows, [5, 9, 7], False)
    assert index.tolist() == [5, 9, 7] and torch.equal(rows, table.rows[[5, 9, 7]])

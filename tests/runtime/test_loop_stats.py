"""RADIXLM_LOOP_STATS (runtime/loop_stats.py): one line per busy period of the scheduler process's
loop, its seconds by part and the scheduler's step counters over that period only."""
from __future__ import annotations

import gc
import time

import pytest

from radixlm.runtime.loop_stats import LoopStats, read_last


@pytest.fixture
def loop(tmp_path):
    """A LoopStats writing under tmp_path, closed after the test: `watch_scheduler` patches classes and modules for
    the whole process, and a wrapper left behind would outlive the test."""
    stats = LoopStats(str(tmp_path / "loop.jsonl"))
    yield stats
    stats.close()


def test_one_line_per_busy_period_with_counter_deltas(tmp_path, loop) -> None:
    path = tmp_path / "loop.jsonl"
    assert read_last(str(path)) is None
    stats = {"forward_steps": 10, "decode_steps": 7, "overlapped_steps": 5, "prefill_steps": 3, "mixed_steps": 0,
             "generated_tokens": 100}
    loop.end(stats)  # idle without a busy period: nothing written
    assert not path.exists()
    loop.begin(stats)
    for k, ran in enumerate((True, True, False)):
        loop.add("step", 0.5)
        loop.add("wait", 0.25 * (not ran))
        loop.turn(ran, 0.5 - 0.25 * k)
    gc.collect()  # a full collection inside the period: counted, its pause timed
    loop.begin(stats)  # more messages in the same busy period do not restart it
    stats = {**stats, "forward_steps": 12, "decode_steps": 9, "overlapped_steps": 6, "generated_tokens": 140}
    loop.end(stats)
    line = read_last(str(path))
    assert line is not None and line["seconds"]["step"] == 1.5 and line["seconds"]["wait"] == 0.25
    assert line["turns"] == 3 and line["turns_without_a_step"] == 1
    assert line["gc_full_collections"] >= 1 and line["seconds"]["gc"] > 0
    assert line["step_ms"] == {"median": 375.0, "p90": 500.0, "max": 500.0, "longest": [500.0, 250.0]}  # turns with a step
    assert (line["forward_steps"], line["decode_steps"], line["overlapped_steps"], line["prefill_steps"],
            line["generated_tokens"]) == (2, 2, 1, 0, 40)
    loop.begin(stats)
    loop.turn(True)
    loop.end(stats)
    lines = path.read_text().splitlines()
    assert len(lines) == 2 and read_last(str(path))["turns"] == 1 and read_last(str(path))["seconds"]["step"] == 0.0


def test_step_parts_of_a_constrained_run(tmp_path, default_model_dir, loop) -> None:
    """`watch_scheduler`: a busy period's line splits the step into the forward's launch, commits,
    sampling, and the grammar's commit and masks (each within "step"; masks within sampling); idle,
    nothing is counted."""
    import json

    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from tests.runtime.helpers import make_scheduler, run_to_completion

    sched = make_scheduler(default_model_dir, enable_overlap_schedule_on_cpu=True, disable_jump_forward=True,
                           grammar_mask_threads=0)
    loop.watch_scheduler(sched)
    schema = json.dumps({"type": "object", "properties": {"a": {"type": "boolean"}}, "required": ["a"]})
    reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=[1, 2, 3], params=SamplingParams(
        temperature=0.0, max_new_tokens=16, json_schema=schema)) for i in range(2)]
    run_to_completion(sched, reqs[:1])  # not busy: nothing counted
    assert loop.parts == {}
    loop.begin(sched.stats)
    step = sched.step

    def turn() -> bool:  # as the scheduler process's loop counts its turns
        ran = step()
        loop.turn(ran)
        return ran

    sched.step = turn
    t = time.perf_counter()
    run_to_completion(sched, reqs[1:])
    took = time.perf_counter() - t
    loop.end(sched.stats)
    parts = read_last(str(tmp_path / "loop.jsonl"))["parts"]
    for part in ("forward launch", "commit", "sample launch (incl. masks taken)",
                 "grammar commit", "masks taken", "grammar poll", "table rows filed"):
        assert 0 < parts[part] < took, part
    assert parts["masks taken"] <= parts["sample launch (incl. masks taken)"]
    for part in ("sampling tensors", "draw", "bitmask applied", "mask gather", "table commit", "schedule decode",
                 "forward inputs", "sampled tokens' copy"):  # the finer parts, each inside a coarse one
        assert 0 < parts[part] < took, part
    line = read_last(str(tmp_path / "loop.jsonl"))
    assert parts["mask gather"] <= parts["masks taken"] and parts["table commit"] <= parts["grammar commit"]
    for part, longest in line["parts_max"].items():  # the longest single call of each part, and the calls
        assert 0 < longest <= parts[part] and line["parts_calls"][part] >= 1, part
    assert line["parts_calls"]["grammar commit"] == line["parts_calls"]["table commit"]
    first = line["first_step_parts"]  # the turns up to the first that ran a step: the admission, the first forward
    assert first["schedule prefill"] > 0 and first["forward launch"] > 0
    assert line["parts_calls"]["forward launch"] > 1 and first["forward launch"] < parts["forward launch"]
    assert all(first[k] <= parts[k] for k in first)
    sched.grammars.close()


def test_forced_rows_parts(tmp_path, default_model_dir, loop) -> None:
    """With --enable-forced-rows the line also splits out its host parts: the guess and ride plans, the guesses'
    resolution, and inside "forward inputs" the extra-rows step's guess entries and its packed copy."""
    import json

    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from tests.runtime.helpers import make_scheduler, run_to_completion

    sched = make_scheduler(default_model_dir, max_total_tokens=8192, enable_overlap_schedule_on_cpu=True,
                           disable_jump_forward=True, enable_forced_rows=True, grammar_state_table="complete",
                           grammar_mask_threads=0)
    loop.watch_scheduler(sched)
    schema = json.dumps({"type": "object", "properties": {"id": {"type": "integer"}, "name": {"type": "string",
                        "maxLength": 12}, "active": {"type": "boolean"}}, "required": ["id", "name", "active"],
                         "additionalProperties": False})
    params = dict(temperature=1.0, max_new_tokens=48, json_schema=schema)
    run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=[5, 6, 7], params=SamplingParams(**params))])
    deadline = time.monotonic() + 120
    while sched.grammars.info()["grammar_tables_completing"] and time.monotonic() < deadline:
        sched.grammars.file_completed_rows()
        time.sleep(0.05)
    for key in ("forced_guess_rows", "forced_ride_tokens"):
        sched.stats[key] = 0
    loop.begin(sched.stats)
    reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=[100 + i, 7, 9], params=SamplingParams(seed=i, **params))
            for i in range(8)]
    for _ in range(2):  # the first run teaches the table which tokens lead into forced runs; the second guesses
        run_to_completion(sched, reqs)
        reqs = [TokenizedGenerateReq(rid=r.rid + "b", input_ids=r.input_ids, params=r.params) for r in reqs]
    loop.end(sched.stats)
    assert sched.stats["forced_guess_rows"] > 0
    line = read_last(str(tmp_path / "loop.jsonl"))
    parts = line["parts"]
    for part in ("plan guesses", "resolve guesses", "plan rides", "guess pick inputs", "extra-rows inputs' copy"):
        assert 0 < parts[part], part
    assert parts["guess pick inputs"] + parts["extra-rows inputs' copy"] < parts["forward inputs"]
    sched.grammars.close()


def test_close_undoes_every_watch(tmp_path) -> None:
    """`close` puts back what `watch` replaced on classes, modules and objects (a classmethod stays one; an
    attribute the object did not have of its own is removed again) and stops timing the collector."""
    import inspect

    from radixlm.runtime import forced_rows_batch
    from radixlm.runtime.sampler import SamplingBatch

    class Owner:
        def method(self) -> int:
            return 1

    obj = Owner()
    before = (inspect.getattr_static(SamplingBatch, "build"), forced_rows_batch.pack_on)
    loop = LoopStats(str(tmp_path / "loop.jsonl"))
    loop.watch(SamplingBatch, "build", "a")
    loop.watch(forced_rows_batch, "pack_on", "b")
    loop.watch(obj, "method", "c")
    assert "method" in vars(obj) and forced_rows_batch.pack_on is not before[1]
    loop.close()
    assert (inspect.getattr_static(SamplingBatch, "build"), forced_rows_batch.pack_on) == before
    assert "method" not in vars(obj) and obj.method() == 1
    assert loop._on_gc not in gc.callbacks

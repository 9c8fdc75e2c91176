"""An adapter --max-loaded-loras evicted from host memory is read back on the lora-load thread while
the scheduler keeps stepping; its requests wait out of the batch and then run as they would have,
or end with an error naming the adapter when its folder no longer reads."""
from __future__ import annotations

import dataclasses
import shutil
import threading
import time

import pytest

from radixlm.runtime.lora import manager
from radixlm.runtime.lora.background_load import THREAD_NAME, AdapterLoads
from tests.fixtures.lora_adapters import make_peft_adapter
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    return model_dir, {n: make_peft_adapter(model_dir, root / n, seed=60 + i, r=4) for i, n in enumerate(("a0", "a1"))}


def _sched(model_dir, paths: dict, **options):
    """a0 then a1 at start-up with one host copy: a0 leaves host memory as a1 comes."""
    sched = make_scheduler(model_dir, lora_paths=tuple(f"{n}={p}" for n, p in paths.items()), max_lora_rank=8,
                           max_loaded_loras=1, max_loras_per_batch=1, cpu_threads=1, **options)
    assert sched.runner.lora.info()["in_host_memory"] == ["a1"]
    return sched


def _run(sched, reqs, on_step=None) -> dict[str, dict]:
    for r in reqs:
        sched.handle(r)
    out: dict[str, dict] = {}
    deadline = time.monotonic() + 300
    while not sched.idle:
        assert time.monotonic() < deadline, "scheduler did not finish"
        if not sched.step():
            time.sleep(0.002)
        if on_step is not None:
            on_step()
        for o in sched.pop_outputs():
            merge(out, o)
    return out


def _reqs():
    return [greedy_req("base", [5, 6, 7, 8], 24),
            dataclasses.replace(greedy_req("uses", [9, 10, 11], 8), lora_path="a0")]


def test_an_evicted_adapter_is_read_on_the_load_thread_while_the_loop_steps(setup, monkeypatch) -> None:
    model_dir, adapters = setup
    want = _run(_sched(model_dir, adapters), _reqs())  # in-process: read inside the step, as before
    sched = _sched(model_dir, adapters)
    sched.adapter_loads = AdapterLoads(sched.runner.lora)
    reads: list[str] = []
    release = threading.Event()
    base_steps = []
    real = manager.read_adapter

    def slow_read(*args, **kwargs):
        reads.append(threading.current_thread().name)
        assert release.wait(120), "the loop did not step while the read ran"
        return real(*args, **kwargs)

    def on_step() -> None:
        if reads and not release.is_set():
            base_steps.append(next(r.kv_len for r in sched.running if r.rid == "base"))
            if len(base_steps) >= 3:  # the base request decoded three steps while a0's folder was being read
                release.set()

    monkeypatch.setattr(manager, "read_adapter", slow_read)
    got = _run(sched, _reqs(), on_step)
    assert reads == [f"{THREAD_NAME}_0"]
    assert base_steps == sorted(set(base_steps))  # each step made a token
    assert got["uses"]["output_ids"] == want["uses"]["output_ids"]  # the held request ran, as it would have
    assert got["base"]["output_ids"] == want["base"]["output_ids"]
    assert got["uses"]["finished_reason"]["type"] == "length"
    assert sched.runner.lora.info()["in_host_memory"] == ["a0"]
    assert_pool_idle(sched)


def test_an_adapter_whose_folder_is_gone_fails_its_requests_alone(setup, tmp_path) -> None:
    model_dir, adapters = setup
    gone = shutil.copytree(adapters["a0"], tmp_path / "a0")
    sched = _sched(model_dir, {"a0": gone, "a1": adapters["a1"]})
    sched.adapter_loads = AdapterLoads(sched.runner.lora)
    shutil.rmtree(gone)
    got = _run(sched, _reqs())
    reason = got["uses"]["finished_reason"]
    assert reason["type"] == "abort" and "'a0'" in reason["message"] and str(gone) in reason["message"]
    assert reason.get("status_code") == 500
    assert len(got["base"]["output_ids"]) == 24 and got["base"]["finished_reason"]["type"] == "length"
    assert_pool_idle(sched)
    # the folder back: the next request of a0 reads it again and runs
    shutil.copytree(adapters["a0"], gone)
    again = _run(sched, [dataclasses.replace(greedy_req("again", [9, 10, 11], 8), lora_path="a0")])
    assert len(again["again"]["output_ids"]) == 8, again["again"]["finished_reason"]
    assert_pool_idle(sched)

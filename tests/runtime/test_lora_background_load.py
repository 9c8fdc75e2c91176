"""/load_lora_adapter in the scheduler process: the adapter's files are read on the lora-load
thread, registered and answered from the loop, which keeps stepping meanwhile."""
from __future__ import annotations

import dataclasses
import threading
import time

import pytest

from radixlm.runtime.io_struct import ControlReq
from radixlm.runtime.lora import manager
from radixlm.runtime.lora.background_load import THREAD_NAME, AdapterLoads
from tests.fixtures.lora_adapters import make_peft_adapter
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


@pytest.fixture(scope="module")
def setup(tiny_model_dir, tmp_path_factory):
    model_dir = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("adapters")
    return model_dir, {n: make_peft_adapter(model_dir, root / n, seed=40 + i, r=4) for i, n in enumerate(("a0", "a1"))}


def _replies(loads: AdapterLoads, sched, want: int) -> list:
    got: list = []
    deadline = time.monotonic() + 120
    while len(got) < want:
        assert time.monotonic() < deadline, "no reply"
        sched.step()  # the loop goes on while the read runs
        got.extend(loads.finished())
        time.sleep(0.005)
    return got


def test_the_read_runs_on_the_load_thread_and_the_reply_comes_from_the_loop(setup, tmp_path, monkeypatch) -> None:
    model_dir, adapters = setup
    sched = make_scheduler(model_dir, lora_paths=(f"a0={adapters['a0']}",), max_lora_rank=8, cpu_threads=1)
    loads = sched.adapter_loads = AdapterLoads(sched.runner.lora)
    threads: list[str] = []
    real = manager.read_adapter

    def recording(*args, **kwargs):
        threads.append(threading.current_thread().name)
        return real(*args, **kwargs)

    monkeypatch.setattr(manager, "read_adapter", recording)
    sched.handle(greedy_req("base", [5, 6, 7], 12))
    assert sched.handle(ControlReq("load_lora_adapter", 1, {"lora_name": "new", "lora_path": str(adapters["a1"])})) is None
    assert sched.handle(ControlReq("load_lora_adapter", 2, {"lora_name": "bad", "lora_path": str(tmp_path)})) is None
    taken = sched.handle(ControlReq("load_lora_adapter", 3, {"lora_name": "a0", "lora_path": str(adapters["a1"])}))
    assert not taken.ok and taken.payload["param"] == "lora_name"  # answered at once
    new, bad = _replies(loads, sched, 2)
    assert new.request_id == 1 and new.ok and "new" in new.payload["loaded_adapters"]
    assert bad.request_id == 2 and not bad.ok and bad.payload["param"] == "lora_path"
    assert threads and all(t.startswith(THREAD_NAME) for t in threads)
    assert "bad" not in sched.runner.lora.adapters
    out = run_to_completion(sched, [dataclasses.replace(greedy_req("uses", [5, 6, 7], 6), lora_path="new")])
    assert len(out["uses"]["output_ids"]) == 6 and out["uses"]["finished_reason"]["type"] == "length"
    assert_pool_idle(sched)


def test_a_name_loaded_while_its_read_ran_is_refused_at_registration(setup) -> None:
    model_dir, adapters = setup
    sched = make_scheduler(model_dir, lora_paths=(f"a0={adapters['a0']}",), max_lora_rank=8, cpu_threads=1)
    loads = sched.adapter_loads = AdapterLoads(sched.runner.lora)
    assert sched.handle(ControlReq("load_lora_adapter", 1, {"lora_name": "x", "lora_path": str(adapters["a1"])})) is None
    assert sched.handle(ControlReq("load_lora_adapter", 2, {"lora_name": "x", "lora_path": str(adapters["a1"])})) is None
    first, second = _replies(loads, sched, 2)
    assert first.ok and not second.ok and "already loaded" in second.payload["message"]

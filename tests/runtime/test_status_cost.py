"""The scheduler's status (info(), read by the "Decode batch." line every --decode-log-interval decode
steps) stays cheap after the scheduler process froze its start-up heap: gc.get_freeze_count() walks
every frozen object (40-60 ms for ~300k on the 2-core CPU), a stall inside the decode loop."""
from __future__ import annotations

import gc
import logging

import pytest

from radixlm.runtime.scheduler_process import freeze_startup_heap
from tests.runtime.helpers import greedy_req, make_scheduler, run_to_completion


@pytest.fixture
def frozen(monkeypatch):
    """A frozen heap as in the scheduler process, and a gc.get_freeze_count() that fails if called
    afterwards (the heap is unfrozen again for the other tests)."""
    count = freeze_startup_heap()

    def walk() -> int:
        raise AssertionError("gc.get_freeze_count() walks the whole frozen heap")

    monkeypatch.setattr(gc, "get_freeze_count", walk)
    yield count
    gc.unfreeze()


def test_status_line_does_not_walk_the_frozen_heap(tiny_model_dir, frozen, caplog) -> None:
    sched = make_scheduler(tiny_model_dir("llama"), decode_log_interval=2)
    sched.frozen_objects = frozen
    assert frozen > 1_000  # torch, transformers and the model's Python side
    with caplog.at_level(logging.INFO, logger="radixlm.scheduler"):
        out = run_to_completion(sched, [greedy_req("a", [5, 6, 7, 8], 9)])
    assert len(out["a"]["output_ids"]) == 9
    assert sum("Decode batch." in r.getMessage() for r in caplog.records) >= 3  # info() ran for each line
    assert sched.info()["gc_frozen_objects"] == frozen

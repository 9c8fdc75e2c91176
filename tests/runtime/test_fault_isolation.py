"""Fault isolation: an exception in a scheduler step fails only that step's requests (status 500,
KV freed and not cached), the loop goes on with exact KV accounting; a device error, or one that
leaves the pools inconsistent, stops the scheduler process, which tells the front why."""
from __future__ import annotations

import multiprocessing
import random

import pytest
import torch

from radixlm.runtime.fault_isolation import SchedulerFatalError, kv_accounting_problem
from radixlm.runtime.io_struct import ControlReq, SchedulerFailed, SchedulerReady
from radixlm.runtime.scheduler_process import FATAL_EXIT_CODE
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def prompt(seed: int, n: int = 12) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 200) for _ in range(n)]


def drive(sched, steps_before_fault: int = 0) -> dict[str, dict]:
    """Step until idle, merging outputs and checking the accounting after every step."""
    results: dict[str, dict] = {}
    for _ in range(2000):
        if sched.idle:
            break
        sched.step()
        assert kv_accounting_problem(sched) is None
        for out in sched.pop_outputs():
            merge(results, out)
    assert sched.idle
    return results


def reference(model_dir, rid: str, ids: list[int], max_new: int) -> list[int]:
    sched = make_scheduler(model_dir)
    return run_to_completion(sched, [greedy_req(rid, ids, max_new)])[rid]["output_ids"]


class Boom(ValueError):
    pass


@pytest.mark.parametrize("overlap", [False, True])
def test_forward_error_fails_only_that_batch_then_serves(model_dir, monkeypatch, overlap):
    sched = make_scheduler(model_dir, enable_overlap_schedule_on_cpu=overlap)
    real_forward = sched.runner.forward
    calls = {"n": 0}

    def flaky_forward(fb):
        calls["n"] += 1
        if calls["n"] == 4:  # a decode step of both requests, after their prefill
            raise Boom("injected fault in the forward pass")
        return real_forward(fb)

    monkeypatch.setattr(sched.runner, "forward", flaky_forward)
    for rid, seed in (("a", 1), ("b", 2)):
        sched.handle(greedy_req(rid, prompt(seed), 10))
    results = drive(sched)
    for rid in ("a", "b"):
        reason = results[rid]["finished_reason"]
        assert reason["type"] == "abort" and reason["status_code"] == 500, reason
        assert "Boom: injected fault" in reason["message"]
    assert sched.stats["failed_steps"] == 1
    # The loop goes on: the next request is answered exactly as on a fresh scheduler, and the KV
    # of the failed requests was not cached (a fresh prompt sharing their prefix is still exact).
    later = drive_one(sched, "c", prompt(1), 10)
    assert later == reference(model_dir, "c", prompt(1), 10)
    assert_pool_idle(sched)


def drive_one(sched, rid: str, ids: list[int], max_new: int) -> list[int]:
    sched.handle(greedy_req(rid, ids, max_new))
    out = drive(sched)[rid]
    assert out["finished_reason"]["type"] == "length", out
    return out["output_ids"]


def test_error_in_result_processing_fails_batch(model_dir, monkeypatch):
    sched = make_scheduler(model_dir)
    real = sched.results.check_finish

    def flaky(req, tok, grammars):
        if req.rid == "bad" and len(req.output_ids) == 3:
            raise Boom("injected fault in result processing")
        return real(req, tok, grammars)

    monkeypatch.setattr(sched.results, "check_finish", flaky)
    sched.handle(greedy_req("bad", prompt(3), 8))
    results = drive(sched)
    assert results["bad"]["finished_reason"]["status_code"] == 500
    assert drive_one(sched, "next", prompt(4), 6) == reference(model_dir, "next", prompt(4), 6)
    assert_pool_idle(sched)


def test_error_while_scheduling_fails_the_admitted_request(model_dir, monkeypatch):
    sched = make_scheduler(model_dir)
    real = sched._admit
    fired = {"done": False}

    def flaky(req, prefix, ext):
        if not fired["done"]:
            fired["done"] = True
            raise Boom("injected fault while scheduling")
        return real(req, prefix, ext)

    monkeypatch.setattr(sched, "_admit", flaky)
    sched.handle(greedy_req("x", prompt(5), 4))
    results = drive(sched)
    assert results["x"]["finished_reason"]["status_code"] == 500
    assert drive_one(sched, "y", prompt(5), 4) == reference(model_dir, "y", prompt(5), 4)
    assert_pool_idle(sched)


def test_device_error_is_fatal(model_dir, monkeypatch):
    sched = make_scheduler(model_dir)

    def broken(fb):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(sched.runner, "forward", broken)
    sched.handle(greedy_req("z", prompt(6), 4))
    with pytest.raises(SchedulerFatalError, match="device error.*illegal memory access"):
        sched.step()


def test_inconsistent_pool_after_an_error_is_fatal(model_dir, monkeypatch):
    sched = make_scheduler(model_dir)
    real = sched.results.process

    def leak_then_fail(*args):
        sched.kv_pool.alloc(3)  # slots owned by nobody: the accounting cannot add up any more
        raise Boom("injected fault after a leak")

    monkeypatch.setattr(sched.results, "process", leak_then_fail)
    sched.handle(greedy_req("w", prompt(7), 4))
    with pytest.raises(SchedulerFatalError, match="inconsistent"):
        sched.step()
    monkeypatch.setattr(sched.results, "process", real)


def test_message_that_fails_to_admit_fails_alone(model_dir, monkeypatch):
    from radixlm.runtime.fault_isolation import reject_message

    sched = make_scheduler(model_dir)
    msg = greedy_req("g", prompt(8), 4)

    def broken(sched, msg):
        raise Boom("injected fault while admitting")

    monkeypatch.setattr("radixlm.runtime.scheduler.add_request", broken)  # what Scheduler.handle calls
    with pytest.raises(Boom) as info:
        sched.handle(msg)
    assert reject_message(sched, msg, info.value) is None
    out = sched.pop_outputs()
    assert [o.rid for o in out] == ["g"] and out[0].finished_reason.status_code == 500
    assert sched.idle
    resp = reject_message(sched, ControlReq("get_info", 7), Boom("x"))
    assert resp is not None and not resp.ok


def _child(args, model_dir, recv, send):  # runs in a forked process: the forward pass hits a "device error"
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.scheduler_process import run_scheduler_process

    def broken(self, fb):
        raise RuntimeError("CUDA error: device-side assert triggered")

    ModelRunner.forward = broken
    run_scheduler_process(args, model_dir, recv, send)


def test_fatal_error_stops_the_process_and_says_why(model_dir):
    from radixlm.runtime.server_args import ServerArgs

    ctx = multiprocessing.get_context("fork")
    to_child, child_in = ctx.Pipe(duplex=False)
    child_out, from_child = ctx.Pipe(duplex=False)
    args = ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096, log_level="error").resolve()
    proc = ctx.Process(target=_child, args=(args, str(model_dir), to_child, from_child), daemon=True)
    proc.start()
    try:
        assert isinstance(child_out.recv(), SchedulerReady)
        child_in.send([greedy_req("r", prompt(9), 4)])
        assert child_out.poll(60)
        msg = child_out.recv()
        assert isinstance(msg, SchedulerFailed) and "device-side assert" in msg.error
        proc.join(30)
        assert proc.exitcode == FATAL_EXIT_CODE
    finally:
        if proc.is_alive():
            proc.kill()

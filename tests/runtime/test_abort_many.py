"""abort_all's one abort a request, taken in one pass over the scheduler's queues (Scheduler.abort_many via
scheduler_process.take_messages): one by one, 1,000 queued requests' aborts scanned the queues 1,000 times
(67 ms of the loop on the 2-core CPU, quadratic in the count)."""
from __future__ import annotations

from radixlm.runtime.io_struct import AbortReq
from radixlm.runtime.scheduler_process import take_messages
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


class Sent(list):
    def send(self, msg: object) -> None:
        self.append(msg)


def test_a_run_of_aborts_is_one_pass_over_the_queues(tiny_model_dir) -> None:
    sched = make_scheduler(tiny_model_dir("llama"))
    reqs = [greedy_req(f"q{i}", [1, 2, 3 + i % 50], 8) for i in range(300)]
    run_to_completion(sched, [greedy_req("warm", [1, 2, 3], 2)])
    calls: list[int] = []
    real = sched.abort_many

    def counted(aborts):
        calls.append(len(aborts))
        return real(aborts)

    sched.abort_many = counted
    scans = [0]
    waiting = sched.waiting
    base = type(waiting)

    class Counted(base):  # counts the passes over the waiting queue
        def __iter__(self):
            scans[0] += 1
            return super().__iter__()

    sched.waiting = Counted(waiting)
    keep = greedy_req("keep", [4, 5, 6], 4)
    msgs = [*reqs, keep, *(AbortReq(f"q{i}", "aborted by /abort_request") for i in range(300))]
    assert take_messages(sched, msgs, Sent())
    assert calls == [300] and scans[0] < 10  # (one by one: a pass per abort, 300)
    outs = {o.rid: o for o in sched.pop_outputs()}
    assert set(outs) == {f"q{i}" for i in range(300)}
    assert all(o.finished_reason.to_json()["type"] == "abort" for o in outs.values())
    assert [r.rid for r in sched.waiting] == ["keep"]
    assert run_to_completion(sched, [])["keep"]["output_ids"]
    assert_pool_idle(sched)


def test_aborts_keep_their_order_among_other_messages(tiny_model_dir) -> None:
    """An abort before its request arrives finds nothing (as one by one); a run is cut by any other message."""
    sched = make_scheduler(tiny_model_dir("llama"))
    calls: list[list[str]] = []
    real = sched.abort_many
    sched.abort_many = lambda aborts: (calls.append([a.rid for a in aborts]), real(aborts))[1]
    a, b = greedy_req("a", [1, 2, 3], 3), greedy_req("b", [1, 2, 4], 3)
    assert take_messages(sched, [AbortReq("a"), a, b, AbortReq("b"), AbortReq("c")], Sent())
    assert calls == [["a"], ["b", "c"]]
    assert [r.rid for r in sched.waiting] == ["a"]
    assert run_to_completion(sched, [])["a"]["output_ids"]


def test_the_front_sends_abort_all_as_one_message_a_replica() -> None:
    """TokenizerManager.abort_request(None): one list of aborts per replica (the scheduler takes it in one pass),
    not a message a request."""
    from types import SimpleNamespace

    from radixlm.runtime.tokenizer_manager import TokenizerManager

    sent: list[tuple[object, int]] = []
    replicas = [SimpleNamespace(index=0), SimpleNamespace(index=1)]

    class Replicas:
        def send(self, msg, replica):
            sent.append((msg, replica.index))

        def __getitem__(self, i):
            return replicas[i]

    tm = object.__new__(TokenizerManager)
    tm.replicas = Replicas()
    tm.states = {f"r{i}-{k}": SimpleNamespace(rid=f"r{i}-{k}", item=SimpleNamespace(rid=f"r{i}"), replica=i % 2,
                                              finished=False, error=None)
                 for i in range(6) for k in range(2)}  # 6 requests of n = 2
    assert tm.abort_request(None, "stop") == 12
    assert len(sent) == 2
    by_replica = {index: msg for msg, index in sent}
    assert [a.rid for a in by_replica[0]] == ["r0", "r2", "r4"] and [a.rid for a in by_replica[1]] == ["r1", "r3", "r5"]
    assert all(isinstance(a, AbortReq) and a.message == "stop" for msg, _ in sent for a in msg)
    sent.clear()
    assert tm.abort_request("r3-1", "one") == 1 and [[a.rid for a in m] for m, _ in sent] == [["r3-1"]]

"""The front never writes to a scheduler's pipe from its event loop: a pipe nobody reads fills at
64 KiB, and the old direct send then blocked the whole front until the scheduler's next step."""
from __future__ import annotations

import multiprocessing as mp
import threading
import time
from types import SimpleNamespace

import pytest

from radixlm.runtime.io_struct import AbortReq
from radixlm.runtime.outbox import Outbox
from radixlm.runtime.parallel.replica_set import ReplicaSet, SchedulerDiedError

BIG = list(range(4000))  # ~12 KiB pickled: a few fill a pipe


def _unread_pipe():
    recv, send = mp.Pipe(duplex=False)
    return recv, send


def test_put_returns_while_the_pipe_is_full_and_order_is_kept() -> None:
    recv, send = _unread_pipe()
    box = Outbox(send.send, "test-outbox")
    t = time.monotonic()
    for i in range(40):  # ~480 KiB: the pipe is full long before the last put
        box.put((i, BIG))
    assert time.monotonic() - t < 1.0
    got: list[int] = []
    messages = 0
    while len(got) < 40:  # what queued up while the pipe was full leaves as one list
        msg = recv.recv()
        messages += 1
        got += [m[0] for m in msg] if isinstance(msg, list) else [msg[0]]
    assert got == list(range(40))
    assert messages < 40
    box.close()
    box.join(5)
    assert not box._thread.is_alive()


def test_a_closed_pipe_ends_the_thread_quietly() -> None:
    recv, send = _unread_pipe()
    recv.close()
    box = Outbox(send.send, "test-outbox")
    box.put("lost")  # BrokenPipeError in the thread: the reader thread reports a dead scheduler
    box.join(5)
    assert not box._thread.is_alive()
    box.put("after")  # never raises


def _front(send) -> tuple[ReplicaSet, SimpleNamespace]:
    """The front's ReplicaSet with one fake replica whose pipe is `send`; no scheduler process."""
    replicas = ReplicaSet.__new__(ReplicaSet)
    replica = SimpleNamespace(index=0, dead=None, send=send)
    replicas.replicas = [replica]
    replicas.closing = False
    replicas.outboxes = [Outbox(replica.send, "test-outbox")]
    return replicas, replica


def test_tokenizer_manager_send_does_not_block_on_a_full_pipe() -> None:
    recv, send = _unread_pipe()
    replicas, replica = _front(send.send)
    done = threading.Event()

    def burst() -> None:
        for i in range(40):
            replicas.send(AbortReq(f"r{i}", str(BIG)), replica)
        done.set()

    threading.Thread(target=burst, daemon=True).start()
    assert done.wait(5), "the caller blocked on the scheduler's pipe"
    rids: list[str] = []
    while len(rids) < 40:
        msg = recv.recv()
        rids += [m.rid for m in msg] if isinstance(msg, list) else [msg.rid]
    assert rids == [f"r{i}" for i in range(40)]


def test_send_refuses_after_death_or_shutdown() -> None:
    recv, send = _unread_pipe()
    replicas, replica = _front(send.send)
    replica.dead = "the scheduler process died"
    with pytest.raises(SchedulerDiedError, match="died"):
        replicas.send(AbortReq("x"), replica)
    replica.dead = None
    replicas.closing = True
    with pytest.raises(SchedulerDiedError, match="shut down"):
        replicas.send(AbortReq("x"), replica)
    assert not recv.poll(0.2)


def test_a_batch_reaches_the_scheduler_as_one_message() -> None:
    """A batch put as a list (TokenizerManager.submit does so per replica) is one pipe message,
    so the scheduler admits it in one drain rather than starting a step with its first request."""
    recv, send = _unread_pipe()
    box = Outbox(send.send, "test-outbox")
    box.put([AbortReq(f"b{i}") for i in range(64)])
    msg = recv.recv()
    assert isinstance(msg, list) and [m.rid for m in msg] == [f"b{i}" for i in range(64)]
    box.close()
    box.join(5)


def test_engine_batch_is_admitted_in_one_prefill_step(tiny_model_dir) -> None:
    """64 prompts from one Engine.generate call: one prefill step, then decode steps only. Sent one
    message per request, the scheduler sometimes started with the first few (13 steps, not 8)."""
    import radixlm

    with radixlm.Engine(str(tiny_model_dir("llama")), device="cpu", cpu_threads=1, max_total_tokens=20000) as eng:
        eng.generate(input_ids=[[5, 6, 7]], sampling_params={"max_new_tokens": 2, "temperature": 0})
        for _ in range(3):
            before = eng.get_server_info()["forward_steps"]
            eng.generate(input_ids=[[10 + i] * 20 for i in range(64)],
                         sampling_params={"max_new_tokens": 8, "temperature": 0, "ignore_eos": True})
            assert eng.get_server_info()["forward_steps"] - before == 8  # 1 prefill + 7 decode

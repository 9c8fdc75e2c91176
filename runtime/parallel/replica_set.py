"""The front's data-parallel replicas as one object: start, watch, route, send, control, stop.

The TokenizerManager owns requests (tokens, state, results); this owns the scheduler processes
behind it. With one replica (no --dp-size) it is the same code with nothing to route. Messages to
a replica leave from its outbox thread (outbox.py); messages from it arrive on a reader thread and
are handed to the event loop: control answers are settled here, request outputs go to `on_outputs`.
"""
from __future__ import annotations

import asyncio
import dataclasses
import itertools
import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

from radixlm.runtime.io_struct import ControlReq, ControlResp, ReqOutput, SchedulerFailed, SchedulerReady
from radixlm.runtime.outbox import Outbox
from radixlm.runtime.parallel.launch import Replica, merge_infos, start_replicas, stop_replica, watch_replicas
from radixlm.runtime.parallel.router import Router
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


class SchedulerDiedError(RuntimeError):
    pass


class ReplicaSet:
    def __init__(self, args: ServerArgs, model_dir: Path) -> None:
        self.closing = False
        # Every replica's scheduler (and its other ranks) started and ready; one unless --dp-size.
        self.replicas: list[Replica] = start_replicas(args, model_dir)
        # The event loop never writes to a scheduler's pipe itself (it may be full): see outbox.py.
        self.outboxes = [Outbox(r.send, f"radixlm-send-{r.index}") for r in self.replicas]
        first = self.replicas[0].info
        assert first is not None
        # Requests are validated against the smallest replica.
        self.info: SchedulerReady = first if len(self.replicas) == 1 else dataclasses.replace(
            first, max_total_tokens=min(r.info.max_total_tokens for r in self.replicas if r.info))
        self.router = Router(args.load_balance_method, [r.info.max_total_tokens for r in self.replicas if r.info])
        self._watch_stop = threading.Event()
        watch_replicas(self.replicas, self._watch_stop)
        self._control: dict[int, tuple[asyncio.Future, int]] = {}  # request id -> (answer, replica asked)
        self._ids = itertools.count()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.dead: str | None = None  # every replica is gone

    def __iter__(self) -> Iterator[Replica]:
        return iter(self.replicas)

    def __len__(self) -> int:
        return len(self.replicas)

    def __getitem__(self, index: int) -> Replica:
        return self.replicas[index]

    # ---------------------------------------------------------------- receiving
    def start(self, loop: asyncio.AbstractEventLoop, on_outputs: Callable[[list[ReqOutput]], None],
              on_death: Callable[[Replica], None]) -> None:
        """A reader thread per replica feeds `loop`: outputs to `on_outputs`; when a replica's
        scheduler is gone, it is marked dead here and then `on_death` fails its requests."""
        self.loop = loop
        for replica in self.replicas:
            threading.Thread(target=self._reader, args=(replica, on_outputs, on_death),
                             name=f"radixlm-recv-{replica.index}", daemon=True).start()

    def _reader(self, replica: Replica, on_outputs: Callable[[list[ReqOutput]], None],
                on_death: Callable[[Replica], None]) -> None:
        assert self.loop is not None
        while True:
            try:
                msg = replica.from_sched.recv()
            except (EOFError, OSError):
                try:
                    self.loop.call_soon_threadsafe(self._on_death, replica, on_death)
                except RuntimeError:  # the event loop is already closed: we are shutting down
                    pass
                return
            if isinstance(msg, SchedulerFailed):  # it stops itself (fault_isolation.py): this is why
                replica.reported = msg.error
                continue
            try:
                if isinstance(msg, ControlResp):
                    self.loop.call_soon_threadsafe(self._settle_control, msg)
                else:
                    self.loop.call_soon_threadsafe(on_outputs, msg)
            except RuntimeError:
                return

    def _settle_control(self, resp: ControlResp) -> None:
        entry = self._control.pop(resp.request_id, None)
        if entry is not None and not entry[0].done():
            entry[0].set_result(resp)

    def _on_death(self, replica: Replica, on_death: Callable[[Replica], None]) -> None:
        """A replica whose scheduler is gone stops serving; the others keep serving."""
        if self.closing or replica.dead:
            return
        replica.dead = replica.describe_death(len(self.replicas))
        logger.error(replica.dead)
        self.outboxes[replica.index].close()
        stop_replica(replica, graceful=False)  # its other ranks too
        self.router.forget(replica.index)
        if all(r.dead for r in self.replicas):
            self.dead = replica.dead
        for fut, asked in self._control.values():
            if asked == replica.index and not fut.done():
                fut.set_exception(SchedulerDiedError(replica.dead))
        on_death(replica)

    # ---------------------------------------------------------------- sending
    def send(self, msg: object, replica: Replica) -> None:
        if replica.dead:
            raise SchedulerDiedError(replica.dead)
        if self.closing:
            raise SchedulerDiedError("the runtime is shut down")
        self.outboxes[replica.index].put(msg)

    def route(self, ids: list[int], extra_key: str | None) -> Replica:
        """The replica for a prompt (the router's choice among the live ones)."""
        if len(self.replicas) == 1:
            replica = self.replicas[0]
        else:
            loads = [None if r.dead else r.open_sequences for r in self.replicas]
            if all(load is None for load in loads):
                raise SchedulerDiedError(self.dead or "every data-parallel replica died")
            replica = self.replicas[self.router.select(ids, extra_key, loads)]
        if replica.dead:
            raise SchedulerDiedError(replica.dead)
        return replica

    # ---------------------------------------------------------------- control
    async def control(self, kind: str, timeout: float = 30.0, payload: dict | None = None) -> ControlResp:
        """Ask every live replica; with several, one answer merged from theirs."""
        live = [r for r in self.replicas if not r.dead]
        if not live:
            raise SchedulerDiedError(self.dead or "no live replica")
        resps = await asyncio.wait_for(asyncio.gather(*(self._control_one(kind, r, payload) for r in live)), timeout)
        if len(self.replicas) == 1:
            return resps[0]
        if kind == "get_info":
            payload = merge_infos([{**r.payload, "dp_rank": rep.index} for r, rep in zip(resps, live)])
            payload["dp_dead_replicas"] = [r.index for r in self.replicas if r.dead]
            return ControlResp(resps[0].request_id, all(r.ok for r in resps), payload)
        failed = [r for r in resps if not r.ok]
        return failed[0] if failed else resps[0]

    async def _control_one(self, kind: str, replica: Replica, payload: dict | None = None) -> ControlResp:
        assert self.loop is not None
        rid = next(self._ids)
        fut = self.loop.create_future()
        self._control[rid] = (fut, replica.index)  # failed if that replica dies
        try:
            self.send(ControlReq(kind, rid, payload or {}), replica)
            return await fut
        finally:
            self._control.pop(rid, None)

    def shutdown(self) -> None:
        if self.closing:
            return
        self.closing = True
        self._watch_stop.set()
        for replica, outbox in zip(self.replicas, self.outboxes):  # all at once: each then stops its own other ranks
            if not replica.dead:
                outbox.put(ControlReq("shutdown", -1))  # behind the aborts already queued
            outbox.close()
        for replica, outbox in zip(self.replicas, self.outboxes):
            outbox.join(2.0)
            stop_replica(replica, graceful=not replica.dead)

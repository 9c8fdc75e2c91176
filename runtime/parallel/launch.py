"""Starting, watching and stopping the processes of the data-parallel replicas (each TP x PP ranks).

The front's ReplicaSet starts every replica: rank 0 of each runs the scheduler and talks to the
front over a pipe pair; this node's other ranks run `run_worker_process`. With nnodes > 1 the other
nodes start their ranks with `run_worker_node` (`radixlm serve --node-rank N ...`), and all meet at
`--dist-init-addr` through torch.distributed's TCP rendezvous.
"""
from __future__ import annotations

import logging
import multiprocessing as mp
import socket
import threading
import time
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess
from pathlib import Path
from typing import Any

from radixlm.runtime.io_struct import ControlReq, SchedulerFailed, SchedulerReady
from radixlm.runtime.parallel.state import LOST_PEERS_EXIT_CODE, RankInfo
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger(__name__)


@dataclass
class Replica:
    """One data-parallel replica as the front sees it."""

    index: int
    procs: list[BaseProcess]  # this node's processes of the replica; [0] is rank 0 (the scheduler)
    ranks: list[int]  # the global rank of each of procs
    world_size: int
    to_sched: Connection
    from_sched: Connection
    info: SchedulerReady | None = None
    dead: str | None = None  # why it no longer serves
    cause: str | None = None  # set by the watcher when a rank other than 0 died
    reported: str | None = None  # the scheduler's own reason when it stopped itself (SchedulerFailed)
    open_sequences: int = 0  # unfinished sequences routed here (its load, for the router)
    send_lock: threading.Lock = field(default_factory=threading.Lock)
    # Held around every wait on / signal to the processes: two threads reaping one child would
    # leave multiprocessing believing it is alive forever.
    proc_lock: threading.RLock = field(default_factory=threading.RLock)

    def send(self, msg: object) -> None:
        with self.send_lock:
            self.to_sched.send(msg)

    def describe_death(self, dp_size: int) -> str:
        """Why rank 0's pipe closed, for the requests it fails."""
        with self.proc_lock:
            self.procs[0].join(1)
            if self.cause is None:  # a rank that died on its own, rather than after losing rank 0
                for rank, p in zip(self.ranks[1:], self.procs[1:]):
                    if p.exitcode not in (None, LOST_PEERS_EXIT_CODE):
                        self.cause = f"rank {rank} of {self.world_size} exited (code {p.exitcode})"
                        break
            # A peer rank's death comes first: rank 0 then only reports that the group broke.
            what = self.cause or self.reported or f"the scheduler process died (exit code {self.procs[0].exitcode})"
        if dp_size == 1:
            return f"{what}; restart the server"
        return (f"data-parallel replica {self.index} failed: {what}; its requests failed, "
                f"the other replicas keep serving")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_method(args: ServerArgs, replica: int) -> str:
    if args.dist_init_addr is None:
        return f"tcp://127.0.0.1:{free_port()}"
    host, _, port = args.dist_init_addr.rpartition(":")
    return f"tcp://{host}:{int(port) + replica}"  # one rendezvous per replica


def node_ranks(args: ServerArgs, replica: int, method: str) -> list[RankInfo]:
    """The RankInfo of each rank of `replica` that runs on this node (args.node_rank)."""
    world = args.tp_size * args.pp_size
    per_node = world // args.nnodes
    first = args.node_rank * per_node
    return [RankInfo(rank=first + i, tp_size=args.tp_size, pp_size=args.pp_size, init_method=method,
                     gpu=replica * per_node + i, replica=replica) for i in range(per_node)]


def _on_cuda(args: ServerArgs) -> bool:
    return args.device.startswith("cuda")  # resolved: never None


def check_layout(args: ServerArgs, model_dir: Path) -> None:
    """Clear errors before any process starts: a model the TP / PP sizes do not split, too few GPUs."""
    from radixlm.runtime.model_config import ModelConfig
    from radixlm.runtime.parallel.layers import check_model_parallel

    check_model_parallel(ModelConfig.from_pretrained(model_dir), args.tp_size, args.pp_size)
    if _on_cuda(args):
        import torch

        need = args.dp_size * args.tp_size * args.pp_size // args.nnodes
        if need > torch.cuda.device_count():
            raise ValueError(f"tp_size: {args.dp_size} replica(s) x {args.tp_size * args.pp_size // args.nnodes} "
                             f"rank(s) on this node need {need} GPUs; {torch.cuda.device_count()} visible")


def start_replicas(args: ServerArgs, model_dir: Path) -> list[Replica]:
    """Spawn every replica's processes on this node and wait until each scheduler is ready."""
    from radixlm.runtime.parallel.worker import run_worker_process
    from radixlm.runtime.scheduler_process import run_scheduler_process

    if not args.resolved:
        raise ValueError("start_replicas needs resolved options: ServerArgs(...).resolve()")
    if args.node_rank != 0:
        raise ValueError("node_rank: the front (Engine / HTTP server) runs on node 0; start the other nodes "
                         "with `radixlm serve --node-rank N ...`")
    check_layout(args, model_dir)
    ctx = mp.get_context("spawn")
    world = args.tp_size * args.pp_size
    replicas: list[Replica] = []
    try:
        for index in range(args.dp_size):
            ranks = node_ranks(args, index, init_method(args, index)) if world > 1 else []
            to_sched_r, to_sched = ctx.Pipe(duplex=False)
            from_sched, from_sched_w = ctx.Pipe(duplex=False)
            suffix = "" if args.dp_size == 1 else f"-{index}"
            sched_args = args
            if not ranks and args.dp_size > 1 and _on_cuda(args):  # one GPU per single-rank replica
                sched_args = args.replace(device=f"cuda:{index}")
            scheduler = ctx.Process(  # non-daemon: it starts a grammar worker of its own
                target=run_scheduler_process, name=f"radixlm-scheduler{suffix}", daemon=False,
                args=(sched_args, str(model_dir), to_sched_r, from_sched_w, ranks[0] if ranks else None))
            procs = [scheduler] + [
                ctx.Process(target=run_worker_process, args=(args, str(model_dir), info),
                            name=f"radixlm-rank{suffix}-{info.rank}", daemon=True)
                for info in ranks[1:]
            ]
            for p in procs:
                p.start()
            to_sched_r.close()
            from_sched_w.close()
            replicas.append(Replica(index, procs, [r.rank for r in ranks] or [0], world, to_sched, from_sched))
        for replica in replicas:
            replica.info = _wait_ready(replica)
    except BaseException:
        for replica in replicas:
            stop_replica(replica, graceful=False)
        raise
    return replicas


def _wait_ready(replica: Replica) -> SchedulerReady:
    where = "" if replica.world_size == 1 and replica.index == 0 else f" of replica {replica.index}"
    while not replica.from_sched.poll(0.5):
        for rank, p in zip(replica.ranks, replica.procs):
            if not p.is_alive():
                who = "scheduler process" if rank == 0 else f"rank {rank}"
                raise RuntimeError(f"{who}{where} exited during startup (code {p.exitcode})")
    msg = replica.from_sched.recv()
    if isinstance(msg, SchedulerFailed):
        replica.procs[0].join(5)
        raise RuntimeError(f"scheduler{where} failed to start:\n{msg.error}")
    assert isinstance(msg, SchedulerReady)
    return msg


def stop_replica(replica: Replica, graceful: bool = True) -> None:
    """Ask rank 0 to shut down (it stops the other ranks), then make sure every process is gone."""
    with replica.proc_lock:
        _stop(replica, graceful)


def _stop(replica: Replica, graceful: bool) -> None:
    if graceful:
        try:
            replica.send(ControlReq("shutdown", -1))
        except (OSError, BrokenPipeError, ValueError):
            pass
        replica.procs[0].join(10)
        deadline = time.monotonic() + 5
        for p in replica.procs[1:]:
            p.join(max(deadline - time.monotonic(), 0.1))
    for p in replica.procs:
        if p.is_alive():
            p.terminate()
            p.join(5)
        if p.is_alive():
            p.kill()
            p.join(1)


def watch_replicas(replicas: list[Replica], stop: threading.Event, period: float = 0.5) -> threading.Thread | None:
    """A thread that notices a dead rank other than 0 (rank 0 could be stuck in a collective with it):
    it ends the replica's other processes, so the front sees rank 0's pipe close and reports why."""
    if all(len(r.procs) == 1 for r in replicas):
        return None  # rank 0 alone: its pipe closing is the whole story

    def loop() -> None:
        while not stop.wait(period):
            for replica in replicas:
                with replica.proc_lock:
                    if replica.dead or replica.cause or stop.is_set():
                        continue
                    for rank, p in zip(replica.ranks[1:], replica.procs[1:]):
                        if p.exitcode is not None:
                            replica.cause = f"rank {rank} of {replica.world_size} exited (code {p.exitcode})"
                            logger.error("replica %d: %s; stopping its other ranks", replica.index, replica.cause)
                            _stop(replica, graceful=False)
                            break

    thread = threading.Thread(target=loop, name="radixlm-rank-watch", daemon=True)
    thread.start()
    return thread


def merge_infos(payloads: list[dict[str, Any]]) -> dict[str, Any]:
    """get_info of several replicas: counters summed, rates recomputed, each replica's own under dp_replicas."""
    merged: dict[str, Any] = {}
    for key, value in payloads[0].items():
        values = [p.get(key) for p in payloads]
        if isinstance(value, bool) or not all(isinstance(v, (int, float)) for v in values):
            merged[key] = value
        else:
            merged[key] = sum(values)  # type: ignore[arg-type]
    if "cache_hit_rate" in merged:
        merged["cache_hit_rate"] = sum(p.get("cached_tokens", 0) for p in payloads) / max(
            sum(p.get("prompt_tokens", 0) for p in payloads), 1)
    if merged.get("spec_verify_steps"):
        merged["avg_spec_accept_length"] = merged["spec_verify_tokens"] / merged["spec_verify_steps"]
    merged["dp_replicas"] = payloads
    return merged


def run_worker_node(args: ServerArgs) -> int:
    """Node `args.node_rank` > 0 of a multi-node replica: run this node's ranks until rank 0 stops them."""
    from radixlm.runtime.model_source import resolve_model_path
    from radixlm.runtime.parallel.worker import run_worker_process

    args = args.resolve()
    model_dir = resolve_model_path(args.model_path, revision=args.revision, download_dir=args.download_dir)
    check_layout(args, model_dir)
    ranks = node_ranks(args, 0, init_method(args, 0))
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=run_worker_process, args=(args, str(model_dir), info),
                         name=f"radixlm-rank-{info.rank}") for info in ranks]
    for p in procs:
        p.start()
    print(f"radixlm: node {args.node_rank} runs ranks {[r.rank for r in ranks]}, "
          f"waiting for rank 0 at {args.dist_init_addr}", flush=True)
    try:
        for p in procs:
            p.join()
    except KeyboardInterrupt:
        for p in procs:
            p.join(10)
    return max((p.exitcode or 0) for p in procs) if procs else 0

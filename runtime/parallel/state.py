"""This process's place in its replica, and the replica's process groups.

A replica is tp_size x pp_size ranks driven by rank 0, the one with the scheduler:
rank = pp_rank * tp_size + tp_rank. With nnodes nodes, node n hosts ranks [n*k, (n+1)*k) where
k = world_size / nnodes. Nothing here is initialized when a replica has a single rank: the getters
then answer for one process, so TP = PP = 1 runs exactly as before, with no process group.
"""
from __future__ import annotations

import datetime
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Rank 0 broadcasts each step's header on this group; the other ranks wait on it while the server
# idles, so it must not time out (collectives inside a step use the default timeouts).
_IDLE_TIMEOUT = datetime.timedelta(days=365)
# A rank other than 0 exits with this code when it loses the replica's other ranks (not its own fault).
LOST_PEERS_EXIT_CODE = 3


@dataclass(frozen=True)
class RankInfo:
    """What a spawned process needs to join its replica's process group (picklable)."""

    rank: int
    tp_size: int
    pp_size: int
    init_method: str  # tcp://host:port, where rank 0 runs the torch.distributed store
    gpu: int = 0  # CUDA device index on its node
    replica: int = 0  # data-parallel replica index

    @property
    def world_size(self) -> int:
        return self.tp_size * self.pp_size

    @property
    def tp_rank(self) -> int:
        return self.rank % self.tp_size

    @property
    def pp_rank(self) -> int:
        return self.rank // self.tp_size

    def peer(self, pp_rank: int, tp_rank: int | None = None) -> int:
        """The global rank of stage `pp_rank`'s TP rank (this rank's TP index by default)."""
        return pp_rank * self.tp_size + (self.tp_rank if tp_rank is None else tp_rank)


@dataclass
class ParallelState:
    info: RankInfo
    device: torch.device
    tp_group: dist.ProcessGroup | None  # this rank's TP group; None when tp_size == 1
    ctrl_group: dist.ProcessGroup  # gloo, on the host: each step's header from rank 0


_STATE: ParallelState | None = None


def get_parallel_state() -> ParallelState | None:
    return _STATE


def tp_rank_size() -> tuple[int, int]:
    return (0, 1) if _STATE is None else (_STATE.info.tp_rank, _STATE.info.tp_size)


def pp_rank_size() -> tuple[int, int]:
    return (0, 1) if _STATE is None else (_STATE.info.pp_rank, _STATE.info.pp_size)


def init_parallel(info: RankInfo, device: str | None) -> ParallelState:
    """Join the replica's process group (returns once every rank has arrived) and make its TP groups."""
    global _STATE
    use_cuda = (device or ("cuda" if torch.cuda.is_available() else "cpu")).startswith("cuda")
    if use_cuda:
        torch.cuda.set_device(info.gpu)
    dist.init_process_group("nccl" if use_cuda else "gloo", init_method=info.init_method,
                            rank=info.rank, world_size=info.world_size)
    ctrl = dist.new_group(backend="gloo", timeout=_IDLE_TIMEOUT)
    tp_group = None
    if info.tp_size > 1:
        for stage in range(info.pp_size):  # every rank creates every group, in the same order
            group = dist.new_group(list(range(stage * info.tp_size, (stage + 1) * info.tp_size)))
            if stage == info.pp_rank:
                tp_group = group
    _STATE = ParallelState(info, torch.device("cuda", info.gpu) if use_cuda else torch.device("cpu"), tp_group, ctrl)
    return _STATE


def destroy_parallel() -> None:
    global _STATE
    if _STATE is not None:
        _STATE = None
        dist.destroy_process_group()


def agree_min(value: int) -> int:
    """The smallest of every rank's `value` (e.g. the KV capacity each GPU can hold)."""
    if _STATE is None:
        return value
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_STATE.ctrl_group)
    return int(t.item())

"""L2 prefetch hints for the next linear's weight, issued from inside a batch-1 4-bit linear (no launch of its own).

A batch-1 4-bit decode layer leaves the HBM idle while decode attention and its merge run (a few MB of KV),
and the small linears (qkv 12.6 MB, o 8.4 MB) are bound by their programs' round trips, not by bytes. So a
linear may hint the memory system to bring the next linear's first bytes (its codes and scales) into L2 at its
start or at its end (`PF` 1 / 2): the next one then reads them at L2 latency. The hints are
`cp.async.bulk.prefetch.L2` (sm_90+): the copy engine fetches, nothing lands in registers or is written, so no
result can change. A side-stream prefetch kernel lost for bf16 (RESULTS.md, lean3: its extra launches slowed the
small kernels beside it); here the hints ride in programs that run anyway.

Who issues what: `issuers` consecutive programs of the grid (the first ones for a start hint, the last ones for an
end hint: those launched last finish last), program i of them the i-th piece of each span, split over `lanes` of its
threads (each lane one bulk hint of at most `piece` / lanes bytes, 16-byte aligned). On the CPU (the interpreter
runs no PTX) the launchers pass PF 0; `_pieces` is the offsets' arithmetic, tested there by `recorded_hints`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

ALIGN = 16  # bulk prefetches take 16-byte aligned addresses and sizes
LANE_BYTES = 4096  # a lane's hint is at least this long (fewer, longer hints for the copy engine)


@dataclass(frozen=True)
class L2Span:
    """The first `nbytes` bytes of a tensor (the next linear's codes or scales)."""

    base: torch.Tensor
    nbytes: int


@dataclass(frozen=True)
class L2Plan:
    """What one launch hints: up to two spans, when (`at` 1: before its loop, 2: after it), by how many programs."""

    spans: tuple[L2Span, ...]
    at: int
    issuers: int


def launch_args(plan: L2Plan | None, grid_programs: int, threads: int, device: torch.device) -> dict:
    """A kernel launch's prefetch keyword arguments (PF 0: none; always none off the GPU)."""
    if plan is not None and len(plan.spans) > 2:
        raise ValueError(f"an L2 plan hints at most two spans (the kernels take PfA and PfB), not {len(plan.spans)}")
    if plan is None or not plan.spans or device.type != "cuda" or plan.at not in (1, 2):
        return {"PF": 0}
    issuers = max(1, min(plan.issuers, grid_programs))
    # a hint's address and size: multiples of 16 (a view starting off that grid is not hinted)
    spans = [L2Span(s.base, s.nbytes // ALIGN * ALIGN if s.base.data_ptr() % ALIGN == 0 else 0) for s in plan.spans]
    spans += [L2Span(spans[0].base, 0)] * (2 - len(spans))
    pieces = [piece_bytes(s.nbytes, issuers) for s in spans]
    lanes = lanes_for(max(pieces), threads)
    first = 0 if plan.at == 1 else grid_programs - issuers
    return {"PfA": spans[0].base, "pf_a": spans[0].nbytes, "piece_a": pieces[0], "PfB": spans[1].base,
            "pf_b": spans[1].nbytes, "piece_b": pieces[1], "pf_first": first, "pf_issuers": issuers, "PF": plan.at,
            "PF_THREADS": threads, "PF_LANES": lanes}


def piece_bytes(nbytes: int, issuers: int) -> int:
    """Bytes of a span each issuing program hints (a multiple of 16)."""
    return triton.cdiv(triton.cdiv(max(nbytes, 0), max(issuers, 1)), ALIGN) * ALIGN


def lanes_for(piece: int, threads: int) -> int:
    """Lanes a program's piece is split over: a power of two, at most `threads`, each lane >= LANE_BYTES."""
    want = max(1, min(threads, piece // LANE_BYTES))
    return 1 << (want.bit_length() - 1)


@triton.jit
def _pieces(pid, pf_first, pf_issuers, nbytes, piece, PF_THREADS: tl.constexpr, PF_LANES: tl.constexpr):
    """[PF_THREADS] byte offsets and sizes of this program's lanes' hints on one span (size 0: no hint)."""
    lane = tl.arange(0, PF_THREADS)
    i = (pid - pf_first).to(tl.int64)
    sub = ((piece + PF_LANES - 1) // PF_LANES + 15) // 16 * 16
    start = i * piece + lane.to(tl.int64) * sub
    stop = tl.minimum(tl.minimum(i * piece + piece, start + sub), nbytes)
    live = (lane < PF_LANES) & (i >= 0) & (i < pf_issuers) & (stop > start)
    return tl.where(live, start, 0), tl.where(live, stop - start, 0).to(tl.int32)


@triton.jit
def _hint(Base, off, size):
    tl.inline_asm_elementwise(
        "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
        "=r,l,r", [Base.to(tl.pointer_type(tl.int8)) + off, size], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def prefetch_next(PfA, pf_a, piece_a, PfB, pf_b, piece_b, pf_first, pf_issuers, PF_THREADS: tl.constexpr,
                  PF_LANES: tl.constexpr):
    """This program's hints of both spans (called by the linear kernels where their PF says)."""
    pid = tl.program_id(0) + tl.program_id(1) * tl.num_programs(0)
    off, size = _pieces(pid, pf_first, pf_issuers, pf_a, piece_a, PF_THREADS, PF_LANES)
    _hint(PfA, off, size)
    off, size = _pieces(pid, pf_first, pf_issuers, pf_b, piece_b, PF_THREADS, PF_LANES)
    _hint(PfB, off, size)


@triton.jit
def _record_kernel(Out, nbytes, piece, pf_first, pf_issuers, PF_THREADS: tl.constexpr, PF_LANES: tl.constexpr):
    """The hints program `pid` would issue, written out (the CPU test of `_pieces`'s coverage)."""
    pid = tl.program_id(0)
    off, size = _pieces(pid, pf_first, pf_issuers, nbytes, piece, PF_THREADS, PF_LANES)
    lane = tl.arange(0, PF_THREADS)
    tl.store(Out + (pid * PF_THREADS + lane) * 2, off)
    tl.store(Out + (pid * PF_THREADS + lane) * 2 + 1, size.to(tl.int64))


def recorded_hints(nbytes: int, grid_programs: int, issuers: int, at: int, threads: int) -> list[tuple[int, int, int]]:
    """(program, offset, size) of every hint a launch of `grid_programs` programs would issue on a span of `nbytes`."""
    span = L2Span(torch.empty(0), nbytes)
    args = launch_args(L2Plan((span,), at, issuers), grid_programs, threads, torch.device("cuda"))
    out = torch.zeros(grid_programs, threads, 2, dtype=torch.int64)
    _record_kernel[(grid_programs,)](out, args["pf_a"], args["piece_a"], args["pf_first"], args["pf_issuers"],
                                     PF_THREADS=threads, PF_LANES=args["PF_LANES"])
    return [(pid, int(o), int(s)) for pid in range(grid_programs) for o, s in out[pid].tolist() if s > 0]

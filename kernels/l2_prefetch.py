"""Warm the L2 cache with the first bytes of a weight, from a side stream, while the GPU's memory is idle.

A batch-1 decode layer reads ~436 MB of bf16 weights in four GEMMs; between them run small kernels
(norms, rotary, KV store, decode attention, SiLU-and-mul) that are bound by latency, not bandwidth,
and for those ~15 µs per layer HBM sits idle. A prefetch issued as the previous GEMM ends fills L2
(50 MB on an H200) with what the next GEMM reads first, so that GEMM starts on cached bytes.

The kernel only hints the memory system; it reads nothing into registers and writes nothing, so it
cannot change a result. Two ways to issue the hints (`mode`):
  bulk  `cp.async.bulk.prefetch.L2` (sm_90+): one instruction per `chunk` bytes, done by the copy engine
  line  `prefetch.global.L2`: one instruction per 128-byte line
On the CPU there is nothing to warm and `prefetch_l2` returns at once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

LINE = 128  # bytes of an L2 line
ALIGN = 16  # bulk prefetches take 16-byte aligned addresses and sizes


@dataclass(frozen=True)
class PrefetchLaunch:
    """How one prefetch is spread: `programs` programs of `lanes` lanes (a multiple of 32), each lane issuing the hints for
    `per_lane` consecutive pieces (bulk: chunks of `chunk` bytes; line: 128-byte lines)."""

    programs: int
    lanes: int
    per_lane: int
    piece: int  # bytes per hint

    @property
    def covered(self) -> int:
        return self.programs * self.lanes * self.per_lane * self.piece


def plan(nbytes: int, mode: str, chunk: int, programs: int, lanes: int = 32) -> PrefetchLaunch:
    """At most `programs` programs whose hints cover [0, nbytes) (the last pieces clipped to nbytes)."""
    if mode not in ("bulk", "line"):
        raise ValueError(f"l2 prefetch mode must be 'bulk' or 'line', not {mode!r}")
    piece = chunk if mode == "bulk" else LINE
    if piece % ALIGN or piece <= 0:
        raise ValueError(f"l2 prefetch chunk must be a positive multiple of {ALIGN} bytes, not {piece}")
    pieces = triton.cdiv(max(nbytes, 0), piece)
    per_program = triton.cdiv(pieces, max(1, programs)) if pieces else 0
    per_lane = triton.cdiv(per_program, lanes) if per_program else 0
    used = triton.cdiv(pieces, lanes * per_lane) if per_lane else 0
    return PrefetchLaunch(used, lanes, per_lane, piece)


@triton.jit
def _l2_prefetch_kernel(Base, nbytes, per_lane, PIECE: tl.constexpr, LANES: tl.constexpr, BULK: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, LANES).to(tl.int64)
    for i in range(per_lane):
        # lane-major within a step: consecutive lanes hint consecutive pieces
        off = ((pid * per_lane + i) * LANES + lane) * PIECE
        live = off < nbytes
        off = tl.where(live, off, 0)
        if BULK:
            size = tl.where(live, tl.minimum(nbytes - off, PIECE), 0).to(tl.int32)
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.gt.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }",
                "=r,l,r", [Base + off, size], dtype=tl.int32, is_pure=False, pack=1)
        else:
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p prefetch.global.L2 [$1]; mov.u32 $0, 0; }",
                "=r,l,r", [Base + off, live.to(tl.int32)], dtype=tl.int32, is_pure=False, pack=1)


@triton.jit
def _l2_prefetch_rows_kernel(Base, n_rows, row_bytes, per_row, rows_per_lane, LANES: tl.constexpr):
    """The first `per_row` bytes of every row (one bulk hint per row): the columns a GEMV reads first."""
    pid = tl.program_id(0).to(tl.int64)
    lane = tl.arange(0, LANES).to(tl.int64)
    for i in range(rows_per_lane):
        row = (pid * rows_per_lane + i) * LANES + lane
        live = row < n_rows
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [Base + tl.where(live, row, 0) * row_bytes, live.to(tl.int32),
                         tl.full([LANES], 0, tl.int32) + per_row], dtype=tl.int32, is_pure=False, pack=1)


def row_plan(nbytes: int, rows: int, row_bytes: int) -> int:
    """Bytes hinted at the head of each row so that rows x that ~ nbytes (16-byte multiples, >= 16)."""
    return min(row_bytes, max(ALIGN, (nbytes // max(rows, 1)) // ALIGN * ALIGN))


def prefetch_l2(t: torch.Tensor, nbytes: int | None = None, *, mode: str = "bulk", chunk: int = 16384,
                programs: int = 32, lanes: int = 32, layout: str = "prefix") -> int:
    """Hint L2 to load `nbytes` (all when None) of contiguous tensor `t`, on the current stream: its first
    bytes (`layout` "prefix"), or the head of each of its rows (2-D `t`, "cols": the columns a GEMV reads
    first, bulk mode). Returns the bytes hinted (0 on the CPU, where nothing is launched)."""
    if layout not in ("prefix", "cols"):
        raise ValueError(f"l2 prefetch layout must be 'prefix' or 'cols', not {layout!r}")
    if not t.is_cuda or t.numel() == 0:
        return 0
    if not t.is_contiguous():
        raise ValueError("prefetch_l2 needs a contiguous tensor")
    total = t.numel() * t.element_size()
    want = total if nbytes is None else max(0, min(nbytes, total))
    want -= want % ALIGN
    row_bytes = t.shape[-1] * t.element_size()
    if layout == "cols" and t.dim() == 2 and 0 < want < total and row_bytes % ALIGN == 0:
        rows = t.shape[0]
        per_row = row_plan(want, rows, row_bytes)
        per_program = triton.cdiv(rows, max(1, programs))
        rows_per_lane = triton.cdiv(per_program, lanes)
        _l2_prefetch_rows_kernel[(triton.cdiv(rows, lanes * rows_per_lane),)](
            t.view(-1).view(torch.uint8), rows, row_bytes, per_row, rows_per_lane, LANES=lanes,
            num_warps=max(1, lanes // 32))
        return per_row * rows
    launch = plan(want, mode, chunk, programs, lanes)
    if launch.programs == 0:
        return 0
    _l2_prefetch_kernel[(launch.programs,)](
        t.view(-1).view(torch.uint8), want, launch.per_lane, PIECE=launch.piece, LANES=launch.lanes,
        BULK=mode == "bulk", num_warps=launch.lanes // 32,
    )
    return want

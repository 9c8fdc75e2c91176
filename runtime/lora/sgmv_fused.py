"""One-launch LoRA for decode-sized batches: shrink and expand of a projection in a single kernel.

At decode sizes the two SGMV launches of `sgmv_triton` (shrink, then expand) are launch-bound:
the H200 took 2.7–5 µs per launch for a few KB of work, 8 launches per layer, 0.92 ms per
batch-1 step against a bytes floor of ~20 µs. Here each program owns one row block of one segment
(as there) and one span of output columns of one fused part (q, k, v; gate, up; ...): it
computes that part's rank columns y = x·A_partᵀ over the whole reduction itself, keeps y in
registers, and adds y·B[span]ᵀ onto the base GEMM's output in place. No y buffer, no second
launch, no memset, no atomics (each output element is written by exactly one program, the sum
over K runs in a fixed order): bit-identical from run to run.

The price is that every program of a part re-reads that part's A (R × K, 128 KB at K = 4096,
rank 16) — from L2 after the first — so spans are wide (`FusedTiles.span`: few programs per part)
and the one-launch path is used only while the batch is small (`FUSED_MAX_TOKENS`); larger batches
keep the two-launch kernels, where A is read once per row block. The choice depends only on the
token count, so a CUDA graph captured for a batch size keeps its kernels, and the segment tensors
are read on the device at replay (graph-stable, as in `sgmv_triton`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from radixlm.runtime.lora.sgmv import LoRASegments
from radixlm.runtime.lora.sgmv_triton import _dot_options, _segment, work_items
from radixlm.runtime.lora.smem import SM90_SMEM, device_smem, dot_bytes, loop_bytes

FUSED_MAX_TOKENS = 32  # decode batches up to this many rows take the one-launch kernel
# ... of adapters up to this rank: the kernel keeps y [rows, rank] in registers through the expand
# and re-reads [rank, K] of A per program; larger ranks take the two-launch kernels
FUSED_MAX_RANK = 64
MIN_BLOCK = 16  # the smallest dot dimension


@dataclass(frozen=True)
class FusedTiles:
    """Tile sizes of the one-launch kernel (a function of the token count only: CUDA-graph stable)."""

    block_m: int  # rows per work item
    block_k: int  # reduction step of the shrink
    block_n: int  # output columns per inner step of the expand
    span: int  # output columns per program (a multiple of block_n): its A re-read is amortised over them


def block_r(rank: int) -> int:
    return max(MIN_BLOCK, triton.next_power_of_2(rank))


def fused_smem(tile: FusedTiles, rank: int, elt: int) -> int:
    """Upper bound of the launch's shared memory: the shrink loop's pipelined x / A tiles, or the expand
    loop's pipelined B tiles (over the span, BLOCK_N columns a step) with y and the output tile."""
    r = block_r(rank)
    return max(loop_bytes(tile.block_m, r, tile.block_k, elt, None) + tile.block_m * r * 4,
               loop_bytes(0, tile.block_n, r, elt, None) + dot_bytes(tile.block_m, tile.block_n, r, elt))


def fused_tiles(t: int, block_k: int | None = None, span: int | None = None, block_n: int | None = None,
                rank: int = 16, elt: int = 2, smem: int = SM90_SMEM) -> FusedTiles | None:
    """Defaults for T tokens of adapters up to `rank`, operands of `elt` bytes, on a device with `smem`
    bytes of shared memory a program: the K step (then the column step) halves until the launch fits
    (float32 at rank 16 on an H200: K steps of 512, not 1,024). None: no tile fits (the caller takes the
    two-launch kernels). Overrides (the benchmark's sweep, the tests' small shapes) are taken as given."""
    tile = FusedTiles(block_m=16, block_k=block_k or 1024, block_n=block_n or 512, span=span or 512)
    if block_k is not None and block_n is not None:
        return tile
    while fused_smem(tile, rank, elt) > smem:
        if block_k is None and tile.block_k > 4 * MIN_BLOCK and tile.block_k >= tile.block_n:
            tile = replace(tile, block_k=tile.block_k // 2)
        elif block_n is None and tile.block_n > MIN_BLOCK:
            tile = replace(tile, block_n=tile.block_n // 2)
        elif block_k is None and tile.block_k > MIN_BLOCK:
            tile = replace(tile, block_k=tile.block_k // 2)
        else:
            return None
    return tile


def use_fused(t: int, rank: int = 16) -> bool:
    return t <= FUSED_MAX_TOKENS and rank <= FUSED_MAX_RANK


def fused_tile_for(x: torch.Tensor, rank: int) -> FusedTiles | None:
    """The one-launch kernel's tile for this batch (None: the two-launch kernels): a function of the
    token count, rank, dtype and device only, so a CUDA graph keeps its kernels."""
    if not use_fused(x.shape[0], rank):
        return None
    return fused_tiles(x.shape[0], rank=rank, elt=x.element_size(), smem=device_smem(x.device))


@triton.jit
def _fused_kernel(x_ptr, a_ptr, b_ptr, out_ptr, order_ptr, start_ptr, len_ptr, slot_ptr, off_ptr,
                  S, K, R, spans_per_part, stride_xm, stride_as, stride_an, stride_bs, stride_bn, stride_om,
                  BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
                  SPAN: tl.constexpr, S_POW2: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    m0, length, start, slot = _segment(tl.program_id(0), len_ptr, start_ptr, slot_ptr, S, BLOCK_M, S_POW2)
    part = tl.program_id(1) // spans_per_part
    n_first = tl.load(off_ptr + part) + (tl.program_id(1) % spans_per_part) * SPAN
    n_hi = tl.load(off_ptr + part + 1)
    if slot >= 0 and n_first < n_hi:
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < length
        rows = tl.load(order_ptr + start + rm, mask=m_mask, other=0).to(tl.int64)
        # shrink: y [BLOCK_M, BLOCK_R] = x[rows] · A[slot, part·R : part·R + R]ᵀ over all of K
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        rk = tl.arange(0, BLOCK_K)
        a_base = a_ptr + slot.to(tl.int64) * stride_as + (part * R + rr)[:, None] * stride_an
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            k_mask = k0 + rk < K
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + (k0 + rk)[None, :], mask=r_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:  # the CPU interpreter mis-computes bf16 dots
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)
        b_base = b_ptr + slot.to(tl.int64) * stride_bs + rr[None, :]
        if DOT_FP32:
            yt = acc
        else:
            yt = acc.to(b_ptr.dtype.element_ty)  # as the two-launch expand: y rounded to the weights' type
        # expand: out[rows, span] += y · B[slot, span]ᵀ, BLOCK_N columns at a time
        rn0 = tl.arange(0, BLOCK_N)
        for n0 in range(0, SPAN, BLOCK_N):
            rn = n_first + n0 + rn0
            n_mask = rn < n_hi
            bt = tl.load(b_base + rn[:, None] * stride_bn, mask=n_mask[:, None] & r_mask[None, :], other=0.0)
            if DOT_FP32:
                bt = bt.to(tl.float32)
            delta = tl.dot(yt, tl.trans(bt), input_precision=DOT_PRECISION)
            mask = m_mask[:, None] & n_mask[None, :]
            o_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :]
            old = tl.load(o_ptrs, mask=mask, other=0.0)
            tl.store(o_ptrs, (old.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def sgmv_fused(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, slice_offsets: torch.Tensor, widest: int,
               rank: int, out: torch.Tensor, seg: LoRASegments, tile: FusedTiles | None = None) -> None:
    """out[:, slice s] += (x·A[slot, s·R:(s+1)·R]ᵀ)·B[slot, slice s]ᵀ per segment, in place, one launch.
    `x`: [T, K] with unit stride along K; `a`: [slots, n·R, K]; `b`: [slots, out, R];
    `slice_offsets`: [n + 1] int32 on the device; `widest`: the widest slice (sizes the grid).
    ValueError when no tile of this rank fits the device's shared memory (see `use_fused`)."""
    t, k = x.shape
    tile = tile or fused_tiles(t, rank=rank, elt=x.element_size(), smem=device_smem(x.device))
    if tile is None:
        raise ValueError(f"rank {rank}: no one-launch LoRA tile fits this device's shared memory")
    span = max(tile.span // tile.block_n, 1) * tile.block_n
    spans = triton.cdiv(widest, span)
    parts = slice_offsets.numel() - 1
    s = seg.slot.numel()
    grid = (work_items(t, s, tile.block_m), parts * spans)
    _fused_kernel[grid](x, a, b, out, seg.order, seg.start, seg.length, seg.slot, slice_offsets,
                        s, k, rank, spans, x.stride(0), a.stride(0), a.stride(1), b.stride(0), b.stride(1),
                        out.stride(0),
                        BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, BLOCK_R=block_r(rank),
                        BLOCK_N=tile.block_n, SPAN=span, S_POW2=max(triton.next_power_of_2(s), 2),
                        **_dot_options(x))

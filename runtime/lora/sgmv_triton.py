"""Triton SGMV kernels: shrink and expand for every adapter of a batch in one launch each.

Grid: (segment, block of its rows, block of output columns). A program reads its rows through
`order` (tokens sorted by adapter), so each adapter's A / B tile is read once per row block,
not once per token. The grid depends only on the segment count (--max-loras-per-batch) and the
longest segment, which in decode is the graph's batch size: a CUDA graph captured for a batch
size stays valid whatever adapters its rows use (unused segments and blocks exit at once).
Imported only when triton is (the CPU path is `sgmv.py`).

Two launches per projection and no memset: the shrink splits its reduction over K (so a decode
step of one adapter still spreads the reading of A over many SMs) and each split stores its own
partial sum into y [split, T, n·R]; the expand adds the splits as it loads y. No atomics, so the
result is the same bit for bit from run to run, and y needs no zeroing (rows of no segment are
never read).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.runtime.lora.sgmv import LoRASegments

BLOCK_M = 16


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, y_ptr, order_ptr, start_ptr, len_ptr, slot_ptr,
                   K, N, K_PER_SPLIT, SPLIT_K, stride_xm, stride_as, stride_an, stride_ys, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2) // SPLIT_K
    split = tl.program_id(2) % SPLIT_K
    k_lo = split * K_PER_SPLIT
    slot = tl.load(slot_ptr + seg)
    length = tl.load(len_ptr + seg)
    if slot >= 0 and pid_m * BLOCK_M < length:
        start = tl.load(start_ptr + seg)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < length
        rows = tl.load(order_ptr + start + rm, mask=m_mask, other=0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_mask = k0 + rk < k_hi
            xt = tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :],
                         mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            at = tl.load(a_base + rn[:, None] * stride_an + (k0 + rk)[None, :],
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:  # the CPU interpreter mis-computes bf16 dots
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + split * stride_ys + rows[:, None] * stride_ym + rn[None, :]
        tl.store(y_ptrs, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _expand_kernel(y_ptr, b_ptr, out_ptr, order_ptr, start_ptr, len_ptr, slot_ptr, off_ptr,
                   R, blocks_per_slice, SPLIT_K, stride_ys, stride_ym, stride_bs, stride_bn, stride_om,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr):
    seg = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_sn = tl.program_id(2)
    slot = tl.load(slot_ptr + seg)
    length = tl.load(len_ptr + seg)
    if slot >= 0 and pid_m * BLOCK_M < length:
        piece = pid_sn // blocks_per_slice
        n_lo = tl.load(off_ptr + piece)
        n_hi = tl.load(off_ptr + piece + 1)
        start = tl.load(start_ptr + seg)
        rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        m_mask = rm < length
        rows = tl.load(order_ptr + start + rm, mask=m_mask, other=0).to(tl.int64)
        rn = n_lo + (pid_sn % blocks_per_slice) * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < n_hi
        rr = tl.arange(0, BLOCK_R)
        r_mask = rr < R
        y_ptrs = y_ptr + rows[:, None] * stride_ym + (piece * R + rr)[None, :]
        y_mask = m_mask[:, None] & r_mask[None, :]
        yt = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        for split in range(1, SPLIT_K):  # the shrink's partial sums, added in a fixed order
            yt += tl.load(y_ptrs + split * stride_ys, mask=y_mask, other=0.0).to(tl.float32)
        bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + rn[:, None] * stride_bn + rr[None, :],
                     mask=n_mask[:, None] & r_mask[None, :], other=0.0)
        if DOT_FP32:
            yt = yt.to(tl.float32)
            bt = bt.to(tl.float32)
        else:
            yt = yt.to(bt.dtype)
        delta = tl.dot(yt, tl.trans(bt), input_precision=DOT_PRECISION)
        mask = m_mask[:, None] & n_mask[None, :]
        o_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :]
        old = tl.load(o_ptrs, mask=mask, other=0.0)
        tl.store(o_ptrs, (old.to(tl.float32) + delta).to(out_ptr.dtype.element_ty), mask=mask)


def _dot_options(x: torch.Tensor) -> dict:
    """fp32 operands off the GPU (the interpreter's bf16 dot is wrong); exact fp32 dots, not tf32."""
    return {"DOT_FP32": not x.is_cuda, "DOT_PRECISION": "ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32"}


def _row_blocks(seg: LoRASegments) -> int:
    return max(triton.cdiv(seg.max_length, BLOCK_M), 1)


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoRASegments) -> torch.Tensor:
    """y [split, T, n·R] float32: partial sums over K whose sum is x·A[slot]ᵀ per segment (rows of
    no segment are left unwritten; `sgmv_expand` adds the splits)."""
    t, k = x.shape
    n = a.shape[1]
    block_n, block_k = 16, 128
    split_k = max(1, min(16, k // 256))
    k_per_split = triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k
    split_k = triton.cdiv(k, k_per_split)  # no split without work (each one writes its partial sum)
    y = torch.empty(split_k, t, n, dtype=torch.float32, device=x.device)
    grid = (seg.slot.numel(), _row_blocks(seg), triton.cdiv(n, block_n) * split_k)
    _shrink_kernel[grid](x, a, y, seg.order, seg.start, seg.length, seg.slot, k, n, k_per_split, split_k,
                         x.stride(0), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_K=block_k, **_dot_options(x))
    return y


def sgmv_expand(y: torch.Tensor, b: torch.Tensor, slice_offsets: torch.Tensor, widest: int, rank: int,
                out: torch.Tensor, seg: LoRASegments) -> None:
    """out[:, slice s] += y[:, s·R:(s+1)·R]·B[slot, slice s]ᵀ per segment, in place.
    `y`: [T, n·R], or the shrink's [split, T, n·R] partial sums; `slice_offsets`: [n + 1] int32 on
    the device; `widest`: the widest slice (sizes the grid)."""
    if y.dim() == 2:
        y = y.unsqueeze(0)
    block_n = 64
    blocks = triton.cdiv(widest, block_n)
    pieces = slice_offsets.numel() - 1
    grid = (seg.slot.numel(), _row_blocks(seg), pieces * blocks)
    _expand_kernel[grid](y, b, out, seg.order, seg.start, seg.length, seg.slot, slice_offsets,
                         rank, blocks, y.shape[0], y.stride(0), y.stride(1), b.stride(0), b.stride(1),
                         out.stride(0),
                         BLOCK_M=BLOCK_M, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(rank)),
                         **_dot_options(b))

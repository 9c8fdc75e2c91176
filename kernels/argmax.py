"""Greedy argmax over a few rows of 128k-wide float32 logits, in two launches that fill the GPU.

torch's argmax gives a [1, 128256] row to one block: ~27 µs on an H200 for 0.5 MB, a step's sampler
tail at batch 1. Here stage 1 splits each row over many programs (each the first index of its block's
maximum), stage 2 picks, per row, the first block holding the row's maximum. The result is torch's,
index for index: the first index of the maximum, and where a row holds NaN, its first NaN (torch
ranks NaN above every number).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 2048  # columns per stage-1 program (128k vocab: 63 programs a row)
MAX_ROWS = 16  # rows the sampler hands it: 16-17 vs 32-34 µs at 1..16 rows on the H200 (RESULTS.md); torch's above


@triton.jit
def _argmax_stage1(X, BestVal, BestIdx, n_cols, stride_x, n_blocks, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    blk = tl.program_id(1)
    cols = blk * BLOCK + tl.arange(0, BLOCK)
    x = tl.load(X + row * stride_x + cols, mask=cols < n_cols, other=float("-inf"))
    nan = x != x
    big = n_cols  # an index past every column
    first_nan = tl.min(tl.where(nan, cols, big), 0)
    best = tl.max(tl.where(nan, float("-inf"), x), 0)
    first_best = tl.min(tl.where((x == best) & (cols < n_cols), cols, big), 0)
    has_nan = first_nan < big
    # a block holding NaN reports NaN and its first NaN's index; else its maximum and that maximum's first index
    tl.store(BestVal + row * n_blocks + blk, tl.where(has_nan, float("nan"), best))
    tl.store(BestIdx + row * n_blocks + blk, tl.where(has_nan, first_nan, first_best))


@triton.jit
def _argmax_stage2(BestVal, BestIdx, Out, n_blocks, n_cols, BLOCK_B: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    b = tl.arange(0, BLOCK_B)
    valid = b < n_blocks
    val = tl.load(BestVal + row * n_blocks + b, mask=valid, other=float("-inf"))
    idx = tl.load(BestIdx + row * n_blocks + b, mask=valid, other=n_cols)
    nan = (val != val) & valid
    big = n_cols
    first_nan = tl.min(tl.where(nan, idx, big), 0)
    best = tl.max(tl.where(nan, float("-inf"), val), 0)
    # blocks are in column order, so the smallest index among the blocks at the maximum is the first
    first_best = tl.min(tl.where((val == best) & valid, idx, big), 0)
    tl.store(Out + row, tl.where(first_nan < big, first_nan, first_best).to(tl.int64))


def argmax_two_stage(x: torch.Tensor) -> torch.Tensor:
    """x [B, V] float -> int64 [B], equal to x.argmax(-1), in two launches on any device Triton runs on
    (the CPU interpreter in tests). The sampler takes it at <= MAX_ROWS rows (runtime/sampler.py)."""
    if x.dim() != 2 or x.shape[1] == 0:
        raise ValueError(f"argmax_two_stage takes [rows, columns >= 1], not {tuple(x.shape)}")
    if x.stride(1) != 1:
        x = x.contiguous()
    rows, cols = x.shape
    n_blocks = triton.cdiv(cols, BLOCK)
    best_val = torch.empty(rows, n_blocks, dtype=torch.float32, device=x.device)
    best_idx = torch.empty(rows, n_blocks, dtype=torch.int32, device=x.device)
    out = torch.empty(rows, dtype=torch.int64, device=x.device)
    if rows == 0:
        return out
    _argmax_stage1[(rows, n_blocks)](x, best_val, best_idx, cols, x.stride(0), n_blocks, BLOCK=BLOCK, num_warps=8)
    _argmax_stage2[(rows,)](best_val, best_idx, out, n_blocks, cols, BLOCK_B=triton.next_power_of_2(n_blocks),
                            num_warps=2)
    return out

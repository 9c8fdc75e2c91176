"""The grammar's packed token bitmask applied to a batch of logits in one launch.

The torch reference (constrained/bitmask.py) expands every mask word into 32 int32 lanes, then a
bool tensor, then a masked fill: four or five kernels and ~B x V x 5 bytes of intermediates per
decode step. Here each program reads its columns' mask words once and writes -inf only where a
token is refused; allowed logits are neither read nor written.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

BLOCK = 4096


@triton.jit
def _apply_token_bitmask_kernel(Logits, Mask, n_cols, n_words, stride_l, stride_m, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    words = cols >> 5
    # Columns past the mask's 32 x n_words (a model vocabulary padded past the tokenizer's) read
    # word 0 bits as "refused": other=0.
    packed = tl.load(Mask + row * stride_m + words, mask=words < n_words, other=0)
    allowed = (packed >> (cols & 31)) & 1
    neg_inf = tl.full([BLOCK], float("-inf"), dtype=Logits.dtype.element_ty)
    tl.store(Logits + row * stride_l + cols, neg_inf, mask=(cols < n_cols) & (allowed == 0))


def apply_token_bitmask_triton(logits: torch.Tensor, bitmask: torch.Tensor) -> None:
    """In place: logits [B, V] (unit column stride) -> -inf where `bitmask` [B, W] int32, on the
    same device, has the token's bit clear, and for every column >= 32 x W."""
    if logits.stride(1) != 1 or bitmask.stride(1) != 1:
        raise ValueError("logits and bitmask need a unit column stride")
    rows, cols = logits.shape
    if rows == 0 or cols == 0:
        return
    grid = (rows, triton.cdiv(cols, BLOCK))
    _apply_token_bitmask_kernel[grid](logits, bitmask, cols, bitmask.shape[1], logits.stride(0), bitmask.stride(0),
                                      BLOCK=BLOCK, num_warps=8)

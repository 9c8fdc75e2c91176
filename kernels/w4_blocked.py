"""4-bit codes blocked by row tile: `pack_codes`' [N, Kp / 4] halfwords with each tile of `block_n` rows stored chunk
by chunk, a chunk's block_n x 32 halfwords (64 B a row) one contiguous run:

    (row r, halfword c)  at  ((r // bn) * (Kp / 128) + c // 32) * bn * 32 + (r % bn) * 32 + c % 32

The batch-1 tensor-core kernel (`w4a16_mma_m1.py`) with a row tile of bn reads one run of bn x 64 B per chunk
instead of bn pieces of 64 B a row apart (the H200 measured the decode step 86.7 µs of 2,020 shorter with it,
RESULTS.md 2026-12-05). So that such a layout can be a weight's only copy, every 4-bit kernel takes it: `BLOCKED` (a
constexpr, the rows a block; 0 = plain) and `row_offsets` for the rows' first chunk, then `chunk_stride` a chunk.
The torch paths read it through `code_rows` (rows gathered back to the plain layout).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

HALVES = 32  # halfwords of one chunk of a row (128 columns)


def block_codes(codes: torch.Tensor, block_n: int) -> torch.Tensor:
    """Plain [N, Kp / 4] codes in the blocked layout for tiles of `block_n` rows (same shape and bytes)."""
    n, kw = codes.shape
    if n % block_n or kw % HALVES:
        raise ValueError(f"block_codes: {n} rows of {kw} halfwords do not make tiles of {block_n} rows x 32 halfwords")
    return codes.view(n // block_n, block_n, kw // HALVES, HALVES).permute(0, 2, 1, 3).contiguous().view(n, kw)


def unblock_codes(codes: torch.Tensor, block_n: int) -> torch.Tensor:
    """The inverse of `block_codes` (block_n 0: `codes` as they are)."""
    if not block_n:
        return codes
    n, kw = codes.shape
    return codes.view(n // block_n, kw // HALVES, block_n, HALVES).permute(0, 2, 1, 3).contiguous().view(n, kw)


def code_rows(codes: torch.Tensor, rows: torch.Tensor | slice, block_n: int) -> torch.Tensor:
    """Rows `rows` of the plain layout ([len, Kp / 4]) from codes blocked by `block_n` rows (0: plain)."""
    if not block_n:
        return codes[rows]
    n, kw = codes.shape
    if isinstance(rows, slice):
        rows = torch.arange(n, device=codes.device)[rows]
    rows = rows.to(device=codes.device, dtype=torch.int64)
    tiles = codes.view(n // block_n, kw // HALVES, block_n, HALVES)
    return tiles[rows // block_n, :, rows % block_n, :].reshape(-1, kw)


def chunk_stride(blocked: int, per_chunk: int = HALVES) -> int:
    """Elements from one chunk of a row to its next (`per_chunk` elements a chunk: 32 halfwords or 16 int32 words)."""
    return blocked * per_chunk if blocked else per_chunk


@triton.jit
def row_offsets(rn, stride_row, BLOCKED: tl.constexpr, PER_CHUNK: tl.constexpr = 32):
    """int64 offsets (in the codes' elements: halfwords, or int32 words with PER_CHUNK 16) of chunk 0 of rows rn;
    stride_row: a plain row's elements (Kp / 4 halfwords, Kp / 8 words)."""
    if BLOCKED == 0:
        return rn.to(tl.int64) * stride_row
    else:
        return (rn // BLOCKED).to(tl.int64) * stride_row * BLOCKED + (rn % BLOCKED) * PER_CHUNK

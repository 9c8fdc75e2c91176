"""The 4-bit weight-only GEMV of decode (a few rows): streams the packed weight at HBM speed on CUDA cores.

It reads the layout `w4a16_gemm.pack_codes` writes (so the tiled GEMM and this kernel share one copy of
the weight): nibble j of halfword i of a 128-column chunk is column 32 j + i, so for each j the 32
halfwords give 32 consecutive columns. A program owns BLOCK_N rows and a run of chunks (split-K);
each loop step loads a [BLOCK_N, CHUNKS, 32]-halfword tile (BLOCK_N x CHUNKS x 64 contiguous bytes per
row, 128-bit loads) while it computes the previous one.

Why no tensor cores: at M = 1 an MMA wastes 15/16 of itself and its operand shuffles cost more than
the arithmetic. Each weight here is a shift and a LOP3 (the nibble moved to bits 16-19 and OR'ed with
0x43000000 *is* the float32 128 + c: exponent 2^7, mantissa step 1, no conversion instruction), one
subtract of 128 + z (exactly c - z), the activation widened to float32, and one FMA; the group's scale
multiplies each chunk row's sum once per group (its 32 columns sit in 4 threads of a warp: register
adds and two shuffles). The activations are loaded at the weight tile's full shape (stride 0 over its rows) so the
compiler gives them the tile's layout: converting the other way went through shared memory for every
weight (checked in the sm_90 PTX: the loop now has 128-bit loads and no shared memory or barrier).

Split-K partial sums go to a float32 buffer; the last program of a row tile to finish (an atomic ticket
per tile) adds them in split order and writes the output, then resets its ticket: deterministic, one
launch, and the tickets (int32, zero at rest) are owned by the weight so CUDA graphs replay them.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp8_gemm import sm_count
from .w4a16_gemm import CHUNK, SLICE

CHUNK_C = tl.constexpr(CHUNK)  # compiled Triton reads only constexpr globals (the interpreter reads any)
SLICE_C = tl.constexpr(SLICE)
MAX_M = 16  # rows this kernel takes (its FMAs per weight grow with M: W4Weight picks it up to GEMV_MAX_M)


@dataclass(frozen=True)
class GemvConfig:
    """One launch's tile: BLOCK_N rows x CHUNKS chunks of 128 columns per loop step."""

    block_n: int = 32
    chunks: int = 4
    num_warps: int = 8
    split_k: int | None = None  # None: from the shape (`gemv_plan`); a number: at most that many splits
    waves: int = 4  # programs per SM the split-K plan aims for


def gemv_default_config(m: int) -> GemvConfig:
    """M = 1-2: 32 rows x 4 chunks (8 KB a step) over 8 warps: 64 registers a thread at M = 1 (sm_90), so
    four programs an SM keep 32 KB of weights in flight besides the prefetch; more rows, smaller tiles."""
    if m <= 2:
        return GemvConfig()
    return GemvConfig(chunks=2) if m <= 4 else GemvConfig(block_n=16, chunks=2)


def gemv_plan(n: int, kp: int, cfg: GemvConfig, device: torch.device) -> tuple[int, int]:
    """(split_k, chunks per split): about `waves` programs per SM, each split a whole number of loop
    steps and at least two of them (so the prefetch of the next tile overlaps something)."""
    tiles = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(kp // CHUNK, cfg.chunks)
    want = max(1, min(triton.cdiv(cfg.waves * sm_count(device), tiles), steps // 2))
    if cfg.split_k is not None:
        want = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, want)
    return triton.cdiv(steps, per_split), per_split * cfg.chunks


def tickets_for(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K tickets for any tile of at least 8 rows of an N-row weight."""
    return torch.zeros(triton.cdiv(n, 8), dtype=torch.int32, device=device)


@triton.jit
def _gemv_kernel(
    X, Codes, Scales, Zeros, Offsets, Perm, Out, Part, Tickets,
    M, N, K, G, group_size, chunks_per_split, n_chunks, split, stride_xm, stride_cn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    SLICES_PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rc = tl.arange(0, CHUNKS)
    ri = tl.arange(0, 32)
    m_mask = rm < M
    n_mask = rn < N
    c_first = pid_k * chunks_per_split
    c_end = tl.minimum(c_first + chunks_per_split, n_chunks)
    h_rows = Codes + rn[:, None, None].to(tl.int64) * stride_cn + ri[None, None, :]  # [BLOCK_N, 1, 32]
    x_rows = X + rm[:, None, None, None].to(tl.int64) * stride_xm  # [BLOCK_M, 1, 1, 1]
    zero_n = (rn * 0)[None, :, None, None]  # [1, BLOCK_N, 1, 1]
    acc = tl.zeros((BLOCK_M, BLOCK_N, CHUNKS), dtype=tl.float32)

    cc = c_first + rc
    c_mask = cc < c_end
    halves = tl.load(h_rows + cc[None, :, None] * 32, mask=n_mask[:, None, None] & c_mask[None, :, None], other=0)
    for c0 in range(c_first, c_end, CHUNKS):
        cc = c0 + rc
        c_mask = cc < c_end
        nxt = cc + CHUNKS  # the next step's tile, loaded before this one is used
        halves_next = tl.load(h_rows + nxt[None, :, None] * 32,
                             mask=n_mask[:, None, None] & (nxt < c_end)[None, :, None], other=0)
        for jg in tl.static_range(4 // SLICES_PER_GROUP):  # one group per pass (a whole chunk when group >= 128)
            g = tl.minimum((cc * CHUNK_C + jg * SLICES_PER_GROUP * SLICE_C) // group_size, G - 1)  # [CHUNKS]
            sg = g[None, :] * N + rn[:, None]  # [BLOCK_N, CHUNKS]
            gmask = n_mask[:, None] & c_mask[None, :]
            if HAS_ZEROS:
                zb = 128.0 + tl.load(Zeros + sg, mask=gmask, other=0).to(tl.float32)
            else:
                zb = tl.full((BLOCK_N, CHUNKS), 136.0, tl.float32)
            t = tl.zeros((BLOCK_M, BLOCK_N, CHUNKS, 32), dtype=tl.float32)
            xs = tl.zeros((BLOCK_M, BLOCK_N, CHUNKS, 32), dtype=tl.float32)  # GGUF offsets only
            for jj in tl.static_range(SLICES_PER_GROUP):
                j = jg * SLICES_PER_GROUP + jj
                # nibble j of each halfword moved to bit 16 and OR'ed into 128.0: 128 + c; less 128 + z: c - z
                w = (((halves.to(tl.int32) << (16 - 4 * j)) & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True)
                w = w - zb[:, :, None]
                kk = cc[:, None] * CHUNK_C + j * SLICE_C + ri[None, :]  # [CHUNKS, 32] columns: contiguous
                k_mask = (kk < K) & c_mask[:, None]
                if HAS_PERM:
                    kx = tl.load(Perm + kk, mask=k_mask, other=0)
                else:
                    kx = kk
                # loaded at the weights' full shape (stride 0 along the rows): the load then takes the weight
                # tile's layout, so nothing is converted through shared memory (repeats hit L1)
                x = tl.load(x_rows + zero_n + kx[None, None, :, :],
                            mask=m_mask[:, None, None, None] & k_mask[None, None, :, :], other=0.0).to(tl.float32)
                t += w[None, :, :, :] * x
                if HAS_OFFSETS:
                    xs += x
            # the 32 columns of a chunk row sit in 4 threads of a warp: the sum is register adds and 2 shuffles
            s = tl.load(Scales + sg, mask=gmask, other=0.0).to(tl.float32)
            acc += tl.sum(t, 3) * s[None, :, :]
            if HAS_OFFSETS:
                o = tl.load(Offsets + sg, mask=gmask, other=0.0)
                acc += o[None, :, :] * tl.sum(xs, 3)
        halves = halves_next

    y = tl.sum(acc, 2)  # [BLOCK_M, BLOCK_N]
    mask = m_mask[:, None] & n_mask[None, :]
    out_ptrs = Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if not PARTIAL:
        tl.store(out_ptrs, y.to(Out.dtype.element_ty), mask=mask)
    else:
        offs = rm[:, None] * N + rn[None, :]
        tl.store(Part + pid_k.to(tl.int64) * M * N + offs, y, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(Tickets + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:  # the last split of this tile: sum all of them in a fixed order
            total = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            for s_ in range(split):
                total += tl.load(Part + s_ * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, total.to(Out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(Tickets + pid_n, 0, sem="relaxed", scope="gpu")


def w4a16_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               perm: torch.Tensor | None, k: int, group_size: int, offsets: torch.Tensor | None = None,
               tickets: torch.Tensor | None = None, cfg: GemvConfig | None = None) -> torch.Tensor:
    """x [M <= MAX_M, K] @ W^T -> [M, N] in x's dtype; the arguments as `w4a16_gemm.w4a16_matmul`'s, plus
    `tickets` (`tickets_for(N)`: zero at rest; a fresh zeroed buffer per call when None)."""
    m = x.shape[0]
    n, kp = codes.shape[0], codes.shape[1] * 4
    if m > MAX_M or x.shape[1] != k or kp != triton.cdiv(k, CHUNK) * CHUNK or group_size % SLICE:
        raise ValueError(f"w4a16_gemv: x {tuple(x.shape)} / codes {tuple(codes.shape)} / group {group_size} do not fit")
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or gemv_default_config(m)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, per_split = gemv_plan(n, kp, cfg, x.device)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        if tickets is None:
            tickets = tickets_for(n, x.device)
        if tickets.numel() < triton.cdiv(n, cfg.block_n):
            raise ValueError("w4a16_gemv: too few split-K tickets for this tile")
    else:
        part = out
        tickets = tickets if tickets is not None else codes
    grid = (triton.cdiv(n, cfg.block_n), split)
    _gemv_kernel[grid](
        x, codes, scales, zeros if zeros is not None else scales, offsets if offsets is not None else scales,
        perm if perm is not None else codes, out, part, tickets,
        m, n, k, scales.shape[0], group_size, per_split, kp // CHUNK, split, x.stride(0), codes.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None, PARTIAL=split > 1,
        SLICES_PER_GROUP=min(group_size, CHUNK) // SLICE,
        BLOCK_M=triton.next_power_of_2(m), BLOCK_N=cfg.block_n, CHUNKS=cfg.chunks, num_warps=cfg.num_warps,
    )
    return out

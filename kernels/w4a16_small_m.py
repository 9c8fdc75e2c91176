"""The 4-bit weight-only linear at decode sizes (M = 1..16), on the layout `w4a16_gemm.pack_codes` writes
(one copy of the weight serves this kernel, the tiled one and the dequantization).

Bound by the packed weight bytes (N K / 2), like `fp8_small_m.py`: a program owns BLOCK_N rows and walks
its split of K CHUNKS chunks (128 columns, 64 bytes a row) per loop step, all of a step's loads issued
before its math and pipelined `num_stages` deep; narrow row tiles (16 rows: 384 programs on qkv) with a
small fixed split-K count that finishes in the same launch (`small_m.finish_tile`: deterministic, no
second kernel; the old path launched a reduction kernel after every split GEMM). The math per chunk is
the tiled kernel's (`w4a16_gemm.chunk_dot`): codes turned into c - z by the bf16 / fp16 magic-number OR
(inline PTX, two codes per shift + LOP3 + FMA), one MMA with the weights as the row operand per 32
columns, each group's scale applied to its float32 partial sum. Only the "dot" family exists here
(CUDA-core FMAs lost to it on the H200: kernels/w4a16_gemv.py, RESULTS.md 2026-12-03).

`DEFAULTS` holds the measured best config per 8B layer shape and M (benchmarks/small_m_gemm_sweep.py
prints a replacement); other shapes take `fallback_config`. A config's block_k is CHUNKS x 128.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import sm_count
from .small_m import MAX_M, SmallMConfig, Table, check_tickets, finish_tile, lookup, register_defaults, table_in_use
from .w4_blocked import chunk_stride, row_offsets
from .w4a16_gemm import CHUNK, SLICE, _codes_minus_zero, _launch_with_asm_fallback, _magic, chunk_dot

# (N, K) -> {largest M covered: config key}; the Llama-3.1-8B layers (qkv, o, gate_up, down), measured by
# benchmarks/small_m_gemm_sweep.py on the H200 (2026-12-03; RESULTS.md: faster than the older kernel at every M).
DEFAULTS: Table = {
    (6144, 4096): {16: "dot-n64-k128-s4-w4-st5"},
    (4096, 4096): {16: "dot-n64-k128-s4-w4-st5"},
    (28672, 4096): {16: "dot-n64-k256-s2-w4-st3"},
    (4096, 14336): {16: "dot-n64-k256-s4-w4-st4"},
}
register_defaults("w4", DEFAULTS)


def fallback_config(n: int, kp: int, device: torch.device) -> SmallMConfig:
    """Unlisted shapes: 16-row tiles of one warp each (see fp8_small_m.fallback_config), split along K
    until there are about four programs per SM."""
    chunks = 4 if kp >= 2048 else 1
    split = max(1, min(triton.cdiv(4 * sm_count(device), triton.cdiv(n, 16)), kp // (CHUNK * chunks * 2)))
    return SmallMConfig("dot", 16, chunks * CHUNK, split, 1, 3)


def config_for(m: int, n: int, k: int, device: torch.device) -> SmallMConfig:
    kp = triton.cdiv(k, CHUNK) * CHUNK
    return lookup(table_in_use("w4"), m, n, k) or fallback_config(n, kp, device)


def plan_chunks(kp: int, cfg: SmallMConfig) -> tuple[int, int]:
    """(split count, chunks per split): at most cfg.split_k splits, each a whole number of loop steps."""
    chunks, step = kp // CHUNK, cfg.block_k // CHUNK
    steps = triton.cdiv(chunks, step)
    per_split = triton.cdiv(steps, max(1, min(cfg.split_k, steps))) * step
    return triton.cdiv(chunks, per_split), per_split


@triton.jit
def _chunk_dot_scaled(h, c, acc, s, z, x_rows, m_mask, Perm, K, HAS_PERM: tl.constexpr, MAGIC: tl.constexpr,
                      IEEE: tl.constexpr, ASM: tl.constexpr):
    """`w4a16_gemm.chunk_dot` for a chunk inside one group (group size >= 128, no offsets), its scale s and
    zero points z [BLOCK_N] given (loaded a step ahead by the caller, not waited for in the loop)."""
    ri = tl.arange(0, 32)
    part = tl.zeros_like(acc)
    for j in tl.static_range(4):
        kk = c * 128 + j * 32 + ri
        k_mask = kk < K
        if HAS_PERM:
            kx = tl.load(Perm + kk, mask=k_mask, other=0)
        else:
            kx = kk
        x = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _codes_minus_zero(h, z, j, MAGIC, ASM and not IEEE)
        if IEEE:  # fp32 activations, or the CPU interpreter (its bf16 dot is wrong): exact fp32 products
            part += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            part += tl.dot(w, tl.trans(x))
    return acc + part * s[:, None]


@triton.jit
def _step_groups(Scales, Zeros, c0, rc, rn, n_mask, N, G, group_size, HAS_ZEROS: tl.constexpr):
    """The scales and zero points [CHUNKS, BLOCK_N] (float32) of the chunks c0 + rc (one group each)."""
    g = tl.minimum(((c0 + rc) * 128) // group_size, G - 1)
    offs = g[:, None] * N + rn[None, :]
    s = tl.load(Scales + offs, mask=n_mask[None, :], other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(Zeros + offs, mask=n_mask[None, :], other=0).to(tl.float32)
    else:
        z = tl.full(s.shape, 8.0, tl.float32)
    return s, z


@triton.jit
def _w4_small_m_kernel(
    X, Codes, Scales, Zeros, Offsets, Perm, Out, Part, Tickets,
    M, N, K, G, group_size, chunks_per_split, n_chunks, split, stride_xm, stride_cn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    MAGIC: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, SLICES_PER_GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, BLOCKED: tl.constexpr = 0,
    CSTRIDE: tl.constexpr = 32,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, 32)
    m_mask = rm < M
    n_mask = rn < N
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, n_chunks)
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    c_ptrs = Codes + row_offsets(rn, stride_cn, BLOCKED)[:, None] + ri[None, :]  # (w4_blocked.py: BLOCKED rows a block)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    if SLICES_PER_GROUP == 4 and not HAS_OFFSETS:
        # groups of >= 128 columns: a chunk is inside one group, so each step's scales (and zero points) are
        # one [CHUNKS, BLOCK_N] tile, loaded a step ahead (these small loads are not in the compiler's
        # cp.async pipeline: waited for in the loop, each step would stall for a memory latency)
        rc = tl.arange(0, CHUNKS)
        s_next, z_next = _step_groups(Scales, Zeros, c_start, rc, rn, n_mask, N, G, group_size, HAS_ZEROS)
        for c0 in range(c_start, c_end, CHUNKS):
            s_step, z_step = s_next, z_next
            s_next, z_next = _step_groups(Scales, Zeros, c0 + CHUNKS, rc, rn, n_mask, N, G, group_size, HAS_ZEROS)
            for cc in tl.static_range(CHUNKS):
                c = c0 + cc
                # a chunk past this split's end (the last split's short step) reads zero codes against zero x
                h = tl.load(c_ptrs + c * CSTRIDE, mask=(n_mask & (rn * 0 + c < c_end))[:, None], other=0)
                s = tl.sum(tl.where(rc[:, None] == cc, s_step, 0.0), 0)
                if HAS_ZEROS:
                    z = tl.sum(tl.where(rc[:, None] == cc, z_step, 0.0), 0)
                else:
                    z = tl.full((BLOCK_N,), 8.0, tl.float32)
                acc = _chunk_dot_scaled(h, c, acc, s, z, x_rows, m_mask & (rm * 0 + c < c_end), Perm, K, HAS_PERM,
                                        MAGIC, IEEE, ASM)
    else:
        z = tl.full((BLOCK_N,), 8.0, tl.float32)  # symmetric: every zero point is 8
        for c0 in range(c_start, c_end, CHUNKS):
            for cc in tl.static_range(CHUNKS):
                c = c0 + cc
                h = tl.load(c_ptrs + c * CSTRIDE, mask=(n_mask & (rn * 0 + c < c_end))[:, None], other=0)
                acc, z = chunk_dot(h, c, acc, z, x_rows, m_mask & (rm * 0 + c < c_end), rn, n_mask, Scales, Zeros,
                                   Offsets, Perm, N, K, G, group_size, HAS_ZEROS, HAS_OFFSETS, HAS_PERM, MAGIC, IEEE,
                                   ASM, SLICES_PER_GROUP, True, BLOCK_M)
    finish_tile(acc, Scales, Out, Part, Tickets, rm, rn, m_mask, n_mask, pid_n, pid_k, M, N, split, stride_om,
                PARTIAL, False)


def w4a16_small_m_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                         perm: torch.Tensor | None, k: int, group_size: int, offsets: torch.Tensor | None = None,
                         tickets: torch.Tensor | None = None, cfg: SmallMConfig | None = None,
                         blocked: int = 0) -> torch.Tensor:
    """x [M <= 16, K] @ W^T -> [M, N] in x's dtype; the arguments as `w4a16_gemm.w4a16_matmul`'s, plus
    `tickets` (`small_m.tickets_for(N)`: zero at rest; a fresh zeroed buffer per call when None)."""
    m = x.shape[0]
    n, kp = codes.shape[0], codes.shape[1] * 4
    if m > MAX_M or x.shape[1] != k or kp != triton.cdiv(k, CHUNK) * CHUNK or group_size % SLICE:
        raise ValueError(f"w4a16_small_m: x {tuple(x.shape)} / codes {tuple(codes.shape)} / group {group_size} do not fit")
    cfg = cfg or config_for(m, n, k, x.device)
    if cfg.kind != "dot" or cfg.block_k % CHUNK:
        raise ValueError(f"w4a16_small_m: config {cfg.key()} (dot only, block_k a multiple of {CHUNK})")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, per_split = plan_chunks(kp, cfg)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        tickets = check_tickets(tickets, n, cfg, x.device)
    else:
        part, tickets = out, codes
    magic = _magic(x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), split)

    def launch(asm: bool) -> None:
        _w4_small_m_kernel[grid](
            x, codes, scales, zeros if zeros is not None else scales, offsets if offsets is not None else scales,
            perm if perm is not None else codes, out, part, tickets,
            m, n, k, scales.shape[0], group_size, per_split, kp // CHUNK, split, x.stride(0), codes.stride(0),
            out.stride(0),
            HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None,
            PARTIAL=split > 1, MAGIC=magic, IEEE=x.dtype == torch.float32 or x.device.type == "cpu", ASM=asm,
            SLICES_PER_GROUP=min(group_size, CHUNK) // SLICE, BLOCK_M=16, BLOCK_N=cfg.block_n,
            CHUNKS=cfg.block_k // CHUNK, BLOCKED=blocked, CSTRIDE=chunk_stride(blocked), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    _launch_with_asm_fallback(launch, x.is_cuda and magic != 0)
    return out

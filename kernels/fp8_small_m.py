"""The FP8 W8A16 linear at decode sizes (M = 1..16): y[m, n] = (sum_k x[m, k] * codes[n, k]) * s_w[n].

Bound by the e4m3 weight bytes (N K), so the kernel is built to keep them streaming: a program owns
BLOCK_N weight rows and walks K in BLOCK_K steps, each step one [BLOCK_N, BLOCK_K] tile read as
16-byte vectors along a row (no mask along K when K is a whole number of steps: a mask there would
split the vectors into byte loads), pipelined `num_stages` deep; narrow row tiles give many programs
(gate_up at BLOCK_N = 16: 1,792) so most shapes need no split-K, and where one is configured it
finishes in the same launch (`small_m.finish_tile`: deterministic, no second kernel).

Two families (`SmallMConfig.kind`):
  dot  tensor cores: the widened weight tile [BLOCK_N, BLOCK_K] is the MMA's row operand and the
       activations [16, BLOCK_K] (M padded to 16) its column operand; the MMA wastes 15/16 at M = 1,
       which costs nothing while the loads are the bottleneck.
  fma  CUDA cores, M <= 2: codes widened to float32 and multiplied into a [BLOCK_N, BLOCK_K] float32
       accumulator per activation row, reduced along K once at the end.
Codes widen exactly (every e4m3 value is a bf16 / fp16 / fp32 value); sums are float32; the scale
multiplies the sum, as `Fp8Weight.reference_w8a16` does.

A dot tile of 16 rows per warp: with fewer rows than 16 x num_warps, Triton spreads the MMA's warps over
the activations' columns and every warp widens the whole weight tile (sm_90 TTGIR: warpsPerCTA [2, 2] at
16 rows over 4 warps; four times the conversions).

`DEFAULTS` holds the measured best config per 8B layer shape and M (benchmarks/small_m_gemm_sweep.py
prints a replacement); other shapes take `fallback_config`.
"""
from __future__ import annotations

from dataclasses import replace

import torch
import triton
import triton.language as tl

from .fp8_gemm import FP8, sm_count
from .small_m import MAX_M, SmallMConfig, Table, check_tickets, finish_tile, lookup, plan, register_defaults, table_in_use

FMA_MAX_M = 2  # rows the fma family takes (one accumulator tile per row)

# (N, K) -> {largest M covered: config key}; the Llama-3.1-8B layers (qkv, o, gate_up, down), measured by
# benchmarks/small_m_gemm_sweep.py on the H200 (2026-12-03; M = 1: the 08:00 round, qkv 9.9 vs 10.1 us,
# gate_up 32.7 vs 33.7; RESULTS.md). The engine takes this kernel at M = 1 only
# (runtime/quantization/fp8.py SMALL_M_KERNEL_MAX_M: the older split-K kernel won at M = 2..16).
DEFAULTS: Table = {
    (6144, 4096): {1: "fma-n8-k512-s1-w2-st4", 2: "fma-n8-k512-s1-w4-st3", 16: "dot-n32-k512-s2-w2-st3"},
    (4096, 4096): {1: "fma-n8-k1024-s1-w4-st2", 2: "fma-n8-k512-s1-w4-st3", 16: "dot-n32-k512-s2-w2-st3"},
    (28672, 4096): {1: "fma-n16-k256-s1-w4-st4", 8: "dot-n32-k512-s1-w2-st3", 16: "dot-n32-k256-s1-w2-st4"},
    (4096, 14336): {1: "fma-n8-k1024-s1-w4-st2", 16: "dot-n32-k512-s2-w2-st3"},
}
register_defaults("fp8", DEFAULTS)


def fallback_config(m: int, n: int, k: int, device: torch.device) -> SmallMConfig:
    """Unlisted shapes: 16-row tiles of one warp each (a warp per 16 weight rows: no warp converts
    another's codes), split along K until there are about three programs per SM."""
    tiles = triton.cdiv(n, 16)
    block_k = 512 if k >= 2048 else 128
    split = max(1, min(triton.cdiv(3 * sm_count(device), tiles), k // (4 * block_k)))
    return SmallMConfig("dot", 16, block_k, split, 1, 4 if m <= 2 else 3)


def config_for(m: int, n: int, k: int, device: torch.device) -> SmallMConfig:
    return lookup(table_in_use("fp8"), m, n, k) or fallback_config(m, n, k, device)


@triton.jit
def _dot_steps(X, W, rm, rn, m_mask, n_mask, k_start, k_end, K, stride_xm, stride_wn,
               IEEE: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               BLOCK_K: tl.constexpr):
    """sum over this split's columns of W[rn, k] * x[rm, k] as a [BLOCK_N, BLOCK_M] float32 tile (MMA)."""
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None], other=0.0)
        else:
            k_mask = (k0 + rk) < k_end
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        if IEEE:  # fp32 activations, or the CPU interpreter (its bf16 dot is wrong): exact fp32 products
            acc += tl.dot(w.to(tl.float32), tl.trans(x.to(tl.float32)), input_precision="ieee")
        else:
            acc += tl.dot(w.to(x.dtype), tl.trans(x))
    return acc


@triton.jit
def _fma_steps(X, W, rm, rn, n_mask, k_start, k_end, K, stride_xm, stride_wn,
               EVEN_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """`_dot_steps` on CUDA cores for M <= 2: float32 FMAs into one [BLOCK_N, BLOCK_K] accumulator per
    activation row, summed along K once at the end (no reduction across threads inside the loop)."""
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)  # the second row's (BLOCK_M == 2 only)
    for k0 in range(k_start, k_end, BLOCK_K):
        if EVEN_K:
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0).to(tl.float32)
            x0 = tl.load(X + k0 + rk).to(tl.float32)
        else:
            k_mask = (k0 + rk) < k_end
            w = tl.load(w_ptrs + k0, mask=n_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
            x0 = tl.load(X + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
        acc0 += w * x0[None, :]
        if BLOCK_M == 2:  # then M == 2
            if EVEN_K:
                x1 = tl.load(X + stride_xm + k0 + rk).to(tl.float32)
            else:
                x1 = tl.load(X + stride_xm + k0 + rk, mask=k_mask, other=0.0).to(tl.float32)
            acc1 += w * x1[None, :]
    row0 = tl.sum(acc0, 1)
    row1 = tl.sum(acc1, 1)
    return tl.where(rm[None, :] == 0, row0[:, None], row1[:, None])  # [BLOCK_N, BLOCK_M]


@triton.jit
def _fp8_small_m_kernel(
    X, W, S, Out, Part, Tickets, M, N, K, k_per_split, split, stride_xm, stride_wn, stride_om,
    FMA: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, PARTIAL: tl.constexpr, USE_PDL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    if USE_PDL:  # launched early beside its predecessor: wait for it before touching memory
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if FMA:
        acc = _fma_steps(X, W, rm, rn, n_mask, k_start, k_end, K, stride_xm, stride_wn,
                         EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    else:
        acc = _dot_steps(X, W, rm, rn, m_mask, n_mask, k_start, k_end, K, stride_xm, stride_wn,
                         IEEE, EVEN_K, BLOCK_M, BLOCK_N, BLOCK_K)
    finish_tile(acc, S, Out, Part, Tickets, rm, rn, m_mask, n_mask, pid_n, pid_k, M, N, split, stride_om,
                PARTIAL, True)


def fp8_small_m_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                       tickets: torch.Tensor | None = None, cfg: SmallMConfig | None = None,
                       pdl: bool = False) -> torch.Tensor:
    """x [M <= 16, K] (bf16 / fp16 / fp32) @ (codes [N, K] e4m3 * scales [N])^T -> [M, N] in x's dtype.
    `tickets`: the weight's `small_m.tickets_for(N)` (zero at rest); a fresh buffer per call when None.
    `pdl`: programmatic dependent launch (sm_90+), as `w4a16_gemv.w4a16_gemv`'s."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.dtype != FP8 or codes.shape[1] != k or m > MAX_M or codes.stride(1) != 1:
        raise ValueError(f"fp8_small_m_matmul: codes {tuple(codes.shape)} {codes.dtype} do not fit x {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    if cfg is None:
        cfg = config_for(m, n, k, x.device)
        if x.dtype == torch.float32 and cfg.kind == "dot":  # float32 tiles take twice the shared memory
            cfg = replace(cfg, block_k=min(cfg.block_k, 256), num_stages=min(cfg.num_stages, 3))
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, k_per_split = plan(k, cfg)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        tickets = check_tickets(tickets, n, cfg, x.device)
    else:
        part, tickets = out, scales
    fma = cfg.kind == "fma"
    if fma and m > FMA_MAX_M:
        raise ValueError(f"fp8_small_m_matmul: the fma family takes M <= {FMA_MAX_M}, not {m}")
    grid = (triton.cdiv(n, cfg.block_n), split)
    _fp8_small_m_kernel[grid](
        x, codes, scales, out, part, tickets, m, n, k, k_per_split, split, x.stride(0), codes.stride(0), out.stride(0),
        FMA=fma, IEEE=x.dtype == torch.float32 or x.device.type == "cpu", EVEN_K=k % cfg.block_k == 0,
        PARTIAL=split > 1, BLOCK_M=triton.next_power_of_2(m) if fma else 16, BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        **({"USE_PDL": True, "launch_pdl": True} if pdl and x.is_cuda else {"USE_PDL": False}),
    )
    return out

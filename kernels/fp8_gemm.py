"""Triton kernels of the FP8 linear layer (runtime/quantization/fp8.py picks between them by M).

`w8a16_matmul`: small M (decode). FP8 e4m3 weight codes [N, K] are read once, widened in registers to
the activation dtype (exact: every e4m3 value is a bf16 / fp16 / fp32 value) and multiplied against the
unquantized activations with fp32 accumulation; the per-output-channel scale is applied to the fp32
sum. At M <= 16 the GEMM is bound by the weight bytes, so the grid is split along K as well as N until
there are about two CTAs per SM (M = 1 must still saturate HBM); split-K partials go to an fp32
buffer and one small kernel sums them in a fixed order (deterministic, no atomics).

    y[m, n] = (sum_k x[m, k] * codes[n, k]) * s_w[n]        (no activation quantization)

`quantize_rows_fp8`: large M (prefill), the activation side of W8A8 in one pass per row: abs-max, the
scale max|x| / 448 (or a static one), x / scale saturated and rounded to e4m3 — the same codes and
scales as `fp8.quantize_rows` (the correctly rounded division by FMAs from the row's reciprocal; the
rounding to e4m3 by the GPU's round-to-nearest-even conversion, and under the CPU interpreter, whose cast
does not round so, on the float32 value by `ops._round_to_fp8`).

All launch parameters depend only on the static shapes, so the kernels capture into CUDA graphs.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .gdc import enter, launch_options
from .ops import _round_to_fp8

FP8 = torch.float8_e4m3fn
FP8_MAX = tl.constexpr(448.0)  # a constexpr: compiled Triton refuses plain globals in kernels (the interpreter allows them)


@dataclass(frozen=True)
class W8A16Config:
    """Tile sizes of one launch; split_k is derived from the shape (see `plan`)."""

    block_m: int = 16
    block_n: int = 64
    block_k: int = 256
    num_warps: int = 4
    num_stages: int = 4


def default_config(m: int) -> W8A16Config:
    """Decode sizes stream the weight in long K tiles; larger M gets a squarer tile."""
    if m <= 16:
        return W8A16Config()
    return W8A16Config(block_m=64, block_n=128, block_k=128, num_warps=8, num_stages=3)


@functools.cache
def _cuda_sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors the split-K plans fill (the 4-bit GEMM's too)."""
    if device.type == "cuda":
        return _cuda_sm_count(device.index if device.index is not None else torch.cuda.current_device())
    return 4  # the CPU interpreter: a few splits, so tests cover the split-K reduction


def plan(m: int, n: int, k: int, cfg: W8A16Config, device: torch.device) -> tuple[int, int]:
    """(split_k, k_per_split): enough CTAs for about two per SM, each split a whole number of K tiles."""
    tiles_mn = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    k_tiles = triton.cdiv(k, cfg.block_k)
    want = max(1, min(triton.cdiv(2 * sm_count(device), tiles_mn), k_tiles))
    tiles_per_split = triton.cdiv(k_tiles, want)
    k_per_split = tiles_per_split * cfg.block_k
    return triton.cdiv(k, k_per_split), k_per_split


@triton.jit
def _w8a16_kernel(
    X, W, S, Out, Part, M, N, K, k_per_split,
    stride_xm, stride_wn, stride_om,
    PARTIAL: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    x_ptrs = X + rm[:, None].to(tl.int64) * stride_xm + rk[None, :]
    w_ptrs = W + rn[None, :].to(tl.int64) * stride_wn + rk[:, None]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        k_mask = (k0 + rk) < k_end
        x = tl.load(x_ptrs + k0, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_ptrs + k0, mask=k_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
        if IEEE:  # fp32 activations, or the CPU interpreter (its bf16 dot is wrong): exact fp32 products
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee")
        else:
            acc += tl.dot(x, w.to(x.dtype))
    mask = m_mask[:, None] & n_mask[None, :]
    if not PARTIAL:
        s = tl.load(S + rn, mask=n_mask, other=0.0)
        out = acc * s[None, :]
        tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], out.to(Out.dtype.element_ty), mask=mask)
    else:
        part = Part + pid_k.to(tl.int64) * M * N + rm[:, None].to(tl.int64) * N + rn[None, :]
        tl.store(part, acc, mask=mask)


@triton.jit
def _split_k_reduce_kernel(Part, S, Out, M, N, stride_om, SPLIT, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: the same sum every run
        acc += tl.load(Part + s * M * N + offs, mask=mask, other=0.0)
    row = offs // N
    col = offs % N
    scale = tl.load(S + col, mask=mask, other=0.0)
    tl.store(Out + row * stride_om + col, (acc * scale).to(Out.dtype.element_ty), mask=mask)


def w8a16_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor,
                 cfg: W8A16Config | None = None) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ (codes [N, K] e4m3 * scales [N])^T -> [M, N] in x's dtype."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.dtype != FP8 or codes.shape[1] != k:
        raise ValueError(f"w8a16_matmul: codes {tuple(codes.shape)} {codes.dtype} do not fit x {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or default_config(m)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, k_per_split = plan(m, n, k, cfg, x.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))
    _w8a16_kernel[grid](
        x, codes, scales, out, part, m, n, k, k_per_split,
        x.stride(0), codes.stride(0), out.stride(0),
        PARTIAL=split > 1, IEEE=x.dtype == torch.float32 or x.device.type == "cpu",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    if split > 1:
        block = 1024
        _split_k_reduce_kernel[(triton.cdiv(m * n, block),)](
            part, scales, out, m, n, out.stride(0), split, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _quantize_rows_kernel(
    X, Codes, Scales, Static, n_cols, stride_x, stride_c, min_scale,
    STATIC: tl.constexpr, BLOCK: tl.constexpr, HW_ROUND: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    store_row_codes(x, mask, Codes + row * stride_c + cols, Scales + row, Static, min_scale, STATIC, HW_ROUND)


@triton.jit
def store_row_codes(x, mask, codes_ptrs, scale_ptr, Static, min_scale, STATIC: tl.constexpr, HW_ROUND: tl.constexpr):
    """One row's quantization, shared by every kernel that emits codes (this module's, and the norm / SiLU
    kernels that quantize what they produce, kernels/fp8_act_quant.py): float32 x (its masked-off lanes 0)
    -> its scale (max |x| / 448, at least min_scale; or the static one) at scale_ptr and the e4m3 codes of
    x / scale, saturated, at codes_ptrs."""
    scale = row_scale(tl.max(tl.abs(x), 0), Static, min_scale, STATIC)
    store_codes(x, mask, codes_ptrs, scale, HW_ROUND)
    tl.store(scale_ptr, scale)


@triton.jit
def row_scale(amax, Static, min_scale, STATIC: tl.constexpr):
    """A row's scale from its max |x| (a kernel that sees the row in chunks takes the max of theirs: the same
    value), or the static scale."""
    if STATIC:
        scale = tl.load(Static)
    else:
        scale = tl.maximum(tl.math.div_rn(amax, FP8_MAX), min_scale)
    return scale


@triton.jit
def store_codes(x, mask, codes_ptrs, scale, HW_ROUND: tl.constexpr):
    """The e4m3 codes of float32 x / scale, saturated, at codes_ptrs."""
    q = _div_rn_by_row(x, scale)
    q = tl.where(q != q, q, tl.minimum(tl.maximum(q, -FP8_MAX), FP8_MAX))  # NaN stays NaN, as torch's clamp keeps it
    if not HW_ROUND:  # the interpreter's cast rounds ties away and drops carries: round on the float32 value
        q = _round_to_fp8(q, 3, -6)  # e4m3: 3 mantissa bits, smallest normal 2^-6
    tl.store(codes_ptrs, q.to(codes_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _div_rn_by_row(x, s):
    """x / s correctly rounded (what `div.rn` gives) in three FMA-pipe operations an element instead of a
    division sequence each (reciprocal, refinement, range check, slow-path branch: ~12 instructions): with
    r = RN(1 / s), once per row, q0 = RN(x r) is within an ulp of x / s, the residual x - q0 s is exact in an
    FMA, and RN(q0 + (x - q0 s) r) is RN(x / s) (Markstein's theorem; residuals that would underflow belong to
    quotients far below e4m3's smallest subnormal, which round to zero either way)."""
    r = tl.math.div_rn(1.0, s)
    q0 = x * r
    q = tl.fma(tl.fma(-q0, s, x), r, q0)
    # an infinite x r (x infinite, or past float32's range), an infinite scale (a row holding inf) or a reciprocal
    # that overflows: x r is what x / s gives there, or saturates to the same e4m3 code
    q = tl.where(tl.abs(q0) < float("inf"), q, q0)
    q = tl.where((r != 0.0) & (r < float("inf")), q, q0)
    return tl.where(x == 0.0, x, q)  # -0 / s is -0 (the FMAs would give +0: another e4m3 code)


def quantize_rows_fp8(x: torch.Tensor, min_scale: float, static_scale: torch.Tensor | None = None, *,
                      pdl: bool = False, num_warps: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes e4m3 [M, K], scales float32 [M, 1]) in one launch (see the module docstring); `pdl`: launched
    with programmatic dependent launch (kernels/gdc.py: o's input comes from the attention kernels, which take it).
    `num_warps`: default 16 values a thread (the codes do not depend on it: the row's max is exact in any order)."""
    x = x if x.stride(1) == 1 else x.contiguous()
    m, k = x.shape
    codes = torch.empty(m, k, dtype=FP8, device=x.device)
    scales = torch.empty(m, 1, dtype=torch.float32, device=x.device)
    if m:
        block = triton.next_power_of_2(k)
        static = static_scale if static_scale is not None else scales
        _quantize_rows_kernel[(m,)](
            x, codes, scales, static, k, x.stride(0), codes.stride(0), min_scale,
            STATIC=static_scale is not None, BLOCK=block, HW_ROUND=x.is_cuda,  # sm_89+: cvt.rn.satfinite, RNE
            # 16 values a thread: 48 registers on sm_90, the warps an SM holds as before at 32 values and 50 registers
            num_warps=num_warps or max(1, min(32, block // 512)), **launch_options(pdl, x.device),
        )
    return codes, scales

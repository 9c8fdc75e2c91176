"""Triton GEMM of int8 weight codes with one scale (and offset) per group of 16 / 32 columns (GGUF
Q8_0 / Q6_K / Q4_K kept as int8 on a GPU, `runtime/quantization/int8_weight.py`).

    y[m, n] = sum_k x[m, k] * (q[n, k] * s[n, k // GROUP] + o[n, k // GROUP])

A [BLOCK_M, BLOCK_N] output tile per program, split along K at decode sizes (partials summed in a fixed
order by `w4a16_gemm`'s small second kernel: deterministic). Each [BLOCK_N, BLOCK_K] weight tile is
dequantized in registers, q * s + o in float32 (exact, as gguf computes it) rounded once to the
activations' type, the same weight `int8_weight.Int8Weight` hands cuBLAS at prefill sizes, and
multiplied with float32 accumulation (IEEE float32 for float32 activations and in the CPU interpreter).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import sm_count
from .w4a16_gemm import _sum_splits_kernel

BLOCK_K = 128


@triton.jit
def _w8_group_kernel(
    X, Codes, Scales, Offsets, Out, Part,
    M, N, K, G, steps_per_split, n_steps, stride_xm, stride_cn, stride_om,
    HAS_OFFSETS: tl.constexpr, PARTIAL: tl.constexpr, IEEE: tl.constexpr, GROUP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rk = tl.arange(0, BLOCK_K)
    rg = tl.arange(0, BLOCK_K // GROUP)
    m_mask = rm < M
    n_mask = rn < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    s_first = pid_k * steps_per_split
    for step in range(s_first, tl.minimum(s_first + steps_per_split, n_steps)):
        kk = step * BLOCK_K + rk
        k_mask = kk < K
        gg = step * (BLOCK_K // GROUP) + rg
        g_mask = n_mask[:, None] & (gg < G)[None, :]
        q = tl.load(Codes + rn[:, None].to(tl.int64) * stride_cn + kk[None, :], mask=n_mask[:, None] & k_mask[None, :],
                    other=0).to(tl.float32)
        s = tl.load(Scales + rn[:, None].to(tl.int64) * G + gg[None, :], mask=g_mask, other=0.0)
        w = tl.reshape(q, (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None]
        if HAS_OFFSETS:
            o = tl.load(Offsets + rn[:, None].to(tl.int64) * G + gg[None, :], mask=g_mask, other=0.0)
            w = w + o[:, :, None]
        w = tl.reshape(w, (BLOCK_N, BLOCK_K))
        x = tl.load(X + rm[:, None].to(tl.int64) * stride_xm + kk[None, :], mask=m_mask[:, None] & k_mask[None, :],
                    other=0.0)
        if IEEE:
            acc += tl.dot(x.to(tl.float32), tl.trans(w), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w.to(x.dtype)))
    offs = rm[:, None].to(tl.int64) * N + rn[None, :]
    mask = m_mask[:, None] & n_mask[None, :]
    if PARTIAL:
        tl.store(Part + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        tl.store(Out + rm[:, None].to(tl.int64) * stride_om + rn[None, :], acc.to(Out.dtype.element_ty), mask=mask)


def w8_group_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, offsets: torch.Tensor | None,
                    group: int, block_m: int = 16, block_n: int = 64, num_warps: int = 4) -> torch.Tensor:
    """x [M, K] @ W^T -> [M, N] in x's dtype; codes int8 [N, K], scales / offsets float32 [N, K // group]."""
    m, k = x.shape
    n = codes.shape[0]
    if codes.shape[1] != k or k % group or scales.shape != (n, k // group) or BLOCK_K % group:
        raise ValueError(f"w8_group_matmul: codes {tuple(codes.shape)} / scales {tuple(scales.shape)} do not fit x {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    steps = triton.cdiv(k, BLOCK_K)
    tiles = triton.cdiv(m, block_m) * triton.cdiv(n, block_n)
    want = max(1, min(triton.cdiv(3 * sm_count(x.device), tiles), steps, k // (64 * m)))
    per_split = triton.cdiv(steps, want)
    split = triton.cdiv(steps, per_split)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    _w8_group_kernel[(triton.cdiv(n, block_n), split, triton.cdiv(m, block_m))](
        x, codes, scales, offsets if offsets is not None else scales, out, part,
        m, n, k, k // group, per_split, steps, x.stride(0), codes.stride(0), out.stride(0),
        HAS_OFFSETS=offsets is not None, PARTIAL=split > 1, IEEE=x.dtype == torch.float32 or not x.is_cuda,
        GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=BLOCK_K, num_warps=num_warps,
    )
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, out, m, n, out.stride(0), split, BLOCK=block, num_warps=4)
    return out

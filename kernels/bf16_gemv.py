"""A bf16 / fp16 weight-streaming GEMV (M = 1) that can start reading its weights before its input exists.

Measurement candidate for issue 22.2 (benchmarks/decode_overlap.py, item "gemv"), not wired into the
engine: cuBLAS' M = 1 kernels cannot be launched with programmatic dependent launch (PDL), so each one
starts streaming weights only after the previous kernel has drained, and pays a ramp of a few µs. This
kernel, launched with PDL, hints L2 to load its programs' weight rows and loads its first weight tile
into registers before `griddepcontrol.wait` (weights are constants: no hazard), then waits for the
activations. Each program owns BLOCK_N rows and all of K: float32 FMAs into a [BLOCK_N, BLOCK_K]
accumulator, one reduction at the end (no split-K, no atomics). Not bit-equal to cuBLAS (another
summation order), hence a measurement, not a switch. Measured on the H200 (RESULTS.md, 2026-12-03): the
whole decode layer with these GEMMs 130.5 vs cuBLAS 133.3 µs; with PDL and `prefetch` (every program's
rows hinted, 224 MB for gate_up into a 50 MB L2) 223 µs — a prefetch must be bounded to what L2 holds.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gdc import launch_options


@triton.jit
def _bf16_gemv_kernel(X, W, Out, N, K, stride_wn, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                      PREFETCH: tl.constexpr, USE_PDL: tl.constexpr):
    pid = tl.program_id(0)
    rn = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    rk = tl.arange(0, BLOCK_K)
    w_ptrs = W + rn[:, None].to(tl.int64) * stride_wn + rk[None, :]
    if PREFETCH:  # this program's rows, K * 2 bytes each, into L2 (one bulk hint per row)
        row_ptr = W + tl.where(n_mask, rn, 0).to(tl.int64) * stride_wn
        tl.inline_asm_elementwise(
            "{ .reg .pred p; setp.ne.s32 p, $2, 0; @p cp.async.bulk.prefetch.L2.global [$1], $3; mov.u32 $0, 0; }",
            "=r,l,r,r", [row_ptr, n_mask.to(tl.int32), tl.full([BLOCK_N], 0, tl.int32) + K * 2],
            dtype=tl.int32, is_pure=False, pack=1)
    w = tl.load(w_ptrs, mask=n_mask[:, None], other=0.0).to(tl.float32)  # the first tile: before the wait
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    acc = w * tl.load(X + rk).to(tl.float32)[None, :]
    for k0 in range(BLOCK_K, K, BLOCK_K):
        w = tl.load(w_ptrs + k0, mask=n_mask[:, None], other=0.0).to(tl.float32)
        acc += w * tl.load(X + k0 + rk).to(tl.float32)[None, :]
    tl.store(Out + rn, tl.sum(acc, 1).to(Out.dtype.element_ty), mask=n_mask)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, *, block_n: int = 8, block_k: int = 512, num_warps: int = 4,
              num_stages: int = 3, pdl: bool = False, prefetch: bool = False) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T -> [1, N] in x's dtype (K a multiple of block_k). `pdl`: launch with
    programmatic dependent launch; `prefetch`: hint L2 with the program's rows first (sm_90)."""
    n, k = weight.shape
    if x.shape != (1, k) or k % block_k or weight.stride(1) != 1:
        raise ValueError(f"bf16_gemv: x {tuple(x.shape)} and weight {tuple(weight.shape)} do not fit block_k {block_k}")
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    _bf16_gemv_kernel[(triton.cdiv(n, block_n),)](
        x, weight, out, n, k, weight.stride(0), BLOCK_N=block_n, BLOCK_K=block_k,
        PREFETCH=prefetch and x.is_cuda, num_warps=num_warps, num_stages=num_stages, **launch_options(pdl, x.device))
    return out

"""The FP8 linear's activation quantization fused into the kernel that produces the activations.

At W8A8 sizes (more than 16 rows) an FP8 linear quantizes its input per token before `torch._scaled_mm`;
as a kernel of its own that is one more pass over the activations (14-29% of the FP8 linear at M >= 1,024
on the H200, RESULTS.md 2026-12-04). Two of a decoder layer's four inputs come from a kernel that already
holds each whole row in registers, so the codes can be made there:

- `add_rms_norm_fp8`: (x + residual) -> RMSNorm -> codes and scales for qkv / gate_up, and the new residual;
- `silu_and_mul_fp8`: [gate | up] -> silu(gate) * up -> codes and scales for down (one program per row: the
  scale needs the row's max, so the row is not split across programs as `ops.silu_and_mul` splits it; a row
  longer than SILU_BLOCK is read in chunks twice, for its max and then for its codes).

Neither writes the bf16 activation. Each computes it exactly as the separate kernel does (`ops._rms_norm_kernel`
at the same warps and register layout, so the same sum of squares — benchmarks/compile_check_fp8_act.py compares
the two kernels' instructions up to rsqrt; `ops._silu_and_mul_kernel`), rounds it to the activation dtype
as that kernel's store does, and quantizes that value with `fp8_gemm.store_row_codes`, the code of
`quantize_rows_fp8`: the codes and scales are those of the separate kernels bit for bit.
o's input comes from attention and keeps `quantize_rows_fp8`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .fp8_gemm import FP8, row_scale, store_codes, store_row_codes
from .gdc import enter, launch_options

# columns of [gate | up] a SiLU program holds at once: the 8B's 14,336-column rows whole, 32 warps, 16 values a thread
# (H200, 2026-12-04 mid round, benchmarks/fp8_act_fusion.py: 8.3 / 32.8 / 240.2 µs at 256 / 1,024 / 8,192 rows, one
# program an SM; rows read twice in chunks of 1,024-4,096 columns took 9.8-12.7 / 37.5-42.1 / 258.0-277.7)
SILU_BLOCK = 16384


@triton.jit
def _add_rms_norm_fp8_kernel(
    X, R, W, Codes, Scales, NewRes, Static, eps, min_scale, n_cols,
    stride_x, stride_r, stride_c, stride_n,
    HAS_RES: tl.constexpr, STATIC: tl.constexpr, HW_ROUND: tl.constexpr, BLOCK: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:  # the sum rounded to the input dtype, as `x + residual` (and ops' kernel) round it
        x = (x.to(tl.float32) + tl.load(R + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
        tl.store(NewRes + row * stride_n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    y = (xf * rstd * w).to(X.dtype.element_ty).to(tl.float32)  # the value the separate norm would store
    # the codes stored 8 to a thread, as the bf16 values are loaded: a 16-byte store of 16 codes made the compiler lay
    # the whole row out 16 values to a thread, and sum the squares in another order than ops' kernel (rstd's last bit)
    codes = Codes + row * stride_c + tl.max_contiguous(cols, 8)
    store_row_codes(y, mask, codes, Scales + row, Static, min_scale, STATIC, HW_ROUND)


@triton.jit
def _silu_mul_chunk(X, cols, mask, n_cols):
    """silu(gate) * up at columns `cols` of the row at X, as ops' kernel computes and rounds it, in float32."""
    gate = tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)  # rounded before the product, as ops'
    return (act * up).to(X.dtype.element_ty).to(tl.float32)


@triton.jit
def _silu_and_mul_fp8_kernel(
    X, Codes, Scales, Static, min_scale, n_cols, stride_x, stride_c,
    STATIC: tl.constexpr, HW_ROUND: tl.constexpr, BLOCK: tl.constexpr, ONE_PASS: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    x_row = X + row * stride_x
    cols = tl.arange(0, BLOCK)
    if ONE_PASS:  # the whole row in registers (BLOCK >= n_cols)
        mask = cols < n_cols
        store_row_codes(_silu_mul_chunk(x_row, cols, mask, n_cols), mask, Codes + row * stride_c + cols, Scales + row,
                        Static, min_scale, STATIC, HW_ROUND)
    else:  # a long row in chunks: its max first, then the chunks again (from L2), quantized
        amax = tl.zeros([BLOCK], dtype=tl.float32)
        if not STATIC:
            for c0 in range(0, n_cols, BLOCK):
                y = _silu_mul_chunk(x_row, c0 + cols, c0 + cols < n_cols, n_cols)
                amax = tl.maximum(amax, tl.abs(y))
        scale = row_scale(tl.max(amax, 0), Static, min_scale, STATIC)
        for c0 in range(0, n_cols, BLOCK):
            mask = c0 + cols < n_cols
            store_codes(_silu_mul_chunk(x_row, c0 + cols, mask, n_cols), mask, Codes + row * stride_c + c0 + cols, scale,
                        HW_ROUND)
        tl.store(Scales + row, scale)


def _outputs(rows: int, cols: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return (torch.empty(rows, cols, dtype=FP8, device=device),
            torch.empty(rows, 1, dtype=torch.float32, device=device))


def add_rms_norm_fp8(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, min_scale: float,
    static_scale: torch.Tensor | None = None, *, pdl: bool = False,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """x [M, K] (+ residual) -> (codes e4m3 [M, K], scales float32 [M, 1] of rms_norm(x + residual), and
    x + residual, or None without a residual) in one launch."""
    if x.dim() != 2 or x.stride(1) != 1 or (residual is not None and (residual.shape != x.shape or residual.stride(1) != 1)):
        raise ValueError(f"add_rms_norm_fp8: x {tuple(x.shape)} / residual must be [rows, hidden] with dense rows")
    m, k = x.shape
    codes, scales = _outputs(m, k, x.device)
    new_res = torch.empty_like(x) if residual is not None else None
    if m:
        block = triton.next_power_of_2(k)
        r = residual if residual is not None else x
        n = new_res if new_res is not None else x
        _add_rms_norm_fp8_kernel[(m,)](
            x, r, weight, codes, scales, n, static_scale if static_scale is not None else scales, eps, min_scale, k,
            x.stride(0), r.stride(0), codes.stride(0), n.stride(0),
            HAS_RES=residual is not None, STATIC=static_scale is not None, HW_ROUND=x.is_cuda, BLOCK=block,
            num_warps=max(1, min(8, block // 512)),  # ops.rms_norm's warps: the same reduction, the same rstd
            **launch_options(pdl, x.device),
        )
    return codes, scales, new_res


def silu_and_mul_fp8(
    x: torch.Tensor, min_scale: float, static_scale: torch.Tensor | None = None, *, pdl: bool = False,
    block: int | None = None, num_warps: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, 2I] = [gate | up] -> (codes e4m3 [M, I], scales float32 [M, 1]) of silu(gate) * up in one launch.
    `block`: columns a program holds at once; a row longer than that is read twice (its max, then its codes: the
    second read mostly from L2), which keeps a program's registers, and so its SM's occupancy, those of a short
    row. Default SILU_BLOCK; `num_warps` default: 16 values of gate and up a thread."""
    if x.dim() != 2 or x.stride(1) != 1 or x.shape[1] % 2:
        raise ValueError(f"silu_and_mul_fp8: x {tuple(x.shape)} must be [rows, 2 * intermediate] with dense rows")
    m, width = x.shape
    n_cols = width // 2
    codes, scales = _outputs(m, n_cols, x.device)
    if m and n_cols:
        block = min(block or SILU_BLOCK, triton.next_power_of_2(n_cols))
        _silu_and_mul_fp8_kernel[(m,)](
            x, codes, scales, static_scale if static_scale is not None else scales, min_scale, n_cols,
            x.stride(0), codes.stride(0),
            STATIC=static_scale is not None, HW_ROUND=x.is_cuda, BLOCK=block, ONE_PASS=block >= n_cols,
            num_warps=num_warps or max(1, min(32, block // 512)), **launch_options(pdl, x.device),
        )
    return codes, scales

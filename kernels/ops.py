"""Triton versions of the decoder's memory-bound elementwise ops (signatures match ops_ref).

Each op is one pass over its data in a single launch, computing in fp32 and rounding where the
reference rounds, so results agree with the torch references to the last bit in most elements.
None of them writes into its inputs: outputs are fresh tensors, like the references.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gdc import enter, launch_options


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x as a 2-D [rows, last] view with a unit inner stride (copies only if it must)."""
    x2 = x.reshape(-1, x.shape[-1])
    return x2 if x2.stride(1) == 1 else x2.contiguous()


def _warps(block: int) -> int:
    return max(1, min(8, block // 512))


@triton.jit
def _rms_norm_kernel(
    X, R, W, Out, NewRes, eps, n_cols,
    stride_x, stride_r, stride_o, stride_n,
    HAS_RES: tl.constexpr, BLOCK: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if HAS_RES:
        r = tl.load(R + row * stride_r + cols, mask=mask, other=0.0)
        # Round the sum to the input dtype first, as `x + residual` does in the reference.
        x = (x.to(tl.float32) + r.to(tl.float32)).to(X.dtype.element_ty)
        tl.store(NewRes + row * stride_n + cols, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (xf * rstd * w).to(Out.dtype.element_ty), mask=mask)


def _norm(
    x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor, eps: float, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One launch: rms_norm(x [+ residual]) and, with a residual, the rounded sum."""
    x2 = _rows(x)
    r2 = _rows(residual) if residual is not None else x2
    out = torch.empty(x2.shape, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(out) if residual is not None else out
    n_rows, n_cols = x2.shape
    if n_rows:
        block = triton.next_power_of_2(n_cols)
        _rms_norm_kernel[(n_rows,)](
            x2, r2, weight, out, new_res, eps, n_cols,
            x2.stride(0), r2.stride(0), out.stride(0), new_res.stride(0),
            HAS_RES=residual is not None, BLOCK=block, num_warps=_warps(block), **launch_options(pdl, x.device),
        )
    return out.view(x.shape), (new_res.view(x.shape) if residual is not None else None)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False) -> torch.Tensor:
    """`pdl`: launch with programmatic dependent launch (kernels/gdc.py; same result)."""
    return _norm(x, None, weight, eps, pdl)[0]


def fused_add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual) as new tensors; inputs are left untouched."""
    normed, summed = _norm(x, residual, weight, eps, pdl)
    assert summed is not None
    return normed, summed


@triton.jit
def _silu_and_mul_kernel(X, Out, n_cols, stride_x, stride_o, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    enter(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    gate = tl.load(X + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(X + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    # The reference rounds silu(gate) to the input dtype before the product; so do we.
    act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
    tl.store(Out + row * stride_o + cols, (act * up).to(Out.dtype.element_ty), mask=mask)


def silu_and_mul(x: torch.Tensor, *, pdl: bool = False) -> torch.Tensor:
    """x = [gate | up] on the last dim -> silu(gate) * up."""
    x2 = _rows(x)
    n_rows, width = x2.shape
    n_cols = width // 2
    out = torch.empty((n_rows, n_cols), dtype=x.dtype, device=x.device)
    if n_rows and n_cols:
        block = min(2048, triton.next_power_of_2(n_cols))
        _silu_and_mul_kernel[(n_rows, triton.cdiv(n_cols, block))](
            x2, out, n_cols, x2.stride(0), out.stride(0), BLOCK=block, num_warps=max(1, min(8, block // 256)),
            **launch_options(pdl, x.device),
        )
    return out.view(*x.shape[:-1], n_cols)


@triton.jit
def _rotate_heads(
    X, Out, t, t_out, stride_xt, stride_xh, stride_ot, stride_oh, cos, sin, n_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    offs = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (offs[None, :] < HALF)
    src = X + t * stride_xt + heads[:, None] * stride_xh + offs[None, :]
    x1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
    dst = Out + t_out * stride_ot + heads[:, None] * stride_oh + offs[None, :]
    tl.store(dst, (x1 * cos - x2 * sin).to(Out.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, (x2 * cos + x1 * sin).to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _rotary_kernel(
    Q, K, QOut, KOut, Pos, Cache, n_q_heads, n_k_heads,
    stride_qt, stride_qh, stride_kt, stride_kh,
    stride_qot, stride_qoh, stride_kot, stride_koh, stride_c,
    V, Slots, stride_vt, stride_vh, stride_vbt, stride_vbh,  # STORE: KOut is the K pool, VOut the V pool
    VOut, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, BLOCK_HALF: tl.constexpr,
    BLOCK_D: tl.constexpr, STORE: tl.constexpr, USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    pos = tl.load(Pos + t).to(tl.int64)
    offs = tl.arange(0, BLOCK_HALF)
    cmask = offs < HALF
    cos = tl.load(Cache + pos * stride_c + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * stride_c + HALF + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    _rotate_heads(Q, QOut, t, t, stride_qt, stride_qh, stride_qot, stride_qoh, cos, sin, n_q_heads,
                  HALF, BLOCK_HQ, BLOCK_HALF)
    t_k = t
    if STORE:  # the rotated K goes straight to its pool slot (the same values store_kv would copy), V beside it
        t_k = tl.load(Slots + t).to(tl.int64)
        heads = tl.arange(0, BLOCK_HK)[:, None]
        dims = tl.arange(0, BLOCK_D)[None, :]
        vmask = (heads < n_k_heads) & (dims < 2 * HALF)
        v = tl.load(V + t * stride_vt + heads * stride_vh + dims, mask=vmask)
        tl.store(VOut + t_k * stride_vbt + heads * stride_vbh + dims, v.to(VOut.dtype.element_ty), mask=vmask)
    _rotate_heads(K, KOut, t, t_k, stride_kt, stride_kh, stride_kot, stride_koh, cos, sin, n_k_heads,
                  HALF, BLOCK_HK, BLOCK_HALF)


def rotary(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor, *, pdl: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox-style rotary; q [T,Hq,D], k [T,Hkv,D] may be strided views (e.g. slices of a fused qkv).

    Returns new contiguous tensors, so a caller may pass views of a buffer it reuses.
    """
    k_out = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    return _launch_rotary(q, k, positions, cos_sin_cache, k_out, None, None, None, pdl), k_out


def rotary_store_kv(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, *, pdl: bool = False,
) -> torch.Tensor:
    """`rotary` and `store_kv` in one launch for a pool of k's dtype: k_buffer[slots] = rotary(k),
    v_buffer[slots] = v, the same values the two kernels write; returns the rotated q."""
    if k_buffer.dtype != k.dtype or v_buffer.dtype != v.dtype or k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1:
        raise ValueError(f"rotary_store_kv: a {k.dtype} pool with unit stride on head_dim, not {k_buffer.dtype}")
    if v.stride(2) != 1:
        v = v.contiguous()
    return _launch_rotary(q, k, positions, cos_sin_cache, k_buffer, v, v_buffer, slots, pdl)


def _launch_rotary(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
                   k_out: torch.Tensor, v: torch.Tensor | None, v_out: torch.Tensor | None,
                   slots: torch.Tensor | None, pdl: bool) -> torch.Tensor:
    if q.stride(2) != 1:
        q = q.contiguous()
    if k.stride(2) != 1:
        k = k.contiguous()
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    num_tokens, n_q, head_dim = q.shape
    n_k = k.shape[1]
    q_out = torch.empty((num_tokens, n_q, head_dim), dtype=q.dtype, device=q.device)
    if num_tokens:
        store = v is not None
        v_, vo = (v, v_out) if store else (k, k_out)  # (unused without STORE)
        half = head_dim // 2
        block_half = triton.next_power_of_2(half)
        block_hq = triton.next_power_of_2(n_q)
        _rotary_kernel[(num_tokens,)](
            q, k, q_out, k_out, positions, cos_sin_cache, n_q, n_k,
            q.stride(0), q.stride(1), k.stride(0), k.stride(1),
            q_out.stride(0), q_out.stride(1), k_out.stride(0), k_out.stride(1),
            cos_sin_cache.stride(0),
            v_, slots if store else positions, v_.stride(0), v_.stride(1), vo.stride(0), vo.stride(1), vo,
            HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(n_k),
            BLOCK_HALF=block_half, BLOCK_D=triton.next_power_of_2(head_dim), STORE=store,
            num_warps=_warps(block_hq * block_half), **launch_options(pdl, q.device),
        )
    return q_out


@triton.jit
def _round_to_fp8(x, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """float32 x (already within the format's range) rounded to nearest-even on the FP8 grid, still
    float32, so the cast that follows is exact: the result does not hang on the backend's conversion
    rounding (the CPU interpreter rounds ties away and drops mantissa carries). Normal values keep
    MANT_BITS of mantissa (the bf16 rounding trick on the bits); below 2^MIN_EXP the grid is uniform,
    2^(MIN_EXP - MANT_BITS), and adding 2^(MIN_EXP + 23 - MANT_BITS) rounds to it."""
    SHIFT: tl.constexpr = 23 - MANT_BITS
    bits = x.to(tl.uint32, bitcast=True)
    bits = bits + ((1 << (SHIFT - 1)) - 1) + ((bits >> SHIFT) & 1)
    normal = ((bits >> SHIFT) << SHIFT).to(tl.float32, bitcast=True)
    magic = tl.exp2((MIN_EXP + 23 - MANT_BITS) * 1.0)
    ax = tl.abs(x)
    tiny = (ax + magic) - magic
    tiny = tl.where((x.to(tl.uint32, bitcast=True) >> 31) != 0, -tiny, tiny)  # the sign bit: -0 stays -0
    return tl.where(ax < tl.exp2(MIN_EXP * 1.0), tiny, normal)


@triton.jit
def _store_kv_kernel(
    KBuf, VBuf, Slots, K, V, n_heads,
    stride_kbt, stride_kbh, stride_vbt, stride_vbh,
    stride_kt, stride_kh, stride_vt, stride_vh,
    k_inv_scale, v_inv_scale,  # an FP8 pool stores x * (1 / scale), saturated to +-FP8_MAX
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,  # FP8_MAX 0: a float pool
    USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    t = tl.program_id(0).to(tl.int64)
    slot = tl.load(Slots + t).to(tl.int64)
    heads = tl.arange(0, BLOCK_H)[:, None]
    offs = tl.arange(0, BLOCK_D)[None, :]
    mask = (heads < n_heads) & (offs < HEAD_DIM)
    k = tl.load(K + t * stride_kt + heads * stride_kh + offs, mask=mask)
    v = tl.load(V + t * stride_vt + heads * stride_vh + offs, mask=mask)
    if FP8_MAX > 0:
        k = _round_to_fp8(tl.minimum(tl.maximum(k.to(tl.float32) * k_inv_scale, -FP8_MAX), FP8_MAX), MANT_BITS, MIN_EXP)
        v = _round_to_fp8(tl.minimum(tl.maximum(v.to(tl.float32) * v_inv_scale, -FP8_MAX), FP8_MAX), MANT_BITS, MIN_EXP)
    tl.store(KBuf + slot * stride_kbt + heads * stride_kbh + offs, k.to(KBuf.dtype.element_ty), mask=mask)
    tl.store(VBuf + slot * stride_vbt + heads * stride_vbh + offs, v.to(VBuf.dtype.element_ty), mask=mask)


def store_kv(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0, *, pdl: bool = False,
) -> None:
    """k_buffer[slots] = k, v_buffer[slots] = v (cast to the pool dtype) in one launch; an FP8 pool
    stores k / k_scale and v / v_scale saturated, as `ops_ref.quantize_kv_ref`.

    Slots must be distinct (as the allocator guarantees); k/v may be strided views of a fused qkv.
    """
    if k.stride(2) != 1:
        k = k.contiguous()
    if v.stride(2) != 1:
        v = v.contiguous()
    if k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1:
        raise ValueError("store_kv needs a unit stride on the pool's head_dim")
    num_tokens, n_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    fp8 = k_buffer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if k_buffer.dtype.itemsize == 1 and not fp8:
        raise ValueError(f"store_kv: a one-byte pool must be float8_e4m3fn or float8_e5m2, not {k_buffer.dtype}")
    block_h = triton.next_power_of_2(n_heads)
    block_d = triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        k_buffer, v_buffer, slots, k, v, n_heads,
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        1.0 / k_scale, 1.0 / v_scale,
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d,
        FP8_MAX=float(torch.finfo(k_buffer.dtype).max) if fp8 else 0.0,
        MANT_BITS=3 if k_buffer.dtype == torch.float8_e4m3fn else 2,  # e4m3 / e5m2
        MIN_EXP=-6 if k_buffer.dtype == torch.float8_e4m3fn else -14,  # smallest normal exponent
        num_warps=_warps(block_h * block_d), **launch_options(pdl, k.device),
    )

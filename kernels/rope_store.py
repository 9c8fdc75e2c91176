"""The attention block's epilogue after the fused QKV projection, in one launch (issue 22.2).

Between the qkv matmul and attention a decode layer used to run two kernels (rotary on q and k,
then the KV-cache store), plus two per-head RMS norms on models with q/k norm (Qwen3). Here one
program per (token, part) reads its slice of the projection's output once: part 0 rotates the query
heads into a fresh q, part 1 rotates the key heads and writes them into the pool, part 2 writes the
value heads into the pool. The rounding follows the composed references (`ops_ref.rms_norm_ref`,
`rotary_ref`, `store_kv_ref`): each step rounds to the input dtype where its reference does, so a
float pool receives the same bits as the unfused kernels write.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .ops import _round_to_fp8


@triton.jit
def _rotated_heads(src, heads_mask, offs, stride_h, cos, sin, NormW, eps,
                   HEAD_DIM: tl.constexpr, HALF: tl.constexpr, QK_NORM: tl.constexpr):
    """[BLOCK_H, BLOCK_HALF] float32 halves of (optionally RMS-normed, then) rotated heads, each step
    rounded to the input dtype as its reference rounds."""
    mask = heads_mask[:, None] & (offs[None, :] < HALF)
    x1 = tl.load(src + offs[None, :], mask=mask, other=0.0)
    x2 = tl.load(src + HALF + offs[None, :], mask=mask, other=0.0)
    dtype = x1.dtype
    x1 = x1.to(tl.float32)
    x2 = x2.to(tl.float32)
    if QK_NORM:
        rstd = tl.rsqrt((tl.sum(x1 * x1, 1) + tl.sum(x2 * x2, 1)) / HEAD_DIM + eps)[:, None]
        w1 = tl.load(NormW + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        w2 = tl.load(NormW + HALF + offs, mask=offs < HALF, other=0.0).to(tl.float32)[None, :]
        x1 = (x1 * rstd * w1).to(dtype).to(tl.float32)
        x2 = (x2 * rstd * w2).to(dtype).to(tl.float32)
    y1 = (x1 * cos - x2 * sin).to(dtype).to(tl.float32)
    y2 = (x2 * cos + x1 * sin).to(dtype).to(tl.float32)
    return y1, y2


@triton.jit
def _to_pool(x, inv_scale, FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """float32 values (already rounded to the input dtype) as the pool stores them (`quantize_kv_ref`)."""
    if FP8_MAX > 0:
        x = _round_to_fp8(tl.minimum(tl.maximum(x * inv_scale, -FP8_MAX), FP8_MAX), MANT_BITS, MIN_EXP)
    return x


@triton.jit
def _rope_store_kernel(
    QKV, QOut, KBuf, VBuf, Pos, Cache, Slots, QNormW, KNormW,
    n_q_heads, n_kv_heads, eps, k_inv_scale, v_inv_scale,
    stride_t, stride_qot, stride_qoh, stride_kbt, stride_kbh, stride_vbt, stride_vbh, stride_c,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
    BLOCK_HALF: tl.constexpr, QK_NORM: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,  # FP8_MAX 0: a float pool
):
    t = tl.program_id(0).to(tl.int64)
    part = tl.program_id(1)
    offs = tl.arange(0, BLOCK_HALF)
    row = QKV + t * stride_t
    if part == 2:  # V: a cast (or FP8 quantization) into the pool, no rotation
        slot = tl.load(Slots + t).to(tl.int64)
        heads = tl.arange(0, BLOCK_HK)
        mask = (heads[:, None] < n_kv_heads) & (offs[None, :] < HALF)
        src = row + (n_q_heads + n_kv_heads) * HEAD_DIM + heads[:, None] * HEAD_DIM + offs[None, :]
        dst = VBuf + slot * stride_vbt + heads[:, None] * stride_vbh + offs[None, :]
        v1 = tl.load(src, mask=mask, other=0.0).to(tl.float32)
        v2 = tl.load(src + HALF, mask=mask, other=0.0).to(tl.float32)
        tl.store(dst, _to_pool(v1, v_inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(VBuf.dtype.element_ty), mask=mask)
        tl.store(dst + HALF, _to_pool(v2, v_inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(VBuf.dtype.element_ty),
                 mask=mask)
        return
    pos = tl.load(Pos + t).to(tl.int64)
    cmask = offs < HALF
    cos = tl.load(Cache + pos * stride_c + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * stride_c + HALF + offs, mask=cmask, other=0.0).to(tl.float32)[None, :]
    # Each part in its own function: Triton requires a name bound in both branches of a runtime `if`
    # to have one type, and the Q and K tiles differ in shape (and pointer dtype).
    if part == 0:  # Q: rotated into a fresh [T, Hq, D] tensor
        _rotate_q(row, QOut + t * stride_qot, stride_qoh, n_q_heads, offs, cos, sin, QNormW, eps,
                  HEAD_DIM, HALF, BLOCK_HQ, QK_NORM)
    else:  # K: rotated straight into the pool
        slot = tl.load(Slots + t).to(tl.int64)
        _rotate_k_into_pool(row + n_q_heads * HEAD_DIM, KBuf + slot * stride_kbt, stride_kbh, n_kv_heads, offs,
                            cos, sin, KNormW, eps, k_inv_scale, HEAD_DIM, HALF, BLOCK_HK, QK_NORM,
                            FP8_MAX, MANT_BITS, MIN_EXP)


@triton.jit
def _rotate_q(row, dst_row, stride_h, n_heads, offs, cos, sin, NormW, eps,
              HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, QK_NORM: tl.constexpr):
    """The query heads of one token's qkv row, rotated into q's row `dst_row`."""
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < n_heads
    y1, y2 = _rotated_heads(row + heads[:, None] * HEAD_DIM, hmask, offs, HEAD_DIM, cos, sin, NormW, eps,
                            HEAD_DIM, HALF, QK_NORM)
    mask = hmask[:, None] & (offs[None, :] < HALF)
    dst = dst_row + heads[:, None] * stride_h + offs[None, :]
    tl.store(dst, y1.to(dst_row.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, y2.to(dst_row.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_k_into_pool(src, dst_row, stride_h, n_heads, offs, cos, sin, NormW, eps, inv_scale,
                        HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_H: tl.constexpr, QK_NORM: tl.constexpr,
                        FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr):
    """The key heads at `src` (one token), rotated and written as the pool stores them at `dst_row`."""
    heads = tl.arange(0, BLOCK_H)
    hmask = heads < n_heads
    y1, y2 = _rotated_heads(src + heads[:, None] * HEAD_DIM, hmask, offs, HEAD_DIM, cos, sin, NormW, eps,
                            HEAD_DIM, HALF, QK_NORM)
    mask = hmask[:, None] & (offs[None, :] < HALF)
    dst = dst_row + heads[:, None] * stride_h + offs[None, :]
    tl.store(dst, _to_pool(y1, inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(dst_row.dtype.element_ty), mask=mask)
    tl.store(dst + HALF, _to_pool(y2, inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(dst_row.dtype.element_ty),
             mask=mask)


def rotary_store_kv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k_scale: float = 1.0,
    v_scale: float = 1.0, q_norm: torch.Tensor | None = None, k_norm: torch.Tensor | None = None, eps: float = 0.0,
) -> torch.Tensor:
    """qkv [T, (Hq + 2 Hkv) * D] -> rotated q [T, Hq, D]; rotated k and v written into the pool at
    `slots` (an FP8 pool: divided by its scale, saturated). With `q_norm` / `k_norm` each head is
    RMS-normed (weight [D], `eps`) before the rotation. Same results as `ops_ref.rotary_store_kv_ref`."""
    if qkv.dim() != 2 or qkv.stride(1) != 1:
        raise ValueError("rotary_store_kv needs a 2-D qkv with a unit inner stride")
    num_tokens, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    if head_dim * (num_heads + 2 * num_kv_heads) != width or head_dim % 2:
        raise ValueError(f"rotary_store_kv: width {width} is not (Hq + 2 Hkv) * an even head_dim")
    if k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1:
        raise ValueError("rotary_store_kv needs a unit stride on the pool's head_dim")
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    fp8 = k_buffer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if k_buffer.dtype.itemsize == 1 and not fp8:
        raise ValueError(f"rotary_store_kv: a one-byte pool must be float8_e4m3fn or float8_e5m2, not {k_buffer.dtype}")
    q_out = torch.empty((num_tokens, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if num_tokens == 0:
        return q_out
    qk_norm = q_norm is not None and k_norm is not None
    half = head_dim // 2
    block_half = triton.next_power_of_2(half)
    block_hq = triton.next_power_of_2(num_heads)
    _rope_store_kernel[(num_tokens, 3)](
        qkv, q_out, k_buffer, v_buffer, positions, cos_sin_cache, slots,
        q_norm if qk_norm else qkv, k_norm if qk_norm else qkv,
        num_heads, num_kv_heads, eps, 1.0 / k_scale, 1.0 / v_scale,
        qkv.stride(0), q_out.stride(0), q_out.stride(1),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1), cos_sin_cache.stride(0),
        HEAD_DIM=head_dim, HALF=half, BLOCK_HQ=block_hq, BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        BLOCK_HALF=block_half, QK_NORM=qk_norm,
        FP8_MAX=float(torch.finfo(k_buffer.dtype).max) if fp8 else 0.0,
        MANT_BITS=3 if k_buffer.dtype == torch.float8_e4m3fn else 2,  # e4m3 / e5m2
        MIN_EXP=-6 if k_buffer.dtype == torch.float8_e4m3fn else -14,  # smallest normal exponent
        num_warps=max(1, min(8, block_hq * block_half // 256)),
    )
    return q_out

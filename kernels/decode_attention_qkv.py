"""Decode attention straight from the fused qkv projection: rotary, KV store and attention in one launch.

A decode layer's attention block otherwise runs rotary + KV store (`rope_store.py`) and then
attention, two launches whose data is a few KB at batch 1 to 8. Here each (request, KV head, split)
program of the one-launch decode kernel rotates its own query heads in registers, and the split that
holds the request's newest position rotates that token's key, writes K and V into the pool (as the
pool stores them: FP8 codes under a scale) and folds them into its softmax from registers, while
every split reads only the positions already in the pool, so no program waits for the store. The
splits are merged by the last to finish (`decode_attention.write_or_merge`). Results equal
rotary + store + decode attention within float tolerance (the new key's score is a sum, not a dot).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import LOG2E, gather_kv, online_softmax_step
from .decode_attention import GPU_CONFIG, default_num_kv_splits, split_counters, write_or_merge
from .rope_store import _to_pool


@triton.jit
def _rotated(src, rows_mask, offs_d, cos, sin, HALF: tl.constexpr, HEAD_DIM: tl.constexpr):
    """Rows [R, BLOCK_D] of heads at `src` (row offsets already applied), rotated as `ops_ref.rotary_ref`
    does (float32 products, rounded to the input dtype), returned as float32."""
    mask_d = offs_d < HEAD_DIM
    first = offs_d < HALF
    partner = tl.where(first, offs_d + HALF, offs_d - HALF)
    x = tl.load(src + offs_d[None, :], mask=rows_mask[:, None] & mask_d[None, :], other=0.0)
    y = tl.load(src + partner[None, :], mask=rows_mask[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    sign = tl.where(first, -1.0, 1.0)[None, :]
    return (x.to(tl.float32) * cos + (sign * y) * sin).to(x.dtype).to(tl.float32)


@triton.jit
def _decode_qkv_kernel(
    QKV, Pos, Cache, Slots, K, V, ReqToToken, ReqIdx, SeqLens, MidO, MidLse, Out, Locks,
    qk_scale, v_scale, k_inv_scale, v_inv_scale, num_splits, n_q_heads, n_kv_heads,
    stride_qkv, stride_c,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_r2t,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, HALF: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr, DOT_FP32: tl.constexpr,
    FP8_MAX: tl.constexpr, MANT_BITS: tl.constexpr, MIN_EXP: tl.constexpr,  # FP8_MAX 0: a float pool
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start >= end:
        return
    newest = seq_len - 1  # the new token: in registers here, not yet in the pool
    has_new = end == seq_len

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h
    pos = tl.load(Pos + b).to(tl.int64)
    cidx = tl.where(offs_d < HALF, offs_d, offs_d - HALF)
    cos = tl.load(Cache + pos * stride_c + cidx, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    sin = tl.load(Cache + pos * stride_c + HALF + cidx, mask=mask_d, other=0.0).to(tl.float32)[None, :]
    row = QKV + b.to(tl.int64) * stride_qkv
    q = _rotated(row + heads[:, None] * HEAD_DIM, mask_h, offs_d, cos, sin, HALF, HEAD_DIM)
    q = q.to(QKV.dtype.element_ty)
    if DOT_FP32:
        q = q.to(tl.float32)
    r2t = ReqToToken + tl.load(ReqIdx + b).to(tl.int64) * stride_r2t

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        p_idx = n0 + offs_n
        mask_n = p_idx < tl.minimum(end, newest)
        k, v = gather_kv(K, V, r2t, p_idx, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)
    if has_new:
        one = offs_h < 1
        k_new = _rotated(row + (n_q_heads + kvh + offs_h[:, None] * 0) * HEAD_DIM, one, offs_d, cos, sin, HALF, HEAD_DIM)
        k_new = tl.sum(tl.where(one[:, None], k_new, 0.0), 0)  # [BLOCK_D]
        v_new = tl.load(row + (n_q_heads + n_kv_heads + kvh) * HEAD_DIM + offs_d, mask=mask_d, other=0.0).to(tl.float32)
        k_code = _to_pool(k_new, k_inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(K.dtype.element_ty)
        v_code = _to_pool(v_new, v_inv_scale, FP8_MAX, MANT_BITS, MIN_EXP).to(V.dtype.element_ty)
        slot = tl.load(Slots + b).to(tl.int64)
        tl.store(K + slot * stride_kt + kvh * stride_kh + offs_d, k_code, mask=mask_d)
        tl.store(V + slot * stride_vt + kvh * stride_vh + offs_d, v_code, mask=mask_d)
        # the pool's values as attention reads them: codes in the query's dtype (scales folded in)
        kf = k_code.to(q.dtype).to(tl.float32)
        vf = v_code.to(q.dtype).to(tl.float32)
        s = tl.sum(q.to(tl.float32) * kf[None, :], 1) * qk_scale
        m_new = tl.maximum(m_i, s)
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new)
        l_i = l_i * alpha + p
        acc = acc * alpha[:, None] + p.to(q.dtype).to(tl.float32)[:, None] * vf[None, :]
        m_i = m_new
    out = acc / l_i[:, None] * v_scale
    write_or_merge(out, m_i, l_i, MidO, MidLse, Out, Locks, b, kvh, split, tl.cdiv(seq_len, split_len),
                   heads, mask_h, offs_d, mask_d, stride_mb, stride_mh, stride_ms, stride_lb, stride_lh,
                   stride_ob, stride_oh, GROUP, BLOCK_S)


def decode_attention_qkv(
    qkv: torch.Tensor, num_heads: int, num_kv_heads: int, positions: torch.Tensor, cos_sin_cache: torch.Tensor,
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, sm_scale: float, *, k_scale: float = 1.0,
    v_scale: float = 1.0, num_kv_splits: int | None = None,
) -> torch.Tensor:
    """qkv [B, (Hq + 2 Hkv) * D] of one new token per request (at `positions`, KV slot `slots`,
    seq_lens counting it) -> attention output [B, Hq, D]; the token's rotated K and V are stored.
    Same result as `ops_ref.rotary_store_kv_ref` followed by `decode_attention_ref`."""
    bsz, width = qkv.shape
    head_dim = width // (num_heads + 2 * num_kv_heads)
    if head_dim * (num_heads + 2 * num_kv_heads) != width or head_dim % 2 or num_heads % num_kv_heads:
        raise ValueError(f"decode_attention_qkv: width {width} is not (Hq + 2 Hkv) * an even head_dim")
    if qkv.stride(1) != 1 or k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1 or req_to_token.stride(1) != 1:
        raise ValueError("decode_attention_qkv needs unit inner strides (qkv, pool head_dim, req_to_token rows)")
    if cos_sin_cache.stride(1) != 1:
        cos_sin_cache = cos_sin_cache.contiguous()
    fp8 = k_buffer.dtype in (torch.float8_e4m3fn, torch.float8_e5m2)
    if k_buffer.dtype.itemsize == 1 and not fp8:
        raise ValueError(f"decode_attention_qkv: a one-byte pool must be float8_e4m3fn or float8_e5m2, not {k_buffer.dtype}")
    group = num_heads // num_kv_heads
    out = torch.empty((bsz, num_heads, head_dim), dtype=qkv.dtype, device=qkv.device)
    if bsz == 0:
        return out
    splits = max(1, min(num_kv_splits or default_num_kv_splits(bsz, num_kv_heads, qkv.device), 64))
    if splits > 1:
        mid_o = torch.empty((bsz, num_heads, splits, head_dim), dtype=torch.float32, device=qkv.device)
        mid_lse = torch.empty((bsz, num_heads, splits), dtype=torch.float32, device=qkv.device)
    else:  # one split always writes `out` itself
        mid_o, mid_lse = out.unsqueeze(2), out
    locks = split_counters(qkv.device, bsz * num_kv_heads)
    on_gpu = qkv.is_cuda
    precision = "ieee" if qkv.dtype == torch.float32 or not on_gpu else "tf32"
    _decode_qkv_kernel[(bsz, num_kv_heads, splits)](
        qkv, positions, cos_sin_cache, slots, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens,
        mid_o, mid_lse, out, locks,
        sm_scale * k_scale * LOG2E, v_scale, 1.0 / k_scale, 1.0 / v_scale, splits, num_heads, num_kv_heads,
        qkv.stride(0), cos_sin_cache.stride(0),
        k_buffer.stride(0), k_buffer.stride(1), v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, HALF=head_dim // 2,
        BLOCK_H=max(16, triton.next_power_of_2(group)), BLOCK_D=triton.next_power_of_2(head_dim),
        BLOCK_N=GPU_CONFIG["block_n"] if on_gpu else 16, BLOCK_S=triton.next_power_of_2(splits),
        DOT_PRECISION=precision, DOT_FP32=not on_gpu,
        FP8_MAX=float(torch.finfo(k_buffer.dtype).max) if fp8 else 0.0,
        MANT_BITS=3 if k_buffer.dtype == torch.float8_e4m3fn else 2,
        MIN_EXP=-6 if k_buffer.dtype == torch.float8_e4m3fn else -14,
        num_warps=GPU_CONFIG["num_warps"] if on_gpu else 4,
        num_stages=GPU_CONFIG["num_stages"] if on_gpu else 1,
    )
    return out

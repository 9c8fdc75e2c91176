"""Triton building blocks shared by the decode and extend attention kernels (inlined at compile)."""
from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634  # softmax runs in base 2: scores are scaled by sm_scale * log2(e)


@triton.jit
def gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh):
    """K and V rows [BLOCK_N, BLOCK_D] of one request's positions `pos`, through req_to_token.

    Both gathers are issued before any math: one memory round trip per block.
    """
    slot = tl.load(r2t + pos, mask=mask_n, other=0).to(tl.int64)
    kv_mask = mask_n[:, None] & mask_d[None, :]
    k = tl.load(K + slot[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
    v = tl.load(V + slot[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
    return k, v


@triton.jit
def online_softmax_step(q, k, v, visible, acc, m_i, l_i, qk_scale, DOT_PRECISION: tl.constexpr):
    """Fold one key block into the running (acc, max, sum); `visible` masks scores to -inf.

    Rows start from a finite max (-1e30), so a fully masked block adds exact zeros, never NaN.
    """
    s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision=DOT_PRECISION) * qk_scale
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    alpha = tl.exp2(m_i - m_new)
    p = tl.exp2(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype), input_precision=DOT_PRECISION)
    return acc, m_new, l_i

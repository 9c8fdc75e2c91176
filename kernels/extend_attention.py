"""Triton varlen extend (prefill) attention over the token-level KV pool.

The new tokens' K/V are already in the pool, so prefix and new keys are read the same way,
through `req_to_token`. One program per (block of new tokens, request, HEADS q heads of one GQA
group) runs a flash-attention online softmax over a BLOCK_M-row tile in two loops: keys before the
block's first query position need no causal mask (only a tail bound), keys on the diagonal block do.
A tile holds BLOCK_M tokens of one head, or — when every request extends by at most BLOCK_M / 2
tokens (short questions after a long cached prefix) — BLOCK_M / HEADS tokens of HEADS heads that
read the same K/V, so the tile is not half empty and the keys are read once for those heads.

A request may carry a draft tree (speculative decoding in a mixed batch): its new tokens are a
tree's nodes, each seeing the prefix, its ancestors and itself. TreeStart[b] >= 0 points at its
[ext, ext] int8 ancestor matrix in TreeMask (-1: causal); its new keys all go through the masked
loop.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import LOG2E, gather_kv, online_softmax_step


@triton.jit
def _extend_kernel(
    Q, K, V, Out, ReqToToken, ReqIdx, SeqLens, ExtLens, ExtStart, TreeStart, TreeMask,
    qk_scale,  # sm_scale * k_scale * log2(e) (k_scale: an FP8 pool's, else 1)
    v_scale,  # an FP8 pool's V scale (1.0 otherwise)
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_r2t,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter mis-computes bf16 dots)
    HAS_TREE: tl.constexpr,  # some request carries a tree mask (TreeStart / TreeMask are read)
    HEADS: tl.constexpr,  # q heads per tile (a power of two dividing GROUP): BLOCK_M // HEADS tokens each
):
    # Largest (most work) query blocks first: better tail balance under causal masking.
    mblock = tl.num_programs(0) - 1 - tl.program_id(0)
    b = tl.program_id(1)
    h = tl.program_id(2) * HEADS
    kvh = h // GROUP
    TOKENS: tl.constexpr = BLOCK_M // HEADS

    ext_len = tl.load(ExtLens + b).to(tl.int32)
    m_start = mblock * TOKENS
    if m_start >= ext_len:
        return
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    prefix_len = seq_len - ext_len
    q_start = tl.load(ExtStart + b).to(tl.int64)
    row = tl.load(ReqIdx + b).to(tl.int64)
    r2t = ReqToToken + row * stride_r2t

    if HEADS == 1:
        offs_m = m_start + tl.arange(0, BLOCK_M)  # the tile's rows: tokens of head h
        head_off = h * stride_qh
        out_head_off = h * stride_oh
    else:
        rows = tl.arange(0, BLOCK_M)  # row r: token m_start + r // HEADS, head h + r % HEADS
        offs_m = m_start + rows // HEADS
        head_off = (h + rows % HEADS)[:, None] * stride_qh
        out_head_off = (h + rows % HEADS)[:, None] * stride_oh
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < ext_len
    mask_d = offs_d < HEAD_DIM
    q = tl.load(
        Q + (q_start + offs_m[:, None]) * stride_qt + head_off + offs_d[None, :],
        mask=mask_m[:, None] & mask_d[None, :],
        other=0.0,
    )
    if DOT_FP32:
        q = q.to(tl.float32)
    q_pos = prefix_len + offs_m

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    # Loop 1: keys strictly before this block's first query; visible to every row (a tree's new
    # keys are not: its loop 1 stops at the prefix).
    diag = prefix_len + m_start
    if HAS_TREE:
        tree_at = tl.load(TreeStart + b)
        if tree_at >= 0:
            diag = prefix_len
    for n0 in range(0, diag, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < diag
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)

    # Loop 2: the diagonal block(s), causal mask key_pos <= query_pos.
    kv_end = prefix_len + tl.minimum(m_start + TOKENS, ext_len)
    for n0 in range(diag, kv_end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < kv_end
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        visible = mask_n[None, :] & (pos[None, :] <= q_pos[:, None])
        if HAS_TREE:
            if tree_at >= 0:
                bit = tl.load(TreeMask + tree_at + offs_m[:, None] * ext_len + (pos - prefix_len)[None, :],
                              mask=mask_m[:, None] & mask_n[None, :], other=0)
                visible = visible & (bit != 0)
        acc, m_i, l_i = online_softmax_step(q, k, v, visible, acc, m_i, l_i, qk_scale, DOT_PRECISION)

    out = acc / tl.maximum(l_i, 1.0e-30)[:, None] * v_scale
    tl.store(
        Out + (q_start + offs_m[:, None]) * stride_ot + out_head_off + offs_d[None, :],
        out.to(Out.dtype.element_ty),
        mask=mask_m[:, None] & mask_d[None, :],
    )


# GPU launch parameters (BLOCK_M, BLOCK_N, num_warps, num_stages) by head_dim bound; module-level so
# a tuning script can override them. Best of a 24-config sweep on an H200 for D=128 bf16 (about
# 270-325 TFLOP/s at 4x2048 tokens; torch's flash SDPA on dense K/V does ~510).
GPU_CONFIG: dict[int, tuple[int, int, int, int]] = {64: (128, 64, 4, 2), 256: (128, 64, 4, 2)}


# Pack a GQA group's q heads into a tile when every extension is short (`heads_per_tile`); False: one head
# per tile always (module-level: benchmarks/cascade_e.py A/Bs it).
PACK_HEADS = True


def _config(head_dim: int, on_gpu: bool) -> tuple[int, int, int, int]:
    """Tiny blocks under the interpreter, so short test sequences still cross block borders."""
    if not on_gpu:
        return 16, 16, 4, 1
    return GPU_CONFIG[min(bound for bound in GPU_CONFIG if bound >= head_dim)]


def heads_per_tile(block_m: int, max_extend_len: int, group: int) -> int:
    """q heads of one GQA group per tile: as many as fill the tile's BLOCK_M rows with the longest
    extension's tokens (1 once an extension reaches BLOCK_M / 2 tokens: a tile of one head)."""
    if not PACK_HEADS:
        return 1
    heads = 1
    while heads < group and group % (2 * heads) == 0 and max_extend_len * 2 * heads <= block_m:
        heads *= 2
    return heads


def extend_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    extend_seq_lens: torch.Tensor,
    extend_start_loc: torch.Tensor,
    sm_scale: float,
    *,
    max_extend_len: int,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    tree_start: torch.Tensor | None = None,
    tree_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Same result as `extend_attention_ref`, with the per-request metadata as device tensors.

    `max_extend_len` (host int, >= max(extend_seq_lens)) sizes the grid without a device sync.
    `tree_start` [B] int64 (-1: causal) / `tree_mask` flat int8: draft trees' ancestor matrices.
    """
    num_tokens, num_q_heads, head_dim = q.shape
    bsz = req_pool_indices.shape[0]
    num_kv_heads = k_buffer.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} q heads not a multiple of {num_kv_heads} KV heads")
    if out is None:
        out = torch.empty_like(q)
    for name, t in (("q", q), ("k_buffer", k_buffer), ("v_buffer", v_buffer), ("out", out)):
        if t.stride(2) != 1:
            raise ValueError(f"extend_attention needs a unit stride on head_dim of {name}")
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    if num_tokens == 0 or bsz == 0 or max_extend_len <= 0:
        return out

    block_m, block_n, num_warps, num_stages = _config(head_dim, q.is_cuda)
    group = num_q_heads // num_kv_heads
    heads = heads_per_tile(block_m, max_extend_len, group)
    grid = (triton.cdiv(max_extend_len, block_m // heads), bsz, num_q_heads // heads)
    has_tree = tree_start is not None and tree_mask is not None
    _extend_kernel[grid](
        q, k_buffer, v_buffer, out, req_to_token, req_pool_indices, seq_lens,
        extend_seq_lens, extend_start_loc, tree_start if has_tree else seq_lens, tree_mask if has_tree else seq_lens,
        sm_scale * k_scale * LOG2E, v_scale,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        out.stride(0), out.stride(1),
        req_to_token.stride(0),
        GROUP=group,
        HEAD_DIM=head_dim,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(head_dim),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 or not q.is_cuda else "tf32",
        DOT_FP32=not q.is_cuda,
        HAS_TREE=has_tree,
        HEADS=heads,
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return out

"""Cascade (shared-prefix) decode attention: a group's common prefix is read once for all its rows.

When R decode rows share the first P positions of their KV (the same radix-tree nodes, hence the
same pool slots), plain decode attention reads those P tokens R times. Here the prefix stage reads
them once per group: a program takes up to `rows_per_task` rows of one group and one KV head, so
its queries form a (rows x GQA group) x head_dim tile — the M dimension of `tl.dot` — and streams
the prefix's K/V blocks through it. Each row's own suffix [P, seq_len) runs through decode
attention's stage 1 (a per-row KV start), and decode's stage 2 merges suffix and prefix partials by
log-sum-exp, so the result equals plain decode attention. When decode runs one split per row
(large batches) the suffix pass can merge instead (`suffix_merge`, GPU_CONFIG["fused_merge"]): the
prefix stage runs first, then one program per (row, KV head) reads the row's suffix and folds the
prefix partials into its running softmax and writes the output — no stage 2 launch, and the
suffix's float32 partial is never written.

The work list is fixed-shape (CUDA-graph friendly): `tasks` has `max_tasks` entries of
(row offset, row count, kv start, kv end, prefix slot, request row); unused entries have row
count 0 and return at once. A long prefix is split into several tasks (slots) so that few groups
still fill the GPU; `build_cascade_layout` balances that from the host-side group list.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .attention_common import gather_kv, online_softmax_step
from .cascade_layout import GPU_CONFIG, INTERPRETER_CONFIG, CascadeLayout
from .gdc import enter, launch_options


@triton.jit
def _prefix_stage(
    Q, K, V, ReqToToken, Tasks, Rows, MidO, MidLse,
    qk_scale, v_scale, num_splits,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_r2t,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,
    ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
):
    t = tl.program_id(0)
    kvh = tl.program_id(1)
    task = Tasks + t * 6
    row_off = tl.load(task).to(tl.int32)  # the layout is int32 on the host, int64 once packed for the device
    row_cnt = tl.load(task + 1).to(tl.int32)
    kv_start = tl.load(task + 2).to(tl.int32)
    kv_end = tl.load(task + 3).to(tl.int32)
    slot = tl.load(task + 4).to(tl.int32)
    req_row = tl.load(task + 5).to(tl.int64)
    if row_cnt == 0:
        return

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    i = offs_m // GROUP  # the tile's row (request) ...
    heads = kvh * GROUP + offs_m % GROUP  # ... and q head
    mask_m = (i < row_cnt) & (i < ROWS)
    mask_d = offs_d < HEAD_DIM
    b = tl.load(Rows + row_off + i, mask=mask_m, other=0).to(tl.int64)
    q = tl.load(Q + b[:, None] * stride_qb + heads[:, None] * stride_qh + offs_d[None, :],
                mask=mask_m[:, None] & mask_d[None, :], other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    r2t = ReqToToken + req_row * stride_r2t  # the prefix's slots: the same in every row of the group

    m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for n0 in range(kv_start, kv_end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < kv_end
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)

    out = acc / l_i[:, None] * v_scale
    part = num_splits + slot
    tl.store(MidO + b[:, None] * stride_mb + heads[:, None] * stride_mh + part * stride_ms + offs_d[None, :],
             out, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(MidLse + b * stride_lb + heads * stride_lh + part, m_i + tl.log2(l_i), mask=mask_m)


def launch_prefix_stage(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                        layout: CascadeLayout, mid_o: torch.Tensor, mid_lse: torch.Tensor, num_splits: int,
                        qk_scale: float, v_scale: float, precision: str) -> None:
    """Write each grouped row's prefix partials (slots num_splits + j) for decode's stage 2 to merge."""
    num_q_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    on_gpu = q.is_cuda
    cfg = GPU_CONFIG if on_gpu else INTERPRETER_CONFIG
    block_m = max(cfg["block_m"], triton.next_power_of_2(group))
    _prefix_stage[(layout.tasks.shape[0], num_kv_heads)](
        q, k_buffer, v_buffer, req_to_token, layout.tasks, layout.rows, mid_o, mid_lse,
        qk_scale, v_scale, num_splits,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, ROWS=block_m // group, HEAD_DIM=head_dim,
        BLOCK_M=block_m, BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=cfg["block_n"],
        DOT_PRECISION=precision, DOT_FP32=not on_gpu,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )


@triton.jit
def _suffix_merge_stage(
    Q, K, V, ReqToToken, ReqIdx, SeqLens, KvStart, PrefixSplits, MidO, MidLse, Out,
    qk_scale, v_scale,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_r2t,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_PREFIX: tl.constexpr,  # partial slots the prefix stage may have written (0 .. PrefixSplits[b] - 1)
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,
    USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    kv_lo = tl.load(KvStart + b).to(tl.int32)
    num_prefix = tl.load(PrefixSplits + b).to(tl.int32)

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    mask_hd = mask_h[:, None] & mask_d[None, :]
    heads = kvh * GROUP + offs_h
    q = tl.load(Q + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=mask_hd, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    r2t = ReqToToken + tl.load(ReqIdx + b).to(tl.int64) * stride_r2t

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(kv_lo, seq_len, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < seq_len
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)
    # The prefix partials are normalized outputs (V scale applied) with their base-2 log-sum-exp: each
    # weighs 2^(lse - m) against the suffix's sum l_i 2^(m_i - m), as stage 2 would weigh them.
    acc = acc * v_scale
    prefix_h = tl.where(mask_h, num_prefix, 0)  # per tile row (the interpreter takes no scalar mask term)
    for j in range(NUM_PREFIX):
        valid = prefix_h > j
        lse = tl.load(MidLse + b * stride_lb + heads * stride_lh + j, mask=valid, other=float("-inf"))
        part = tl.load(MidO + b * stride_mb + heads[:, None] * stride_mh + j * stride_ms + offs_d[None, :],
                       mask=valid[:, None] & mask_d[None, :], other=0.0)
        m_new = tl.maximum(m_i, lse)
        alpha = tl.exp2(m_i - m_new)
        w = tl.exp2(lse - m_new)
        acc = acc * alpha[:, None] + part * w[:, None]
        l_i = l_i * alpha + w
        m_i = m_new
    out = acc / tl.maximum(l_i, 1.0e-30)[:, None]
    tl.store(Out + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=mask_hd)


def fused_merge_enabled(on_gpu: bool) -> bool:
    """Whether one-split cascade steps run the suffix pass with the merge folded in (a launch setting)."""
    return bool((GPU_CONFIG if on_gpu else INTERPRETER_CONFIG).get("fused_merge", False))


def cascade_suffix_merge(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, req_to_token: torch.Tensor,
                         req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, layout: CascadeLayout,
                         out: torch.Tensor, qk_scale: float, v_scale: float, precision: str, block_n: int,
                         num_warps: int, num_stages: int, pdl: bool) -> torch.Tensor:
    """Cascade decode attention in two launches: the prefix stage (partials), then each row's suffix
    with the partials merged in, written to `out`."""
    bsz, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    group = num_q_heads // num_kv_heads
    num_prefix = layout.max_prefix_splits
    mid_o = torch.empty((bsz, num_q_heads, num_prefix, head_dim), dtype=torch.float32, device=q.device)
    mid_lse = torch.empty((bsz, num_q_heads, num_prefix), dtype=torch.float32, device=q.device)
    launch_prefix_stage(q, k_buffer, v_buffer, req_to_token, layout, mid_o, mid_lse, 0, qk_scale, v_scale, precision)
    on_gpu = q.is_cuda
    _suffix_merge_stage[(bsz, num_kv_heads)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, layout.kv_start, layout.prefix_splits,
        mid_o, mid_lse, out, qk_scale, v_scale,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        GROUP=group, HEAD_DIM=head_dim, BLOCK_H=max(16, triton.next_power_of_2(group)),
        BLOCK_D=triton.next_power_of_2(head_dim), BLOCK_N=block_n, NUM_PREFIX=num_prefix,
        DOT_PRECISION=precision, DOT_FP32=not on_gpu,
        num_warps=num_warps, num_stages=num_stages, **launch_options(pdl, q.device),
    )
    return out

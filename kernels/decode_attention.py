"""Triton paged decode attention over the token-level KV pool (one new query token per request).

Two stages, because a single program per (request, KV head) leaves the GPU idle at small batch
sizes with long contexts:
  1. grid (B, Hkv, S): program s reads one contiguous slice of the request's KV positions once for
     *all* q heads of its GQA group (the group is the M dimension of `tl.dot`), and writes a
     normalized partial output plus its log-sum-exp (base 2).
  2. grid (B, Hq): merges the S partial results of each head.
Empty splits (short requests) return at once and are skipped by stage 2 with the same arithmetic,
so the number of splits needs no host sync on the sequence lengths (CUDA-graph friendly). With a
single split (large batches) stage 1 writes the output and stage 2 is skipped.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from .attention_common import LOG2E, gather_kv, online_softmax_step
from .cascade_attention import cascade_suffix_merge, fused_merge_enabled, launch_prefix_stage
from .cascade_layout import CascadeLayout
from .gdc import enter, launch_options

_MAX_SPLITS = 32
# Plain decode takes q, k and v before rotary and stores the new K/V itself (`RopeStore`): one launch a layer fewer
# than rotary + KV store, then attention. The attention backend reads it at every call (a benchmark's A/B switch).
ROPE_IN_STAGE1 = True


class RopeStore(NamedTuple):
    """The new tokens' raw k, v [B, Hkv, D] (views of the qkv projection), their positions, the rotary table
    ([max_pos, D]: cos | sin, as `ops.rotary` takes it) and their pool slots: with it `decode_attention`
    takes the raw q too, rotates q and k as `ops.rotary` does and writes k, v to the slots as `ops.store_kv`
    does (a pool of k's dtype)."""

    k: torch.Tensor
    v: torch.Tensor
    positions: torch.Tensor
    cos_sin: torch.Tensor
    slots: torch.Tensor
# GPU launch parameters, module-level so a tuning script can override them. Chosen on an H200 (bf16,
# Hq=32 Hkv=8 D=128, CUDA-graph timing): 86-97% of the copy-bandwidth floor from B=32 ctx=8192 and
# B=128 ctx=1024 up; 32/64 blocks and 2/8 warps were within a few percent.
GPU_CONFIG = {"block_n": 128, "num_warps": 4, "num_stages": 2}


@triton.jit
def _decode_stage1(
    Q, K, V, ReqToToken, ReqIdx, SeqLens, KvStart, MidO, MidLse,
    qk_scale,  # sm_scale * k_scale * log2(e): softmax runs in base 2 (k_scale: an FP8 pool's)
    v_scale,  # an FP8 pool's V scale (1.0 otherwise): the output is linear in V
    num_splits,
    stride_qb, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_r2t,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    GROUP: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
    DOT_FP32: tl.constexpr,  # upcast dot operands (the CPU interpreter mis-computes bf16 dots)
    FINAL: tl.constexpr,
    HAS_START: tl.constexpr,  # cascade: each request attends to [KvStart[b], seq_len) only (its suffix)
    USE_PDL: tl.constexpr,  # programmatic dependent launch (kernels/gdc.py)
    # ROPE (`RopeStore`): Q, KNew and VNew are the step's raw projections; the kernel rotates q and the new k
    # (neox) itself, and the split holding the new position takes that key from registers (not from its slot,
    # which it writes at the end): `ops.rotary_store_kv`'s launch folded into this one
    KNew=None, VNew=None, Pos=None, Cache=None, Slots=None,
    stride_knb=0, stride_knh=0, stride_vnb=0, stride_vnh=0, stride_c=0,
    ROPE: tl.constexpr = False,
):
    enter(USE_PDL)
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)

    seq_len = tl.load(SeqLens + b).to(tl.int32)
    kv_lo = 0
    if HAS_START:
        kv_lo = tl.load(KvStart + b).to(tl.int32)
    # Split length rounded up to whole blocks, so a short request uses few splits.
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N
    start = kv_lo + split * split_len
    end = tl.minimum(start + split_len, seq_len)
    if start >= end:
        return

    offs_h = tl.arange(0, BLOCK_H)
    offs_d = tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_h = offs_h < GROUP
    mask_d = offs_d < HEAD_DIM
    heads = kvh * GROUP + offs_h

    q_ptrs = Q + b * stride_qb + heads[:, None] * stride_qh
    q_mask = mask_h[:, None] & mask_d[None, :]
    if ROPE:
        half = HEAD_DIM // 2
        lower = offs_d < half
        partner = tl.where(lower, offs_d + half, offs_d - half)  # the other half of d's rotation pair
        at = tl.load(Pos + b).to(tl.int64) * stride_c + tl.where(lower, offs_d, offs_d - half)
        cos = tl.load(Cache + at, mask=mask_d, other=0.0).to(tl.float32)
        sin = tl.load(Cache + half + at, mask=mask_d, other=0.0).to(tl.float32)
        q = _rotated(q_ptrs, offs_d, partner, q_mask, lower, cos, sin).to(Q.dtype.element_ty)
        k_ptrs = KNew + b * stride_knb + kvh * stride_knh
        k_new = _rotated(k_ptrs, offs_d, partner, mask_d, lower, cos, sin).to(K.dtype.element_ty)
        v_new = tl.load(VNew + b * stride_vnb + kvh * stride_vnh + offs_d, mask=mask_d, other=0.0).to(V.dtype.element_ty)
        new_at = seq_len - 1  # the new token's position in the request (its slot: Slots[b])
    else:
        q = tl.load(q_ptrs + offs_d[None, :], mask=q_mask, other=0.0)
    if DOT_FP32:
        q = q.to(tl.float32)
    row = tl.load(ReqIdx + b).to(tl.int64)
    r2t = ReqToToken + row * stride_r2t

    m_i = tl.full([BLOCK_H], -1.0e30, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_H], dtype=tl.float32)
    acc = tl.zeros([BLOCK_H, BLOCK_D], dtype=tl.float32)
    for n0 in range(start, end, BLOCK_N):
        pos = n0 + offs_n
        mask_n = pos < end
        if ROPE:  # the new position's slot is not written yet: its key comes from registers after the loop
            mask_n = mask_n & (pos != new_at)
        k, v = gather_kv(K, V, r2t, pos, mask_n, kvh, offs_d, mask_d, stride_kt, stride_kh, stride_vt, stride_vh)
        acc, m_i, l_i = online_softmax_step(q, k, v, mask_n[None, :], acc, m_i, l_i, qk_scale, DOT_PRECISION)
    if ROPE:
        if new_at < end:  # the one split holding the new position (splits tile [kv_lo, seq_len)): fold its key in
            # (a one-key step of online_softmax_step, its dot as a float32 sum; p rounded to q's dtype for PV as there)
            s_new = tl.sum(q.to(tl.float32) * k_new.to(tl.float32)[None, :], 1) * qk_scale
            m_new = tl.maximum(m_i, s_new)
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s_new - m_new)
            l_i = l_i * alpha + p
            acc = acc * alpha[:, None] + p.to(q.dtype).to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
            m_i = m_new

    out = acc / l_i[:, None] * v_scale
    # FINAL (a single split): MidO is the output itself and stage 2 does not run.
    tl.store(
        MidO + b * stride_mb + heads[:, None] * stride_mh + split * stride_ms + offs_d[None, :],
        out.to(MidO.dtype.element_ty),
        mask=mask_h[:, None] & mask_d[None, :],
    )
    if not FINAL:
        tl.store(MidLse + b * stride_lb + heads * stride_lh + split, m_i + tl.log2(l_i), mask=mask_h)
    if ROPE:
        if new_at < end:  # its K/V into the pool (no program of this launch reads that slot)
            slot = tl.load(Slots + b).to(tl.int64)
            tl.store(K + slot * stride_kt + kvh * stride_kh + offs_d, k_new, mask=mask_d)
            tl.store(V + slot * stride_vt + kvh * stride_vh + offs_d, v_new, mask=mask_d)


@triton.jit
def _rotated(ptrs, offs_d, partner, mask, lower, cos, sin):
    """Neox rotary of the rows at `ptrs` (one row [BLOCK_D] or [BLOCK_H, BLOCK_D]) in float32, as
    `ops._rotate_heads` computes it: x1 cos - x2 sin in the lower half, x2 cos + x1 sin in the upper."""
    x = tl.load(ptrs + offs_d, mask=mask, other=0.0).to(tl.float32)
    y = tl.load(ptrs + partner, mask=mask, other=0.0).to(tl.float32)
    return tl.where(lower, x * cos - y * sin, x * cos + y * sin)


@triton.jit
def _decode_stage2(
    MidO, MidLse, SeqLens, KvStart, PrefixSplits, Out, num_splits,
    stride_mb, stride_mh, stride_ms,
    stride_lb, stride_lh,
    stride_ob, stride_oh,
    HEAD_DIM: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_N: tl.constexpr,
    NUM_PREFIX: tl.constexpr,  # cascade: partials num_splits .. num_splits + PrefixSplits[b] - 1 hold the prefix
    USE_PDL: tl.constexpr,
):
    enter(USE_PDL)
    b = tl.program_id(0)
    h = tl.program_id(1)
    seq_len = tl.load(SeqLens + b).to(tl.int32)
    kv_lo = 0
    if NUM_PREFIX > 0:
        kv_lo = tl.load(KvStart + b).to(tl.int32)
    split_len = tl.cdiv(tl.cdiv(seq_len - kv_lo, num_splits), BLOCK_N) * BLOCK_N

    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    # Same predicate as stage 1's early return: unwritten (garbage) splits are never read.
    valid = (offs_s < num_splits) & (offs_s * split_len < seq_len - kv_lo)
    if NUM_PREFIX > 0:
        num_prefix = tl.load(PrefixSplits + b).to(tl.int32)
        valid = valid | ((offs_s >= num_splits) & (offs_s < num_splits + num_prefix))
    lse = tl.load(MidLse + b * stride_lb + h * stride_lh + offs_s, mask=valid, other=float("-inf"))
    part = tl.load(
        MidO + b * stride_mb + h * stride_mh + offs_s[:, None] * stride_ms + offs_d[None, :],
        mask=valid[:, None] & (offs_d[None, :] < HEAD_DIM),
        other=0.0,
    )
    m = tl.maximum(tl.max(lse, 0), -1.0e30)  # finite even when seq_len == 0
    w = tl.exp2(lse - m)
    denom = tl.maximum(tl.sum(w, 0), 1.0e-30)
    out = tl.sum(part * w[:, None], 0) / denom
    tl.store(
        Out + b * stride_ob + h * stride_oh + offs_d, out.to(Out.dtype.element_ty), mask=offs_d < HEAD_DIM
    )


def default_num_kv_splits(batch: int, num_kv_heads: int, device: torch.device) -> int:
    """Enough (request, KV head, split) programs to fill the GPU ~4 times, from shapes alone."""
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
    else:
        sms = 4
    return max(1, min(_MAX_SPLITS, triton.cdiv(4 * sms, batch * num_kv_heads)))


SHORT_SPLITS = 8  # the split count of the short-context plan (`short_context_splits`)


def short_context_splits(batch: int, num_kv_heads: int, device: torch.device) -> tuple[int, int] | None:
    """(splits, longest context) of a second split plan for short contexts at this batch size, or None where
    `default_num_kv_splits` is not larger than SHORT_SPLITS.

    Splits are whole blocks of KV positions (at least one each), so up to SHORT_SPLITS blocks of context
    SHORT_SPLITS splits cover the same blocks with the same active programs as the default's larger count —
    the same partial results — while launching fewer programs that find nothing to do and merging a narrower
    tile: at batch 1 on the H200 (32 splits by default) the 4-bit 8B decode graph ran 2.146 -> 2.068 ms
    (benchmarks/w4_decode_step.py, RESULTS.md 2026-12-04). Longer contexts need the default's programs.
    The split count is fixed when a CUDA graph is captured, so the graph runner captures both plans and
    picks by the step's longest context (runtime/cuda_graph_runner.py)."""
    splits = default_num_kv_splits(batch, num_kv_heads, device)
    if splits <= SHORT_SPLITS:
        return None
    block_n = GPU_CONFIG["block_n"] if device.type == "cuda" else 16  # as `decode_attention` picks it
    return SHORT_SPLITS, SHORT_SPLITS * block_n


def decode_attention(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    *,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    cascade: CascadeLayout | None = None,
    pdl: bool = False,
    rope: RopeStore | None = None,
) -> torch.Tensor:
    """Same result as `decode_attention_ref` for seq_lens >= 1; fills `out` (shaped like q) if given.

    `num_kv_splits` defaults to `default_num_kv_splits` (shapes only, no host sync); with one split
    stage 1 writes `out` directly. An FP8 pool's `k_scale` / `v_scale` multiply scores and output.
    With a `cascade` layout (shared prefixes, kernels/cascade_attention.py) stage 1 reads each
    request's own suffix only, the prefix stage reads each group's prefix once for all its rows, and
    stage 2 merges both: the same result, fewer KV bytes. `pdl`: launch both stages with programmatic
    dependent launch (kernels/gdc.py; the same result). `rope`: q is before rotary and the new K/V not yet
    in the pool (`RopeStore`; not with a cascade layout): the result and the pool as after `ops.rotary_store_kv`.
    """
    bsz, num_q_heads, head_dim = q.shape
    num_kv_heads = k_buffer.shape[1]
    if num_q_heads % num_kv_heads:
        raise ValueError(f"{num_q_heads} q heads not a multiple of {num_kv_heads} KV heads")
    if q.stride(2) != 1 or k_buffer.stride(2) != 1 or v_buffer.stride(2) != 1:
        raise ValueError("decode_attention needs a unit stride on head_dim")
    if req_to_token.stride(1) != 1:
        raise ValueError("req_to_token rows must be contiguous")
    group = num_q_heads // num_kv_heads
    splits = num_kv_splits or default_num_kv_splits(bsz, num_kv_heads, q.device)
    splits = max(1, min(splits, 64))
    if out is None:
        out = torch.empty_like(q)
    if out.stride(2) != 1:
        raise ValueError("decode_attention needs a unit stride on head_dim of out")
    if rope is not None and (cascade is not None or rope.k.dtype != k_buffer.dtype or rope.v.dtype != v_buffer.dtype
                             or rope.k.stride(2) != 1 or rope.v.stride(2) != 1 or rope.cos_sin.stride(1) != 1):
        raise ValueError("decode_attention: rope takes plain decode, a pool of k's dtype and unit inner strides")
    if bsz == 0:
        return out

    on_gpu = q.is_cuda
    block_n = GPU_CONFIG["block_n"] if on_gpu else 16  # small blocks under the interpreter exercise the loop
    block_d = triton.next_power_of_2(head_dim)
    block_h = max(16, triton.next_power_of_2(group))  # tl.dot needs M >= 16
    # float32 stays float32 in every dot (TF32 would round q, k, p and v to 10-bit mantissas).
    precision = "ieee" if q.dtype == torch.float32 or not on_gpu else "tf32"
    if cascade is not None and splits == 1 and fused_merge_enabled(on_gpu):  # one split: no stage 2
        return cascade_suffix_merge(q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, cascade, out,
                                    sm_scale * k_scale * LOG2E, v_scale, precision, block_n,
                                    GPU_CONFIG["num_warps"] if on_gpu else 4, GPU_CONFIG["num_stages"] if on_gpu else 1,
                                    pdl)
    num_prefix = cascade.max_prefix_splits if cascade is not None else 0
    final = splits == 1 and cascade is None
    if final:  # stage 1 writes `out` directly (strides of a [B, Hq, 1, D] view); no lse needed
        mid_o, mid_lse = out.unsqueeze(2), out
    else:  # partial slots: `splits` of each request's own KV, then the cascade prefix's
        mid_o = torch.empty((bsz, num_q_heads, splits + num_prefix, head_dim), dtype=torch.float32, device=q.device)
        mid_lse = torch.empty((bsz, num_q_heads, splits + num_prefix), dtype=torch.float32, device=q.device)
    kv_start = cascade.kv_start if cascade is not None else seq_lens
    prefix_splits = cascade.prefix_splits if cascade is not None else seq_lens

    _decode_stage1[(bsz, num_kv_heads, splits)](
        q, k_buffer, v_buffer, req_to_token, req_pool_indices, seq_lens, kv_start, mid_o, mid_lse,
        sm_scale * k_scale * LOG2E, v_scale, splits,
        q.stride(0), q.stride(1),
        k_buffer.stride(0), k_buffer.stride(1),
        v_buffer.stride(0), v_buffer.stride(1),
        req_to_token.stride(0),
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        GROUP=group, HEAD_DIM=head_dim,
        BLOCK_H=block_h, BLOCK_D=block_d, BLOCK_N=block_n, DOT_PRECISION=precision, DOT_FP32=not on_gpu,
        FINAL=final, HAS_START=cascade is not None,
        num_warps=GPU_CONFIG["num_warps"] if on_gpu else 4,
        num_stages=GPU_CONFIG["num_stages"] if on_gpu else 1, **launch_options(pdl, q.device),
        **({} if rope is None else dict(
            KNew=rope.k, VNew=rope.v, Pos=rope.positions, Cache=rope.cos_sin, Slots=rope.slots,
            stride_knb=rope.k.stride(0), stride_knh=rope.k.stride(1), stride_vnb=rope.v.stride(0),
            stride_vnh=rope.v.stride(1), stride_c=rope.cos_sin.stride(0), ROPE=True)),
    )
    if final:
        return out
    if cascade is not None:
        launch_prefix_stage(q, k_buffer, v_buffer, req_to_token, cascade, mid_o, mid_lse, splits,
                            sm_scale * k_scale * LOG2E, v_scale, precision)
    _decode_stage2[(bsz, num_q_heads)](
        mid_o, mid_lse, seq_lens, kv_start, prefix_splits, out, splits,
        mid_o.stride(0), mid_o.stride(1), mid_o.stride(2),
        mid_lse.stride(0), mid_lse.stride(1),
        out.stride(0), out.stride(1),
        HEAD_DIM=head_dim, BLOCK_S=triton.next_power_of_2(splits + num_prefix),
        BLOCK_D=block_d, BLOCK_N=block_n, NUM_PREFIX=num_prefix,
        num_warps=4 if block_d >= 128 else 2, **launch_options(pdl, q.device),
    )
    return out

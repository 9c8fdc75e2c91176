"""Extend (prefill) attention through torch's flash-attention kernel: varlen, GQA, causal from the end of the keys.

Why: the Triton extend kernel (kernels/extend_attention.py) reads K/V through `req_to_token` for each q head and runs
at about half of flash attention's rate on the H200 (RESULTS.md); prefill is ~46% of workload (b)'s device time. Here
each request's keys (its cached prefix and its new tokens, already in the pool) are gathered once per layer into a
contiguous [sum of seq_lens, Hkv, D] tensor — a few MB against the chunk's 8,192 queries — and torch's
`_flash_attention_forward` attends with cumulative lengths (seqlen_q <= seqlen_k: the causal mask aligned to the
end of the keys, so a prefix is visible to every new token). The gather index is built once per forward pass
(`AttentionMetadata.scratch`) and shared by the layers.

Taken for CUDA bf16 / fp16 with a pool of the same dtype (an FP8 pool's scales and float32's exactness stay with the
Triton kernel), without draft-tree masks, when the host lengths are known. On a CPU (tests) `varlen_attention`
runs a per-request reference with the same masking, so the gather and the cumulative lengths are checked there.
`$RADIXLM_EXTEND_FLASH` (1 / 0) overrides `ENABLED` for an A/B run.
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from .api import AttentionMetadata

# Off until the H200 measures it against the Triton kernel on workload (b)'s chunks (benchmarks/throughput_probe.py).
ENABLED = os.environ.get("RADIXLM_EXTEND_FLASH", "0") == "1"


# The gather copies every key of the batch once per layer: worth it while the keys are not many more than the new
# tokens (prefill chunks); decode rows riding along (one new token over a long context each) or short questions after
# a long cached prefix stay with the Triton kernel, which reads the pool in place.
MAX_KEYS_PER_NEW_TOKEN = 2


def eligible(q: torch.Tensor, k_buffer: torch.Tensor, meta: AttentionMetadata) -> bool:
    """Whether this extend batch may take the flash path (see the module docstring)."""
    if not (q.is_cuda and q.dtype in (torch.bfloat16, torch.float16) and k_buffer.dtype == q.dtype
            and meta.tree_start is None and meta.seq_lens_host is not None and meta.extend_seq_lens_host is not None
            and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0 and len(meta.seq_lens_host) > 0):
        return False
    return sum(meta.seq_lens_host) <= MAX_KEYS_PER_NEW_TOKEN * sum(meta.extend_seq_lens_host)


def gather_plan(meta: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, int]:
    """(KV slot of every request's every position, request by request; cumulative new-token counts [B + 1] int32;
    cumulative KV lengths [B + 1] int32; longest new run; longest KV), built once per forward pass."""
    cached = meta.scratch.get("flash_extend")
    if cached is not None:
        return cached
    assert meta.seq_lens_host is not None and meta.extend_seq_lens_host is not None and meta.extend_seq_lens is not None
    dev = meta.seq_lens.device
    seq = meta.seq_lens.to(torch.int64)
    total = int(sum(meta.seq_lens_host))
    cu_k = torch.zeros(seq.numel() + 1, dtype=torch.int64, device=dev)
    cu_k[1:] = torch.cumsum(seq, 0)
    cu_q = torch.zeros_like(cu_k)
    cu_q[1:] = torch.cumsum(meta.extend_seq_lens.to(torch.int64), 0)
    rows = torch.repeat_interleave(meta.req_pool_indices.to(torch.int64), seq, output_size=total)
    cols = torch.arange(total, device=dev) - torch.repeat_interleave(cu_k[:-1], seq, output_size=total)
    index = meta.req_to_token[rows, cols].to(torch.int64)
    plan = (index, cu_q.to(torch.int32), cu_k.to(torch.int32), max(meta.extend_seq_lens_host),
            max(meta.seq_lens_host))
    meta.scratch["flash_extend"] = plan
    return plan


def varlen_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q: torch.Tensor, cu_k: torch.Tensor,
                     max_q: int, max_k: int, sm_scale: float) -> torch.Tensor:
    """Causal attention of packed requests (q [Tq, Hq, D], k / v [Tk, Hkv, D]); request b's new tokens are the last
    cu_q[b+1] - cu_q[b] of its cu_k[b+1] - cu_k[b] keys. Flash attention on CUDA, a per-request reference elsewhere."""
    if q.is_cuda:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu_q, cu_k, max_q, max_k, 0.0, True, False,
                                                       scale=sm_scale)[0]
    out = torch.empty_like(q)
    group = q.shape[1] // k.shape[1]
    bounds_q, bounds_k = cu_q.tolist(), cu_k.tolist()
    for b in range(len(bounds_q) - 1):
        qs, qe, ks, ke = bounds_q[b], bounds_q[b + 1], bounds_k[b], bounds_k[b + 1]
        if qe == qs:
            continue
        qb = q[qs:qe].float().transpose(0, 1)  # [Hq, Lq, D]
        kb = k[ks:ke].float().repeat_interleave(group, 1).transpose(0, 1)
        vb = v[ks:ke].float().repeat_interleave(group, 1).transpose(0, 1)
        scores = qb @ kb.transpose(1, 2) * sm_scale
        q_pos = torch.arange(ke - ks - (qe - qs), ke - ks)[:, None]
        scores = scores.masked_fill(torch.arange(ke - ks)[None, :] > q_pos, float("-inf"))
        out[qs:qe] = (scores.softmax(-1) @ vb).transpose(0, 1).to(q.dtype)
    return out


def extend_attention_flash(q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, meta: AttentionMetadata,
                           sm_scale: float, *, out: torch.Tensor | None = None) -> torch.Tensor:
    """The extend attention of `meta`'s requests over the pool (the same result as extend_attention_ref, up to the
    summation order), by `varlen_attention` on the gathered keys."""
    index, cu_q, cu_k, max_q, max_k = gather_plan(meta)
    got = varlen_attention(q, k_buffer[index], v_buffer[index], cu_q, cu_k, max_q, max_k, sm_scale)
    if out is None:
        return got
    out.copy_(got)
    return out

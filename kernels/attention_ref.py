"""Pure-torch paged attention over the token-level KV pool: the reference every kernel is checked
against, and the backend that runs on the CPU.

Layout (shared with the Triton kernels):
  q            [T, Hq, D]   queries of the new tokens (extend) or [B, Hq, D] (decode)
  k_buffer     [S, Hkv, D]  one layer of the pool (slot 0 is scratch)
  req_to_token [R, L] int32 slot of each (request row, position)
  seq_lens     [B]          KV length of each request *including* the new tokens,
                            whose K/V are already stored in the pool.
  k_scale, v_scale          an FP8 pool's per-layer scales: K = k_buffer * k_scale (1.0: a float pool)
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F


def gather_kv_ref(buffer: torch.Tensor, slots: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """buffer[slots] in `dtype` (FP8 rows are gathered as bytes: exact, and on every device)."""
    if buffer.dtype.itemsize == 1:
        return buffer.view(torch.uint8)[slots].view(buffer.dtype).to(dtype)
    return buffer[slots].to(dtype)


def decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: torch.Tensor,
    seq_lens: torch.Tensor,
    sm_scale: float,
    max_seq_len: int | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """One new token per request attends to all `seq_lens[b]` tokens of its request.

    FP8 scales fold into the math exactly as the kernels do: q.K = k_scale (q.k_stored), out = v_scale
    (softmax . v_stored)."""
    max_len = int(seq_lens.max()) if max_seq_len is None else max_seq_len
    slots = req_to_token[req_pool_indices, :max_len].long()  # [B, L]
    k = gather_kv_ref(k_buffer, slots, q.dtype).transpose(1, 2)  # [B, Hkv, L, D] (a view: SDPA takes strides)
    v = gather_kv_ref(v_buffer, slots, q.dtype).transpose(1, 2)
    valid = torch.arange(max_len, device=q.device)[None, :] < seq_lens[:, None]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=valid[:, None, None, :], scale=sm_scale * k_scale,
        enable_gqa=k.shape[1] != q.shape[1],
    )
    return out.squeeze(2) if v_scale == 1.0 else (out.squeeze(2) * v_scale).to(q.dtype)


def extend_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    seq_lens: list[int],
    extend_seq_lens: list[int],
    sm_scale: float,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    tree_masks: Sequence[torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """New tokens of each request attend causally to its cached prefix plus themselves (varlen).
    `tree_masks[b]` (a [ext, ext] bool matrix, or None: causal): which of its new tokens each new
    token of request b sees (a draft tree's ancestors and itself); the prefix stays visible to all.

    Host lists: the reference loops over requests, one SDPA call each.
    """
    num_q_heads = q.shape[1]
    out = torch.empty_like(q)
    start = 0
    for b, (row, seq_len, ext_len) in enumerate(zip(req_pool_indices, seq_lens, extend_seq_lens)):
        prefix_len = seq_len - ext_len
        tree = tree_masks[b] if tree_masks is not None else None
        slots = req_to_token[row, :seq_len].long()
        qi = q[start : start + ext_len].transpose(0, 1).unsqueeze(0)  # [1, Hq, n, D]
        ki = gather_kv_ref(k_buffer, slots, q.dtype).transpose(0, 1).unsqueeze(0)  # [1, Hkv, S, D]
        vi = gather_kv_ref(v_buffer, slots, q.dtype).transpose(0, 1).unsqueeze(0)
        if ki.shape[1] != num_q_heads:
            rep = num_q_heads // ki.shape[1]
            ki = ki.repeat_interleave(rep, dim=1)
            vi = vi.repeat_interleave(rep, dim=1)
        if tree is not None:
            mask = torch.ones((ext_len, seq_len), dtype=torch.bool, device=q.device)
            mask[:, prefix_len:] = tree.to(device=q.device, dtype=torch.bool)
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=sm_scale * k_scale)
        elif prefix_len == 0:
            oi = F.scaled_dot_product_attention(qi, ki, vi, is_causal=True, scale=sm_scale * k_scale)
        else:
            qpos = torch.arange(prefix_len, seq_len, device=q.device)[:, None]
            mask = torch.arange(seq_len, device=q.device)[None, :] <= qpos
            oi = F.scaled_dot_product_attention(qi, ki, vi, attn_mask=mask, scale=sm_scale * k_scale)
        if v_scale != 1.0:
            oi = oi * v_scale
        out[start : start + ext_len] = oi[0].transpose(0, 1)
        start += ext_len
    return out


def _attend_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """q [n, Hq, D], k/v [L, Hkv, D] -> (softmax(q k^T) v [n, Hq, D], log-sum-exp [n, Hq]), in float32."""
    rep = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(rep, dim=1)
    v = v.float().repeat_interleave(rep, dim=1)
    s = torch.einsum("nhd,lhd->nhl", q.float(), k) * scale
    lse = torch.logsumexp(s, dim=-1)
    return torch.einsum("nhl,lhd->nhd", torch.exp(s - lse[..., None]), v), lse


def cascade_decode_attention_ref(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    req_to_token: torch.Tensor,
    req_pool_indices: list[int],
    seq_lens: list[int],
    sm_scale: float,
    groups: list[tuple[list[int], int]],
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Decode attention computed the cascade way: each group (batch rows, prefix length) attends to
    its prefix once — read through its first row, as the kernel does — each row to its own suffix,
    and the two are merged by log-sum-exp. Equal to `decode_attention_ref` when the rows of a group
    share the prefix's slots; every row not in a group attends to its whole KV alone."""
    out = torch.empty(q.shape, dtype=torch.float32, device=q.device)
    prefix_of: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
    for rows, prefix_len in groups:
        slots = req_to_token[req_pool_indices[rows[0]], :prefix_len].long()
        o, lse = _attend_lse(q[rows], gather_kv_ref(k_buffer, slots, torch.float32),
                             gather_kv_ref(v_buffer, slots, torch.float32), sm_scale * k_scale)
        for i, r in enumerate(rows):
            prefix_of[r] = (o[i], lse[i], prefix_len)
    for b, (row, seq_len) in enumerate(zip(req_pool_indices, seq_lens)):
        start = prefix_of[b][2] if b in prefix_of else 0
        slots = req_to_token[row, start:seq_len].long()
        o, lse = _attend_lse(q[b : b + 1], gather_kv_ref(k_buffer, slots, torch.float32),
                             gather_kv_ref(v_buffer, slots, torch.float32), sm_scale * k_scale)
        o, lse = o[0], lse[0]
        if b in prefix_of:
            po, plse, _ = prefix_of[b]
            m = torch.maximum(lse, plse)
            wa, wb = torch.exp(lse - m), torch.exp(plse - m)
            o = (o * wa[:, None] + po * wb[:, None]) / (wa + wb)[:, None]
        out[b] = o * v_scale
    return out.to(q.dtype)

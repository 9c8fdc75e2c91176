"""Attention backends over the token-level KV pool: store the new K/V, then extend or decode."""
from __future__ import annotations

from typing import Protocol

import torch

from radixlm.kernels.attention_ref import decode_attention_ref, extend_attention_ref
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool


class AttentionBackend(Protocol):
    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T,Hq,D], k/v [T,Hkv,D] of the new tokens -> attention output [T,Hq,D]."""
        ...


class TorchAttentionBackend:
    """Reference backend: runs anywhere torch runs (the CPU path)."""

    def __init__(self, req_to_token_pool: ReqToTokenPool, kv_pool: TokenToKVPool, sm_scale: float) -> None:
        self.req_to_token = req_to_token_pool.req_to_token
        self.kv_pool = kv_pool
        self.sm_scale = sm_scale

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        k_buf = self.kv_pool.k_buffer[layer_id]
        v_buf = self.kv_pool.v_buffer[layer_id]
        k_buf[batch.out_cache_loc] = k.to(k_buf.dtype)
        v_buf[batch.out_cache_loc] = v.to(v_buf.dtype)
        if batch.mode is ForwardMode.DECODE:
            return decode_attention_ref(
                q, k_buf, v_buf, self.req_to_token, batch.req_pool_indices, batch.seq_lens,
                self.sm_scale, max_seq_len=batch.max_seq_len,
            )
        return extend_attention_ref(
            q, k_buf, v_buf, self.req_to_token, batch.req_pool_indices_cpu, batch.seq_lens_cpu,
            batch.extend_seq_lens_cpu, self.sm_scale,
        )

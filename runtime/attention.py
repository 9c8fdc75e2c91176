"""Paged attention over the token-level KV pool: store the new K/V, then extend or decode.

One backend class for every device: the kernels bundle decides whether that is the torch
reference (CPU) or the Triton kernels (GPU). Metadata is built once per forward pass.
"""
from __future__ import annotations

import torch

from radixlm.kernels import AttentionMetadata, KernelOps
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.kv_pool import ReqToTokenPool, TokenToKVPool


class PagedAttentionBackend:
    def __init__(self, ops: KernelOps, req_to_token_pool: ReqToTokenPool, kv_pool: TokenToKVPool, sm_scale: float) -> None:
        self.ops = ops
        self.req_to_token = req_to_token_pool.req_to_token
        self.kv_pool = kv_pool
        self.sm_scale = sm_scale
        self.meta: AttentionMetadata | None = None

    def begin_forward(self, batch: ForwardBatch) -> None:
        if batch.mode is ForwardMode.DECODE and self.ops.decode_metadata is not None and batch.cascade is None:
            self.meta = self.ops.decode_metadata(self.req_to_token, batch.req_pool_indices, batch.seq_lens,
                                                 batch.seq_lens_cpu)
            return
        if batch.mode is ForwardMode.DECODE:
            self.meta = AttentionMetadata.for_decode(
                self.req_to_token, batch.req_pool_indices, batch.seq_lens, max_seq_len=batch.max_seq_len,
                cascade=batch.cascade,
            )
            return
        self.meta = AttentionMetadata(
            req_to_token=self.req_to_token,
            req_pool_indices=batch.req_pool_indices,
            seq_lens=batch.seq_lens,
            extend_seq_lens=batch.extend_seq_lens,
            extend_start_loc=batch.extend_start_loc,
            max_extend_len=batch.max_extend_len,
            req_pool_indices_host=tuple(batch.req_pool_indices_cpu),
            seq_lens_host=tuple(batch.seq_lens_cpu),
            extend_seq_lens_host=tuple(batch.extend_seq_lens_cpu),
            max_seq_len=batch.max_seq_len,
            tree_start=batch.tree_start,
            tree_mask=batch.tree_mask,
            tree_masks_host=batch.tree_masks_cpu,
        )

    def rotary_and_store(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch,
        cos_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Rotary on q and k, and the new K/V into the pool: in one launch where the kernels have it and the pool
        holds k's dtype (then (q, None, None): `forward` stores nothing), else (q, k, v) rotated for `forward`."""
        pool = self.kv_pool
        if self.ops.rotary_store_kv is not None and pool.dtype == k.dtype:
            q = self.ops.rotary_store_kv(q, k, v, batch.positions, cos_sin, pool.k_buffer[layer_id],
                                         pool.v_buffer[layer_id], batch.out_cache_loc)
            return q, None, None
        q, k = self.ops.rotary(q, k, batch.positions, cos_sin)
        return q, k, v

    def decode_with_rotary(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layer_id: int, batch: ForwardBatch,
        cos_sin: torch.Tensor,
    ) -> torch.Tensor | None:
        """Plain decode on the Triton kernels (no cascade layout, a pool of k's dtype): rotary on q and k, the new
        K/V into the pool and the attention in one launch of the attention's first stage (one launch a layer
        fewer than `rotary_and_store`, then `forward`; the same values); None where that does not apply."""
        pool = self.kv_pool
        meta = self.meta
        if (not self.ops.decode_takes_rope or batch.mode is not ForwardMode.DECODE or meta is None
                or meta.cascade is not None or pool.dtype != k.dtype or self.ops.rotary_table is not None):
            return None
        from radixlm.kernels import decode_attention as da

        if not da.ROPE_IN_STAGE1:
            return None
        rope = da.RopeStore(k, v, batch.positions, cos_sin, batch.out_cache_loc)
        return self.ops.decode_attention(q, pool.k_buffer[layer_id], pool.v_buffer[layer_id], meta, self.sm_scale,
                                         k_scale=pool.k_scales[layer_id], v_scale=pool.v_scales[layer_id], rope=rope)

    def forward(
        self, q: torch.Tensor, k: torch.Tensor | None, v: torch.Tensor | None, layer_id: int, batch: ForwardBatch
    ) -> torch.Tensor:
        """q [T,Hq,D], k/v [T,Hkv,D] of the new tokens -> attention output [T,Hq,D]; k, v None: already stored
        (`rotary_and_store`)."""
        assert self.meta is not None, "begin_forward() must run before the layers"
        pool = self.kv_pool
        k_buf, v_buf = pool.k_buffer[layer_id], pool.v_buffer[layer_id]
        k_scale, v_scale = pool.k_scales[layer_id], pool.v_scales[layer_id]  # 1.0 unless an FP8 pool
        if k is not None and v is not None:
            self.ops.store_kv(k_buf, v_buf, batch.out_cache_loc, k, v, k_scale, v_scale)
        attend = self.ops.decode_attention if batch.mode is ForwardMode.DECODE else self.ops.extend_attention
        return attend(q, k_buf, v_buf, self.meta, self.sm_scale, k_scale=k_scale, v_scale=v_scale)

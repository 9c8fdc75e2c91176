"""One calling convention for attention on both backends: a per-batch `AttentionMetadata`.

The Triton kernels want device tensors (no host sync, CUDA-graph friendly); the torch reference
for extend loops over requests and wants host lists. The metadata carries both, built once per
forward pass by the model runner and shared by every layer.
"""
from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from .attention_ref import cascade_decode_attention_ref, decode_attention_ref, extend_attention_ref

if TYPE_CHECKING:
    from .cascade_layout import CascadeLayout
    from .decode_attention import RopeStore


@dataclass(frozen=True)
class AttentionMetadata:
    """Batch description for paged attention.

    req_to_token      [R, L] int32   slot of each (request row, position)
    req_pool_indices  [B] int        request rows (device)
    seq_lens          [B] int        KV length incl. the new tokens (device)
    extend_seq_lens   [B] int        new tokens per request (device; extend only)
    extend_start_loc  [B] int        offset of each request's first new token in q (device; extend)
    max_extend_len                   host bound on extend_seq_lens (sizes the Triton grid)
    *_host                           host copies, used by the torch reference of extend
    max_seq_len                      optional host bound on seq_lens (saves the decode ref a sync)
    num_kv_splits                    optional override of the decode kernel's KV split count
    cascade                          decode: groups of rows sharing a prefix (kernels/cascade_attention.py)
    kv_slots, kv_valid               decode on the CPU (`cpu_ops.decode_metadata`): [B, L] int64 KV slots
                                     and validity mask (None: every row has L tokens), built once per forward
    kv_in_place                      decode on the CPU: the C kernel (`cpu_native`) reads req_to_token and the
                                     pool in place; req_pool_indices and seq_lens are then int64 host tensors
    tree_start, tree_mask            extend: draft trees' ancestor matrices ([B] int64 offsets, -1: causal;
                                     flat int8), on the device; tree_masks_host: the same per request (or None)
    """

    req_to_token: torch.Tensor
    req_pool_indices: torch.Tensor
    seq_lens: torch.Tensor
    extend_seq_lens: torch.Tensor | None = None
    extend_start_loc: torch.Tensor | None = None
    max_extend_len: int = 0
    req_pool_indices_host: tuple[int, ...] | None = None
    seq_lens_host: tuple[int, ...] | None = None
    extend_seq_lens_host: tuple[int, ...] | None = None
    max_seq_len: int | None = None
    num_kv_splits: int | None = None
    cascade: CascadeLayout | None = None
    kv_slots: torch.Tensor | None = None
    kv_valid: torch.Tensor | None = None
    kv_in_place: bool = False
    tree_start: torch.Tensor | None = None
    tree_mask: torch.Tensor | None = None
    tree_masks_host: tuple[torch.Tensor | None, ...] | None = None

    @property
    def batch_size(self) -> int:
        return int(self.req_pool_indices.shape[0])

    @classmethod
    def for_decode(
        cls,
        req_to_token: torch.Tensor,
        req_pool_indices: torch.Tensor,
        seq_lens: torch.Tensor,
        *,
        max_seq_len: int | None = None,
        num_kv_splits: int | None = None,
        cascade: CascadeLayout | None = None,
    ) -> AttentionMetadata:
        """Decode batch from device tensors (in-place updatable, e.g. for CUDA-graph replay)."""
        return cls(
            req_to_token, req_pool_indices, seq_lens, max_seq_len=max_seq_len, num_kv_splits=num_kv_splits,
            cascade=cascade,
        )

    @classmethod
    def for_extend(
        cls,
        req_to_token: torch.Tensor,
        req_pool_indices: Sequence[int],
        seq_lens: Sequence[int],
        extend_seq_lens: Sequence[int],
    ) -> AttentionMetadata:
        """Extend batch from host lists (the scheduler has them); one small copy per tensor."""
        dev = req_to_token.device
        ext = [int(n) for n in extend_seq_lens]
        starts = [0] * len(ext)
        for i in range(1, len(ext)):
            starts[i] = starts[i - 1] + ext[i - 1]
        return cls(
            req_to_token=req_to_token,
            req_pool_indices=torch.tensor(list(req_pool_indices), dtype=torch.int64, device=dev),
            seq_lens=torch.tensor(list(seq_lens), dtype=torch.int64, device=dev),
            extend_seq_lens=torch.tensor(ext, dtype=torch.int64, device=dev),
            extend_start_loc=torch.tensor(starts, dtype=torch.int64, device=dev),
            max_extend_len=max(ext, default=0),
            req_pool_indices_host=tuple(int(r) for r in req_pool_indices),
            seq_lens_host=tuple(int(n) for n in seq_lens),
            extend_seq_lens_host=tuple(ext),
            max_seq_len=max((int(n) for n in seq_lens), default=0),
        )


def _fill(out: torch.Tensor | None, result: torch.Tensor) -> torch.Tensor:
    if out is None:
        return result
    out.copy_(result)
    return out


def decode_attention_torch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    if meta.cascade is not None:  # the cascade arithmetic itself (prefix once per group, LSE merge)
        groups = [(list(g.rows), g.prefix_len) for g in meta.cascade.groups]
        result = cascade_decode_attention_ref(
            q, k_buffer, v_buffer, meta.req_to_token, meta.req_pool_indices.tolist(), meta.seq_lens.tolist(),
            sm_scale, groups, k_scale=k_scale, v_scale=v_scale)
        return _fill(out, result)
    result = decode_attention_ref(
        q, k_buffer, v_buffer, meta.req_to_token, meta.req_pool_indices, meta.seq_lens, sm_scale,
        max_seq_len=meta.max_seq_len, k_scale=k_scale, v_scale=v_scale,
    )
    return _fill(out, result)


def extend_attention_torch(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    if meta.extend_seq_lens is None and meta.extend_seq_lens_host is None:
        raise ValueError("extend attention needs extend_seq_lens in the metadata")

    def host(values: tuple[int, ...] | None, tensor: torch.Tensor | None) -> list[int]:
        assert values is not None or tensor is not None
        return list(values) if values is not None else [int(x) for x in tensor.tolist()]  # type: ignore[union-attr]

    result = extend_attention_ref(
        q, k_buffer, v_buffer, meta.req_to_token,
        host(meta.req_pool_indices_host, meta.req_pool_indices),
        host(meta.seq_lens_host, meta.seq_lens),
        host(meta.extend_seq_lens_host, meta.extend_seq_lens),
        sm_scale, k_scale=k_scale, v_scale=v_scale, tree_masks=meta.tree_masks_host,
    )
    return _fill(out, result)


def decode_attention_triton(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
    pdl: bool = False,
    rope: RopeStore | None = None,
) -> torch.Tensor:
    """`rope`: q before rotary, the new K/V stored by the kernel (`decode_attention.RopeStore`)."""
    from .decode_attention import decode_attention

    return decode_attention(
        q, k_buffer, v_buffer, meta.req_to_token, meta.req_pool_indices, meta.seq_lens, sm_scale,
        num_kv_splits=meta.num_kv_splits, out=out, k_scale=k_scale, v_scale=v_scale, cascade=meta.cascade, pdl=pdl,
        rope=rope,
    )


def extend_attention_triton(
    q: torch.Tensor,
    k_buffer: torch.Tensor,
    v_buffer: torch.Tensor,
    meta: AttentionMetadata,
    sm_scale: float,
    *,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,
    v_scale: float = 1.0,
) -> torch.Tensor:
    from .extend_attention import extend_attention

    if meta.extend_seq_lens is None or meta.extend_start_loc is None:
        raise ValueError("extend attention needs extend_seq_lens/extend_start_loc in the metadata")
    max_ext = meta.max_extend_len
    if max_ext <= 0 and meta.extend_seq_lens_host is not None:
        max_ext = max(meta.extend_seq_lens_host, default=0)
    if max_ext <= 0:
        max_ext = q.shape[0]  # safe upper bound, no device sync
    return extend_attention(
        q, k_buffer, v_buffer, meta.req_to_token, meta.req_pool_indices, meta.seq_lens,
        meta.extend_seq_lens, meta.extend_start_loc, sm_scale, max_extend_len=max_ext, out=out,
        k_scale=k_scale, v_scale=v_scale, tree_start=meta.tree_start, tree_mask=meta.tree_mask,
    )

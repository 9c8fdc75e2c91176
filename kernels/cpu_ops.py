"""The decoder's ops on a CPU: the torch reference's math in fewer dispatches (issue 20).

A batch-1 decode step of a small model on a CPU is made of hundreds of tiny ops, each costing a
few microseconds of dispatch, so the step's time is as much the op count as the arithmetic. These
functions compute what `ops_ref` computes with fewer calls. Where the C kernels built
(`cpu_native`: a C compiler on the machine) and the tensors are float32 with dense rows:

- rms_norm / fused_add_rms_norm / silu_and_mul: one C call each (torch's CPU `rms_norm` is itself
  six ops); within float32 rounding of the reference (its own summation order);
- rotary: one C call for q and k from the step's cos/sin rows (`rope_rows`, gathered once per
  forward through the bundle's `rotary_table`), bit for bit equal to the reference;
- decode attention: the C kernel reads each request's slots from req_to_token and its K/V rows
  from the pool in place (`decode_metadata` marks the metadata `kv_in_place`).

Otherwise torch ops: `rms_norm` (one call), rotary with a `roll`, and decode attention over the
KV slots gathered once per forward pass in `decode_metadata` (K/V rows by `index_select`, the query
heads of one KV head as that head's query rows). store_kv is `index_copy_` into a float pool.
Anything else (FP8 pools, other dtypes) falls through to the reference.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .api import AttentionMetadata, decode_attention_torch
from .cpu_native import decode_kernels_library
from .ops_ref import fused_add_rms_norm_ref, rms_norm_ref, rotary_ref, store_kv_ref


def _rows(x: torch.Tensor) -> bool:
    """x is float32 [rows, dim] with dense rows: what the C kernels take."""
    return x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return rms_norm_ref(x, weight, eps)
    lib = decode_kernels_library()
    if lib is None or not _rows(x) or not weight.is_contiguous():
        return F.rms_norm(x, (x.shape[-1],), weight, eps)
    out = torch.empty(x.shape, dtype=torch.float32)
    lib.radixlm_rms_norm_f32(x.data_ptr(), x.stride(0), weight.data_ptr(), eps, out.data_ptr(), x.shape[0], x.shape[1],
                             torch.get_num_threads())
    return out


def fused_add_rms_norm_cpu(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dtype != torch.float32 or weight.dtype != torch.float32:
        return fused_add_rms_norm_ref(x, residual, weight, eps)
    lib = decode_kernels_library()
    if lib is None or not _rows(x) or not _rows(residual) or x.shape != residual.shape or not weight.is_contiguous():
        summed = x + residual
        return F.rms_norm(summed, (x.shape[-1],), weight, eps), summed
    normed, summed = torch.empty(x.shape, dtype=torch.float32), torch.empty(x.shape, dtype=torch.float32)
    lib.radixlm_add_rms_norm_f32(x.data_ptr(), x.stride(0), residual.data_ptr(), residual.stride(0), weight.data_ptr(),
                                 eps, normed.data_ptr(), summed.data_ptr(), x.shape[0], x.shape[1],
                                 torch.get_num_threads())
    return normed, summed


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    lib = decode_kernels_library()
    if lib is None or not _rows(x):
        gate, up = x.chunk(2, dim=-1)
        return F.silu(gate).mul_(up)
    inter = x.shape[1] // 2
    out = torch.empty((x.shape[0], inter), dtype=torch.float32)
    lib.radixlm_silu_mul_f32(x.data_ptr(), x.stride(0), out.data_ptr(), x.shape[0], inter, torch.get_num_threads())
    return out


@dataclass(frozen=True)
class RopeRows:
    """One forward pass's rotary factors, shared by every layer: [T, 1, D] cos|cos and -sin|sin."""

    cos2: torch.Tensor
    sin2: torch.Tensor


def rope_rows(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> RopeRows:
    rows = cos_sin_cache.index_select(0, positions).float()  # [T, D] = [cos | sin]
    half = rows.shape[-1] // 2
    cos, sin = rows[:, :half], rows[:, half:]
    return RopeRows(torch.cat((cos, cos), dim=-1).unsqueeze(1), torch.cat((-sin, sin), dim=-1).unsqueeze(1))


def rotary_cpu(
    q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor | RopeRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Neox rotary as `rotary_ref`: [x1 | x2] -> [x1 cos - x2 sin | x2 cos + x1 sin], bit for bit
    (x1 cos + x2 (-sin) is the same float as x1 cos - x2 sin). `cos_sin`: the cache, or the step's
    `rope_rows` (what the model passes when the bundle has `rotary_table`)."""
    if q.dtype != torch.float32 or k.dtype != torch.float32:
        cache = cos_sin if isinstance(cos_sin, torch.Tensor) else None
        if cache is None:
            raise ValueError("rotary_cpu: non-float32 q/k need the cos/sin cache, not the step's rows")
        return rotary_ref(q, k, positions, cache)
    rope = cos_sin if isinstance(cos_sin, RopeRows) else rope_rows(positions, cos_sin)
    lib = decode_kernels_library()
    if (lib is not None and _heads(q) and _heads(k) and q.shape[0] == k.shape[0] == rope.cos2.shape[0]
            and rope.cos2.is_contiguous() and rope.sin2.is_contiguous() and rope.cos2.shape[-1] == q.shape[-1]):
        return _rotary_c(lib, q, k, rope)
    half = q.shape[-1] // 2

    def rotate(x: torch.Tensor) -> torch.Tensor:
        return (x * rope.cos2).add_(torch.roll(x, half, dims=-1).mul_(rope.sin2))

    return rotate(q), rotate(k)


def _heads(x: torch.Tensor) -> bool:
    """x is [T, H, D] with dense heads (any token stride, e.g. a view of the fused qkv output)."""
    return x.dim() == 3 and x.stride(2) == 1 and x.stride(1) == x.shape[2]


def _rotary_c(lib: ctypes.CDLL, q: torch.Tensor, k: torch.Tensor, rope: RopeRows) -> tuple[torch.Tensor, torch.Tensor]:
    tokens, hq, dim = q.shape
    q_out, k_out = torch.empty(q.shape, dtype=torch.float32), torch.empty(k.shape, dtype=torch.float32)
    lib.radixlm_rotary_f32(q.data_ptr(), q.stride(0), hq, k.data_ptr(), k.stride(0), k.shape[1], dim,
                           rope.cos2.data_ptr(), rope.sin2.data_ptr(), q_out.data_ptr(), k_out.data_ptr(), tokens,
                           torch.get_num_threads())
    return q_out, k_out


def store_kv_cpu(
    k_buffer: torch.Tensor, v_buffer: torch.Tensor, slots: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
    k_scale: float = 1.0, v_scale: float = 1.0,
) -> None:
    if k_buffer.dtype != k.dtype or v_buffer.dtype != v.dtype:  # FP8 pool, or a cast
        store_kv_ref(k_buffer, v_buffer, slots, k, v, k_scale, v_scale)
        return
    k_buffer.index_copy_(0, slots, k)
    v_buffer.index_copy_(0, slots, v)


def decode_metadata(
    req_to_token: torch.Tensor, req_pool_indices: torch.Tensor, seq_lens: torch.Tensor, seq_lens_host: list[int]
) -> AttentionMetadata:
    """A decode batch's metadata, once for all layers. With the C kernel: int64 rows and lengths it
    reads req_to_token and the pool with. Without: the KV slots [B, L] (int64) and validity mask
    [B, L] (None when every row has L tokens) that the torch path gathers K/V with."""
    max_len = max(seq_lens_host)
    if max_len > req_to_token.shape[1] or min(seq_lens_host) < 1:
        raise ValueError(f"decode seq_lens {min(seq_lens_host)}..{max_len} outside 1..{req_to_token.shape[1]}")
    if decode_kernels_library() is not None and req_to_token.is_contiguous():
        return AttentionMetadata(req_to_token, req_pool_indices.long().contiguous(), seq_lens.long().contiguous(),
                                 max_seq_len=max_len, kv_in_place=True)
    slots = req_to_token.index_select(0, req_pool_indices)[:, :max_len].long()
    valid = None
    if min(seq_lens_host) != max_len:
        valid = torch.arange(max_len, device=seq_lens.device)[None, :] < seq_lens[:, None]
    return AttentionMetadata(req_to_token, req_pool_indices, seq_lens, max_seq_len=max_len, kv_slots=slots,
                             kv_valid=valid)


def decode_attention_cpu(
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
    """`decode_attention_ref`'s result: the C kernel over the pool in place, else SDPA over the
    slots `decode_metadata` gathered, else (FP8 pools, an `out` buffer, head dims the kernel's
    16-float vectors do not divide) the reference."""
    same_dtype = k_buffer.dtype == q.dtype and v_buffer.dtype == q.dtype and out is None
    if meta.kv_in_place and same_dtype and q.dtype == torch.float32 and q.shape[-1] % 16 == 0:
        return _decode_attention_in_place(q, k_buffer, v_buffer, meta, sm_scale * k_scale, v_scale)
    slots = meta.kv_slots
    if slots is None or not same_dtype:
        return decode_attention_torch(q, k_buffer, v_buffer, meta, sm_scale, out=out, k_scale=k_scale,
                                      v_scale=v_scale)
    b, length = slots.shape
    flat = slots.reshape(-1)
    k = k_buffer.index_select(0, flat).view(b, length, *k_buffer.shape[1:]).transpose(1, 2)  # [B, Hkv, L, D]
    v = v_buffer.index_select(0, flat).view(b, length, *v_buffer.shape[1:]).transpose(1, 2)
    mask = None if meta.kv_valid is None else meta.kv_valid[:, None, None, :]
    # The query heads sharing a KV head become that head's query rows (all at one position, so no
    # causal mask): SDPA then reads each K/V row once instead of repeating K/V per query head.
    hkv, hq = k.shape[1], q.shape[1]
    o = F.scaled_dot_product_attention(q.view(b, hkv, hq // hkv, q.shape[-1]), k, v, attn_mask=mask,
                                       scale=sm_scale * k_scale).reshape(b, hq, -1)
    return o if v_scale == 1.0 else (o * v_scale).to(q.dtype)


def _decode_attention_in_place(
    q: torch.Tensor, k_buffer: torch.Tensor, v_buffer: torch.Tensor, meta: AttentionMetadata, scale: float,
    v_scale: float,
) -> torch.Tensor:
    lib = decode_kernels_library()
    assert lib is not None and k_buffer.is_contiguous() and v_buffer.is_contiguous()
    q = q.contiguous()
    b, hq, dim = q.shape
    hkv = k_buffer.shape[1]
    rows, lens, r2t = meta.req_pool_indices, meta.seq_lens, meta.req_to_token
    if rows.shape[0] != b or hq % hkv or k_buffer.shape[2] != dim:
        raise ValueError(f"decode attention: q {tuple(q.shape)} vs {rows.shape[0]} rows, K/V {tuple(k_buffer.shape)}")
    o = torch.empty_like(q)
    status = lib.radixlm_decode_attention_f32(
        q.data_ptr(), k_buffer.data_ptr(), v_buffer.data_ptr(), r2t.data_ptr(), r2t.stride(0), rows.data_ptr(),
        lens.data_ptr(), b, hq, hkv, dim, scale, o.data_ptr(), torch.get_num_threads())
    if status != 0:
        raise MemoryError("decode attention: the C kernel could not allocate its score buffer")
    return o if v_scale == 1.0 else o.mul_(v_scale)

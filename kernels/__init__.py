"""Compute kernels of the decoder: Triton on the GPU, torch references on the CPU.

The model takes its ops from one `KernelOps` bundle so the backend is a single switch:

    ops = get_kernel_ops(use_triton=triton_available())
    h = ops.rms_norm(x, w, eps)
    meta = AttentionMetadata.for_decode(req_to_token, req_pool_indices, seq_lens)
    o = ops.decode_attention(q, k_buffer, v_buffer, meta, sm_scale)

Triton modules are imported lazily: importing this package never imports triton, so
TRITON_INTERPRET may be set afterwards and CPU-only installs work without it.
"""
from __future__ import annotations

import functools
import importlib.util
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from . import ops_ref
from .api import AttentionMetadata, decode_attention_torch, extend_attention_torch


class AttentionFn(Protocol):
    def __call__(
        self,
        q: torch.Tensor,
        k_buffer: torch.Tensor,
        v_buffer: torch.Tensor,
        meta: AttentionMetadata,
        sm_scale: float,
        *,
        out: torch.Tensor | None = None,
        k_scale: float = 1.0,
        v_scale: float = 1.0,
    ) -> torch.Tensor: ...


@dataclass(frozen=True)
class KernelOps:
    """The decoder's ops for one backend; elementwise ones have exactly the ops_ref signatures."""

    name: str
    rms_norm: Callable[[torch.Tensor, torch.Tensor, float], torch.Tensor]
    fused_add_rms_norm: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]
    ]
    silu_and_mul: Callable[[torch.Tensor], torch.Tensor]
    rotary: Callable[
        [torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]
    ]
    store_kv: Callable[..., None]  # (k_buffer, v_buffer, slots, k, v, k_scale=1.0, v_scale=1.0)
    decode_attention: AttentionFn
    extend_attention: AttentionFn
    # Builds a decode batch's metadata once per forward (req_to_token, req_pool_indices, seq_lens,
    # seq_lens_host); None: AttentionMetadata.for_decode.
    decode_metadata: Callable[..., AttentionMetadata] | None = None
    # (positions, cos_sin_cache) -> what this bundle's `rotary` takes instead of the cache, built once
    # per forward; None: rotary takes the cache itself.
    rotary_table: Callable[[torch.Tensor, torch.Tensor], object] | None = None
    # (q, k, v, positions, cos_sin_cache, k_buffer, v_buffer, slots) -> rotated q, with rotary(k) and v written
    # to the pool's slots in the same launch (a pool of k's dtype); None: rotary, then store_kv.
    rotary_store_kv: Callable[..., torch.Tensor] | None = None
    # decode_attention takes `rope=` (kernels/decode_attention.RopeStore): q and k before rotary, the new K/V
    # stored by its first stage — rotary, KV store and attention in one launch
    decode_takes_rope: bool = False


def triton_available() -> bool:
    """True when triton imports and can run: a CUDA device, or the CPU interpreter (TRITON_INTERPRET=1)."""
    if importlib.util.find_spec("triton") is None:
        return False
    if os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes"):
        return True
    return torch.cuda.is_available()


@functools.cache
def get_kernel_ops(use_triton: bool, pdl: bool = False) -> KernelOps:
    """The Triton bundle if `use_triton`, else the torch references (the CPU path).

    `pdl` (Triton): the decode layer's small kernels (norms, rotary, KV store, SiLU-and-mul, decode
    attention) launch with programmatic dependent launch where the device has it (kernels/gdc.py):
    each one's launch overlaps its predecessor's work; the results are the same bits."""
    if not use_triton:
        return KernelOps(
            name="torch",
            rms_norm=ops_ref.rms_norm_ref,
            fused_add_rms_norm=ops_ref.fused_add_rms_norm_ref,
            silu_and_mul=ops_ref.silu_and_mul_ref,
            rotary=ops_ref.rotary_ref,
            store_kv=ops_ref.store_kv_ref,
            decode_attention=decode_attention_torch,
            extend_attention=extend_attention_torch,
        )
    if not triton_available():
        raise RuntimeError("Triton kernels requested but triton is missing or no CUDA device is present")
    from . import ops
    from .api import decode_attention_triton, extend_attention_triton

    def launch(kernel: Callable[..., Any]) -> Callable[..., Any]:
        return functools.partial(kernel, pdl=True) if pdl else kernel

    return KernelOps(
        name="triton+pdl" if pdl else "triton",
        rms_norm=launch(ops.rms_norm),
        fused_add_rms_norm=launch(ops.fused_add_rms_norm),
        silu_and_mul=launch(ops.silu_and_mul),
        rotary=launch(ops.rotary),
        store_kv=launch(ops.store_kv),
        decode_attention=launch(decode_attention_triton),
        extend_attention=extend_attention_triton,
        rotary_store_kv=launch(ops.rotary_store_kv),
        decode_takes_rope=True,
    )


@functools.cache
def get_cpu_kernel_ops() -> KernelOps:
    """The references' math in fewer dispatches (`cpu_ops.py`): what a model on the CPU runs. Its C
    kernels are built here (once per machine, ~1 s) rather than at the first request."""
    from . import cpu_native, cpu_ops

    cpu_native.decode_kernels_library()

    return KernelOps(
        name="cpu",
        rms_norm=cpu_ops.rms_norm_cpu,
        fused_add_rms_norm=cpu_ops.fused_add_rms_norm_cpu,
        silu_and_mul=cpu_ops.silu_and_mul_cpu,
        rotary=cpu_ops.rotary_cpu,
        store_kv=cpu_ops.store_kv_cpu,
        decode_attention=cpu_ops.decode_attention_cpu,
        extend_attention=extend_attention_torch,
        decode_metadata=cpu_ops.decode_metadata,
        rotary_table=cpu_ops.rope_rows,
    )


__all__ = ["AttentionMetadata", "KernelOps", "get_cpu_kernel_ops", "get_kernel_ops", "triton_available"]

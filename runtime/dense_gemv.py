"""Which dense (bf16 / fp16) linear layers take the M = 1 GEMV kernel (kernels/bf16_gemv.py) instead of cuBLAS.

The model runner calls `attach_dense_gemv` once after loading on a GPU: every column- / row-parallel linear
with a plain half-precision weight whose shape has a measured config in the kernel's table gets a `DenseGemv`,
which its forward calls for single-row inputs (batch-1 decode); every other shape, batch size and dtype keeps
torch's product. The tickets of the kernel's split-K belong to the weight, so CUDA graphs replay them.
"""
from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from radixlm.kernels.small_m import SmallMConfig

# --decode-gemv-norm auto: off (benchmarks/decode_lean.py measures it in (a) on the H200; RESULTS.md)
NORM_AUTO_ON = False


def norm_fusion_enabled(mode: str) -> bool:
    """--decode-gemv-norm `mode` (auto / on / off): whether the qkv / gate_up GEMVs take the add + RMSNorm."""
    return mode == "on" or (mode == "auto" and NORM_AUTO_ON)


class DenseGemv:
    """One weight's M = 1 kernel launch: its config, its split-K tickets, PDL on or off, and whether the decoder
    computes the add + RMSNorm before this layer inside it (`fuse_norm`, --decode-gemv-norm)."""

    def __init__(self, weight: torch.Tensor, cfg: SmallMConfig, pdl: bool = False, fuse_norm: bool = False) -> None:
        self.weight = weight
        self.cfg = cfg
        self.pdl = pdl
        self.fuse_norm = fuse_norm
        from radixlm.kernels.bf16_gemv import gemv_tickets

        self.tickets = gemv_tickets(weight.shape[0], cfg, weight.device)

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias); `silu_mul`: x is the MLP's [gate | up] and the product is of silu(gate) * up."""
        from radixlm.kernels.bf16_gemv import bf16_gemv

        return bf16_gemv(x, self.weight, self.cfg, self.tickets, bias, self.pdl, silu_mul)

    def add_norm(self, x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(rms_norm(x [+ residual]) @ W^T, x + residual) in one launch (kernels/bf16_gemv.bf16_gemv_add_norm)."""
        from radixlm.kernels.bf16_gemv import bf16_gemv_add_norm

        return bf16_gemv_add_norm(x, residual, norm_weight, eps, self.weight, self.cfg, self.tickets, self.pdl)


def attach_kernels(model: nn.Module, attr: str, make: Callable[[nn.Module], Any]) -> list[str]:
    """Set `attr` of every column- / row-parallel linear of `model`: `make(module)` (None: no kernel for its shape)
    where a bf16 / fp16 Triton kernel can take its product, else None (a stale one goes); the names of the layers
    that got one. Such a weight: on CUDA, half precision, 2-D with unit column stride, not quantized, no bias
    (cuBLAS adds a bias before rounding; Qwen2's qkv keeps it)."""
    from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear

    attached = []
    for name, module in model.named_modules():
        if not isinstance(module, (ColumnParallelLinear, RowParallelLinear)):
            continue
        weight = module.weight
        plain = (module.quantized is None and weight.is_cuda and weight.dim() == 2 and module.bias is None
                 and weight.dtype in (torch.bfloat16, torch.float16) and weight.stride(1) == 1)
        setattr(module, attr, make(module) if plain else None)
        if getattr(module, attr) is not None:
            attached.append(name)
    return attached


def attach_dense_gemv(model: nn.Module, pdl: bool = False, fuse_norm: bool = False) -> list[str]:
    """Give each eligible linear of `model` its `DenseGemv` (and take it away from the others); the names of
    the layers that got one. Eligible: `attach_kernels`' plain half-precision weights whose shape is in the
    kernel's table. `fuse_norm`: the column-parallel ones (qkv, gate_up) take the decoder's add + RMSNorm into
    their loads where the model asks them to."""
    from radixlm.kernels.bf16_gemv import config_for
    from radixlm.runtime.parallel.layers import ColumnParallelLinear

    def make(module: nn.Module) -> DenseGemv | None:
        cfg = config_for(*module.weight.shape)
        fuse = fuse_norm and isinstance(module, ColumnParallelLinear)
        return None if cfg is None else DenseGemv(module.weight, cfg, pdl, fuse)
    return attach_kernels(model, "gemv", make)

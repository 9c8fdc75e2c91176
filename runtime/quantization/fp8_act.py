"""FP8 linears whose input is quantized by the kernel that produces it (W8A8 sizes, issue 19).

Above W8A16_MAX_M rows an FP8 linear quantizes its input per token, then runs `torch._scaled_mm`. For qkv
and gate_up the input is an RMSNorm's output (after the residual add), for down SiLU-and-mul's: on the GPU
those kernels emit the e4m3 codes and per-token scales themselves (kernels/fp8_act_quant.py), so the bf16
activation is never written nor read back and the quantization launch disappears. The codes and scales are
those of the separate kernels bit for bit, so the layer's output is the same.

The model's decoder calls these where it would call the norm / activation and then the layer; each returns
None where the fusion does not apply (not an FP8 weight, W8A16 sizes, an active LoRA update, which reads the
bf16 activation), and the caller runs the separate kernels. Off the GPU's Triton bundle they run the
bundle's own norm / activation and `quantize_rows`: what the layer itself would do, in the same order.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.distributed as dist

from radixlm.runtime.quantization.fp8 import _MIN_SCALE, W8A16_MAX_M, Fp8Weight, quantize_rows

if TYPE_CHECKING:
    from radixlm.kernels import KernelOps
    from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear


def fused_input_weight(layer: ColumnParallelLinear | RowParallelLinear, x: torch.Tensor) -> Fp8Weight | None:
    """The layer's FP8 weight when it takes x pre-quantized: x 2-D with more than W8A16_MAX_M rows (W8A8),
    and no active LoRA update; else None."""
    weight = layer.quantized
    if not isinstance(weight, Fp8Weight) or x.dim() != 2 or x.shape[0] <= W8A16_MAX_M:
        return None
    if layer.lora is not None and layer.lora.active:
        return None
    return weight


def _triton(ops: KernelOps) -> bool:
    return ops.name.startswith("triton")


def add_norm_linear(layer: ColumnParallelLinear, x: torch.Tensor, residual: torch.Tensor | None,
                    norm_weight: torch.Tensor, eps: float, ops: KernelOps) -> tuple[torch.Tensor, torch.Tensor | None] | None:
    """(layer(rms_norm(x + residual)), x + residual) — the sum None without a residual — with the norm emitting
    the layer's FP8 input, or None where that does not apply (`fused_input_weight`)."""
    weight = fused_input_weight(layer, x)
    if weight is None:
        return None
    if _triton(ops):
        from radixlm.kernels.fp8_act_quant import add_rms_norm_fp8

        x = x if x.stride(1) == 1 else x.contiguous()
        if residual is not None and residual.stride(1) != 1:
            residual = residual.contiguous()
        codes, scales, summed = add_rms_norm_fp8(x, residual, norm_weight, eps, _MIN_SCALE, weight.input_scale,
                                                 pdl=weight.pdl)
    else:
        if residual is None:
            normed, summed = ops.rms_norm(x, norm_weight, eps), None
        else:
            normed, summed = ops.fused_add_rms_norm(x, residual, norm_weight, eps)
        codes, scales = quantize_rows(normed, weight.input_scale)
    out = weight.linear_codes(codes, scales, x.dtype)
    return (out if layer.bias is None else out + layer.bias), summed


def silu_mul_linear(layer: RowParallelLinear, gate_up: torch.Tensor, ops: KernelOps) -> torch.Tensor | None:
    """layer(silu(gate) * up) with SiLU-and-mul emitting the layer's FP8 input (then the tensor-parallel sum),
    or None where that does not apply (`fused_input_weight`)."""
    weight = fused_input_weight(layer, gate_up)
    if weight is None:
        return None
    if _triton(ops):
        from radixlm.kernels.fp8_act_quant import silu_and_mul_fp8

        gate_up = gate_up if gate_up.stride(1) == 1 else gate_up.contiguous()
        codes, scales = silu_and_mul_fp8(gate_up, _MIN_SCALE, weight.input_scale, pdl=weight.pdl)
    else:
        codes, scales = quantize_rows(ops.silu_and_mul(gate_up), weight.input_scale)
    out = weight.linear_codes(codes, scales, gate_up.dtype)
    if layer.tp_group is not None:
        dist.all_reduce(out, group=layer.tp_group)
    return out

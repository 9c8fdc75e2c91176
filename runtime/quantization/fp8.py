"""FP8 W8A8 linear layers: float8_e4m3fn weights with per-output-channel scales, activations
quantized per token when the layer runs (dynamic) or with one checkpoint scale (static).

    W ~ codes_w * s_w[n]         (codes_w float8_e4m3fn [N, K], s_w float32 [N])
    x ~ codes_x * s_x[m]         (s_x = max|x[m]| / 448 per token, or the static input_scale)
    y = (codes_x @ codes_w^T) * s_x[m] * s_w[n]

On a Hopper (or Ada) GPU with bf16 activations the product is `torch._scaled_mm` (row-wise scales,
FP8 tensor cores, bf16 output). Everywhere else (the CPU, tests, fp16 / fp32 activations) the same
codes and scales are multiplied out in float32: the reference path has exactly the quantization
numerics of the GPU one and differs only in summation order (and the GPU's bf16 output rounding). A checkpoint's
per-tensor weight scales become per-row ones (exact: the same value on each of the tensor's rows), so
fused qkv / gate_up keep each part's scale; a static input scale of a fused layer is the largest of
its parts' (vLLM's rule: no part's activations overflow).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.quantization.base import QuantizedWeight

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # a zero row / token gets this scale, never a division by zero


def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M, K], scales float32 [M, 1]); one scale per row (max |x| / 448)
    unless `scale` (a static scale, [1] or [M, 1]) is given. Values past the range saturate."""
    xf = x.float()
    if scale is None:
        scale = (xf.abs().amax(dim=-1, keepdim=True) / FP8_MAX).clamp_min(_MIN_SCALE)
    else:
        scale = scale.float().reshape(-1, 1).expand(x.shape[0], 1)
    codes = (xf / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return codes, scale.contiguous()


@dataclass(frozen=True)
class Fp8Part:
    """One checkpoint tensor of a (possibly fused) FP8 layer: codes and scales as published."""

    codes: torch.Tensor  # float8_e4m3fn [rows, K]
    weight_scale: torch.Tensor  # float32, [1] (per tensor) or [rows] / [rows, 1] (per channel)
    input_scale: torch.Tensor | None  # static activation scale [1]; None: dynamic per token

    def row_scales(self) -> torch.Tensor:
        s = self.weight_scale.float().reshape(-1)
        rows = self.codes.shape[0]
        if s.numel() == 1:
            return s.expand(rows).contiguous()
        if s.numel() != rows:
            raise ValueError(f"weight_scale of {s.numel()} values for {rows} rows: only per-tensor or per-channel "
                             "FP8 scales are supported (not block-wise)")
        return s


class Fp8Weight(QuantizedWeight):
    """A [N, K] weight as FP8 codes and per-row scales; see the module docstring for the math."""

    def __init__(self, codes: torch.Tensor, scales: torch.Tensor, input_scale: torch.Tensor | None,
                 source: str) -> None:
        if codes.dtype != FP8:
            raise ValueError(f"FP8 codes must be float8_e4m3fn, got {codes.dtype}")
        self.out_features, self.in_features = int(codes.shape[0]), int(codes.shape[1])
        self.codes = codes.contiguous()
        self.scales = scales.float().reshape(1, -1).contiguous()  # [1, N]: _scaled_mm's row-wise scale_b
        self.input_scale = None if input_scale is None else input_scale.float().reshape(1).to(codes.device)
        self.source = source
        # torch._scaled_mm wants the weight column-major ([K, N] with stride (1, K)): codes.t() is.
        self.use_scaled_mm = (codes.is_cuda and self.out_features % 16 == 0 and self.in_features % 16 == 0
                              and torch.cuda.get_device_capability(codes.device) >= (8, 9))

    @classmethod
    def from_float(cls, weight: torch.Tensor) -> "Fp8Weight":
        """Online quantization of a bf16/fp16/fp32 weight: one scale per output channel."""
        codes, scales = quantize_rows(weight)
        return cls(codes, scales, None, "online")

    @classmethod
    def from_parts(cls, parts: list[Fp8Part], source: str) -> "Fp8Weight":
        """A checkpoint layer (parts stacked along the output rows: q, k, v / gate, up)."""
        static = [p.input_scale for p in parts if p.input_scale is not None]
        if static and len(static) != len(parts):
            raise ValueError("FP8 layer mixes static and dynamic activation scales across its fused parts")
        input_scale = torch.stack([s.float().reshape(()) for s in static]).max() if static else None
        codes = torch.cat([p.codes for p in parts]) if len(parts) > 1 else parts[0].codes
        scales = torch.cat([p.row_scales() for p in parts])
        return cls(codes, scales.to(codes.device), input_scale, source)

    @property
    def format(self) -> str:
        act = "static" if self.input_scale is not None else "dynamic"
        return f"fp8_e4m3[{self.source}, {act} act{', scaled_mm' if self.use_scaled_mm else ', reference'}]"

    @property
    def nbytes(self) -> int:
        return self.codes.numel() + self.scales.numel() * 4

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        xq, sx = quantize_rows(x2, self.input_scale)
        if self.use_scaled_mm and x.dtype == torch.bfloat16:  # row-wise scales take a bf16 output only
            out = torch._scaled_mm(xq, self.codes.t(), scale_a=sx, scale_b=self.scales, out_dtype=x.dtype)
        else:
            out = self.reference_matmul(xq, sx).to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def reference_matmul(self, xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """(codes_x * s_x) @ (codes_w * s_w)^T in float32: the CPU path, and the GPU's check."""
        return (xq.float() @ self.codes.float().t()) * sx * self.scales

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self.codes[ids].float() * self.scales[0, ids, None]

    def dequantize(self) -> torch.Tensor:
        return self.codes.float() * self.scales.t()


def quantize_layers_online(layers: torch.nn.Module) -> int:
    """`--quantization fp8` on an unquantized checkpoint: every linear layer of the decoder layers
    (not the embedding or the LM head, as in vLLM / SGLang) becomes an `Fp8Weight`, one layer at a
    time so the float copies are freed as it goes. Returns the number of layers quantized."""
    count = 0
    for module in layers.modules():
        if hasattr(module, "quantized") and module.quantized is None and module.weight.dim() == 2 and module.weight.numel():
            module.quantized = Fp8Weight.from_float(module.weight.data)
            module.weight.data = module.weight.data.new_empty(0)
            count += 1
    return count

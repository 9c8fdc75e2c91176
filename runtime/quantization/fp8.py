"""FP8 linear layers: float8_e4m3fn weights with per-output-channel scales; W8A16 at decode sizes,
W8A8 (activations quantized per token, or with one checkpoint scale) above them.

    W ~ codes_w * s_w[n]         (codes_w float8_e4m3fn [N, K], s_w float32 [N])
    M <= W8A16_MAX_M:  y = (x @ codes_w^T) * s_w[n]                       (weight-only, x unquantized)
    M >  W8A16_MAX_M:  x ~ codes_x * s_x[m]  (s_x = max|x[m]| / 448 per token, or the static input_scale)
                       y = (codes_x @ codes_w^T) * s_x[m] * s_w[n]

Why two numerics: at decode sizes the GEMM is bound by the weight bytes, so the activations can stay
in bf16 for free (our Triton kernel, `kernels/fp8_small_m.py`, widens the codes in registers, with
many narrow row tiles and split-K finished in the same launch so M = 1 fills the GPU) and the per-token
quantization launches disappear; at prefill sizes FP8 tensor cores pay (`torch._scaled_mm`, row-wise
scales, bf16 output, after one fused quantization kernel).
The choice depends only on M, a static shape, so CUDA graphs capture it; a sequence's prompt runs
W8A8 (M > 16 tokens) and its generated tokens W8A16 (decode batches of <= 16), which is slightly
closer to the float model than W8A8 throughout. A static input scale applies on the W8A8 side only.

Everywhere else (the CPU, tests, GPUs without FP8 tensor cores) the same codes and scales are
multiplied out in float32 with the same M rule: the reference path has exactly the quantization
numerics of the GPU one and differs only in summation order (and the GPU's bf16 output rounding). A
checkpoint's per-tensor weight scales become per-row ones (exact: the same value on each of the tensor's
rows), so fused qkv / gate_up keep each part's scale; a static input scale of a fused layer is the
largest of its parts' (vLLM's rule: no part's activations overflow).
"""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass

import torch

from radixlm.runtime.quantization.base import QuantizedWeight

FP8 = torch.float8_e4m3fn
FP8_MAX = float(torch.finfo(FP8).max)  # 448
_MIN_SCALE = 1.0 / (FP8_MAX * 512.0)  # a zero row / token gets this scale, never a division by zero
W8A16_MAX_M = 16  # rows at or below which the activations stay unquantized (benchmarks/quantized.py)
# rows up to which kernels/fp8_small_m.py runs; above, the older split-K kernel (H200 sweep of 2026-12-03: the
# new kernel won at M = 1 on all four 8B layers, 57-86% of the bytes floor, and lost to the old one at M = 2..16)
SMALL_M_KERNEL_MAX_M = 1


def quantize_rows(x: torch.Tensor, scale: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x [M, K] -> (codes float8_e4m3fn [M, K], scales float32 [M, 1]); one scale per row (max |x| / 448)
    unless `scale` (a static scale, [1] or [M, 1]) is given. Values past the range saturate."""
    xf = x.float()
    if scale is None:
        amax = xf.abs().amax(dim=-1, keepdim=True)
        # Tensor / tensor: torch on CUDA turns `tensor / python_scalar` into a multiplication by the
        # reciprocal (not correctly rounded), which made these scales differ from the fused kernel's
        # (and from the CPU's) in the last bit.
        scale = (amax / torch.full_like(amax, FP8_MAX)).clamp_min(_MIN_SCALE)
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
        self.use_triton = codes.is_cuda and importlib.util.find_spec("triton") is not None
        self.tickets: torch.Tensor | None = None  # the small-M kernel's split-K tickets (int32, zero at rest)
        if self.use_triton:
            from radixlm.kernels.small_m import tickets_for

            self.tickets = tickets_for(self.out_features, codes.device)
        self._float_codes: torch.Tensor | None = None  # the CPU reference's widened codes, made on first use

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
        small = "triton w8a16" if self.use_triton else "reference w8a16"
        large = "scaled_mm" if self.use_scaled_mm else "reference"
        return f"fp8_e4m3[{self.source}, M<={W8A16_MAX_M}: {small}, else {act} act {large}]"

    @property
    def nbytes(self) -> int:
        widened = 0 if self._float_codes is None else self._float_codes.numel() * 4
        tickets = 0 if self.tickets is None else self.tickets.numel() * 4
        return self.codes.numel() + self.scales.numel() * 4 + widened + tickets

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] <= W8A16_MAX_M:
            if self.use_triton:
                out = self._small_m(x2)
            else:
                out = self.reference_w8a16(x2).to(x.dtype)
            return out.reshape(*lead, self.out_features)
        if self.use_triton:
            from radixlm.kernels.fp8_gemm import quantize_rows_fp8

            xq, sx = quantize_rows_fp8(x2, _MIN_SCALE, self.input_scale, pdl=self.pdl)
        else:
            xq, sx = quantize_rows(x2, self.input_scale)
        return self.linear_codes(xq, sx, x.dtype).reshape(*lead, self.out_features)

    def linear_codes(self, xq: torch.Tensor, sx: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The W8A8 product of activations already quantized ([M, K] e4m3 codes, [M, 1] float32 scales: by
        `quantize_rows` or a kernel that emits them, kernels/fp8_act_quant.py) -> [M, N] in `dtype`."""
        if self.use_scaled_mm and dtype == torch.bfloat16:  # row-wise scales take a bf16 output only
            return torch._scaled_mm(xq, self.codes.t(), scale_a=sx, scale_b=self.scales, out_dtype=dtype)
        return self.reference_matmul(xq, sx).to(dtype)

    def _small_m(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode sizes: the small-M kernel (kernels/fp8_small_m.py), or the older split-K one where it is
        switched off or does not compile."""
        from radixlm.kernels import small_m
        from radixlm.kernels.fp8_gemm import w8a16_matmul
        from radixlm.kernels.fp8_small_m import fp8_small_m_matmul

        scales = self.scales.reshape(-1)
        if not small_m.enabled() or x2.shape[0] > SMALL_M_KERNEL_MAX_M:
            return w8a16_matmul(x2, self.codes, scales)
        return small_m.with_fallback("fp8", lambda: fp8_small_m_matmul(x2, self.codes, scales, self.tickets,
                                                                        pdl=self.pdl),
                                     lambda: w8a16_matmul(x2, self.codes, scales))

    def reference_matmul(self, xq: torch.Tensor, sx: torch.Tensor) -> torch.Tensor:
        """(codes_x * s_x) @ (codes_w * s_w)^T in float32: the CPU's W8A8 path, and the GPU's check."""
        return (xq.float() @ self.float_codes().t()) * sx * self.scales

    def reference_w8a16(self, x: torch.Tensor) -> torch.Tensor:
        """x @ (codes_w * s_w)^T in float32, the scale applied to the sum as the Triton kernel does."""
        return (x.float() @ self.float_codes().t()) * self.scales

    def float_codes(self) -> torch.Tensor:
        """The codes as float32 (exact). On a CPU they are kept after the first call: widening every
        weight at every step was most of the reference path's time; a GPU runs the kernels instead."""
        if self.codes.is_cuda:
            return self.codes.float()
        if self._float_codes is None:
            self._float_codes = self.codes.float()
        return self._float_codes

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

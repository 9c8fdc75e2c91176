"""GGUF weights kept 4-bit on the CPU: torch's packed int4 matmul over affine planes.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)` computes
x @ W^T with W = (c - 8) * s + z per group of 32 input columns; its fast path wants bfloat16
activations and scales (float32 ones take a scalar fallback 10-30x slower), so activations are
rounded to bfloat16 for the matmul and the output is cast back. A weight of P planes
(`gguf_blocks.AffinePlanes`) is packed as one matrix over P * K columns, the planes side by side,
and the input is repeated P times: one call, and Q8_0 stays exact (two nibbles per int8).

Large inputs (prefill) are faster through a float32 GEMM on a weight dequantized for the call
from a nibble copy we keep: the int4 kernel dequantizes per tile and is compute-bound there.
"""
from __future__ import annotations

import numpy as np
import torch

from radixlm.runtime.quantization.base import QuantizedWeight
from radixlm.runtime.quantization.gguf_blocks import GROUP, AffinePlanes

# Rows of input from which dequantize + float32 GEMM beats the int4 kernel (measured on a 2-core
# AVX-512 Xeon with the default model's shapes; see benchmarks/RESULTS.md).
DEQUANT_MIN_ROWS = 48


def int4_cpu_kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def merge_planes(parts: list[AffinePlanes]) -> AffinePlanes:
    """Stack weights along the output rows (fused qkv / gate_up); a part with fewer planes gets
    zero planes (code 8, scale 0, zero 0: contributes nothing)."""
    planes = max(int(p.codes.shape[0]) for p in parts)

    def padded(p: AffinePlanes) -> AffinePlanes:
        extra = planes - int(p.codes.shape[0])
        if not extra:
            return p
        _, n, k = p.codes.shape
        return AffinePlanes(
            codes=np.concatenate([p.codes, np.full((extra, n, k), 8, np.uint8)]),
            scales=np.concatenate([p.scales, np.zeros((extra, n, k // GROUP), np.float32)]),
            zeros=np.concatenate([p.zeros, np.zeros((extra, n, k // GROUP), np.float32)]),
        )

    parts = [padded(p) for p in parts]
    return AffinePlanes(
        codes=np.concatenate([p.codes for p in parts], axis=1),
        scales=np.concatenate([p.scales for p in parts], axis=1),
        zeros=np.concatenate([p.zeros for p in parts], axis=1),
    )


class Int4PackedWeight(QuantizedWeight):
    """A weight as P int4 planes: torch's packed layout for the matmul, nibbles for dequantizing."""

    def __init__(self, planes: AffinePlanes, source: str) -> None:
        p, n, k = planes.codes.shape
        if k % GROUP:
            raise ValueError(f"in_features {k} is not a multiple of {GROUP}")
        self.planes, self.out_features, self.in_features = int(p), int(n), int(k)
        self.source = source
        side_by_side = np.ascontiguousarray(planes.codes.transpose(1, 0, 2).reshape(n, p * k))  # [N, P*K]
        codes = torch.from_numpy(side_by_side)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scales = torch.from_numpy(np.ascontiguousarray(planes.scales.transpose(1, 0, 2).reshape(n, -1)))  # [N, P*K/32]
        zeros = torch.from_numpy(np.ascontiguousarray(planes.zeros.transpose(1, 0, 2).reshape(n, -1)))
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        # Our own copy of the codes for dequantizing (two a byte); it uses the kernel's bfloat16
        # scales and zeros, so both paths compute with the same weight.
        self.nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()

    @property
    def format(self) -> str:
        return f"int4x{self.planes}[{self.source}]"

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.scales_and_zeros, self.nibbles)
        return sum(t.numel() * t.element_size() for t in tensors)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if x2.shape[0] >= DEQUANT_MIN_ROWS:
            out = torch.matmul(x2.float(), self.dequantize().t()).to(x.dtype)
        else:
            xb = x2.to(torch.bfloat16)
            if self.planes > 1:
                xb = xb.repeat(1, self.planes)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), self.packed, GROUP, self.scales_and_zeros)
            out = out.to(x.dtype)
        return out.reshape(*lead, self.out_features)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(self.nibbles[ids], self.scales_and_zeros[:, ids])

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.nibbles, self.scales_and_zeros)

    def _dequantize(self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        n = nibbles.shape[0]
        codes = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=-1).view(n, -1, GROUP)
        sz = scales_and_zeros.float().transpose(0, 1)  # [n, groups, 2]
        w = torch.addcmul(sz[..., 1:], codes.float().sub_(8.0), sz[..., :1])
        w = w.reshape(n, self.planes, self.in_features)
        return w[:, 0] if self.planes == 1 else w.sum(1)

"""GGUF weights kept as int8 codes on a GPU: Q8_0 and Q6_K, and layers mixing them with 4-bit types.

    W[n, k] = q[n, k] * s[n, g] + o[n, g]        q int8, s / o float32, g = k // group (16 or 32)

`gguf_kquants.GroupCodes` gives each checkpoint part in this form, exactly as the gguf package
dequantizes it; fused parts (q / k / v, gate / up) of different types share the smallest group (Q6_K's
16: a 32-column scale is repeated, still exact). llama.cpp's Q4_K_M files mix Q4_K and Q6_K this way.
On a GPU the Triton kernel (`kernels/w8a16_group.py`) dequantizes tiles in registers up to
`DEQUANT_MIN_M` rows; above it the weight is dequantized for the call and cuBLAS runs (prefill).
Elsewhere (tests; the CPU serves these types dequantized) x @ W^T in float32.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import torch

from radixlm.runtime.quantization.base import DequantizedRows, QuantizedWeight
from radixlm.runtime.quantization.gguf_kquants import GroupCodes

DEQUANT_MIN_M = 512  # rows from which dequantize + cuBLAS replaces the Triton kernel


class Int8Weight(DequantizedRows, QuantizedWeight):
    """A [N, K] weight as int8 codes with float32 scales (and offsets) per 16 or 32 columns."""

    def __init__(self, parts: list[GroupCodes], source: str, device: torch.device) -> None:
        group = min(p.group for p in parts)
        parts = [p if p.group == group else p.regroup(group) for p in parts]
        if len({p.q.shape[1] for p in parts}) > 1:
            raise ValueError("fused int8 parts have different in_features")
        has_offsets = any(p.offsets is not None for p in parts)
        self.group = group
        self.codes = torch.from_numpy(np.concatenate([p.q for p in parts])).to(device)
        self.scales = torch.from_numpy(np.concatenate([p.scales for p in parts])).to(device)
        self.offsets = torch.from_numpy(np.concatenate(
            [p.offsets if p.offsets is not None else np.zeros_like(p.scales) for p in parts])).to(device) if has_offsets else None
        self.out_features, self.in_features = (int(d) for d in self.codes.shape)
        self.source = source
        self.use_triton = self.codes.is_cuda and importlib.util.find_spec("triton") is not None
        self._float_weight: torch.Tensor | None = None  # the CPU reference's weight, made on first use

    @property
    def format(self) -> str:
        path = "triton, dequant + cuBLAS" if self.use_triton else "reference"
        return f"int8[{self.source} g{self.group}{' affine' if self.offsets is not None else ''}, {path}]"

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.codes, self.scales, self.offsets, self._float_weight) if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.use_triton:
            out = (x2.float() @ self.float_weight().t()).to(x.dtype)
        elif x2.shape[0] >= DEQUANT_MIN_M:
            out = torch.matmul(x2, self.dequantize().to(x.dtype).t())
        else:
            from radixlm.kernels.w8a16_group import w8_group_matmul

            out = w8_group_matmul(x2, self.codes, self.scales, self.offsets, self.group)
        return out.reshape(*lead, self.out_features)

    def _dequantize(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """q * s (+ o) in float32, in gguf's order of operations: its dequantization bit for bit."""
        q = self.codes[rows].float()
        n = q.shape[0]
        w = q.view(n, -1, self.group) * self.scales[rows][..., None]
        if self.offsets is not None:
            w = w + self.offsets[rows][..., None]
        return w.view(n, self.in_features)

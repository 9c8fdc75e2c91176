"""The seam between the model's linear layers and however their weights are stored.

A linear layer (qkv, o, gate_up, down, the LM head, and the embedding that may share the LM head's
weight) holds either a plain `weight` parameter or a `QuantizedWeight` chosen for it at load time
(`runtime/quantization/select.py`). The model code is the same either way: it calls `linear` /
`rows` and never looks at the storage. New formats (the GPU's FP8, AWQ/GPTQ, GGUF on a GPU) are
new subclasses plus a rule in the selector.
"""
from __future__ import annotations

from abc import ABC, abstractmethod

import torch


class QuantizedWeight(ABC):
    """A [out_features, in_features] weight kept in a compressed form."""

    out_features: int
    in_features: int
    # decode kernels launched with programmatic dependent launch (sm_90+; `set_decode_pdl`): resident while
    # the previous kernel runs, weights in flight before they wait for it (results bit-identical)
    pdl: bool = False
    silu_epilogue: bool = False  # --decode-silu-epilogue: `linear_silu_mul` may fuse (`set_decode_pdl` sets it)
    split_norm: bool = False  # --decode-split-norm: batch-1 decode may split the norms across it (W4Weight)

    @abstractmethod
    def linear(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in_features] -> x @ W^T [..., out_features], in x's dtype."""

    def linear_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """For the MLP's [gate | up] weight: silu(gate) * up of x @ W^T in one launch (the bits of the product,
        then ops.silu_and_mul), or None where this weight has no such kernel for x (then the caller does both)."""
        return None

    @abstractmethod
    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """W[ids] as float32 [len(ids), in_features] (the embedding lookup of a shared weight)."""

    @abstractmethod
    def dequantize(self) -> torch.Tensor:
        """The whole weight as float32 [out_features, in_features]."""

    @property
    @abstractmethod
    def nbytes(self) -> int:
        """Bytes held for this weight (all representations together)."""

    @property
    @abstractmethod
    def format(self) -> str:
        """Short name of the storage, for logs and /get_server_info (e.g. 'int4x1[Q4_1]')."""


class DequantizedRows:
    """`dequantize`, `rows` and `float_weight` over a subclass's `_dequantize(rows)`, for the formats that
    keep integer codes (`codes`); the float32 weight is kept after first use on a CPU (the reference path)."""

    codes: torch.Tensor
    _float_weight: torch.Tensor | None

    def _dequantize(self, rows: torch.Tensor | slice) -> torch.Tensor:
        raise NotImplementedError

    def float_weight(self) -> torch.Tensor:
        """W as float32, kept after the first call on a CPU (the reference path's weight)."""
        if self.codes.is_cuda:
            return self.dequantize()
        if self._float_weight is None:
            self._float_weight = self.dequantize()
        return self._float_weight

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(slice(None))

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(ids)


def set_decode_pdl(model: torch.nn.Module, on: bool, silu_epilogue: bool = False, split_norm: bool = False) -> int:
    """Turn PDL on / off for every quantized linear of `model` whose decode kernels take it (the 4-bit GEMV,
    the FP8 small-M kernel), the gate_up SiLU-and-mul epilogue (`linear_silu_mul`) and the split norms
    (runtime/models/split_norm_decode.py); the model runner calls it with its --decode-pdl, --decode-silu-epilogue
    and --decode-split-norm decisions. Returns how many."""
    count = 0
    for module in model.modules():
        quantized = getattr(module, "quantized", None)
        if isinstance(quantized, QuantizedWeight):
            quantized.pdl = on
            quantized.silu_epilogue = silu_epilogue
            quantized.split_norm = split_norm
            count += 1
    return count


def linear_forward(weight: torch.Tensor, quantized: QuantizedWeight | None, x: torch.Tensor,
                   bias: torch.Tensor | None = None) -> torch.Tensor:
    """x @ W^T (+ bias) through the quantized form when the layer has one."""
    if quantized is None:
        return torch.nn.functional.linear(x, weight, bias)
    out = quantized.linear(x)
    return out if bias is None else out + bias

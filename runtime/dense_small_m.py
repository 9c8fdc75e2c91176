"""Which dense (bf16 / fp16) linear layers take the 2..16-row kernel (kernels/bf16_small_m.py) instead of cuBLAS.

A batch-1 speculative verify step runs the decode row and its drafts (2-9 rows, padded to the CUDA graphs' buckets
2 / 4 / 8 / 12 / 16) through every linear; decode at one row takes the M = 1 GEMV (runtime/dense_gemv.py). The model
runner calls `attach_dense_small_m` once after loading on a GPU: every plain half-precision weight with a measured
config for some row count gets a `DenseSmallM`, which the layer's forward calls for those row counts; the others
keep torch's product. The split-K tickets belong to the weight (one buffer for every row count: calls never
overlap on the stream), so CUDA graphs replay them.
"""
from __future__ import annotations

import torch
from torch import nn

from radixlm.kernels.small_m import MAX_M, SmallMConfig


class DenseSmallM:
    """One weight's small-M launches: a config per row count it serves, its split-K tickets, PDL on or off."""

    def __init__(self, weight: torch.Tensor, configs: dict[int, SmallMConfig], pdl: bool = False) -> None:
        from radixlm.kernels.small_m import tickets_for

        self.weight = weight
        self.configs = configs
        self.pdl = pdl
        self.tickets = tickets_for(weight.shape[0], weight.device)

    def covers(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] in self.configs

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None, silu_mul: bool = False) -> torch.Tensor:
        """x @ W^T (+ bias); `silu_mul`: x is the MLP's [gate | up] and the product is of silu(gate) * up."""
        from radixlm.kernels.bf16_small_m import bf16_small_m

        return bf16_small_m(x, self.weight, self.configs[x.shape[0]], self.tickets, bias, self.pdl, silu_mul)


def attach_dense_small_m(model: nn.Module, pdl: bool = False) -> list[str]:
    """Give each eligible linear of `model` its `DenseSmallM` (and take it away from the others); the names of the
    layers that got one. Eligible: `dense_gemv.attach_kernels`' plain half-precision weights with a measured config
    for at least one row count of 2..16 (kernels/bf16_small_m.py's table)."""
    from radixlm.kernels.bf16_small_m import MIN_M, config_for
    from radixlm.runtime.dense_gemv import attach_kernels

    def make(module: nn.Module) -> DenseSmallM | None:
        shape = module.weight.shape
        configs = {m: cfg for m in range(MIN_M, MAX_M + 1) if (cfg := config_for(m, *shape)) is not None}
        return DenseSmallM(module.weight, configs, pdl) if configs else None
    return attach_kernels(model, "small_m", make)

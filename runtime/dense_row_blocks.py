"""Which dense (bf16 / fp16) linear layers run a large product (a prefill chunk's rows) as row blocks.

A prefill chunk of 8,192 tokens multiplies [8192, K] activations by the MLP's weights, and neither operand fits
the GPU's L2 (the 8B shape's gate_up: 67 MB of activations, 235 MB of weight; down: 235 MB and 117 MB; the H200's
L2 holds 50 MB). cuBLAS then re-reads one of them from HBM for each tile row or column it walks. In blocks of
rows whose activations fit L2, each block streams the weight once and reads its activations from L2: on the H200,
gate_up and down at 1,024 rows ran 8-10% faster per row than at 8,192 in two GEMM-alone tables (RESULTS.md,
throughput_probe `--items gemms` and quantized.py's gemmlarge), while qkv / o (weights that fit L2) did not gain.

The model runner calls `attach_row_blocks` once after loading on a GPU: every plain half-precision weight larger
than twice the L2 (the 8B shape's gate_up, down and LM head — the head sees that many rows only when a prefill
asks for every token's logits) gets a `RowBlocks` of --gemm-row-block rows, which the layer's forward calls for
inputs of more rows than that; decode batches (at most the CUDA graphs' 1,024 rows) and smaller weights keep
torch's product. The forward runs under inference mode (a product with `out=` refuses autograd's parameters).
Each block is a product of the same operands' rows, so each output row is computed by a cuBLAS kernel as before,
only chosen for the block's row count.
"""
from __future__ import annotations

import torch
from torch import nn

# --gemm-row-block auto: 0 (off) until the engine's prefill chunks measure it on the H200 (benchmarks/b_levers.py).
AUTO_ROWS = 0


def resolve_rows(flag: int | None) -> int:
    """--gemm-row-block (None: auto) as a row count; 0 is off."""
    return AUTO_ROWS if flag is None else flag


class RowBlocks:
    """One weight's large-M product in blocks of `rows` rows, each written into its rows of one output."""

    def __init__(self, weight: torch.Tensor, rows: int) -> None:
        if rows < 1:
            raise ValueError(f"gemm_row_block: {rows} rows; a block needs at least one")
        self.weight = weight
        self.rows = rows

    def covers(self, x: torch.Tensor) -> bool:
        return x.dim() == 2 and x.shape[0] > self.rows

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x @ W^T, block by block (the layers that get one have no bias: `dense_gemv.attach_kernels`)."""
        if bias is not None:
            raise ValueError("RowBlocks: a layer with a bias keeps torch's product")
        w_t = self.weight.t()
        out = x.new_empty(x.shape[0], self.weight.shape[0])
        for start in range(0, x.shape[0], self.rows):
            end = min(start + self.rows, x.shape[0])
            torch.mm(x[start:end], w_t, out=out[start:end])
        return out


def blocked_weight(weight: torch.Tensor, l2_bytes: int) -> bool:
    """A weight worth blocking: larger than twice the L2, so that the product's activations and the weight
    cannot both stay there (qkv / o of the 8B shape, 50 / 34 MB, are not)."""
    return weight.numel() * weight.element_size() > 2 * l2_bytes


def attach_row_blocks(model: nn.Module, rows: int, l2_bytes: int) -> list[str]:
    """Give each eligible linear of `model` its `RowBlocks` of `rows` rows (0: none; a stale one goes); the names of
    the layers that got one. Eligible: `dense_gemv.attach_kernels`' plain half-precision weights that pass
    `blocked_weight`."""
    from radixlm.runtime.dense_gemv import attach_kernels

    def make(module: nn.Module) -> RowBlocks | None:
        return RowBlocks(module.weight, rows) if rows > 0 and blocked_weight(module.weight, l2_bytes) else None
    return attach_kernels(model, "row_blocks", make)

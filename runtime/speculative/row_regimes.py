"""Greedy exactness on the CPU: a verify step stays in the kernel regime of its decode batch.

The CPU's 4-bit linear (`int4_cpu.Int4PackedWeight.linear`) picks its kernel by the number of input
rows: the packed int4 kernel (or the exact float32 C GEMV) for a few rows, the dense bfloat16 copy
(or a dequantized float32 GEMM) from a threshold up. Each kernel is row-invariant (a row's result
does not depend on the other rows), but two kernels round differently. Verify rows are decode rows
(one per draft), so a decode batch of B rows whose drafts push it past a threshold computes every
row with another kernel than plain decoding would: greedy outputs then drift from speculation off
(measured: copy-heavy prompts, batch 8 finishing at uneven lengths, benchmarks/speculative.py
--mode cpu reported `identical: false`). The drafts of a step are therefore capped so that its
B + drafts rows stay below the next threshold above B. Not fixed here: speculation also changes when
requests finish, so a token may be computed at another batch size (kernel) than without it; exact
equality across batch sizes needs one rounding for every row count (kernels/cpu_*, issue 20).
"""
from __future__ import annotations

import torch

from radixlm.runtime.quantization import int4_cpu


def kernel_thresholds(model: torch.nn.Module) -> tuple[int, ...]:
    """Row counts at which the model's CPU linears switch kernels (ascending; empty: one kernel)."""
    weights = [q for m in model.modules() if isinstance(q := getattr(m, "quantized", None), int4_cpu.Int4PackedWeight)]
    if not weights:
        return ()
    bounds: set[int] = set()
    for w in weights:  # int4_cpu.Int4PackedWeight.linear: the C GEMV first, then dense / dequantized / packed
        gemv = int4_cpu.GEMV_MAX_ROWS + 1 if w.gemv_blocks is not None or w.int8_blocks is not None else 1
        bounds.add(max(int4_cpu.DENSE_MIN_ROWS if w.dense is not None else int4_cpu.DEQUANT_MIN_ROWS, gemv))
        if gemv > 1:
            bounds.add(gemv)
    return tuple(sorted(bounds))


def max_step_rows(thresholds: tuple[int, ...], decode_rows: int) -> int | None:
    """The most rows a step of `decode_rows` decode rows may have with its drafts (None: no limit)."""
    above = [t for t in thresholds if t > decode_rows]
    return above[0] - 1 if above else None

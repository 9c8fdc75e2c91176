"""GGUF Q4_0 / Q4_1 weights kept 4-bit on a GPU: their blocks as `W4Weight`s for the Triton kernels.

The blocks are read through `gguf_blocks.AffinePlanes` (the CPU path's representation), one plane of
codes c with a scale d and an offset per 32 columns: W = (c - 8) * d + o, o = 0 for Q4_0 and m + 8 d
(rounded once to float32) for Q4_1. That is `W4Weight`'s symmetric form (z = 8) plus its per-group
offsets, so the weights are exactly the CPU path's: equal to the gguf package's dequantization for
Q4_0, within that one rounding of m + 8 d for Q4_1. Types of more planes (Q5_x, Q8_0) and the
K-quants load dequantized on a GPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization.gguf_blocks import GROUP
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

if TYPE_CHECKING:
    from radixlm.runtime.quantization.select import GGUFTensor

GPU_QTYPES = (QType.Q4_0, QType.Q4_1)


def w4_from_gguf(parts: list[GGUFTensor], device: torch.device) -> W4Weight | None:
    """The packed GPU form of a layer whose parts (stacked along the output rows) are all Q4_0 / Q4_1;
    None otherwise (the layer then loads dequantized)."""
    if not parts or any(p.qtype not in GPU_QTYPES for p in parts):
        return None
    w4_parts = []
    for part in parts:
        planes = part.planes()
        w4_parts.append(W4Part(
            codes=torch.from_numpy(planes.codes[0]).to(device),
            scales=torch.from_numpy(planes.scales[0]).t().contiguous().half().to(device),  # fp16 d: exact
            zeros=None,
            g_idx=None,
            offsets=torch.from_numpy(planes.zeros[0]).t().contiguous().to(device),
        ))
    return W4Weight(w4_parts, GROUP, "gguf " + "+".join(sorted({p.qtype.name for p in parts})))

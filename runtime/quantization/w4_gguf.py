"""GGUF Q4_0 / Q4_1 / Q4_K weights kept 4-bit on a GPU: their blocks as `W4Weight`s for the Triton kernels.

The blocks are read through `gguf_blocks.AffinePlanes` (the CPU path's representation), one plane of
codes c with a scale d and an offset per 32 columns: W = (c - 8) * d + o, o = 0 for Q4_0 and m + 8 d
(rounded once to float32) for Q4_1. That is `W4Weight`'s symmetric form (z = 8) plus its per-group
offsets, so the weights are exactly the CPU path's: equal to the gguf package's dequantization for
Q4_0, within that one rounding of m + 8 d for Q4_1. Q4_K (`gguf_kquants.q4_k`) takes the asymmetric
form with zero point 0, scale d sc and offset -dmin m per 32 columns: W = c (d sc) - dmin m, gguf's own
expression, so bit for bit. Q8_0 / Q6_K (and layers mixing them with these) are `Int8Weight`s; the
other types load dequantized on a GPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization.gguf_blocks import GROUP
from radixlm.runtime.quantization.gguf_kquants import q4_k
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

if TYPE_CHECKING:
    from radixlm.runtime.quantization.select import GGUFTensor

GPU_QTYPES = (QType.Q4_0, QType.Q4_1, QType.Q4_K)


def w4_from_gguf(parts: list[GGUFTensor], device: torch.device) -> W4Weight | None:
    """The packed GPU form of a layer whose parts (stacked along the output rows) are all Q4_0 / Q4_1 /
    Q4_K; None otherwise."""
    if not parts or any(p.qtype not in GPU_QTYPES for p in parts):
        return None
    w4_parts = []
    for part in parts:
        if part.qtype == QType.Q4_K:
            k4 = q4_k(part.raw, part.shape[0])
            w4_parts.append(W4Part(
                codes=torch.from_numpy(k4.q.view(np.uint8)).to(device),
                scales=torch.from_numpy(k4.scales).t().contiguous().to(device),  # float32 d sc: exact
                zeros=torch.zeros(k4.scales.shape[::-1], dtype=torch.uint8, device=device),
                g_idx=None,
                offsets=torch.from_numpy(k4.offsets).t().contiguous().to(device),
            ))
            continue
        planes = part.planes()
        w4_parts.append(W4Part(
            codes=torch.from_numpy(planes.codes[0]).to(device),
            scales=torch.from_numpy(planes.scales[0]).t().contiguous().half().to(device),  # fp16 d: exact
            zeros=None,
            g_idx=None,
            offsets=torch.from_numpy(planes.zeros[0]).t().contiguous().to(device),
        ))
    return W4Weight(w4_parts, GROUP, "gguf " + "+".join(sorted({p.qtype.name for p in parts})))

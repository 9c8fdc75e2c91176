"""The device side of multi-LoRA: per layer and fused projection, a buffer of adapter slots.

Slot s of a projection holds A [n·R, in] (the n fused parts' A matrices stacked by rank, R the
--max-lora-rank, zero-padded) and B·scaling [out, R]; parts an adapter does not target stay
zero. The buffers never move, so CUDA graphs captured over them stay valid while adapters are
swapped in and out of slots (`write`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.lora.adapter import TARGETS, LoRAAdapter, ModelShape
from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, shrink_ref

# our fused projection -> its HF parts, in output order
PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}


class BatchAdapters:
    """The current forward's token -> adapter segments, shared by every LoRA projection
    (None: no row of this batch uses an adapter, the projections add nothing)."""

    segments: LoRASegments | None = None


@dataclass
class LoRAProjection:
    """Attached to one linear layer (its `lora`): adds the batch's adapters' updates to its output."""

    a: torch.Tensor  # [slots, n·R, in]
    b: torch.Tensor  # [slots, out, R]
    offsets: list[int]  # output column where each part starts, + the total
    rank: int
    batch: BatchAdapters
    use_triton: bool
    offsets_dev: torch.Tensor | None = None
    widest: int = 0

    def __post_init__(self) -> None:
        self.offsets_dev = torch.tensor(self.offsets, dtype=torch.int32, device=self.a.device)
        self.widest = max(hi - lo for lo, hi in zip(self.offsets, self.offsets[1:]))

    def apply(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        seg = self.batch.segments
        if seg is None:
            return out
        x = x.reshape(-1, x.shape[-1])
        if self.use_triton:
            from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

            y = sgmv_shrink(x.contiguous(), self.a, seg)
            sgmv_expand(y, self.b, self.offsets_dev, self.widest, self.rank, out, seg)
        else:
            expand_ref(shrink_ref(x, self.a, seg), self.b, self.offsets, self.rank, out, seg)
        return out


class LoRAPool:
    """The slot buffers of every layer; attaches a `LoRAProjection` to each target linear layer."""

    def __init__(self, model: torch.nn.Module, shape: ModelShape, slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device, use_triton: bool) -> None:
        self.slots = slots
        self.rank = rank
        self.shape = shape
        self.batch = BatchAdapters()
        self.projections: dict[tuple[int, str], LoRAProjection] = {}
        for i, layer in enumerate(model.layers):
            for proj, parts in PARTS.items():
                in_f = shape.features[parts[0]][0]
                offsets = [0]
                for part in parts:
                    offsets.append(offsets[-1] + shape.features[part][1])
                a = torch.zeros(slots, len(parts) * rank, in_f, dtype=dtype, device=device)
                b = torch.zeros(slots, offsets[-1], rank, dtype=dtype, device=device)
                p = LoRAProjection(a, b, offsets, rank, self.batch, use_triton)
                self.projections[(i, proj)] = p
                owner = layer.self_attn if proj in ("qkv_proj", "o_proj") else layer.mlp
                getattr(owner, proj).lora = p

    @property
    def nbytes(self) -> int:
        return sum(p.a.numel() * p.a.element_size() + p.b.numel() * p.b.element_size()
                   for p in self.projections.values())

    def write(self, slot: int, adapter: LoRAAdapter) -> None:
        """Copy an adapter's weights into `slot` (asynchronous from pinned host memory)."""
        for p in self.projections.values():
            p.a[slot].zero_()
            p.b[slot].zero_()
        for (layer, module), (a, b) in adapter.weights.items():
            proj, part = TARGETS[module]
            p = self.projections[(layer, proj)]
            r = a.shape[0]
            p.a[slot, part * self.rank:part * self.rank + r].copy_(a, non_blocking=True)
            p.b[slot, p.offsets[part]:p.offsets[part + 1], :r].copy_(b, non_blocking=True)

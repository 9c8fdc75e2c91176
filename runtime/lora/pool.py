"""The device side of multi-LoRA: per layer and fused projection, a buffer of adapter slots.

Slot s of a projection holds A [n·R, in] (the n fused parts' A matrices stacked by rank, R the
--max-lora-rank, zero-padded) and B·scaling [out, R]; parts an adapter does not target stay
zero. The buffers never move, so CUDA graphs captured over them stay valid while adapters are
swapped in and out of slots (`write`).
"""
from __future__ import annotations

import contextlib

import torch

from radixlm.runtime.lora.adapter import TARGETS, LoRAAdapter, ModelShape
from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

# our fused projection -> its HF parts, in output order
PARTS: dict[str, tuple[str, ...]] = {
    "qkv_proj": ("q_proj", "k_proj", "v_proj"), "o_proj": ("o_proj",),
    "gate_up_proj": ("gate_proj", "up_proj"), "down_proj": ("down_proj",),
}


# The side stream's CUDA priority (lower = higher). High: its small LoRA launches get SMs before the
# pending blocks of the base GEMM beside them, so the shrink is done when the GEMM ends instead of
# starting after its last wave (where CUDA graphs keep node priorities). Unmeasured (variants overlap_hi).
SIDE_STREAM_PRIORITY = -1
# The projections stacked under --lora-kernels stacked. o_proj and down_proj add their update into the
# residual, all of it on the side stream beside their GEMM (overlap), so their critical path has no
# LoRA launch when that side chain fits beside the GEMM; stacking them puts one expand on it.
STACKED_PROJECTIONS = ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")


class LoRAPool:
    """The slot buffers of every layer; attaches a `LoRAProjection` to each target linear layer.

    All of one slot's weights are one contiguous row of `buffer` [slots, total]; each projection's
    A and B are strided views into it. An adapter in host memory is kept in the same packed layout
    (`pack`), so swapping it into a slot is a single copy, issued on a side stream on CUDA."""

    def __init__(self, model: torch.nn.Module, shape: ModelShape, slots: int, rank: int, dtype: torch.dtype,
                 device: torch.device, use_triton: bool, kernels: str = "overlap") -> None:
        self.slots = slots
        self.rank = rank
        self.shape = shape
        self.dtype = dtype
        self.device = device
        self.batch = BatchAdapters()
        # (layer, projection) -> (A offset, A shape, B offset, B shape) in a slot's packed row
        self.layout: dict[tuple[int, str], tuple[int, tuple[int, int], int, tuple[int, int]]] = {}
        self.offsets: dict[str, list[int]] = {}
        total = 0
        for i in range(len(model.layers)):
            for proj, parts in PARTS.items():
                offsets = [0]
                for part in parts:
                    offsets.append(offsets[-1] + shape.features[part][1])
                self.offsets[proj] = offsets
                a_shape = (len(parts) * rank, shape.features[parts[0]][0])
                b_shape = (offsets[-1], rank)
                self.layout[(i, proj)] = (total, a_shape, total + a_shape[0] * a_shape[1], b_shape)
                total += a_shape[0] * a_shape[1] + b_shape[0] * b_shape[1]
        self.slot_numel = total
        self.buffer = torch.zeros(slots, total, dtype=dtype, device=device)
        self.copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self.staging: torch.Tensor | None = None  # one slot row on the device: the next adapter, copied ahead (`stage`)
        side = (torch.cuda.Stream(device, priority=SIDE_STREAM_PRIORITY)
                if device.type == "cuda" and kernels in ("overlap", "stacked") else None)
        self.projections: dict[tuple[int, str], LoRAProjection] = {}
        # stacked: (A as a view of the slot buffer, where it is staged by a swap; A as the tail of the
        # stacked weight, where the kernels read it)
        self.staged: list[tuple[torch.Tensor, torch.Tensor]] = []
        for (i, proj), (a_off, a_shape, b_off, b_shape) in self.layout.items():
            a = self.buffer[:, a_off:a_off + a_shape[0] * a_shape[1]].view(slots, *a_shape)
            b = self.buffer[:, b_off:b_off + b_shape[0] * b_shape[1]].view(slots, *b_shape)
            layer = model.layers[i]
            linear = getattr(layer.self_attn if proj in ("qkv_proj", "o_proj") else layer.mlp, proj)
            stacked = (stack_weight(linear, slots, a_shape, self.offsets[proj][-1])
                       if kernels == "stacked" and proj in STACKED_PROJECTIONS else None)
            if stacked is not None:
                self.staged.append((a, stacked[linear.weight.shape[0]:].view(slots, *a_shape)))
                a = self.staged[-1][1]
            p = LoRAProjection(a, b, self.offsets[proj], rank, self.batch, use_triton, kernels, side, stacked=stacked,
                               layer=linear)
            self.projections[(i, proj)] = p
            linear.lora = p
        if self.staged and device.type == "cuda":
            torch.cuda.empty_cache()  # the replaced base weights' blocks: before the KV pool is sized

    def attach_gemv(self, pdl: bool) -> int:
        """Give each stacked projection whose layer has an M = 1 GEMV (runtime/dense_gemv.py; attached after the
        pool stacked the weights) a GEMV over its stacked weight, the layer's config; the count."""
        from radixlm.runtime.dense_gemv import DenseGemv

        count = 0
        for p in self.projections.values():
            p.gemv, p.pdl = None, pdl
            layer_gemv = getattr(p.layer, "gemv", None)
            if p.stacked is not None and layer_gemv is not None:
                p.gemv = DenseGemv(p.stacked, layer_gemv.cfg, pdl)
                count += 1
        return count

    @property
    def nbytes(self) -> int:
        return self.buffer.numel() * self.buffer.element_size()

    def pack(self, adapter: LoRAAdapter) -> torch.Tensor:
        """The adapter as one slot row in host memory (page-locked on CUDA, so a swap-in is one
        asynchronous copy): parts it does not target and ranks below R stay zero."""
        row = torch.zeros(self.slot_numel, dtype=self.dtype, pin_memory=self.device.type == "cuda")
        for (layer, module), (a, b) in adapter.weights.items():
            proj, part = TARGETS[module]
            a_off, a_shape, b_off, b_shape = self.layout[(layer, proj)]
            a_view = row[a_off:a_off + a_shape[0] * a_shape[1]].view(a_shape)
            b_view = row[b_off:b_off + b_shape[0] * b_shape[1]].view(b_shape)
            r = a.shape[0]
            offsets = self.offsets[proj]
            a_view[part * self.rank:part * self.rank + r].copy_(a)
            b_view[offsets[part]:offsets[part + 1], :r].copy_(b)
        return row

    def stage(self, packed: torch.Tensor) -> None:
        """Copy a packed adapter (page-locked host memory) to the device's staging row, on the copy stream:
        it crosses PCIe while forwards run, and a later `write(slot, None)` is a device-to-device copy."""
        if self.staging is None:
            self.staging = torch.empty(self.slot_numel, dtype=self.dtype, device=self.device)
        with torch.cuda.stream(self.copy_stream) if self.copy_stream is not None else contextlib.nullcontext():
            self.staging.copy_(packed, non_blocking=self.copy_stream is not None)

    def write(self, slot: int, packed: torch.Tensor | None, after: torch.cuda.Event | None = None) -> None:
        """Copy a packed adapter (None: the staged one) into `slot`. On CUDA the copy runs on the side
        stream once `after` (the end of the last forward that read the slot) has passed, so it overlaps
        the forward in flight; the forwards enqueued from now on wait for it."""
        source = self.staging if packed is None else packed
        assert source is not None, "nothing staged"
        if self.copy_stream is None:
            self.buffer[slot].copy_(source)
            self._unstage(slot)
            return
        with torch.cuda.stream(self.copy_stream):  # (after any `stage` copy into `source`: one stream)
            if after is not None:
                self.copy_stream.wait_event(after)
            self.buffer[slot].copy_(source, non_blocking=True)
            self._unstage(slot)
            done = torch.cuda.Event()
            done.record(self.copy_stream)
        torch.cuda.current_stream(self.device).wait_event(done)

    def _unstage(self, slot: int) -> None:
        """Stacked: the slot's A matrices from the slot buffer into the stacked weights (one batched copy)."""
        if self.staged:
            torch._foreach_copy_([tail[slot] for _, tail in self.staged], [a[slot] for a, _ in self.staged])


def stack_weight(linear: torch.nn.Module, slots: int, a_shape: tuple[int, int], out: int) -> torch.Tensor | None:
    """--lora-kernels stacked: the layer's weight moved into the head of a [out + slots·n·R, in] buffer
    whose tail holds every slot's A (the layer keeps its weight as a view of the head, so base-only
    forwards and graphs are unchanged). None where the layer cannot (packed weights, a bias, a shard)."""
    weight = linear.weight
    if getattr(linear, "quantized", None) is not None or getattr(linear, "bias", None) is not None:
        return None
    if weight.shape != (out, a_shape[1]) or getattr(linear, "tp_group", None) is not None:
        return None
    stacked = torch.zeros(weight.shape[0] + slots * a_shape[0], weight.shape[1], dtype=weight.dtype,
                          device=weight.device)
    stacked[:weight.shape[0]].copy_(weight.data)
    weight.data = stacked[:weight.shape[0]]
    return stacked

"""Segmented LoRA matmuls (SGMV, as in Punica / S-LoRA): the batch's tokens grouped by adapter.

A batch mixing adapters is described by `LoRASegments`: `order` lists the token rows sorted by
adapter slot, and segment i covers order[start[i] : start[i] + length[i]], all using the weights
in slot `slot[i]` (rows of the base model are in no segment). Per projection the update is
a shrink y = x·Aᵀ (rank columns of every slice at once) and an expand out[:, slice] +=
y[:, slice ranks]·Bᵀ, each one launch for the whole batch (`sgmv_triton.py`; the shrink may run
beside the base GEMM, see `projection.LoRAProjection`), or both in one launch at decode sizes
(`sgmv_fused.py`). This module holds the torch reference (the CPU path, and what the Triton
kernels are tested against).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from radixlm.runtime.device_transfer import to_device


@dataclass
class LoRASegments:
    """One forward's token -> adapter mapping, on the device, plus its host copy."""

    order: torch.Tensor  # [T'] int32 token rows sorted by slot (base rows left out; T' <= T)
    start: torch.Tensor  # [S] int32 offset of each segment in `order`
    length: torch.Tensor  # [S] int32 (0: an unused segment)
    slot: torch.Tensor  # [S] int32 pool slot of each segment (-1: unused)
    max_length: int  # longest segment (sizes the kernels' grid; the graph's batch size in decode)
    host: list[tuple[int, int, int]]  # (slot, start, length) of the used segments
    # [>= T] int32 each token row's slot in batch order (-1: none), read by the stacked path's expand by rows
    # (sgmv_rows.py); None where a caller built the segments without it (that path then takes the segment expand)
    row_slot: torch.Tensor | None = None

    @classmethod
    def build(cls, token_slots: torch.Tensor, num_segments: int, device: torch.device) -> "LoRASegments":
        """From each token's slot (host int tensor, -1 = base model); `num_segments` fixes the
        segment tensors' size (the adapters a batch may hold)."""
        order, start, length, slot, host = segment_host(token_slots, num_segments)
        max_len = max((n for _, _, n in host), default=0)
        rows = token_slots.to(torch.int32)
        packed = to_device(torch.cat([order, start, length, slot, rows]), device)  # pinned: no wait on the stream
        t, s = order.numel(), num_segments
        return cls(packed[:t], packed[t:t + s], packed[t + s:t + 2 * s], packed[t + 2 * s:t + 3 * s], max_len, host,
                   packed[t + 3 * s:])


def segment_host(token_slots: torch.Tensor, num_segments: int
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, list[tuple[int, int, int]]]:
    """(order, start, length, slot, host segments) as int32 host tensors of fixed segment count."""
    slots = token_slots.to(torch.int64)
    order = torch.argsort(slots, stable=True)
    used = slots[order] >= 0
    order = order[used]
    values, counts = torch.unique_consecutive(slots[order], return_counts=True)
    if values.numel() > num_segments:
        raise ValueError(f"{values.numel()} adapters in one batch; at most {num_segments} (--max-loras-per-batch)")
    start = torch.zeros(num_segments, dtype=torch.int64)
    length = torch.zeros(num_segments, dtype=torch.int64)
    slot = torch.full((num_segments,), -1, dtype=torch.int64)
    n = values.numel()
    length[:n] = counts
    start[:n] = torch.cumsum(counts, 0) - counts
    slot[:n] = values
    host = [(int(v), int(s), int(c)) for v, s, c in zip(values, start[:n], counts)]
    i32 = torch.int32
    return order.to(i32), start.to(i32), length.to(i32), slot.to(i32), host


def graph_segments_row(per_req: list[int], num_segments: int, max_rows: int, row_slots: bool = True) -> list[int]:
    """A decode step's segments as the graphs' buffer holds them: order (padded to `max_rows`) |
    start | length | slot (unused segments: length 0, slot -1), then with `row_slots` each row's slot
    (padded with -1 to `max_rows`; read only by the expand by rows, sgmv_rows.py), from each row's slot
    (-1: base model). Plain Python: for a decode batch's few hundred rows it is ~3x faster than the tensor
    ops of `segment_host` (which the host paid every decode step), and the same mapping."""
    rows_of: dict[int, list[int]] = {}
    for row, slot in enumerate(per_req):
        if slot >= 0:
            rows_of.setdefault(slot, []).append(row)
    if len(rows_of) > num_segments:
        raise ValueError(f"{len(rows_of)} adapters in one batch; at most {num_segments} (--max-loras-per-batch)")
    order: list[int] = []
    start, length, slots = [], [], []
    for slot in sorted(rows_of):
        start.append(len(order))
        length.append(len(rows_of[slot]))
        slots.append(slot)
        order.extend(rows_of[slot])
    pad = num_segments - len(slots)
    row = order + [0] * (max_rows - len(order)) + start + [0] * pad + length + [0] * pad + slots + [-1] * pad
    return row + per_req + [-1] * (max_rows - len(per_req)) if row_slots else row


def shrink_ref(x: torch.Tensor, a: torch.Tensor, seg: LoRASegments) -> torch.Tensor:
    """y [T, n·R] = x·A[slot]ᵀ for each segment's rows; rows of no segment are zero.
    `a`: the pool's [slots, n·R, in] buffer."""
    y = x.new_zeros(x.shape[0], a.shape[1])
    order = seg.order.to(torch.int64)
    for slot, start, length in seg.host:
        rows = order[start:start + length]
        y[rows] = (x[rows].float() @ a[slot].float().t()).to(y.dtype)
    return y


def expand_ref(y: torch.Tensor, b: torch.Tensor, slice_offsets: list[int], rank: int, out: torch.Tensor,
               seg: LoRASegments) -> None:
    """out[:, off[s]:off[s+1]] += y[:, s·R:(s+1)·R]·B[slot, off[s]:off[s+1]]ᵀ, in place, per segment.
    `b`: the pool's [slots, out, R] buffer."""
    order = seg.order.to(torch.int64)
    for slot, start, length in seg.host:
        rows = order[start:start + length]
        for s in range(len(slice_offsets) - 1):
            lo, hi = slice_offsets[s], slice_offsets[s + 1]
            delta = y[rows, s * rank:(s + 1) * rank].float() @ b[slot, lo:hi].float().t()
            out[rows, lo:hi] += delta.to(out.dtype)

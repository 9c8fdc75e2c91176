"""Host-to-device copies that never stall the host, staged through pinned memory.

A copy from pageable memory may wait until the stream is idle, i.e. until the forward pass in
flight has finished; with overlap scheduling that would serialize the host and the device again.
Pinned sources copy asynchronously (PyTorch's pinned allocator keeps each staging block alive until
its copy has run). On the CPU these are plain tensors.
"""
from __future__ import annotations

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def pack_on(arrays: list[torch.Tensor], device: torch.device, int32: list[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Several 1-D int64 host tensors, then several 1-D int32 ones (`int32`), in one transfer; returns device views
    in the same order. The int32 ones ride in the same buffer, two to an int64 word, so a consumer that wants int32
    (lengths, slots) needs no conversion kernel on the device."""
    if device.type != "cuda":
        return [*arrays, *int32]
    packed, sizes, sizes32 = pack(arrays, list(int32), pin=True)
    return unpack(packed.to(device, non_blocking=True), sizes, sizes32)


def pack(arrays: list[torch.Tensor], int32: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[int], list[int]]:
    """(one int64 buffer: `arrays`, then `int32` two to a word, padded to a whole word; the sizes of each)."""
    sizes, sizes32 = [int(a.numel()) for a in arrays], [int(a.numel()) for a in int32]
    n64, n32 = sum(sizes), sum(sizes32)
    packed = torch.empty(n64 + (n32 + 1) // 2, dtype=torch.int64, pin_memory=pin)
    if arrays:
        torch.cat(arrays, out=packed[:n64])
    if n32:
        torch.cat(int32, out=packed[n64:].view(torch.int32)[:n32])
    return packed, sizes, sizes32


def unpack(packed: torch.Tensor, sizes: list[int], sizes32: list[int]) -> list[torch.Tensor]:
    """`pack`'s buffer (wherever it now is) back into its int64 and int32 views."""
    n64 = sum(sizes)
    views = list(packed[:n64].split(sizes))
    if sizes32:
        views += list(packed[n64:].view(torch.int32)[: sum(sizes32)].split(sizes32))
    return views

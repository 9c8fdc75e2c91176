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


def pack_on(arrays: list[torch.Tensor], device: torch.device) -> list[torch.Tensor]:
    """Several 1-D int64 host tensors in one transfer; returns device views in the same order."""
    if device.type != "cuda":
        return arrays
    sizes = [int(a.numel()) for a in arrays]
    packed = torch.empty(sum(sizes), dtype=torch.int64, pin_memory=True)
    torch.cat(arrays, out=packed)
    return list(packed.to(device, non_blocking=True).split(sizes))

"""Host-to-device copies that never stall the host, staged through pinned memory.

A copy from pageable memory may wait until the stream is idle, i.e. until the forward pass in
flight has finished; with overlap scheduling that would serialize the host and the device again.
Pinned sources copy asynchronously (PyTorch's pinned allocator keeps each staging block alive until
its copy has run). On the CPU these are plain tensors.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if device.type != "cuda":
        return t
    return t.pin_memory().to(device, non_blocking=True)


def tensor_on(values: list, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return to_device(torch.tensor(values, dtype=dtype), device)


def pack_on(arrays: list[torch.Tensor], device: torch.device, int32: Sequence[torch.Tensor] = ()) -> list[torch.Tensor]:
    """Several 1-D int64 host tensors, then several 1-D int32 ones (`int32`), in one transfer; returns device views
    in the same order. The int32 ones ride in the same buffer, two to an int64 word, so a consumer that wants int32
    (lengths, slots) needs no conversion kernel on the device."""
    if device.type != "cuda":
        return [*arrays, *int32]
    packed, sizes, sizes32 = pack(arrays, list(int32), pin=True)
    return unpack(packed.to(device, non_blocking=True), sizes, sizes32)


def _int32_starts(n64: int, sizes32: list[int]) -> list[int]:
    """Where each int32 array starts, in int32 elements of the buffer: after the int64 part, each on a 16-byte
    boundary (as a fresh allocation would be: a Triton kernel specializes on its pointers' alignment)."""
    at = 2 * (n64 + n64 % 2)
    starts = []
    for n in sizes32:
        starts.append(at)
        at += n + (-n) % 4
    return starts + [at]


def pack(arrays: list[torch.Tensor], int32: list[torch.Tensor], pin: bool = False) -> tuple[torch.Tensor, list[int], list[int]]:
    """(one int64 buffer: `arrays`, then each of `int32` two to a word on a 16-byte boundary; the sizes of each)."""
    sizes, sizes32 = [int(a.numel()) for a in arrays], [int(a.numel()) for a in int32]
    n64 = sum(sizes)
    starts = _int32_starts(n64, sizes32)
    packed = torch.empty(starts[-1] // 2, dtype=torch.int64, pin_memory=pin)
    if arrays:
        torch.cat(arrays, out=packed[:n64])
    words = packed.view(torch.int32)
    for a, at in zip(int32, starts):
        words[at: at + a.numel()] = a
    return packed, sizes, sizes32


def unpack(packed: torch.Tensor, sizes: list[int], sizes32: list[int]) -> list[torch.Tensor]:
    """`pack`'s buffer (wherever it now is) back into its int64 and int32 views."""
    n64 = sum(sizes)
    views = list(packed[:n64].split(sizes))
    words = packed.view(torch.int32)
    return views + [words[at: at + n] for n, at in zip(sizes32, _int32_starts(n64, sizes32))]

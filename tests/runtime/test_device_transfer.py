"""The step's packed host-to-device copy (runtime/device_transfer.py): int64 arrays and int32 ones, two to a word,
in one buffer; unpacked views equal the inputs with their dtypes (the CPU runs the same pack / unpack the GPU path
copies in between)."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.device_transfer import pack, pack_on, unpack


@pytest.mark.parametrize("n32", [[], [0], [3], [1, 4, 0, 2], [5, 5]])
@pytest.mark.parametrize("n64", [[], [0, 2], [4, 1, 3]])
def test_pack_round_trip_keeps_values_and_dtypes(n64: list[int], n32: list[int]) -> None:
    gen = torch.Generator().manual_seed(len(n64) * 10 + len(n32))
    arrays = [torch.randint(-2**40, 2**40, (n,), generator=gen, dtype=torch.int64) for n in n64]
    int32 = [torch.randint(-2**30, 2**30, (n,), generator=gen, dtype=torch.int32) for n in n32]
    packed, sizes, sizes32 = pack(arrays, int32)
    assert packed.dtype == torch.int64 and packed.numel() <= sum(n64) + 1 + sum(n + 3 for n in n32) // 2
    copy = torch.empty(packed.numel() + 64, dtype=torch.int64)[64:]  # (a copy at a 512-byte boundary, as the device's)
    copy.copy_(packed)
    views = unpack(copy, sizes, sizes32)
    assert len(views) == len(arrays) + len(int32)
    for got, want in zip(views, [*arrays, *int32]):
        assert got.dtype == want.dtype and torch.equal(got, want)
    for got in views[len(arrays):]:  # each int32 array 16-byte aligned within the buffer, as a fresh allocation
        assert (got.data_ptr() - copy.data_ptr()) % 16 == 0


def test_pack_on_a_cpu_returns_the_host_tensors() -> None:
    a, b = torch.arange(3), torch.arange(2, dtype=torch.int32)
    got = pack_on([a], torch.device("cpu"), int32=[b])
    assert got[0] is a and got[1] is b

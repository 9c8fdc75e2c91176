"""The int8 group-scaled GEMM (kernels/w8a16_group.py; the CPU interpreter without CUDA) against the float32
reference of the same codes (`Int8Weight.dequantize`, itself gguf's dequantization bit for bit: see
tests/runtime/test_gguf_kquants.py): groups of 16 and 32, with and without offsets, one launch and split-K,
K not a multiple of the 128-column step."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from radixlm.kernels.w8a16_group import w8_group_matmul
from radixlm.runtime.quantization.gguf_kquants import GroupCodes
from radixlm.runtime.quantization.int8_weight import Int8Weight


def _weight(n: int, k: int, group: int, offsets: bool, device: str) -> Int8Weight:
    rng = np.random.default_rng(n + k + group)
    codes = GroupCodes(rng.integers(-128, 128, (n, k), dtype=np.int8),
                       rng.uniform(-0.02, 0.02, (n, k // group)).astype(np.float32),
                       rng.standard_normal((n, k // group)).astype(np.float32) if offsets else None, group)
    return Int8Weight([codes], "test", torch.device(device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "n", "k", "group", "offsets"), [(1, 96, 512, 16, False), (5, 80, 160, 32, True),
                                                               (17, 48, 256, 16, True)])
def test_int8_group_gemm_matches_reference(device, dtype, m, n, k, group, offsets):
    w = _weight(n, k, group, offsets, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    got = w8_group_matmul(x, w.codes, w.scales, w.offsets, group)
    assert got.dtype == dtype and got.shape == (m, n)
    # float32: summation order; bf16: the output's rounding, and on a GPU the weight rounded to bf16 (the
    # same weight dequantize + cuBLAS uses at prefill sizes)
    tol = 1e-5 if dtype == torch.float32 else 2**-6
    assert ((got.float() - ref).abs() <= ref.abs() * tol + tol * ref.abs().max()).all()
    w.use_triton = True  # the layer's dispatch: this kernel below DEQUANT_MIN_M rows
    assert torch.equal(w.linear(x), got)


def test_int8_group_gemm_refuses_bad_shapes(device):
    w = _weight(16, 256, 32, False, device)
    with pytest.raises(ValueError, match="do not fit"):
        w8_group_matmul(torch.zeros(1, 128, device=device), w.codes, w.scales, None, 32)

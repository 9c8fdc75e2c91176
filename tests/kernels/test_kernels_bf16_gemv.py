"""kernels/bf16_gemv.py (a measurement candidate) against the float32 product, rounded once."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels.bf16_gemv import bf16_gemv


@pytest.mark.parametrize("n,k,block_n,block_k", [(24, 256, 8, 128), (37, 512, 16, 256), (8, 128, 8, 128)])
def test_matches_the_float32_product(device, n, k, block_n, block_k) -> None:
    g = torch.Generator().manual_seed(n * k)
    w = torch.randn(n, k, generator=g).to(device=device, dtype=torch.bfloat16)
    x = torch.randn(1, k, generator=g).to(device=device, dtype=torch.bfloat16)
    ref = (x.float() @ w.float().T).to(torch.bfloat16)
    got = bf16_gemv(x, w, block_n=block_n, block_k=block_k, pdl=True, prefetch=True)
    assert got.shape == (1, n) and got.dtype == torch.bfloat16
    torch.testing.assert_close(got.float(), ref.float(), rtol=1e-2, atol=1e-2)


def test_refuses_what_it_does_not_tile() -> None:
    with pytest.raises(ValueError, match="block_k"):
        bf16_gemv(torch.ones(1, 100, dtype=torch.bfloat16), torch.ones(8, 100, dtype=torch.bfloat16), block_k=64)

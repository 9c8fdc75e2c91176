"""The one-launch bitmask application equals the torch reference: refused and padding columns
-inf, allowed logits untouched bit for bit, rows of any pattern (all allowed, none, random)."""
from __future__ import annotations

import pytest
import torch

from radixlm.constrained import bitmask as B


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize(("rows", "vocab", "words"), [(5, 200, 7), (3, 4100, 129), (2, 4096 + 64, 120)])
def test_triton_bitmask_equals_reference(device, dtype, rows: int, vocab: int, words: int) -> None:
    from radixlm.kernels.token_bitmask import apply_token_bitmask_triton

    torch.manual_seed(rows * vocab)
    logits = torch.randn(rows, vocab, dtype=dtype) * 4
    mask = torch.randint(-(2**31), 2**31 - 1, (rows, words), dtype=torch.int32)
    mask[0] = -1  # all allowed (up to 32 x words)
    mask[1] = 0  # none allowed
    expected = logits.clone()
    B.apply_token_bitmask_(expected, mask)  # the reference (CPU tensors)
    got = logits.to(device)
    apply_token_bitmask_triton(got, mask.to(device))
    assert torch.equal(got.cpu(), expected)
    assert torch.isinf(expected[1]).all() and (expected[1] < 0).all()
    assert (expected[:, 32 * words:] == float("-inf")).all()


def test_triton_bitmask_takes_a_row_slice_of_a_wider_buffer(device) -> None:
    """Logits rows with a stride larger than the vocabulary (a view of a padded buffer)."""
    from radixlm.kernels.token_bitmask import apply_token_bitmask_triton

    torch.manual_seed(3)
    base = torch.randn(4, 300)
    mask = torch.randint(-(2**31), 2**31 - 1, (4, 8), dtype=torch.int32)
    expected = base.clone()
    B.apply_token_bitmask_(expected[:, :250], mask)
    got = base.clone().to(device)
    apply_token_bitmask_triton(got[:, :250], mask.to(device))
    assert torch.equal(got.cpu(), expected)

"""kernels/argmax.py against torch's argmax: first index of the maximum, first NaN, -inf rows, ties across
and within the stage-1 blocks, bf16 and strided inputs."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels.argmax import BLOCK, argmax_two_stage
from radixlm.runtime.sampler import greedy_argmax


@pytest.mark.parametrize("cols", [1, 7, BLOCK, BLOCK + 1, 3 * BLOCK + 123])
@pytest.mark.parametrize("rows", [1, 3])
def test_matches_torch_on_random_rows(device, rows, cols) -> None:
    g = torch.Generator().manual_seed(cols + rows)
    x = torch.randn(rows, cols, generator=g).to(device)
    assert torch.equal(argmax_two_stage(x), x.argmax(-1))


def test_ties_nan_and_infinities_follow_torch(device) -> None:
    cols = 3 * BLOCK + 5
    x = torch.full((8, cols), -1.0)
    x[0, [5, BLOCK + 3, 2 * BLOCK]] = 4.0  # ties in different blocks: the first
    x[1, [BLOCK + 9, BLOCK + 2]] = 2.0  # ties in one block
    x[2, [BLOCK * 2 + 1, 7]] = float("nan")  # NaN beats everything: the first NaN
    x[2, 3] = float("inf")
    x[3, :] = float("-inf")  # nothing finite: index 0
    x[4, cols - 1] = float("inf")  # the last column
    x[5, [9, 3 * BLOCK + 1]] = float("nan")
    x[5, 10] = 1e30
    x[6, 0] = 0.5
    x[7, BLOCK] = float("-inf")
    x = x.to(device)
    assert torch.equal(argmax_two_stage(x), x.argmax(-1))
    assert argmax_two_stage(x).tolist()[:6] == [5, BLOCK + 2, 7, 0, cols - 1, 9]


def test_bf16_and_strided_views(device) -> None:
    g = torch.Generator().manual_seed(3)
    base = torch.randn(4, 2 * BLOCK + 40, generator=g).to(device)
    view = base[:, 10 : BLOCK + 700]  # a row stride wider than the row
    assert torch.equal(argmax_two_stage(view), view.argmax(-1))
    half = base.to(torch.bfloat16)
    assert torch.equal(argmax_two_stage(half), half.argmax(-1))


def test_sampler_greedy_argmax_and_edges() -> None:
    x = torch.randn(2, 50)
    assert torch.equal(greedy_argmax(x), x.argmax(-1))  # a CPU tensor: torch's own
    assert argmax_two_stage(torch.empty(0, 5)).shape == (0,)
    with pytest.raises(ValueError, match="rows"):
        argmax_two_stage(torch.empty(3, 0))

"""The suite's Triton mode is the process's from the start (tests/conftest.py): without CUDA, the CPU
interpreter, for Triton's own jit helpers too. Set by the test that needed it instead, it came after
transformers had imported triton in another module's test, and the LoRA kernels' `tl.cumsum` failed
("Cannot call @triton.jit'd outside of the scope of a kernel") in some orders of the same tests."""
from __future__ import annotations

import pytest
import torch

triton = pytest.importorskip("triton")
tl = pytest.importorskip("triton.language")


@triton.jit
def _cumsum_kernel(x_ptr, out_ptr, N: tl.constexpr):
    offs = tl.arange(0, N)
    tl.store(out_ptr + offs, tl.cumsum(tl.load(x_ptr + offs), axis=0))


def test_triton_helpers_run_in_the_sessions_mode() -> None:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":  # Triton decided each helper's mode at its import: interpreted, or it cannot run here
        assert type(tl.cumsum).__name__ == "InterpretedFunction"
    x = torch.arange(1, 9, dtype=torch.int32, device=device)
    out = torch.empty_like(x)
    _cumsum_kernel[(1,)](x, out, N=8)
    assert out.tolist() == torch.cumsum(x, 0).tolist()

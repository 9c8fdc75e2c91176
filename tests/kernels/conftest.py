"""Kernel tests: on a machine without CUDA the Triton kernels run in the CPU interpreter, which
tests/conftest.py turns on for the whole session before anything imports triton."""
from __future__ import annotations

import os

import pytest
import torch

pytest.importorskip("triton")


@pytest.fixture(scope="session")
def device() -> str:
    """Interpreter runs take CPU tensors; compiled Triton takes CUDA ones."""
    return "cpu" if os.environ.get("TRITON_INTERPRET") == "1" else "cuda"


class Pool:
    """A one-layer KV pool with requests at scattered slots and garbage everywhere else."""

    def __init__(self, seq_lens: list[int], num_kv_heads: int, head_dim: int, dtype: torch.dtype, device: str):
        total = sum(seq_lens)
        spare = 8  # slots no request owns, filled with large values that must never be attended
        num_slots = total + spare + 1
        self.k_buffer = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        self.v_buffer = torch.randn(num_slots, num_kv_heads, head_dim, dtype=dtype, device=device)
        perm = torch.randperm(num_slots - 1) + 1
        owned, garbage = perm[:total], perm[total:]
        self.k_buffer[garbage] = 1.0e3
        self.v_buffer[garbage] = -1.0e3
        rows = len(seq_lens) + 2
        width = max(seq_lens) + 5
        # Positions past a request's length point at garbage slots (the kernels must not read them).
        r2t = garbage[torch.randint(0, spare, (rows, width))].to(torch.int32)
        self.rows = torch.randperm(rows)[: len(seq_lens)].tolist()  # not in batch order
        start = 0
        for row, n in zip(self.rows, seq_lens):
            r2t[row, :n] = owned[start : start + n].to(torch.int32)
            start += n
        self.req_to_token = r2t.to(device)


@pytest.fixture
def make_pool():
    torch.manual_seed(1234)
    return Pool


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.float(), ref.float()
    return ((out - ref).norm() / ref.norm().clamp_min(1e-30)).item()


@pytest.fixture
def assert_close():
    def check(out: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> None:
        assert out.shape == ref.shape
        assert torch.isfinite(out.float()).all(), "non-finite output (unwritten or poisoned rows?)"
        tol = 1e-5 if dtype == torch.float32 else 1e-2
        assert rel_err(out, ref) < tol

    return check

"""4-bit codes blocked by row tile as a weight's only copy (kernels/w4_blocked.py, `w4a16.BLOCKED_CODES`): the
layout's address formula and its torch inverse, every 4-bit kernel reading blocked codes (`blocked=`) computing the
bits it computes on the plain layout (the CPU interpreter), and a W4Weight loaded with the constant on giving the
bits of one loaded with it off at every row count and through the split norm and SiLU epilogue, in the same bytes."""
from __future__ import annotations

import os

import pytest
import torch

from radixlm.kernels.small_m import SmallMConfig, tickets_for
from radixlm.kernels.split_norm import AddNorm, PendingNorm
from radixlm.kernels.w4_blocked import block_codes, code_rows, unblock_codes
from radixlm.kernels.w4a16_gemm import W4Config, w4_dequantize, w4a16_matmul
from radixlm.kernels.w4a16_gemv import GemvConfig, w4a16_gemv
from radixlm.kernels.w4a16_mma_m1 import Mma1Config, w4a16_mma_m1
from radixlm.kernels.w4a16_small_m import w4a16_small_m_matmul
from radixlm.runtime.quantization import w4a16
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

N, K = 64, 640  # 5 chunks: split ends that are not whole steps
# These tests make W4Weights of CPU tensors and tell W4Weight that Triton serves them: only Triton's CPU interpreter
# runs its kernels on CPU tensors (tests/conftest.py turns it on wherever CUDA is absent, as in CI); on a GPU the
# kernel tests above cover the same kernels with CUDA tensors.
interpreter_only = pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1",
                                      reason="W4Weights of CPU tensors run their Triton kernels only in the interpreter")


def _weight(device: str, group: int = 128, symmetric: bool = False, act_order: bool = True) -> W4Weight:
    g = torch.Generator().manual_seed(group + symmetric)
    part = quantize_rtn(torch.randn(N, K, generator=g) * torch.rand(N, 1, generator=g) * 3, group, symmetric)
    g_idx = (torch.arange(K) // group)[torch.randperm(K, generator=g)] if act_order else None
    return W4Weight([W4Part(part.codes.to(device), part.scales.to(device),
                            None if part.zeros is None else part.zeros.to(device),
                            None if g_idx is None else g_idx.to(device))], group, "test")


def _x(m: int, device: str, seed: int = 1) -> torch.Tensor:
    return (torch.randn(m, K, generator=torch.Generator().manual_seed(seed)) * 2).to(torch.bfloat16).to(device)


def test_layout_address_and_inverse():
    codes = torch.arange(N * 160, dtype=torch.int32).view(N, 160).to(torch.int16)  # 160 halfwords: 5 chunks
    for bn in (8, 16, 32):
        blocked = block_codes(codes, bn)
        r, c = torch.meshgrid(torch.arange(N), torch.arange(160), indexing="ij")
        at = ((r // bn) * (160 // 32) + c // 32) * bn * 32 + (r % bn) * 32 + c % 32
        assert torch.equal(blocked.view(-1)[at], codes)
        assert torch.equal(unblock_codes(blocked, bn), codes)
        rows = torch.tensor([63, 0, 17, 9, 9, 40])
        assert torch.equal(code_rows(blocked, rows, bn), codes[rows])
        assert torch.equal(code_rows(blocked, slice(None), bn), codes)
        assert torch.equal(code_rows(blocked, slice(10, 30), bn), codes[10:30])
    assert unblock_codes(codes, 0) is codes and torch.equal(code_rows(codes, slice(3, 5), 0), codes[3:5])
    with pytest.raises(ValueError, match="tiles"):
        block_codes(codes[:40], 16)


@pytest.mark.parametrize("bn", [16, 32])
def test_every_kernel_reads_blocked_codes(device, bn):
    """Each kernel's tile (16 / 32 / 64 rows) against blocks of 16 and 32 rows: equal to the plain layout's bits."""
    w = _weight(device)
    blocked = block_codes(w.codes, bn)
    args = (w.scales, w.zeros, w.perm, K, w.group_size)
    for m, cfg in ((3, None), (20, W4Config(block_m=32, block_n=32, num_warps=4, num_stages=1))):
        x = _x(m, device)
        assert torch.equal(w4a16_matmul(x, blocked, *args, cfg=cfg, blocked=bn), w4a16_matmul(x, w.codes, *args, cfg=cfg))
    assert torch.equal(w4_dequantize(blocked, *args, torch.float32, blocked=bn),
                       w4_dequantize(w.codes, *args, torch.float32))
    tickets = tickets_for(N, torch.device(device))
    x = _x(5, device)
    cfg = SmallMConfig("dot", 16, 256, 2, 1, 1)
    assert torch.equal(w4a16_small_m_matmul(x, blocked, *args, tickets=tickets, cfg=cfg, blocked=bn),
                       w4a16_small_m_matmul(x, w.codes, *args, tickets=tickets, cfg=cfg))
    x = _x(1, device)
    gemv = GemvConfig.parse("gemv-n16-c2-w1-s2-p1")
    for silu in (False, True):
        assert torch.equal(w4a16_gemv(x, blocked, *args, tickets=tickets, cfg=gemv, silu_mul=silu, blocked=bn),
                           w4a16_gemv(x, w.codes, *args, tickets=tickets, cfg=gemv, silu_mul=silu))
    for mma in (Mma1Config(block_n=16, chunks=2, num_warps=1, split_k=2, num_stages=1, sums=True),
                Mma1Config(block_n=32, chunks=1, num_warps=1, split_k=1, num_stages=1, window=8, split_major=True)):
        for silu in (False, True):  # (the SiLU epilogue's tile: gate rows and their up rows, far apart)
            assert torch.equal(w4a16_mma_m1(x, blocked, *args, tickets=tickets, cfg=mma, silu_mul=silu, blocked=bn),
                               w4a16_mma_m1(x, w.codes, *args, tickets=tickets, cfg=mma, silu_mul=silu))
    assert not tickets.any()
    with pytest.raises(ValueError, match="whole blocks"):
        w4a16_mma_m1(x[:, :K], w.codes[:40], *args, cfg=Mma1Config(block_n=16), blocked=32)


@pytest.fixture
def blocked_load(monkeypatch):
    """W4Weights made as on a GPU (the Triton kernels, here interpreted) with the tensor-core kernel's table listing
    N x K at a 32-row tile; returns a maker taking BLOCKED_CODES."""
    from radixlm.kernels import w4a16_mma_m1 as mma1

    monkeypatch.setattr(w4a16, "triton_serves", lambda codes: True)
    monkeypatch.setitem(mma1.DEFAULTS, (N, K), {1: "mma1-n32-c2-w1-sa-st1-g1-j8-r1"})

    def make(on: bool, **kw) -> W4Weight:
        monkeypatch.setattr(w4a16, "BLOCKED_CODES", on)
        return _weight("cpu", **kw)

    return make


@interpreter_only
def test_blocked_codes_constant_keeps_the_bits_and_the_bytes(blocked_load):
    plain, blocked = blocked_load(False), blocked_load(True)
    assert plain.blocked == 0 and blocked.blocked == 32 and "blocked-32" in blocked.format
    assert torch.equal(blocked.codes, block_codes(plain.codes, 32)) and blocked.codes_m1 is None
    assert blocked.nbytes == plain.nbytes
    assert torch.equal(blocked.dequantize(), plain.dequantize())
    rows = torch.tensor([5, 62, 33])
    assert torch.equal(blocked.rows(rows), plain.rows(rows))
    for m in (1, 2, 7, 16, 20, 64, 256):  # tensor-core M = 1, small-M, tiled, dequantize + matmul
        x = _x(m, "cpu", seed=m)
        assert torch.equal(blocked.linear(x), plain.linear(x)), m
    x = _x(1, "cpu", seed=3)
    g = torch.Generator().manual_seed(4)
    add = AddNorm(torch.randn(1, N, generator=g).to(torch.bfloat16), torch.rand(N, generator=g), 1e-5)
    for w in (plain, blocked):
        w.split_norm = w.silu_epilogue = True
    (p1, r1), (p2, r2) = (w.linear_split_norm(x, add_norm=add) for w in (blocked, plain))
    assert torch.equal(p1.u, p2.u) and torch.equal(p1.sumsq, p2.sumsq) and torch.equal(r1, r2)
    pending = PendingNorm(x, (torch.rand(4, generator=g) * 64), 1e-5)
    for silu in (False, True):
        got = blocked.linear_split_norm(None, pending=pending, silu_mul=silu)
        assert got is not None and torch.equal(got, plain.linear_split_norm(None, pending=pending, silu_mul=silu))
    assert torch.equal(blocked.linear_silu_mul(x), plain.linear_silu_mul(x))
    # the copy of the blk variants is not made over blocked codes; set_blocked goes back to the plain bytes
    assert blocked.use_blocked_m1(True) and blocked.codes_m1 is None
    assert not blocked.set_blocked(False) and torch.equal(blocked.codes, plain.codes)
    assert blocked.set_blocked(True) and blocked.blocked == 32


@interpreter_only
def test_blocked_codes_constant_leaves_other_shapes_plain(blocked_load, monkeypatch):
    """Only the tensor-core kernel's table shapes are blocked; off a GPU (no Triton kernels) nothing is."""
    from radixlm.kernels import w4a16_mma_m1 as mma1

    monkeypatch.setitem(mma1.DEFAULTS, (N, K), {1: "mma1-n48-c2-w1-sa-st1-g1-j8-r1"})  # 64 rows are not whole tiles
    assert blocked_load(True).blocked == 0
    monkeypatch.delitem(mma1.DEFAULTS, (N, K))
    assert blocked_load(True).blocked == 0
    monkeypatch.setitem(mma1.DEFAULTS, (N, K), {1: "mma1-n32-c2-w1-sa-st1-g1-j8-r1"})
    monkeypatch.setattr(w4a16, "triton_serves", lambda codes: False)
    assert blocked_load(True).blocked == 0


@interpreter_only
def test_blocked_codes_environment_overrides_the_constant(blocked_load, monkeypatch):
    """$RADIXLM_W4_BLOCKED_CODES (what the sweep's -blocked / -plain Engine arms set for their scheduler process)."""
    from radixlm.benchmarks.small_m_gemm_sweep import ARM_ENV, DECODE_ARMS

    assert ARM_ENV["w4a16-defaults-blocked"] == {w4a16.BLOCKED_CODES_ENV: "1"} and set(ARM_ENV) <= set(DECODE_ARMS)
    monkeypatch.setenv(w4a16.BLOCKED_CODES_ENV, ARM_ENV["w4a16-defaults-blocked"][w4a16.BLOCKED_CODES_ENV])
    assert blocked_load(False).blocked == 32
    monkeypatch.setenv(w4a16.BLOCKED_CODES_ENV, ARM_ENV["w4a16-defaults-plain"][w4a16.BLOCKED_CODES_ENV])
    assert blocked_load(True).blocked == 0
    monkeypatch.delenv(w4a16.BLOCKED_CODES_ENV)
    assert blocked_load(True).blocked == 32 and blocked_load(False).blocked == 0

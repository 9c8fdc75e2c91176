"""The batch-1 tensor-core 4-bit linear (kernels/w4a16_mma_m1.py; the CPU interpreter without CUDA) against the
float32 reference of the same codes (`W4Weight.dequantize`): every group size the layout takes, symmetric /
asymmetric, act-order, GGUF's affine offsets, one launch and split-K (tickets back at zero), a window of 16
groups per split (more splits than configured where the groups are small), and the plane conversion bit for bit."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from radixlm.kernels.small_m import tickets_for
from radixlm.kernels.w4a16_gemm import pack_codes
from radixlm.kernels.w4a16_mma_m1 import Mma1Config, _plane, mma1_plan, step_groups, w4a16_mma_m1
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight


def _weight(n: int, k: int, group: int, symmetric: bool, act_order: bool, device: str) -> W4Weight:
    g = torch.Generator().manual_seed(n * 7 + k + group)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    size = group if group > 0 else k
    part = quantize_rtn(w, size, symmetric)
    g_idx = (torch.arange(k) // size)[torch.randperm(k, generator=g)] if act_order else None
    return W4Weight([W4Part(part.codes.to(device), part.scales.to(device),
                            None if part.zeros is None else part.zeros.to(device),
                            None if g_idx is None else g_idx.to(device))], size, "test")


CASES = [  # n, k, group, symmetric, act-order
    (96, 512, 128, True, False),
    (80, 256, 32, False, True),
    (48, 384, 64, False, False),
    (40, 160, -1, True, False),  # per channel, K not a multiple of 128 (padded), N not a multiple of the tile
    (40, 1024, 256, False, False),  # two chunks a group
    (24, 250, -1, False, False),  # K not a whole chunk
    (32, 1152, 32, True, False),  # 36 groups of 32: more splits than asked, each inside one window of 16 groups
]
CONFIGS = [Mma1Config(block_n=16, chunks=1, num_warps=1, split_k=3, num_stages=1),
           Mma1Config(block_n=32, chunks=2, num_warps=1, split_k=1, num_stages=1),
           Mma1Config(block_n=16, chunks=1, num_warps=1, split_k=3, num_stages=1, sums=True),  # sums before the loop
           Mma1Config(block_n=32, chunks=2, num_warps=1, split_k=1, num_stages=1, waves=2, sums=True),
           # 8 groups; the splits of a row tile as consecutive programs
           Mma1Config(block_n=16, chunks=1, num_warps=1, split_k=2, num_stages=1, sums=True, window=8, split_major=True),
           Mma1Config(block_n=32, chunks=1, num_warps=1, split_k=1, num_stages=1, window=8)]


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 / fp16: the output's rounding
    return bool(((got.float().cpu() - ref.cpu()).abs() <= ref.abs().cpu() * tol + 1e-4 * ref.abs().max().cpu()).all())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k", "group", "symmetric", "act_order"), CASES)
def test_mma_m1_matches_reference(device, dtype, n, k, group, symmetric, act_order):
    w = _weight(n, k, group, symmetric, act_order, device)
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(k)) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    tickets = tickets_for(n, torch.device(device))
    for cfg in CONFIGS:
        got = w4a16_mma_m1(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, tickets=tickets, cfg=cfg)
        assert got.dtype == dtype and got.shape == (1, n)
        assert _close(got, ref, dtype)
        assert not tickets.any()  # every tile's last split reset its ticket


def test_mma_m1_affine_offsets(device):
    """GGUF's W = (c - 8) * s + o per 32 columns (w4_gguf.py)."""
    g = torch.Generator().manual_seed(5)
    n, k = 48, 288
    parts = (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(k // 32, n, generator=g).half(),
             None, None, torch.randn(k // 32, n, generator=g))
    w = W4Weight([W4Part(*(t.to(device) if t is not None else None for t in parts))], 32, "gguf")
    x = (torch.randn(1, k, generator=g) * 2).to(torch.bfloat16).to(device)
    ref = x.float() @ w.dequantize().t()
    for cfg in CONFIGS:
        assert _close(w4a16_mma_m1(x, w.codes, w.scales, None, None, k, 32, offsets=w.offsets, cfg=cfg), ref,
                      torch.bfloat16)


def test_mma_m1_plan_and_refusals(device):
    split, per = mma1_plan(4096, 4096, 128, 32, Mma1Config(), torch.device(device))
    assert mma1_plan(4096, 4096, 32, 128, Mma1Config(split_k=1), torch.device(device)) == (8, 4)  # 16 groups a split
    assert split >= 1 and per % Mma1Config().chunks == 0 and (split - 1) * per < 4096 // 128 <= split * per
    w = _weight(32, 256, 128, True, False, device)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_mma_m1(torch.zeros(2, 256, device=device), w.codes, w.scales, None, None, 256, 128)
    with pytest.raises(ValueError, match="window"):  # 8 chunks of 32-column groups: 32 groups, more than 16
        w4a16_mma_m1(torch.zeros(1, 256, device=device), w.codes, w.scales, None, None, 256, 32,
                     cfg=Mma1Config(block_n=16, chunks=8, num_warps=1))
    for cfg in (Mma1Config(64, 2, 4, None, 3), Mma1Config(64, 2, 1, 4, 4, waves=2, sums=True), Mma1Config(sums=True, waves=3),
                Mma1Config(sums=True, window=8), Mma1Config(sums=True, window=8, split_major=True)):
        assert Mma1Config.parse(cfg.key()) == cfg
    assert step_groups(8, 128) == 8 and step_groups(16, 128) == 16 and step_groups(2, 512) == 1  # aligned steps
    assert step_groups(2, 96) == 4 and step_groups(1, 32) == 4
    # a step of 8 chunks of aligned 128-column groups fills a window of 8 exactly (refused before step_groups)
    w = _weight(32, 1024, 128, False, False, device)
    x = torch.randn(1, 1024, generator=torch.Generator().manual_seed(4)).to(device)
    got = w4a16_mma_m1(x, w.codes, w.scales, w.zeros, None, 1024, 128,
                       cfg=Mma1Config(block_n=16, chunks=8, num_warps=1, num_stages=1, sums=True, window=8))
    assert _close(got, x.float() @ w.dequantize().t(), torch.float32)


@triton.jit
def _planes(H, Out, MAGIC: tl.constexpr):
    r = tl.arange(0, 64)
    h = tl.load(H + r)
    for j in tl.static_range(4):
        tl.store(Out + j * 64 + r, _plane(h, j, MAGIC, False).to(tl.float32))


@pytest.mark.parametrize("magic", [1, 2])
def test_plane_conversion_is_off_plus_code(device, magic):
    """Nibble plane j of the packed halfwords as bf16 128 + c / fp16 1024 + c, exactly."""
    codes = torch.randint(0, 16, (1, 256), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    h = pack_codes(codes).reshape(-1)[:64].contiguous().to(device)
    out = torch.empty(256, dtype=torch.float32, device=device)
    _planes[(1,)](h, out, MAGIC=magic)
    w = h.cpu().to(torch.int32) & 0xFFFF
    expected = torch.cat([((w >> (4 * j)) & 15).float() + (128 if magic == 1 else 1024) for j in range(4)])
    assert torch.equal(out.cpu(), expected)


def test_linear_sends_decode_rows_to_mma_m1_where_listed_and_falls_back_once(device, monkeypatch):
    """W4Weight.linear: M = 1 through this kernel where its table lists the shape (its result, bit for bit), before
    the GEMV; a compile failure is logged once and the GEMV / small-M path serves from then on."""
    from radixlm.kernels import w4a16_mma_m1 as km
    from radixlm.kernels.w4a16_small_m import w4a16_small_m_matmul
    from radixlm.runtime.quantization import w4a16 as wq

    w = _weight(48, 256, 128, True, False, device)
    w.use_triton, w.tickets = True, tickets_for(48, torch.device(device))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    monkeypatch.setitem(km.DEFAULTS, (48, 256), {1: "mma1-n16-c1-w1-s2-st1"})
    assert torch.equal(w.linear(x), w4a16_mma_m1(x, w.codes, w.scales, None, None, 256, 128,
                                                 cfg=Mma1Config.parse("mma1-n16-c1-w1-s2-st1")))
    monkeypatch.setattr(wq, "_mma1_failed", [])

    def broken(*_a, **_k):
        raise triton.CompilationError("w4a16_mma_m1.py", None, "no such instruction")

    monkeypatch.setattr(km, "w4a16_mma_m1", broken)
    assert torch.equal(w.linear(x), w4a16_small_m_matmul(x, w.codes, w.scales, None, None, 256, 128))
    assert wq._mma1_failed == [True]
    monkeypatch.setattr(wq, "_mma1_failed", [])
    monkeypatch.setattr(km, "w4a16_mma_m1", lambda *_a, **_k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.linear(x)


def test_decode_pdl_auto_follows_the_measured_switches(monkeypatch):
    """--decode-pdl auto: PDL for models with quantized linears (their batch-1 kernels take it) and, by its own
    switch (on since the bf16 GEMV measured faster with it), for bf16 ones; on / off as asked; never where the
    device lacks PDL."""
    from radixlm.kernels import gdc

    gpu = torch.device("cuda", 0)
    monkeypatch.setattr(gdc, "supported", lambda device: device.type == "cuda")
    assert gdc.enabled("auto", gpu, quantized=True) and gdc.enabled("auto", gpu, quantized=False)
    monkeypatch.setattr(gdc, "AUTO_ON", False)
    assert gdc.enabled("auto", gpu, quantized=True) and not gdc.enabled("auto", gpu, quantized=False)
    assert gdc.enabled("on", gpu) and not gdc.enabled("off", gpu, quantized=True)
    assert not gdc.enabled("auto", torch.device("cpu"), quantized=True)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_mma_m1_silu_mul_epilogue_is_silu_and_mul_of_the_product(device, dtype):
    """silu_mul: gate and up rows paired in each tile, silu(gate) * up written by the last split, the bits of
    ops.silu_and_mul over the plain product."""
    from radixlm.kernels.ops import silu_and_mul

    n, k = 64, 512
    w = _weight(n, k, 128, False, True, device)
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(9)) * 2).to(dtype).to(device)
    tickets = tickets_for(n, torch.device(device))
    for cfg in CONFIGS:
        args = (x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size)
        fused = w4a16_mma_m1(*args, tickets=tickets, cfg=cfg, silu_mul=True)
        assert fused.shape == (1, n // 2) and not tickets.any()
        assert torch.equal(fused, silu_and_mul(w4a16_mma_m1(*args, tickets=tickets, cfg=cfg)))


def test_blocked_codes_give_the_same_bits(device):
    """`block_codes`: each row tile's chunks as contiguous runs; the kernel reading them (blocked=block_n) computes the
    same bits as on the weight's own layout, plain and as a split norm's producer / consumer."""
    from radixlm.kernels.split_norm import AddNorm, PendingNorm
    from radixlm.kernels.w4_blocked import block_codes

    n, k = 64, 640  # 5 chunks: the splits' ends are not whole steps for chunks=2
    w = _weight(n, k, 128, False, True, device)
    codes = w.codes.cpu()
    blocked = block_codes(codes, 16)
    tile, chunk, row, half = 2, 3, 5, 7
    assert blocked.view(-1)[((tile * 5 + chunk) * 16 + row) * 32 + half] == codes[tile * 16 + row, chunk * 32 + half]
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(1, k, generator=g) * 2).to(torch.bfloat16).to(device)
    tickets = tickets_for(n, torch.device(device))
    args = (w.scales, w.zeros, w.perm, k, w.group_size)
    for cfg in CONFIGS:
        copy = block_codes(w.codes, cfg.block_n)
        plain = w4a16_mma_m1(x, w.codes, *args, tickets=tickets, cfg=cfg)
        assert torch.equal(w4a16_mma_m1(x, copy, *args, tickets=tickets, cfg=cfg, blocked=cfg.block_n), plain)
        pending = PendingNorm(x, (torch.rand(4, generator=g) * 64).to(device), 1e-5)
        assert torch.equal(w4a16_mma_m1(None, copy, *args, tickets=tickets, cfg=cfg, pending=pending, blocked=cfg.block_n),
                           w4a16_mma_m1(None, w.codes, *args, tickets=tickets, cfg=cfg, pending=pending))
        add = AddNorm(torch.randn(1, n, generator=g).to(torch.bfloat16).to(device), torch.rand(n, generator=g).to(device),
                      1e-5)
        (p1, r1), (p2, r2) = (w4a16_mma_m1(x, c, *args, tickets=tickets, cfg=cfg, add_norm=add, blocked=b)
                              for c, b in ((copy, cfg.block_n), (w.codes, 0)))
        assert torch.equal(p1.u, p2.u) and torch.equal(p1.sumsq, p2.sumsq) and torch.equal(r1, r2)
        assert not tickets.any()
    # (blocks of another row count and the SiLU epilogue's paired rows: tests/kernels/test_kernels_w4_blocked.py)
    with pytest.raises(ValueError, match="tiles"):
        block_codes(codes[:40], 16)

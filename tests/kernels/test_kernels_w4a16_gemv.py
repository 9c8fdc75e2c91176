"""The decode GEMV of the 4-bit linear (kernels/w4a16_gemv.py; the CPU interpreter without CUDA) against
the float32 reference of the same codes (`W4Weight.dequantize`): every group size the layout takes,
symmetric / asymmetric, act-order, GGUF's affine offsets, one launch and split-K (the last split of a
tile sums the partials and resets its ticket, so a second call on the same tickets is equal), and the
128 + c float trick bit for bit."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from radixlm.kernels.w4a16_gemv import GemvConfig, gemv_plan, tickets_for, w4a16_gemv
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


CASES = [  # m, n, k, group, symmetric, act-order
    (1, 96, 512, 128, True, False),
    (1, 80, 256, 32, False, True),
    (1, 48, 384, 64, False, False),
    (1, 40, 160, -1, True, False),  # per channel, K not a multiple of 128 (padded), N not a multiple of the tile
    (1, 32, 256, 128, False, False),
    (1, 40, 1024, 256, False, False),  # two chunks a group: found by a shift
    (1, 24, 250, -1, False, False),  # K even but not a whole chunk: the last pair plane partly masked
]
SPLIT_AND_ONE = [GemvConfig(block_n=16, chunks=1, split_k=3), GemvConfig(block_n=32, chunks=2, num_warps=2, split_k=1)]
# float32 (PRECISE nibbles, the tight tolerance) runs every case. bfloat16 / float16 change only how x is read
# (XMODE: int32 pairs, or one by one through the act-order permutation) and the nibble trick (not PRECISE),
# so they run the cases that vary what those meet: whole chunks with no zeros (0), act-order with zeros and
# groups inside a chunk (1), and a K that is not a whole chunk, the last pair partly masked (6). Cases 2-5
# differ from these in group indexing and N / K padding only, which the dtype does not touch.
DTYPE_CASES = ([(torch.float32, *case) for case in CASES]
               + [(dtype, *CASES[i]) for dtype in (torch.bfloat16, torch.float16) for i in (0, 1, 6)])


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: the output's rounding
    return bool(((got.float().cpu() - ref.cpu()).abs() <= ref.abs().cpu() * tol + 1e-5 * ref.abs().max().cpu()).all())


@pytest.mark.parametrize(("dtype", "m", "n", "k", "group", "symmetric", "act_order"), DTYPE_CASES, ids=str)
def test_gemv_matches_reference(device, dtype, m, n, k, group, symmetric, act_order):
    w = _weight(n, k, group, symmetric, act_order, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    tickets = tickets_for(n, torch.device(device))
    for cfg in SPLIT_AND_ONE:
        got = w4a16_gemv(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, tickets=tickets, cfg=cfg)
        assert got.dtype == dtype and got.shape == (m, n)
        assert _close(got, ref, dtype)
        assert not tickets.any()  # every tile's last split reset its ticket
    again = w4a16_gemv(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, tickets=tickets, cfg=SPLIT_AND_ONE[0])
    assert torch.equal(again, w4a16_gemv(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, cfg=SPLIT_AND_ONE[0]))


def test_gemv_affine_offsets(device):
    """GGUF's W = (c - 8) * s + o per 32 columns (w4_gguf.py)."""
    g = torch.Generator().manual_seed(5)
    n, k = 48, 288
    parts = (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(k // 32, n, generator=g).half(),
             None, None, torch.randn(k // 32, n, generator=g))
    w = W4Weight([W4Part(*(t.to(device) if t is not None else None for t in parts))], 32, "gguf")
    x = (torch.randn(1, k, generator=g) * 2).to(torch.bfloat16).to(device)
    ref = x.float() @ w.dequantize().t()
    for cfg in SPLIT_AND_ONE:
        assert _close(w4a16_gemv(x, w.codes, w.scales, None, None, k, 32, offsets=w.offsets, cfg=cfg), ref, torch.bfloat16)


def test_gemv_plan_fills_the_gpu_and_refuses_bad_shapes(device):
    split, per = gemv_plan(4096, 4096, GemvConfig(), torch.device(device))
    assert split >= 1 and per % GemvConfig().chunks == 0 and (split - 1) * per < 4096 // 128 <= split * per
    w = _weight(32, 256, 128, True, False, device)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_gemv(torch.zeros(17, 256, device=device), w.codes, w.scales, None, None, 256, 128)
    with pytest.raises(ValueError, match="tickets"):
        w4a16_gemv(torch.zeros(1, 256, device=device), w.codes, w.scales, None, None, 256, 128,
                   tickets=torch.zeros(1, dtype=torch.int32, device=device), cfg=GemvConfig(block_n=8, chunks=1, split_k=2))


@triton.jit
def _magic(Words, Out):
    r = tl.arange(0, 64)
    words = tl.load(Words + r)
    for j in tl.static_range(4):
        tl.store(Out + j * 64 + r, (((words << (16 - 4 * j)) & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True))
        tl.store(Out + 256 + j * 64 + r, (((words >> (4 * j)) & 0x000F0000) | 0x43000000).to(tl.float32, bitcast=True))


def test_nibble_to_float_trick_is_exact(device):
    words = torch.randint(-(1 << 31), (1 << 31) - 1, (64,), dtype=torch.int64,
                          generator=torch.Generator().manual_seed(1)).to(torch.int32).to(device)
    out = torch.empty(512, dtype=torch.float32, device=device)
    _magic[(1,)](words, out)
    w = words.cpu().to(torch.int64) & 0xFFFFFFFF
    expected = torch.cat([((w >> (4 * j + 16 * h)) & 15).float() + 128 for h in range(2) for j in range(4)])
    assert torch.equal(out.cpu(), expected)


def test_linear_dispatches_decode_rows_to_the_gemv_and_falls_back_once(device, monkeypatch):
    """W4Weight.linear: M = 1 through the GEMV where its table lists the shape (its result, bit for bit), else
    the small-M kernel; a GEMV that does not compile is logged once and the MMA kernel serves from then on
    (other errors propagate)."""
    from radixlm.kernels import w4a16_gemv as kv
    from radixlm.kernels.w4a16_gemm import w4a16_matmul
    from radixlm.kernels.w4a16_small_m import w4a16_small_m_matmul
    from radixlm.runtime.quantization import w4a16 as wq

    w = _weight(48, 256, 128, True, False, device)
    w.use_triton, w.tickets = True, tickets_for(48, torch.device(device))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    monkeypatch.setitem(kv.DEFAULTS, (48, 256), {1: "gemv-n16-c1-w1-s2-p1"})
    assert torch.equal(w.linear(x), w4a16_gemv(x, w.codes, w.scales, None, None, 256, 128))
    monkeypatch.delitem(kv.DEFAULTS, (48, 256))  # not listed: the small-M kernel
    assert torch.equal(w.linear(x), w4a16_small_m_matmul(x, w.codes, w.scales, None, None, 256, 128))
    monkeypatch.setattr(wq, "GEMV_UNLISTED", True)
    monkeypatch.setattr(wq, "_gemv_failed", [])

    def broken(*_a, **_k):
        raise triton.CompilationError("w4a16_gemv.py", None, "no such instruction")

    monkeypatch.setattr(kv, "w4a16_gemv", broken)
    assert torch.equal(w.linear(x), w4a16_matmul(x, w.codes, w.scales, None, None, 256, 128))
    assert wq._gemv_failed == [True]
    monkeypatch.setattr(wq, "_gemv_failed", [])
    monkeypatch.setattr(kv, "w4a16_gemv", lambda *_a, **_k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        w.linear(x)


def test_decode_pdl_switch_reaches_the_kernel_and_changes_nothing(device, monkeypatch):
    """set_decode_pdl marks every quantized linear of a model; a marked W4Weight launches its GEMV with
    pdl=True (on a GPU: programmatic dependent launch; the interpreter ignores it), the same result."""
    from radixlm.kernels import w4a16_gemv as kv
    from radixlm.runtime.quantization.base import set_decode_pdl

    w = _weight(48, 256, 128, True, False, device)
    w.use_triton, w.tickets = True, tickets_for(48, torch.device(device))
    monkeypatch.setitem(kv.DEFAULTS, (48, 256), {1: "gemv-n16-c1-w1-s2-p1"})
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    before = w.linear(x)
    model = torch.nn.Sequential(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2))
    model[1].quantized = w
    assert set_decode_pdl(model, True) == 1 and w.pdl
    seen = []
    real = kv.w4a16_gemv
    monkeypatch.setattr(kv, "w4a16_gemv", lambda *a, **k: seen.append(k.get("pdl")) or real(*a, **k))
    assert torch.equal(w.linear(x), before) and seen == [True]
    assert set_decode_pdl(model, False) == 1 and not w.pdl


def test_gemv_table_from_defaults_or_a_sweep(tmp_path, monkeypatch):
    """Config keys round-trip; the GEMV serves a shape only where its table (DEFAULTS, or a sweep JSON's "gemv"
    entries over them through $RADIXLM_SMALL_M_TABLE) lists it."""
    import json

    from radixlm.kernels import small_m
    from radixlm.kernels import w4a16_gemv as kv

    for key in ("gemv-n32-c4-w4-sa-p1", "gemv-n64-c2-w2-s4-p0"):
        assert GemvConfig.parse(key).key() == key
    monkeypatch.delenv(small_m.TABLE_ENV, raising=False)
    monkeypatch.setitem(kv.DEFAULTS, (96, 512), {1: "gemv-n16-c2-w2-s2-p1"})
    assert kv.gemv_table_config(96, 512) == GemvConfig.parse("gemv-n16-c2-w2-s2-p1")
    assert kv.gemv_table_config(97, 512) is None and kv.gemv_default_config(97, 512) == GemvConfig()
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"gemv": {"97x512": {"1": "gemv-n64-c4-w4-sa-p0"}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    assert kv.gemv_table_config(97, 512).key() == "gemv-n64-c4-w4-sa-p0"
    assert kv.gemv_table_config(96, 512).key() == "gemv-n16-c2-w2-s2-p1"  # the defaults stay under a sweep


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize(("n", "k", "group", "symmetric", "act_order"), [(96, 512, 128, True, False),
                                                                      (80, 256, 32, False, True)])
def test_gemv_silu_mul_epilogue_is_silu_and_mul_of_the_product(device, dtype, n, k, group, symmetric, act_order):
    """silu_mul: the [gate | up] weight's rows paired in each tile, the last split writes silu(gate) * up with the
    bits of ops.silu_and_mul over the plain product (one launch less in the MLP); N / 2 must fill the half tiles."""
    from radixlm.kernels.ops import silu_and_mul

    w = _weight(n, k, group, symmetric, act_order, device)
    x = (torch.randn(1, k, generator=torch.Generator().manual_seed(n)) * 2).to(dtype).to(device)
    tickets = tickets_for(n, torch.device(device))
    for cfg in SPLIT_AND_ONE:
        args = (x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size)
        if (n // 2) % (cfg.block_n // 2):
            with pytest.raises(ValueError, match="silu_mul"):
                w4a16_gemv(*args, tickets=tickets, cfg=cfg, silu_mul=True)
            continue
        fused = w4a16_gemv(*args, tickets=tickets, cfg=cfg, silu_mul=True)
        assert fused.shape == (1, n // 2) and not tickets.any()
        assert torch.equal(fused, silu_and_mul(w4a16_gemv(*args, tickets=tickets, cfg=cfg)))


def test_gate_up_layer_fuses_silu_mul_for_one_row_only(device, monkeypatch):
    """ColumnParallelLinear.forward_then_silu_mul over a 4-bit [gate | up] weight (--decode-silu-epilogue on): one decode
    row through the serving M = 1 kernel with SiLU-and-mul in its epilogue (the bits of the two launches), None
    for more rows, a LoRA update, the CPU reference path, the flag off, or a row tile that N / 2 does not fill."""
    from radixlm.kernels import w4a16_gemv as kv
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.runtime.parallel.layers import ColumnParallelLinear

    w = _weight(64, 256, 128, True, False, device)
    layer = ColumnParallelLinear(256, 64, bias=False)
    layer.quantized = w
    x1 = torch.randn(1, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    assert layer.forward_then_silu_mul(x1) is None  # the CPU reference weight: no kernel
    w.use_triton, w.tickets = True, tickets_for(64, torch.device(device))
    monkeypatch.setitem(kv.DEFAULTS, (64, 256), {1: "gemv-n16-c1-w1-s2-p0"})
    assert layer.forward_then_silu_mul(x1) is None  # --decode-silu-epilogue off (the default)
    w.silu_epilogue = True
    assert torch.equal(layer.forward_then_silu_mul(x1), silu_and_mul(w.linear(x1)))
    assert layer.forward_then_silu_mul(x1.expand(2, 256).contiguous()) is None
    monkeypatch.setitem(kv.DEFAULTS, (64, 256), {1: "gemv-n128-c1-w1-s2-p0"})  # 32 gate rows: not half of 128
    assert layer.forward_then_silu_mul(x1) is None
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection
    from radixlm.runtime.lora.sgmv import LoRASegments

    batch, rank = BatchAdapters(), 4  # a real LoRA projection on [gate | up]: two parts of 32 columns
    a = torch.zeros(1, 2 * rank, 256, dtype=torch.bfloat16, device=device)
    b = torch.zeros(1, 64, rank, dtype=torch.bfloat16, device=device)
    monkeypatch.setitem(kv.DEFAULTS, (64, 256), {1: "gemv-n16-c1-w1-s2-p0"})
    layer.lora = LoRAProjection(a, b, [0, 32, 64], rank, batch, use_triton=False)
    assert torch.equal(layer.forward_then_silu_mul(x1), silu_and_mul(w.linear(x1)))  # no adapter row this forward
    batch.segments = LoRASegments.build(torch.tensor([0]), 1, torch.device(device))
    assert layer.forward_then_silu_mul(x1) is None  # an adapter row: the update needs the unfused product

"""The small-M (decode) kernels (kernels/fp8_small_m.py, kernels/w4a16_small_m.py; the CPU interpreter
without CUDA) against the float32 references of the same codes: every config family (FP8 "dot" / "fma",
one launch / split-K finished by the last split, row and column tails, K not a whole number of tiles),
M = 1..16, the 4-bit formats (symmetric / asymmetric, act-order, group 32 / 64 / 128 / per channel, GGUF
affine offsets); the tickets back at zero and a repeated call bit-equal (fixed summation order); the
config tables, the sweep JSON override and the dispatch of the linear layers with its fallback."""
from __future__ import annotations

import json

import pytest
import torch
import triton

from radixlm.kernels import small_m
from radixlm.kernels.fp8_small_m import fp8_small_m_matmul
from radixlm.kernels.small_m import SmallMConfig, lookup, plan, tickets_for
from radixlm.kernels.w4a16_small_m import plan_chunks, w4a16_small_m_matmul
from radixlm.runtime.quantization.fp8 import Fp8Weight
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight


def _close(got: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype) -> bool:
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: the output's rounding
    return bool(((got.float().cpu() - ref.cpu()).abs() <= ref.abs().cpu() * tol + 1e-5 * ref.abs().max().cpu()).all())


def _fp8(n: int, k: int, device: str) -> Fp8Weight:
    g = torch.Generator().manual_seed(n * 7 + k)
    q = Fp8Weight.from_float(torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 4)
    return Fp8Weight(q.codes.to(device), q.scales.to(device), None, "online")


FP8_CONFIGS = [SmallMConfig("dot", 16, 128, 1, 1, 2), SmallMConfig("dot", 32, 64, 3, 2, 2),
               SmallMConfig("fma", 8, 128, 2, 4, 2), SmallMConfig("fma", 16, 64, 1, 4, 2)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 40, 512), (2, 37, 300), (16, 24, 200)])
def test_fp8_small_m_matches_reference(device, dtype, m, n, k):
    """N = 37 / 24 leave a row tail, K = 300 / 200 a column tail (the masked-K path); split 1 and 2-3; the
    fma family at M <= 2 (refused above)."""
    w = _fp8(n, k, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(dtype).to(device)
    ref = w.reference_w8a16(x)
    tickets = tickets_for(n, torch.device(device))
    for cfg in FP8_CONFIGS:
        if cfg.kind == "fma" and m > 2:
            with pytest.raises(ValueError, match="fma family"):
                fp8_small_m_matmul(x, w.codes, w.scales.reshape(-1), tickets, cfg)
            continue
        got = fp8_small_m_matmul(x, w.codes, w.scales.reshape(-1), tickets, cfg)
        assert got.dtype == dtype and got.shape == (m, n)
        assert _close(got, ref, dtype), cfg.key()
        assert not tickets.any()  # every tile's last split reset its ticket
    split_cfg = FP8_CONFIGS[1]
    assert plan(k, split_cfg)[0] > 1
    once = fp8_small_m_matmul(x, w.codes, w.scales.reshape(-1), tickets, split_cfg)
    assert torch.equal(once, fp8_small_m_matmul(x, w.codes, w.scales.reshape(-1), tickets, split_cfg))


def test_fp8_small_m_refuses_what_it_cannot_take(device):
    w = _fp8(32, 128, device)
    with pytest.raises(ValueError, match="do not fit"):
        fp8_small_m_matmul(torch.zeros(17, 128, device=device), w.codes, w.scales.reshape(-1))
    with pytest.raises(ValueError, match="tickets"):
        fp8_small_m_matmul(torch.zeros(1, 128, device=device), w.codes, w.scales.reshape(-1),
                           torch.zeros(1, dtype=torch.int32, device=device), SmallMConfig("dot", 16, 32, 2, 4, 2))


def _w4(n: int, k: int, group: int, symmetric: bool, act_order: bool, device: str) -> W4Weight:
    g = torch.Generator().manual_seed(n * 7 + k + group)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    size = group if group > 0 else k
    part = quantize_rtn(w, size, symmetric)
    g_idx = (torch.arange(k) // size)[torch.randperm(k, generator=g)] if act_order else None
    return W4Weight([W4Part(part.codes.to(device), part.scales.to(device),
                            None if part.zeros is None else part.zeros.to(device),
                            None if g_idx is None else g_idx.to(device))], size, "test")


W4_CONFIGS = [SmallMConfig("dot", 16, 128, 1, 1, 2), SmallMConfig("dot", 32, 256, 3, 2, 2),
              SmallMConfig("dot", 16, 512, 2, 1, 3)]
F32, BF16 = torch.float32, torch.bfloat16
W4_CASES = [  # m, n, k, group, symmetric, act-order, activations
    (1, 40, 512, 128, True, False, F32),
    (1, 40, 512, 128, False, True, BF16),  # group 128: the scales / zero points loaded a step ahead
    (3, 37, 320, 32, False, True, BF16),  # 2.5 chunks: the last step is short; groups inside a chunk
    (2, 40, 160, -1, True, False, BF16),  # per channel, K padded to 256
    (16, 48, 640, 64, False, False, F32),
]


@pytest.mark.parametrize(("m", "n", "k", "group", "symmetric", "act_order", "dtype"), W4_CASES)
def test_w4_small_m_matches_reference(device, m, n, k, group, symmetric, act_order, dtype):
    w = _w4(n, k, group, symmetric, act_order, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    tickets = tickets_for(n, torch.device(device))
    for cfg in W4_CONFIGS:
        got = w4a16_small_m_matmul(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, tickets=tickets, cfg=cfg)
        assert got.dtype == dtype and got.shape == (m, n)
        assert _close(got, ref, dtype), cfg.key()
        assert not tickets.any()
    again = [w4a16_small_m_matmul(x, w.codes, w.scales, w.zeros, w.perm, k, w.group_size, tickets=tickets,
                                  cfg=W4_CONFIGS[1]) for _ in range(2)]
    assert torch.equal(*again)


def test_w4_small_m_affine_offsets(device):
    """GGUF's W = (c - 8) * s + o per 32 columns (w4_gguf.py), through split-K."""
    g = torch.Generator().manual_seed(5)
    n, k = 48, 288
    parts = (torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(k // 32, n, generator=g).half(),
             None, None, torch.randn(k // 32, n, generator=g))
    w = W4Weight([W4Part(*(t.to(device) if t is not None else None for t in parts))], 32, "gguf")
    x = (torch.randn(3, k, generator=g) * 2).to(torch.bfloat16).to(device)
    ref = x.float() @ w.dequantize().t()
    for cfg in W4_CONFIGS[:2]:
        got = w4a16_small_m_matmul(x, w.codes, w.scales, None, None, k, 32, offsets=w.offsets, cfg=cfg)
        assert _close(got, ref, torch.bfloat16)


def test_w4_small_m_refuses_fma_and_partial_chunks(device):
    w = _w4(32, 256, 128, True, False, device)
    with pytest.raises(ValueError, match="dot only"):
        w4a16_small_m_matmul(torch.zeros(1, 256, device=device), w.codes, w.scales, None, None, 256, 128,
                             cfg=SmallMConfig("dot", 16, 192, 1, 4, 2))


def test_plans_cover_k_exactly():
    for k in (64, 200, 4096, 14336):
        for cfg in (SmallMConfig(block_k=128, split_k=3), SmallMConfig(block_k=512, split_k=8), SmallMConfig(split_k=1)):
            split, per = plan(k, cfg)
            assert per % cfg.block_k == 0 and (split - 1) * per < k <= split * per and split <= cfg.split_k
            kp = triton.cdiv(k, 128) * 128
            if cfg.block_k % 128 == 0:
                split, chunks = plan_chunks(kp, cfg)
                assert chunks % (cfg.block_k // 128) == 0 and (split - 1) * chunks < kp // 128 <= split * chunks


def test_config_keys_tables_and_the_sweep_override(tmp_path, monkeypatch):
    cfg = SmallMConfig("fma", 8, 1024, 2, 8, 2)
    assert SmallMConfig.parse(cfg.key()) == cfg
    table = {(64, 32): {2: "dot-n16-k512-s1-w4-st4", 16: cfg.key()}}
    assert lookup(table, 1, 64, 32).block_k == 512 and lookup(table, 3, 64, 32) == cfg
    assert lookup(table, 1, 64, 64) is None
    from radixlm.kernels import fp8_small_m, w4a16_small_m

    dev = torch.device("cpu")
    assert fp8_small_m.config_for(2, 6144, 4096, dev) == SmallMConfig.parse(fp8_small_m.DEFAULTS[(6144, 4096)][2])
    sweep = {"tables": {"fp8": {"6144x4096": {"16": "fma-n16-k256-s2-w4-st2"}}}}
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps(sweep))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    assert fp8_small_m.config_for(4, 6144, 4096, dev).key() == "fma-n16-k256-s2-w4-st2"
    # what the sweep does not cover (other M, other kinds) keeps the module's defaults
    assert fp8_small_m.config_for(1, 6144, 4096, dev) == SmallMConfig.parse(fp8_small_m.DEFAULTS[(6144, 4096)][1])
    assert w4a16_small_m.config_for(1, 6144, 4096, dev) == SmallMConfig.parse(w4a16_small_m.DEFAULTS[(6144, 4096)][16])
    assert w4a16_small_m.config_for(1, 96, 128, dev) == w4a16_small_m.fallback_config(96, 128, dev)
    assert small_m.enabled()
    monkeypatch.setenv(small_m.TABLE_ENV, "off")
    assert not small_m.enabled()


def test_linear_layers_dispatch_decode_rows_and_fall_back_once(device, monkeypatch):
    """Fp8Weight / W4Weight at M <= 16: the small-M kernel's result bit for bit; switched off, the older kernel;
    a small-M kernel that does not compile is logged once and the older kernel serves (other errors propagate)."""
    from radixlm.kernels import fp8_small_m as fk
    from radixlm.kernels.fp8_gemm import w8a16_matmul
    from radixlm.kernels.w4a16_gemm import w4a16_matmul

    monkeypatch.delenv(small_m.TABLE_ENV, raising=False)
    monkeypatch.setattr(small_m, "_failed", set())
    fp8 = _fp8(48, 256, device)
    w4 = _w4(48, 256, 128, True, False, device)
    for w in (fp8, w4):
        w.use_triton, w.tickets = True, tickets_for(48, torch.device(device))
    x = torch.randn(1, 256, generator=torch.Generator().manual_seed(3)).to(torch.bfloat16).to(device)
    s = fp8.scales.reshape(-1)
    assert torch.equal(fp8.linear(x), fp8_small_m_matmul(x, fp8.codes, s))
    # FP8 above SMALL_M_KERNEL_MAX_M rows: the older split-K kernel (it won there on the H200)
    spy = []
    monkeypatch.setattr(fk, "fp8_small_m_matmul", lambda *a, **k: spy.append(a[0].shape[0]))
    x2 = torch.randn(2, 256, generator=torch.Generator().manual_seed(4)).to(torch.bfloat16).to(device)
    assert torch.equal(fp8.linear(x2), w8a16_matmul(x2, fp8.codes, s)) and spy == []
    monkeypatch.undo()
    monkeypatch.delenv(small_m.TABLE_ENV, raising=False)
    monkeypatch.setattr(small_m, "_failed", set())
    assert torch.equal(w4.linear(x), w4a16_small_m_matmul(x, w4.codes, w4.scales, None, None, 256, 128))
    monkeypatch.setenv(small_m.TABLE_ENV, "off")
    assert torch.equal(fp8.linear(x), w8a16_matmul(x, fp8.codes, s))
    assert torch.equal(w4.linear(x), w4a16_matmul(x, w4.codes, w4.scales, None, None, 256, 128))
    monkeypatch.delenv(small_m.TABLE_ENV)

    def broken(*_a, **_k):
        raise triton.CompilationError("fp8_small_m.py", None, "no such instruction")

    monkeypatch.setattr(fk, "fp8_small_m_matmul", broken)
    assert torch.equal(fp8.linear(x), w8a16_matmul(x, fp8.codes, s))
    assert small_m._failed == {"fp8"}
    monkeypatch.setattr(small_m, "_failed", set())
    monkeypatch.setattr(fk, "fp8_small_m_matmul", lambda *_a, **_k: 1 / 0)
    with pytest.raises(ZeroDivisionError):
        fp8.linear(x)

"""kernels/l2_prefetch.py: the hints' offsets (under the interpreter), which programs issue them, and no hints off
the GPU; runtime/models/w4_l2_prefetch.py: the plan string and which linear carries which next linear's bytes."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from radixlm.kernels.l2_prefetch import L2Plan, L2Span, lanes_for, launch_args, recorded_hints
from radixlm.runtime.models import w4_l2_prefetch
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Weight


@pytest.fixture(autouse=True)
def _interpret(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")


@pytest.mark.parametrize("nbytes,grid,issuers,at,threads", [
    (8 << 20, 768, 264, 2, 64),  # o's codes after qkv: the last 264 programs, 4 lanes of ~8 KB each
    (8 << 20, 100, 264, 1, 64),  # fewer programs than issuers: every program
    (12_345_680, 37, 16, 1, 128),
    (1000, 10, 4, 2, 32),  # pieces of 256 B: one lane each; the last 8 bytes (not a 16-byte hint) left out
    (48, 10, 8, 1, 32),  # fewer 16-byte pieces than issuers
])
def test_hints_cover_the_span_once(nbytes, grid, issuers, at, threads) -> None:
    hints = recorded_hints(nbytes, grid, issuers, at, threads)
    pos = 0
    for _, off, size in sorted(hints, key=lambda h: h[1]):
        assert off == pos and off % 16 == 0 and size > 0
        pos = off + size
    assert pos == nbytes // 16 * 16
    used = min(issuers, grid)
    programs = {pid for pid, _, _ in hints}
    allowed = set(range(used)) if at == 1 else set(range(grid - used, grid))
    assert programs <= allowed  # start hints by the first programs, end hints by the last ones
    per_program = {pid: sum(1 for p, _, _ in hints if p == pid) for pid in programs}
    assert max(per_program.values()) <= lanes_for(max(s for _, _, s in hints) * max(per_program.values()), threads)


def test_nothing_to_hint() -> None:
    assert recorded_hints(0, 4, 2, 1, 32) == []
    span = L2Span(torch.zeros(64, dtype=torch.int16), 128)
    assert launch_args(None, 10, 64, torch.device("cuda")) == {"PF": 0}
    assert launch_args(L2Plan((span,), 2, 8), 10, 64, torch.device("cpu")) == {"PF": 0}  # no PTX off the GPU
    assert launch_args(L2Plan((span,), 0, 8), 10, 64, torch.device("cuda")) == {"PF": 0}
    args = launch_args(L2Plan((span,), 2, 8), 10, 64, torch.device("cuda"))
    assert (args["PF"], args["pf_first"], args["pf_issuers"], args["pf_b"]) == (2, 2, 8, 0)  # one span: B empty
    with pytest.raises(ValueError, match="two spans"):
        launch_args(L2Plan((span, span, span), 1, 8), 10, 64, torch.device("cuda"))
    odd = L2Span(torch.zeros(64, dtype=torch.int16)[1:], 100)  # a view 2 bytes off the 16-byte grid
    args = launch_args(L2Plan((span, odd), 1, 8), 10, 64, torch.device("cuda"))
    assert (args["pf_a"], args["pf_b"], args["pf_first"]) == (128, 0, 0)


def test_lanes() -> None:
    assert lanes_for(100, 64) == 1
    assert lanes_for(7 * 4096, 64) == 4  # a power of two, each lane >= 4 KB
    assert lanes_for(1 << 30, 64) == 64


def _model(layers: int, device: str = "cpu"):
    def lin(n: int, k: int, seed: int):
        g = torch.Generator().manual_seed(seed)
        w = torch.randn(n, k, generator=g) * k ** -0.5
        return SimpleNamespace(quantized=W4Weight([quantize_rtn(w, 128, True)], 128, "test"))

    made = []
    for i in range(layers):
        made.append(SimpleNamespace(
            self_attn=SimpleNamespace(qkv_proj=lin(48, 128, 4 * i), o_proj=lin(32, 128, 4 * i + 1)),
            mlp=SimpleNamespace(gate_up_proj=lin(128, 128, 4 * i + 2), down_proj=lin(32, 256, 4 * i + 3))))
    return SimpleNamespace(layers=made)


def test_plan_string() -> None:
    assert w4_l2_prefetch.parse("") == {}
    assert w4_l2_prefetch.parse("o:all:2, gate_up:16:1") == {"o": (float("inf"), 2), "gate_up": (16.0, 1)}
    for bad in ("o:all", "lm_head:1:1", "o:all:3", "o:-1:1"):
        with pytest.raises(ValueError, match="RADIXLM_W4_L2_PREFETCH"):
            w4_l2_prefetch.parse(bad)


def test_wiring_follows_the_layer_order(monkeypatch) -> None:
    model = _model(2)
    monkeypatch.setattr(w4_l2_prefetch, "ISSUERS_PER_SM", 7)  # x the 4 "SMs" the CPU counts (kernels.fp8_gemm.sm_count)
    w4_l2_prefetch.wire(model, "o:all:2,gate_up:0.0001:1,qkv:all:2")
    (a0, m0), (a1, m1) = [(layer.self_attn, layer.mlp) for layer in model.layers]
    plan = a0.qkv_proj.quantized.l2_next  # qkv carries o: every code byte and the scales
    o = a0.o_proj.quantized
    assert (plan.at, plan.issuers) == (2, 28)
    assert [(s.base is t, s.nbytes) for s, t in zip(plan.spans, (o.codes, o.scales))] == [
        (True, o.codes.numel() * 2), (True, o.scales.numel() * o.scales.element_size())]
    gu = m0.gate_up_proj.quantized
    plan = o.l2_next  # o carries gate_up's first rows: whole rows, at least one
    assert plan.at == 1 and plan.spans[0].base is gu.codes and plan.spans[0].nbytes == 64  # 104 B: one 64-byte row
    assert m0.gate_up_proj.quantized.l2_next is None  # down not planned
    plan = m0.down_proj.quantized.l2_next  # layer 0's down carries layer 1's qkv
    assert plan.spans[0].base is a1.qkv_proj.quantized.codes
    assert m1.down_proj.quantized.l2_next is None  # the last linear carries nothing
    w4_l2_prefetch.wire(model, "gate_up:1:1")
    assert a0.qkv_proj.quantized.l2_next is None
    assert a1.o_proj.quantized.l2_next.spans[0].nbytes == m1.gate_up_proj.quantized.codes.numel() * 2  # all 128 rows < 1 MB


def test_ensure_rewires_when_the_plan_changes(monkeypatch) -> None:
    model = _model(1)
    monkeypatch.setenv(w4_l2_prefetch.ENV, "o:all:2")
    w4_l2_prefetch.ensure(model)
    first = model.layers[0].self_attn.qkv_proj.quantized.l2_next
    assert first is not None
    w4_l2_prefetch.ensure(model)
    assert model.layers[0].self_attn.qkv_proj.quantized.l2_next is first  # unchanged plan: not rebuilt
    monkeypatch.delenv(w4_l2_prefetch.ENV)
    w4_l2_prefetch.ensure(model)
    assert model.layers[0].self_attn.qkv_proj.quantized.l2_next is None
    assert os.environ.get(w4_l2_prefetch.ENV) is None

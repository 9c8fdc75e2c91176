"""benchmarks/w4_decode_step.py's variants on the CPU: each one's tables reach the kernels' config lookup (the
sweep-format JSON over the DEFAULTS, read at every call) as valid configs, its split cap reaches the decode
attention's split count, and the defaults variant restores main's tables. (The timing itself runs on the H200.)"""
from __future__ import annotations

import os

import pytest
import torch

from radixlm.benchmarks.w4_decode_step import DEFAULT_SPLITS, VARIANTS, use_variant
from radixlm.kernels import decode_attention, w4a16_gemv, w4a16_mma_m1
from radixlm.kernels.small_m import TABLE_ENV

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}


def _served(n: int, k: int) -> str:
    """Which M = 1 kernel W4Weight picks for a shape (the tensor-core one first, as `W4Weight.linear` does)."""
    mma1 = w4a16_mma_m1.mma1_table_config(n, k)
    if mma1 is not None:
        assert w4a16_mma_m1.step_groups(mma1.chunks, 128) <= mma1.window  # what w4a16_mma_m1 checks at launch
        return mma1.key()
    gemv = w4a16_gemv.gemv_table_config(n, k)
    return "none" if gemv is None else gemv.key()


@pytest.fixture(autouse=True)
def _mma1_defaults_kept():
    """use_variant edits the tensor-core kernel's DEFAULTS in place (gemv-all): put them back whatever happens."""
    kept = dict(w4a16_mma_m1.DEFAULTS)
    yield
    w4a16_mma_m1.DEFAULTS.clear()
    w4a16_mma_m1.DEFAULTS.update(kept)
    os.environ.pop("RADIXLM_W4_L2_PREFETCH", None)  # (use_variant sets the L2 plan in the environment)


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_reaches_the_kernels(name, tmp_path, monkeypatch) -> None:
    monkeypatch.delenv(TABLE_ENV, raising=False)
    monkeypatch.setattr(decode_attention, "_MAX_SPLITS", DEFAULT_SPLITS)
    monkeypatch.setattr(decode_attention, "ROPE_IN_STAGE1", True)
    defaults = {layer: _served(*shape) for layer, shape in SHAPES.items()}
    use_variant(name, tmp_path)
    tables, splits = VARIANTS[name]
    got = {layer: _served(*shape) for layer, shape in SHAPES.items()}
    for layer, (n, k) in SHAPES.items():
        listed = [by_shape[f"{n}x{k}"]["1"] for by_shape in tables.values() if f"{n}x{k}" in by_shape]
        if name == "gemv-all":  # every shape on the GEMV's own table
            assert got[layer] == w4a16_gemv.gemv_table_config(n, k).key(), layer
        else:
            assert got[layer] == (listed[0] if listed else defaults[layer]), (name, layer)
    # batch 1, 8 KV heads: the CPU counts 4 "SMs", so the split count is min(cap, cdiv(4 * 4, 8) = 2)
    assert decode_attention.default_num_kv_splits(1, 8, torch.device("cpu")) == min(splits or DEFAULT_SPLITS, 2)
    # rotary + KV store inside the attention's first stage, but in their own launch for rope-split
    assert decode_attention.ROPE_IN_STAGE1 is (name != "rope-split")
    use_variant("defaults", tmp_path)
    assert {layer: _served(*shape) for layer, shape in SHAPES.items()} == defaults
    assert decode_attention._MAX_SPLITS == DEFAULT_SPLITS
    assert decode_attention.ROPE_IN_STAGE1


def test_profile_names_the_tensor_core_kernel_a_gemm() -> None:
    """The profile names the four GEMMs of a layer in order from runs of GEMM kernels: the M = 1 tensor-core kernel
    (gate_up / down by default) must count as one, or down would be named gate_up's and the rest shift."""
    from radixlm.benchmarks.decode_overlap import kernel_kind

    assert kernel_kind("_mma1_kernel") == "GEMM"
    assert kernel_kind("_gemv_kernel") == "GEMM"
    assert kernel_kind("_silu_and_mul_kernel") == "SiLU-and-mul"


def test_pdl_and_epilogue_variants_switch_the_model(tmp_path, monkeypatch) -> None:
    """pdl-off / silu-epilogue / split-norm / no-split-norm set what the runner set at load (every quantized weight's
    switches and the ops bundle of the model and its attention), and the defaults put PDL back on with the epilogue
    and the split norm as --decode-silu-epilogue / --decode-split-norm auto resolve."""
    from types import SimpleNamespace

    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

    monkeypatch.delenv(TABLE_ENV, raising=False)
    monkeypatch.setattr(decode_attention, "_MAX_SPLITS", DEFAULT_SPLITS)
    part = quantize_rtn(torch.randn(16, 128), 128, True)
    layer = torch.nn.Module()
    layer.quantized = W4Weight([W4Part(part.codes, part.scales, None, None)], 128, "test")
    runner = SimpleNamespace(model=torch.nn.Sequential(layer), attn_backend=SimpleNamespace(ops=None))
    from radixlm.runtime.quantization.w4a16 import silu_epilogue_enabled, split_norm_enabled

    auto = split_norm_enabled("auto")
    silu = silu_epilogue_enabled("auto")
    for name, pdl, epilogue, split in (("pdl-off", False, silu, auto), ("silu-epilogue", True, True, auto),
                                       ("split-norm", True, silu, True), ("split-norm-silu", True, True, True),
                                       ("pf-o-gu16-silu", True, True, auto),
                                       ("no-split-norm", True, silu, False), ("no-split-norm-s8", True, silu, False),
                                       ("defaults", True, silu, auto)):
        use_variant(name, tmp_path, runner)
        assert (layer.quantized.pdl, layer.quantized.silu_epilogue, layer.quantized.split_norm) == (pdl, epilogue, split)
        assert runner.model.ops.name == runner.attn_backend.ops.name == ("triton+pdl" if pdl else "triton"), name


def test_prefetch_variants_set_their_plan(tmp_path, monkeypatch) -> None:
    """Every pf-* variant is a variant with a valid L2 plan (runtime/models/w4_l2_prefetch.py), use_variant puts it
    where the decoder reads it at the next capture, and every other variant puts back the default plan."""
    from radixlm.benchmarks.w4_decode_step import PF_PLANS
    from radixlm.runtime.models import w4_l2_prefetch

    monkeypatch.delenv(w4_l2_prefetch.ENV, raising=False)
    assert {n for n in VARIANTS if n.startswith("pf-")} == set(PF_PLANS)
    for name, plan in PF_PLANS.items():
        assert w4_l2_prefetch.parse(plan), name
        use_variant(name, tmp_path)
        assert w4_l2_prefetch.current_plan() == plan
    use_variant("defaults", tmp_path)
    assert w4_l2_prefetch.current_plan() == w4_l2_prefetch.DEFAULT_PLAN


def test_blocked_variants_give_the_tensor_core_kernel_its_copy(tmp_path, monkeypatch) -> None:
    """blk / pf-o-gu16-blk: every weight the tensor-core M = 1 kernel serves gets `block_codes`' copy for its table's
    row tile (and the L2 wiring is redone for it); any other variant drops the copies. blk-only: the codes blocked in
    place (one copy); the defaults follow `w4a16.BLOCKED_CODES` (plain with it off, blocked in place with it on)."""
    from types import SimpleNamespace

    from radixlm.benchmarks import w4_decode_step
    from radixlm.kernels.w4_blocked import block_codes
    from radixlm.runtime.quantization import w4a16
    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Weight

    # a small shape in the table use_variant puts back
    monkeypatch.setitem(w4_decode_step.MMA1_DEFAULTS, (64, 256), {1: "mma1-n32-c1-w1-sa-st2-g1-j8-r1"})
    monkeypatch.setattr(w4a16, "BLOCKED_CODES", False)  # (the defaults as before 2026-12-05's flip: plain codes)
    served = W4Weight([quantize_rtn(torch.randn(64, 256), 128, True)], 128, "test")
    other = W4Weight([quantize_rtn(torch.randn(48, 256), 128, True)], 128, "test")
    for w in (served, other):
        w.use_triton = True  # (as on a GPU: the blocked copy is made only for the Triton kernels)
    layers = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
    layers[0].quantized, layers[1].quantized = served, other
    runner = SimpleNamespace(model=torch.nn.Sequential(layers), attn_backend=SimpleNamespace(ops=None))
    for name in ("blk", "pf-o-gu16-blk"):
        runner.model.l2_prefetch_plan = "stale"
        use_variant(name, tmp_path, runner)
        assert served.m1_blocked == 32 and torch.equal(served.codes_m1, block_codes(served.codes, 32))
        assert served._m1_codes() == (served.codes_m1, 32)
        assert other.codes_m1 is None and other.m1_blocked == 0  # not a tensor-core shape
        assert runner.model.l2_prefetch_plan is None
    use_variant("defaults", tmp_path, runner)
    assert served.codes_m1 is None and served._m1_codes() == (served.codes, 0)
    plain, before = served.codes, served.nbytes
    use_variant("blk-only", tmp_path, runner)  # the codes themselves blocked (w4a16.BLOCKED_CODES' layout): no copy
    assert served.blocked == 32 and served.codes_m1 is None and torch.equal(served.codes, block_codes(plain, 32))
    assert served._m1_codes() == (served.codes, 32) and served.nbytes == before and other.blocked == 0
    use_variant("defaults", tmp_path, runner)
    assert served.blocked == 0 and torch.equal(served.codes, plain)
    monkeypatch.setattr(w4a16, "BLOCKED_CODES", True)  # the default since the flip: the defaults are blocked in place
    use_variant("defaults", tmp_path, runner)
    assert served.blocked == 32 and served.codes_m1 is None and torch.equal(served.codes, block_codes(plain, 32))
    assert other.blocked == 0 and served.nbytes == before

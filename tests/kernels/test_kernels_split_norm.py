"""The residual add + RMSNorm split across two batch-1 4-bit linears (kernels/split_norm.py), on both M = 1
kernels (the GEMV and the tensor-core one; the CPU interpreter without CUDA): the producer's new residual and
u = h * g bit for bit against the plain output, its tile sums, and the consumer's product against the plain
kernel on ops.fused_add_rms_norm's output; one split and split-K (tickets back at zero)."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import ops_ref
from radixlm.kernels.small_m import tickets_for
from radixlm.kernels.split_norm import AddNorm, PendingNorm
from radixlm.kernels.w4a16_gemv import GemvConfig, w4a16_gemv
from radixlm.kernels.w4a16_mma_m1 import Mma1Config, w4a16_mma_m1
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

KERNELS = {
    "gemv-split": (w4a16_gemv, GemvConfig(block_n=16, chunks=1, num_warps=1, split_k=2)),
    "gemv": (w4a16_gemv, GemvConfig(block_n=8, chunks=2, num_warps=1, split_k=1)),
    "mma1-split": (w4a16_mma_m1, Mma1Config(block_n=16, chunks=1, num_warps=1, split_k=2, num_stages=1, sums=True)),
    "mma1": (w4a16_mma_m1, Mma1Config(block_n=32, chunks=1, num_warps=1, split_k=1, num_stages=1, window=8)),
}


def _weight(n: int, k: int, seed: int, device: str) -> W4Weight:
    g = torch.Generator().manual_seed(seed)
    part = quantize_rtn(torch.randn(n, k, generator=g), 128, False)
    return W4Weight([W4Part(part.codes.to(device), part.scales.to(device), part.zeros.to(device), None)], 128, "test")


def _run(kernel, cfg, w: W4Weight, x: torch.Tensor, **kw):
    return kernel(x, w.codes, w.scales, w.zeros, None, w.in_features, w.group_size, None, w.tickets, cfg=cfg, **kw)


def _same(got: torch.Tensor, want: torch.Tensor, exact: bool) -> bool:
    """Equal, or (bf16 under the interpreter, whose casts truncate) within one bf16 step."""
    if exact:
        return torch.equal(got, want)
    return bool(((got.float() - want.float()).abs() <= want.float().abs() * 2**-7 + 1e-6).all())


@pytest.mark.parametrize(("producer", "consumer", "dtype"), [
    ("gemv-split", "mma1-split", torch.bfloat16),  # the 8B layer's o -> gate_up
    ("mma1-split", "gemv-split", torch.bfloat16),  # down -> the next layer's qkv
    ("gemv", "mma1", torch.float32),  # one split each: exact casts, tighter bounds
    ("mma1", "gemv-split", torch.float32),
    ("gemv-split", "gemv-split", torch.float32),
], ids=str)
def test_split_norm_equals_the_norm_between_the_linears(device, dtype, producer, consumer) -> None:
    exact = dtype == torch.float32 or device != "cpu"
    n, k2 = 256, 96  # the producer's N is the consumer's K; the consumer's N
    first, second = _weight(n, 384, 1, device), _weight(k2, n, 2, device)
    for w in (first, second):
        w.tickets = tickets_for(w.out_features, torch.device(device))
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 384, generator=g).to(dtype).to(device)
    residual = (torch.randn(1, n, generator=g) * 4).to(dtype).to(device)
    weight = (torch.rand(n, generator=g) + 0.5).to(dtype).to(device)
    run_p, cfg_p = KERNELS[producer]
    run_c, cfg_c = KERNELS[consumer]
    plain = _run(run_p, cfg_p, first, x)
    pending, new_res = _run(run_p, cfg_p, first, x, add_norm=AddNorm(residual, weight, 1e-5))
    assert isinstance(pending, PendingNorm)
    h = (plain.float() + residual.float()).to(dtype)
    assert _same(new_res, h, exact)  # the plain output + residual, rounded as ops.fused_add_rms_norm rounds it
    assert _same(pending.u, (new_res.float() * weight.float()).to(dtype), exact)
    torch.testing.assert_close(pending.sumsq.sum(), new_res.float().pow(2).sum(), rtol=1e-5, atol=0)
    tiles = pending.sumsq.numel()
    assert tiles == -(-n // cfg_p.block_n)
    normed, _ = ops_ref.fused_add_rms_norm_ref(plain, residual, weight, 1e-5)
    want = _run(run_c, cfg_c, second, normed).float()
    got = _run(run_c, cfg_c, second, None, pending=pending).float()
    tol = 1e-4 if dtype == torch.float32 else 2e-2  # u and the normed row rounded at different points; u is larger
    assert ((got - want).abs() <= tol * (want.abs() + 0.1 * want.abs().max())).all()
    for w in (first, second):
        assert int(w.tickets.abs().sum()) == 0


@pytest.mark.parametrize("consumer", ["gemv-split", "mma1-split"])
def test_consumer_with_the_silu_epilogue(device, consumer) -> None:
    """A consumer of the MLP's [gate | up] weight with `silu_mul`: ops.silu_and_mul of its plain output."""
    run, cfg = KERNELS[consumer]
    w = _weight(64, 256, 6, device)
    w.tickets = tickets_for(64, torch.device(device))
    g = torch.Generator().manual_seed(7)
    u = torch.randn(1, 256, generator=g).to(device)
    pending = PendingNorm(u, (torch.rand(4, generator=g) * 64).to(device), 1e-5)
    from radixlm.kernels.ops import silu_and_mul

    act = _run(run, cfg, w, None, pending=pending, silu_mul=True)
    assert torch.equal(act, silu_and_mul(_run(run, cfg, w, None, pending=pending)))  # the activation kernel's bits
    assert int(w.tickets.abs().sum()) == 0


def test_split_norm_refuses_what_it_cannot_fuse(device) -> None:
    w = _weight(64, 128, 4, device)
    x = torch.randn(1, 128).to(torch.bfloat16).to(device)
    res = torch.randn(1, 64).to(torch.bfloat16).to(device)
    norm_w = torch.ones(64, dtype=torch.bfloat16, device=device)
    with pytest.raises(ValueError, match="residual"):
        _run(w4a16_gemv, None, w, x, add_norm=AddNorm(res.float(), norm_w, 1e-5))  # not x's dtype
    pending = PendingNorm(x, torch.ones(4, device=device), 1e-5)
    with pytest.raises(ValueError, match="producer or the consumer"):
        _run(w4a16_mma_m1, None, w, x, add_norm=AddNorm(res, norm_w, 1e-5), pending=pending)


def test_decoder_with_the_split_norm_decodes_the_same_tokens(tmp_path, monkeypatch) -> None:
    """A tiny GPTQ Llama (float32) decoding with its 4-bit linears on the interpreted M = 1 GEMV: the same greedy
    tokens with the norms split across the linears as with the norm kernels, and the split path ran every step."""
    pytest.importorskip("compressed_tensors")
    from radixlm.kernels.small_m import tickets_for as tickets
    from radixlm.runtime.models import split_norm_decode
    from radixlm.runtime.quantization import w4a16
    from tests.fixtures.tiny_models import build_tiny_model
    from tests.fixtures.w4_checkpoints import build_gptq
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion
    from tests.runtime.test_cascade import greedy_req

    base = build_tiny_model("llama", tmp_path / "base", hidden_size=128, intermediate_size=256)
    # groups of 32, asymmetric, act-order: the consumer reads u through the column permutation
    model_dir = build_gptq(base, tmp_path / "gptq", group_size=32, symmetric=False, act_order=True)
    monkeypatch.setattr(w4a16, "GEMV_UNLISTED", True)  # every shape's decode row on the GEMV (no 8B tables here)
    monkeypatch.setattr(w4a16, "DEQUANT_MIN_M", 2)  # prefill rows: dequantize + torch (the interpreter is slow)
    from radixlm.kernels import w4a16_gemv as gemv_module  # wide row tiles, one split: few interpreted programs

    split_k = [1]  # "silu": gate_up's SiLU epilogue, and two splits where K has two chunks (down)
    monkeypatch.setattr(gemv_module, "gemv_default_config",
                        lambda n, k: GemvConfig(block_n=64, chunks=1, split_k=split_k[0]))
    splits: list[bool] = []
    inner = split_norm_decode.forward_layers
    monkeypatch.setattr(split_norm_decode, "forward_layers", lambda *a: (splits.append(True), inner(*a))[1])
    torch.set_num_threads(1)
    runs = {}
    for mode in ("off", "on", "silu"):
        on = mode != "off"
        split_k[0] = 2 if mode == "silu" else 1
        # "silu": also L2 hints planned (none issued off the GPU: the plan's wiring and launch arguments run)
        monkeypatch.setenv("RADIXLM_W4_L2_PREFETCH", "o:all:2,gate_up:16:1,down:8:2,qkv:4:2" if mode == "silu" else "")
        sched = make_scheduler(model_dir, dtype="float32", decode_split_norm="on" if on else "off")
        sched.runner.model.decode_stack = None  # the layers in Python, not the CPU's one-call decode step
        for module in sched.runner.model.modules():
            if isinstance(getattr(module, "quantized", None), W4Weight):
                module.quantized.use_triton = True  # the Triton kernels, interpreted
                module.quantized.split_norm = on  # (what the runner sets from --decode-split-norm on a GPU)
                module.quantized.silu_epilogue = mode == "silu"
                module.quantized.tickets = tickets(module.quantized.out_features, torch.device("cpu"))
        work = [greedy_req("one", [(7 * i) % sched.runner.vocab_size + 3 for i in range(8)], 3)]  # one decode row
        runs[mode] = {k: v["output_ids"] for k, v in run_to_completion(sched, work).items()}
        assert_pool_idle(sched)
        assert len(splits) == {"off": 0, "on": 2, "silu": 4}[mode]  # every decode step (the first from the prefill)
        first = sched.runner.model.layers[0]
        assert (first.self_attn.qkv_proj.quantized.l2_next is not None) is (mode == "silu")
    assert runs["on"] == runs["off"] == runs["silu"]


def test_flag_resolves_and_reaches_every_weight(monkeypatch) -> None:
    """--decode-split-norm: auto follows SPLIT_NORM_AUTO; `set_decode_pdl` hands the decision to every quantized weight."""
    from radixlm.runtime.quantization import w4a16
    from radixlm.runtime.quantization.base import set_decode_pdl

    monkeypatch.setattr(w4a16, "SPLIT_NORM_AUTO", False)
    assert [w4a16.split_norm_enabled(m) for m in ("auto", "on", "off")] == [False, True, False]
    monkeypatch.setattr(w4a16, "SPLIT_NORM_AUTO", True)
    assert [w4a16.split_norm_enabled(m) for m in ("auto", "on", "off")] == [True, True, False]
    for auto in (False, True):  # --decode-silu-epilogue the same way
        monkeypatch.setattr(w4a16, "SILU_EPILOGUE_AUTO", auto)
        assert [w4a16.silu_epilogue_enabled(m) for m in ("auto", "on", "off")] == [auto, True, False]
    layer = torch.nn.Module()
    layer.quantized = _weight(16, 128, 5, "cpu")
    assert not layer.quantized.split_norm and not layer.quantized.split_norm_serves()
    assert set_decode_pdl(torch.nn.Sequential(layer), True, False, True) == 1 and layer.quantized.split_norm
    assert not layer.quantized.split_norm_serves()  # a CPU weight: no kernel takes it

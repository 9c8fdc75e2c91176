"""The bf16 / fp16 M = 1 GEMV (kernels/bf16_gemv.py; the CPU interpreter without CUDA) against a float64
product: one launch and split-K finished by the last split, row and column tails; the tickets back at zero and a
repeated call bit-equal; what it refuses; the table lookup ("cublas" keeps torch's product) and the linear
layers' dispatch of single rows (runtime/dense_gemv.py)."""
from __future__ import annotations

import json

import pytest
import torch

from radixlm.kernels import small_m
from radixlm.kernels.bf16_gemv import bf16_gemv, bf16_gemv_add_norm, config_for, gemv_tickets
from radixlm.kernels.small_m import SmallMConfig, plan
from radixlm.runtime.dense_gemv import DenseGemv, attach_dense_gemv
from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear

CONFIGS = [SmallMConfig("fma", 8, 128, 1, 4, 2), SmallMConfig("fma", 8, 64, 3, 2, 2), SmallMConfig("fma", 16, 128, 2, 4, 1),
           SmallMConfig("pf", 8, 128, 1, 4, 1), SmallMConfig("pf", 8, 64, 3, 2, 1), SmallMConfig("pf", 4, 128, 2, 2, 1),
           SmallMConfig("fe", 8, 128, 2, 2, 2)]


def _within_one_ulp(got: torch.Tensor, exact: torch.Tensor) -> bool:
    """Each output is the exact product rounded to the output dtype, or its neighbour (float32 sums)."""
    ulp = torch.finfo(got.dtype).eps * exact.abs().clamp_min(torch.finfo(got.dtype).tiny)
    return bool(((got.double() - exact).abs() <= 1.01 * ulp + 1e-6 * exact.abs().max()).all())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("n", "k"), [(40, 512), (37, 300), (24, 1024)])
def test_bf16_gemv_matches_float64_product(device, dtype, n, k):
    g = torch.Generator().manual_seed(n + k)
    w = (torch.randn(n, k, generator=g) * k**-0.5).to(dtype).to(device)
    x = torch.randn(1, k, generator=g).to(dtype).to(device)
    exact = (x.double() @ w.double().T).cpu()
    tickets = gemv_tickets(n, SmallMConfig(block_n=4), torch.device(device))  # enough for every config's row tiles
    for cfg in CONFIGS:
        got = bf16_gemv(x, w, cfg, tickets)
        assert got.dtype == dtype and got.shape == (1, n)
        assert _within_one_ulp(got.cpu(), exact), cfg.key()
        assert not tickets.any()  # every row tile's last split reset its ticket
        assert torch.equal(got, bf16_gemv(x, w, cfg, tickets))  # fixed summation order
    assert plan(k, CONFIGS[1])[0] > 1  # the split-K path ran
    bias = torch.randn(n, generator=g).to(dtype).to(device)
    assert torch.equal(bf16_gemv(x, w, CONFIGS[0], tickets, bias), bf16_gemv(x, w, CONFIGS[0], tickets) + bias)


@pytest.mark.parametrize("k", [512, 300])
def test_silu_mul_in_the_loads_equals_the_activation_kernel_then_the_gemv(device, k):
    """The down projection's prologue: the bits of ops.silu_and_mul (Triton), then the GEMV."""
    from radixlm.kernels.ops import silu_and_mul

    g = torch.Generator().manual_seed(k)
    w = (torch.randn(40, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    gate_up = (torch.randn(1, 2 * k, generator=g) * 3).to(torch.bfloat16).to(device)
    for cfg in CONFIGS:
        assert torch.equal(bf16_gemv(gate_up, w, cfg, silu_mul=True), bf16_gemv(silu_and_mul(gate_up), w, cfg)), cfg.key()
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(gate_up[:, :k], w, CONFIGS[0], silu_mul=True)  # not [gate | up]


@pytest.mark.parametrize("k", [1024, 300, 64])
def test_prefetching_kind_gives_the_bits_of_the_plain_one(device, k):
    """"pf" (next tile in flight, first tile before the PDL wait) and "fe" (first tile before the wait, then fma's
    loop) sum the same products in the same order as "fma": equal outputs for one split, several, a single step per
    split, and a K tail."""
    g = torch.Generator().manual_seed(k)
    w = (torch.randn(24, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    x = torch.randn(1, k, generator=g).to(torch.bfloat16).to(device)
    for n, bk, split in [(8, 64, 1), (8, 64, 4), (4, 128, 2), (8, 512, 1)]:
        plain = bf16_gemv(x, w, SmallMConfig("fma", n, bk, split, 2, 1))
        for kind in ("pf", "fe"):
            assert torch.equal(bf16_gemv(x, w, SmallMConfig(kind, n, bk, split, 2, 1)), plain), (kind, n, bk, split)


@pytest.mark.parametrize("k", [256, 300])
@pytest.mark.parametrize("with_residual", [True, False])
def test_add_norm_in_the_loads_equals_the_norm_kernel_then_the_gemv(device, k, with_residual):
    """The add + RMSNorm before qkv / gate_up in the GEMV's loads: the new residual bit-equal to ops'; the product
    equal to the norm kernel's output through the GEMV but where rstd's last bit differs (then within a ulp of
    the float64 product of the normalized row)."""
    from radixlm.kernels.ops import fused_add_rms_norm, rms_norm

    g = torch.Generator().manual_seed(k + with_residual)
    w = (torch.randn(40, k, generator=g) * k**-0.5).to(torch.bfloat16).to(device)
    x = (torch.randn(1, k, generator=g) * 2).to(torch.bfloat16).to(device)
    res = torch.randn(1, k, generator=g).to(torch.bfloat16).to(device) if with_residual else None
    nw = (torch.rand(k, generator=g) + 0.5).to(torch.bfloat16).to(device)
    if res is None:
        normed, new_ref = rms_norm(x, nw, 1e-5), None
    else:
        normed, new_ref = fused_add_rms_norm(x, res, nw, 1e-5)
    for cfg in CONFIGS:
        got, new_res = bf16_gemv_add_norm(x, res, nw, 1e-5, w, cfg, gemv_tickets(40, cfg, torch.device(device)))
        assert (new_res is None) == (res is None)
        if res is not None:
            assert torch.equal(new_res, new_ref)  # the first program's write of the rounded sum
        plain = bf16_gemv(normed, w, cfg)
        close = (got.float() - plain.float()).abs() <= 2 * torch.finfo(torch.bfloat16).eps * plain.float().abs() + 1e-3
        assert bool(close.all()), cfg.key()
        assert torch.equal(got, bf16_gemv_add_norm(x, res, nw, 1e-5, w, cfg)[0])  # repeatable
    with pytest.raises(ValueError, match="norm weight"):
        bf16_gemv_add_norm(x, res, nw[:-1], 1e-5, w, CONFIGS[0])


def test_bf16_gemv_refuses_what_it_cannot_take(device):
    w = torch.randn(16, 128, dtype=torch.bfloat16, device=device)
    cfg = CONFIGS[0]
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(torch.randn(2, 128, dtype=torch.bfloat16, device=device), w, cfg)  # M = 2
    with pytest.raises(ValueError, match="does not fit"):
        bf16_gemv(torch.randn(1, 128, dtype=torch.float16, device=device), w, cfg)  # dtypes differ
    with pytest.raises(ValueError, match="takes bf16"):
        bf16_gemv(torch.randn(1, 128, device=device), w.float(), cfg)  # float32 keeps torch's exact product
    with pytest.raises(ValueError, match="takes bf16"):
        bf16_gemv(torch.randn(1, 128, dtype=torch.bfloat16, device=device), w, SmallMConfig("dot", 16, 128))


def test_table_lookup_and_cublas_entries(tmp_path, monkeypatch):
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"bf16": {"48x256": {"1": "fma-n8-k128-s2-w4-st2"}, "32x256": {"1": "cublas"}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    assert config_for(48, 256) == SmallMConfig("fma", 8, 128, 2, 4, 2)
    assert config_for(32, 256) is None  # measured slower than cuBLAS
    assert config_for(64, 256) is None  # never measured
    monkeypatch.setenv(small_m.TABLE_ENV, "off")
    assert config_for(48, 256) is None  # the defaults (no entry for this shape)


def test_linear_layers_take_the_gemv_for_single_rows_only(device, tmp_path, monkeypatch):
    torch.manual_seed(0)
    col = ColumnParallelLinear(256, 48, bias=True).to(torch.bfloat16).to(device)
    row = RowParallelLinear(256, 48).to(torch.bfloat16).to(device)
    cfg = SmallMConfig("fma", 8, 128, 2, 4, 2)
    x1 = torch.randn(1, 256, dtype=torch.bfloat16, device=device)
    x3 = torch.randn(3, 256, dtype=torch.bfloat16, device=device)
    with torch.no_grad():
        plain3, plain_row = col(x3), row(x3)
        col.gemv, row.gemv = DenseGemv(col.weight, cfg), DenseGemv(row.weight, cfg)
        assert torch.equal(col(x1), bf16_gemv(x1, col.weight, cfg, None, col.bias))
        assert torch.equal(row(x1), bf16_gemv(x1, row.weight, cfg))
        assert torch.equal(col(x3), plain3) and torch.equal(row(x3), plain_row)  # M > 1: torch's product
        gate_up = torch.randn(1, 512, dtype=torch.bfloat16, device=device)
        assert torch.equal(row.forward_silu_mul(gate_up), bf16_gemv(gate_up, row.weight, cfg, silu_mul=True))
        assert row.forward_silu_mul(torch.randn(2, 512, dtype=torch.bfloat16, device=device)) is None

    # attach: only CUDA half-precision weights of a measured shape get one (and others lose a stale one)
    path = tmp_path / "sweep.json"
    path.write_text(json.dumps({"tables": {"bf16": {"48x256": {"1": cfg.key()}}}}))
    monkeypatch.setenv(small_m.TABLE_ENV, str(path))
    model = torch.nn.Sequential(col, row, ColumnParallelLinear(256, 32, bias=False).to(torch.bfloat16).to(device),
                                ColumnParallelLinear(256, 48, bias=False).to(device))  # the last one float32
    names = attach_dense_gemv(model)
    assert names == (["1"] if device == "cuda" else [])  # "0" has a bias
    assert col.gemv is None and model[2].gemv is None and model[3].gemv is None
    if device != "cuda":
        assert row.gemv is None


def test_decoder_with_the_norms_in_the_gemvs_matches_the_unfused_step(tiny_model_dir):
    """A tiny bf16 Llama's batch-1 decode step (the Triton ops and the GEMV under the interpreter): the GEMV on every
    projection, then with each add + RMSNorm inside the qkv / gate_up GEMVs' loads (the decoder's
    `forward_add_norm` path): the same logits up to the normalized rows' last-bit rstd differences."""
    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.request import Req
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.server_args import ServerArgs

    model_dir = tiny_model_dir("llama")
    runner = ModelRunner(ServerArgs(model_path=str(model_dir), dtype="bfloat16", max_total_tokens=256, device="cpu",
                                    attention_backend="triton").resolve(), model_dir)  # the GPU's ops, interpreted
    ids = [5, 17, 42, 9, 3]
    req = Req("0", ids, SamplingParams(), 0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    req.slots = runner.kv_pool.alloc(len(ids) + 1)
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    batch.add(req, req.slots[: len(ids)], prefix_len=0)
    fb, writes = batch.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(writes)
    fb.logits_indices = torch.arange(fb.num_tokens)
    runner.forward(fb)
    req.output_ids = [ids[0]]

    def decode() -> torch.Tensor:  # the same token at the same position and slot each time
        step = ScheduledBatch(ForwardMode.DECODE, [req], [1], [len(ids)], new_slots=[req.slots[len(ids):]])
        dfb, dwrites = step.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(dwrites)
        return runner.forward(dfb).float()

    plain = decode()
    linears = [p for layer in runner.model.layers for p in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                            layer.mlp.gate_up_proj, layer.mlp.down_proj)]
    cfg = SmallMConfig("pf", 8, 64, 1, 2, 1)
    for m in linears:
        m.gemv = DenseGemv(m.weight, cfg)
    with_gemv = decode()
    for m in linears:
        m.gemv.fuse_norm = isinstance(m, ColumnParallelLinear)
    fused = decode()
    layer = runner.model.layers[0]
    row = torch.randn(1, 64, dtype=torch.bfloat16)
    assert layer.self_attn.qkv_proj.forward_add_norm(row, row, layer.input_layernorm.weight, 1e-5) is not None
    assert layer.mlp.down_proj.gemv.fuse_norm is False  # (row-parallel: no norm before it)
    assert layer.self_attn.qkv_proj.forward_add_norm(row.expand(2, 64), row, layer.input_layernorm.weight, 1e-5) is None
    for m in linears:
        m.gemv = None
    scale = plain.abs().max()
    assert (with_gemv - plain).abs().max() <= 0.05 * scale
    assert (fused - with_gemv).abs().max() <= 0.02 * scale
    assert torch.equal(fused.argmax(-1), with_gemv.argmax(-1))


def test_norm_fusion_modes(monkeypatch):
    from radixlm.runtime import dense_gemv

    assert dense_gemv.norm_fusion_enabled("on") and not dense_gemv.norm_fusion_enabled("off")
    for auto in (False, True):
        monkeypatch.setattr(dense_gemv, "NORM_AUTO_ON", auto)
        assert dense_gemv.norm_fusion_enabled("auto") is auto


def test_lm_head_takes_its_gemv_for_a_single_row(tiny_model_dir):
    """The LM head (outside the decode graph; the step's largest weight) goes through its layer, so a measured M = 1
    GEMV for its shape serves batch-1 logits; more rows keep torch's product (the Triton kernel interpreted on a CPU)."""
    import torch.nn.functional as F

    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.server_args import ServerArgs

    model_dir = tiny_model_dir("llama")
    runner = ModelRunner(ServerArgs(model_path=str(model_dir), dtype="bfloat16", max_total_tokens=64, device="cpu",
                                    attention_backend="triton").resolve(), model_dir)
    model = runner.model
    head = model.lm_head
    torch.manual_seed(0)
    one, two = torch.randn(1, head.in_features, dtype=torch.bfloat16), torch.randn(2, head.in_features, dtype=torch.bfloat16)
    cfg = SmallMConfig("fma", 8, 64, 1, 2, 1)
    with torch.no_grad():
        head.gemv = DenseGemv(head.weight, cfg)
        got = model.compute_logits(one)
        assert got.dtype == torch.float32 and got.shape == (1, model.cfg.vocab_size)
        assert torch.equal(got, bf16_gemv(one, head.weight, cfg)[:, : model.cfg.vocab_size].float())
        assert torch.equal(model.compute_logits(two), F.linear(two, head.weight)[:, : model.cfg.vocab_size].float())
        head.gemv = None
        assert torch.equal(model.compute_logits(one), F.linear(one, head.weight)[:, : model.cfg.vocab_size].float())

"""The decoder's FP8 linears fed by the norm / SiLU kernels that quantize their input (runtime/quantization/fp8_act.py):
a tiny bf16 Llama under `--quantization fp8` with the GPU's Triton ops (interpreted on the CPU) takes the fused path for
qkv, gate_up and down at W8A8 sizes, and its logits equal, bit for bit, those of the separate norm / SiLU kernels and
quantization; decode sizes, non-FP8 weights and active LoRA updates keep the separate kernels."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import fp8_act_quant
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.quantization import fp8_act
from radixlm.runtime.quantization.fp8 import Fp8Weight
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs

pytest.importorskip("triton")


def _prefill_logits(runner: ModelRunner, ids: list[int]) -> torch.Tensor:
    req = Req("0", ids, SamplingParams(), 0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    req.slots = runner.kv_pool.alloc(len(ids))
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    batch.add(req, req.slots, prefix_len=0)
    fb, writes = batch.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(writes)
    fb.logits_indices = torch.arange(fb.num_tokens)
    out = runner.forward(fb).float()
    runner.req_to_token_pool.free(req.req_pool_idx)
    runner.kv_pool.free(req.slots)
    return out


@pytest.fixture(scope="module")
def runner(tiny_model_dir) -> ModelRunner:
    model_dir = tiny_model_dir("llama")
    return ModelRunner(ServerArgs(model_path=str(model_dir), dtype="bfloat16", max_total_tokens=256, device="cpu",
                                  quantization="fp8", attention_backend="triton").resolve(), model_dir)


def test_prefill_takes_the_fused_quantization_with_the_same_logits(runner, monkeypatch):
    assert runner.model.ops.name.startswith("triton")
    calls = {"norm": 0, "silu": 0}

    def counted(name, fn):
        def call(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return call

    monkeypatch.setattr(fp8_act_quant, "add_rms_norm_fp8", counted("norm", fp8_act_quant.add_rms_norm_fp8))
    monkeypatch.setattr(fp8_act_quant, "silu_and_mul_fp8", counted("silu", fp8_act_quant.silu_and_mul_fp8))
    ids = torch.randint(0, 400, (23,), generator=torch.Generator().manual_seed(7)).tolist()  # 23 rows: W8A8
    fused = _prefill_logits(runner, ids)
    layers = len(runner.model.layers)
    assert calls == {"norm": 2 * layers, "silu": layers}  # qkv and gate_up, down: every layer
    with monkeypatch.context() as m:
        m.setattr(fp8_act, "fused_input_weight", lambda layer, x: None)  # the separate kernels throughout
        separate = _prefill_logits(runner, ids)
    assert calls == {"norm": 2 * layers, "silu": layers}
    assert torch.equal(fused, separate)
    _prefill_logits(runner, ids[:16])  # 16 rows: W8A16 (unquantized activations), nothing to quantize
    assert calls == {"norm": 2 * layers, "silu": layers}


def test_where_the_fusion_applies(runner):
    layer = runner.model.layers[0]
    qkv, down = layer.self_attn.qkv_proj, layer.mlp.down_proj
    assert isinstance(qkv.quantized, Fp8Weight) and isinstance(down.quantized, Fp8Weight)
    many, few = torch.randn(17, qkv.in_features), torch.randn(16, qkv.in_features)
    assert fp8_act.fused_input_weight(qkv, many) is qkv.quantized
    assert fp8_act.fused_input_weight(qkv, few) is None
    assert fp8_act.fused_input_weight(qkv, many.reshape(17, 1, -1)) is None
    assert fp8_act.fused_input_weight(runner.model.lm_head, many) is None  # (kept in bf16)

    class Active:
        active = True

    qkv.lora = Active()  # type: ignore[assignment]
    try:
        assert fp8_act.fused_input_weight(qkv, many) is None
        assert fp8_act.add_norm_linear(qkv, many, None, layer.input_layernorm.weight, 1e-5, runner.model.ops) is None
    finally:
        qkv.lora = None


def test_reference_ops_run_the_same_composition(runner):
    """Off the Triton bundle (a CPU model's own ops) the same norm, `quantize_rows` and product as the layer itself."""
    from radixlm.kernels import get_kernel_ops

    layer = runner.model.layers[0]
    qkv, gate_up, down = layer.self_attn.qkv_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj
    ref = get_kernel_ops(False)
    g = torch.Generator().manual_seed(2)
    x, res = (torch.randn(20, qkv.in_features, generator=g).bfloat16() for _ in range(2))
    w = layer.input_layernorm.weight
    out, summed = fp8_act.add_norm_linear(gate_up, x, res, w, 1e-5, ref)
    normed, ref_sum = ref.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, ref_sum) and torch.equal(out, gate_up(normed))
    out, summed = fp8_act.add_norm_linear(qkv, x, None, w, 1e-5, ref)
    assert summed is None and torch.equal(out, qkv(ref.rms_norm(x, w, 1e-5)))
    gu = torch.randn(20, down.in_features * 2, generator=g).bfloat16()
    assert torch.equal(fp8_act.silu_mul_linear(down, gu, ref), down(ref.silu_and_mul(gu)))
    assert torch.equal(fp8_act.silu_mul_linear(down, gu, runner.model.ops), down(runner.model.ops.silu_and_mul(gu)))


def test_the_weights_pdl_flag_reaches_the_quantizing_launches(runner, monkeypatch):
    """`QuantizedWeight.pdl` (set_decode_pdl: on for quantized models on sm_90+) launches the norm / SiLU kernels that
    quantize and o's separate quantization with programmatic dependent launch; off, without."""
    from radixlm.kernels import fp8_gemm

    seen: list[bool] = []

    def record(pdl: bool, device: torch.device) -> dict:
        seen.append(pdl)
        return {"USE_PDL": False}  # (the interpreter has no PDL)

    monkeypatch.setattr(fp8_act_quant, "launch_options", record)
    monkeypatch.setattr(fp8_gemm, "launch_options", record)
    layer = runner.model.layers[0]
    qkv, o, down = layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.down_proj
    x = torch.randn(20, qkv.in_features).bfloat16()
    monkeypatch.setattr(o.quantized, "use_triton", True)  # o's W8A8 input through quantize_rows_fp8, as on a GPU
    for pdl in (True, False):
        for lin in (qkv, o, down):
            monkeypatch.setattr(lin.quantized, "pdl", pdl)
        seen.clear()
        fp8_act.add_norm_linear(qkv, x, x, layer.input_layernorm.weight, 1e-5, runner.model.ops)
        fp8_act.silu_mul_linear(down, torch.randn(20, 2 * down.in_features).bfloat16(), runner.model.ops)
        o.quantized.linear(torch.randn(20, o.in_features).bfloat16())
        assert seen == [pdl] * 3


def test_down_projection_output_is_summed_over_the_tensor_parallel_group(runner, monkeypatch):
    """Row-parallel down: each rank's partial product goes through the group's all-reduce, as
    RowParallelLinear.forward sends it (the fused path replaces that forward)."""
    down = runner.model.layers[0].mlp.down_proj
    summed: list[tuple[torch.Tensor, object]] = []
    monkeypatch.setattr(fp8_act.dist, "all_reduce", lambda t, group=None: summed.append((t, group)))
    group = object()
    monkeypatch.setattr(down, "tp_group", group)
    out = fp8_act.silu_mul_linear(down, torch.randn(20, 2 * down.in_features).bfloat16(), runner.model.ops)
    assert len(summed) == 1 and summed[0][0] is out and summed[0][1] is group

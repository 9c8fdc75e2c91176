"""FP8 W8A8 and the FP8 KV cache on the CPU reference path, against compressed-tensors and float32.

Exact: online quantization produces compressed-tensors' own codes and scales (FP8_DYNAMIC's rules),
and a compressed-tensors checkpoint loads to the weights its decompressor gives, bit for bit.
Within tolerance (tiny llama, logits at every position of 4 prompts, prefill + chunks + decode):
per position, max |logit error| / (max - min logit) is <= 4% on average with dynamic activations
(measured 1.7%), <= 8% with static ones calibrated on other text (measured 2.7%, worst position 5%),
<= 4% with an FP8 KV cache (measured 0.9% e4m3, 1.8% e5m2); the argmax agrees at >= 93% of positions
(measured 94.5-99%).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.kv_pool import TokenToKVPool
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.quantization.checkpoint import read_checkpoint_quantization
from radixlm.runtime.quantization.fp8 import FP8, Fp8Weight, quantize_rows
from radixlm.runtime.quantization.select import resolve_quantization
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs
from tests.fixtures.fp8_checkpoints import as_fp8_method_checkpoint, build_compressed_tensors_fp8
from tests.runtime.test_model_logits import _forward_all_positions, _reference_logits

pytest.importorskip("compressed_tensors")


@pytest.fixture(scope="module")
def checkpoints(tiny_model_dir, tmp_path_factory) -> dict[str, Path]:
    base = tiny_model_dir("llama")
    root = tmp_path_factory.mktemp("fp8")
    out = {"base": base}
    for preset in ("FP8", "FP8_DYNAMIC"):
        out[preset] = build_compressed_tensors_fp8(base, root / preset, preset)
    out["fp8-method"] = as_fp8_method_checkpoint(out["FP8"], root / "fp8-method")
    return out


def _runner(model_dir: Path, **options) -> ModelRunner:
    args = ServerArgs(model_path=str(model_dir), max_total_tokens=2048, device="cpu", dtype="float32", **options)
    return ModelRunner(args.resolve(), model_dir)


def _prompts() -> list[list[int]]:
    g = torch.Generator().manual_seed(1)
    return [torch.randint(0, 400, (n,), generator=g).tolist() for n in (3, 17, 40, 300)]


def _check_close(runner: ModelRunner, base: Path, mean_bound: float) -> None:
    prompts = _prompts()
    ours = _forward_all_positions(runner, prompts, chunks=[8, 8, 64, 1000])
    errors, agree, total = [], 0, 0
    for o, r in zip(ours, _reference_logits(base, prompts)):
        spread = (r.amax(-1) - r.amin(-1)).mean()
        errors.append(((o - r).abs().amax(-1).mean() / spread).item())
        agree += int((o.argmax(-1) == r.argmax(-1)).sum())
        total += r.shape[0]
    assert sum(errors) / len(errors) <= mean_bound, errors
    assert agree / total >= 0.93, agree / total


def _ct_weight_args(preset: str):
    from compressed_tensors.quantization import preset_name_to_scheme

    return preset_name_to_scheme(preset, ["Linear"]).weights


def test_online_quantization_is_compressed_tensors_fp8_dynamic_bit_for_bit() -> None:
    from compressed_tensors.quantization.lifecycle.forward import quantize
    from compressed_tensors.quantization.utils import calculate_qparams

    g = torch.Generator().manual_seed(0)
    w = torch.randn(48, 64, generator=g) * torch.rand(48, 1, generator=g) * 3
    w[5] = 0.0  # a zero row: a tiny scale, zero codes, no NaN
    ours = Fp8Weight.from_float(w)
    args = _ct_weight_args("FP8_DYNAMIC")
    scale, zero = calculate_qparams(w.amin(1, keepdim=True), w.amax(1, keepdim=True), args)
    codes = quantize(x=w, scale=scale, zero_point=zero, args=args, dtype=FP8)
    assert torch.equal(ours.codes.view(torch.uint8)[torch.arange(48) != 5], codes.view(torch.uint8)[torch.arange(48) != 5])
    assert torch.equal(ours.scales[0, torch.arange(48) != 5], scale.reshape(-1)[torch.arange(48) != 5])
    assert not ours.dequantize()[5].any() and torch.isfinite(ours.dequantize()).all()


def test_activations_per_token_and_static_saturate() -> None:
    x = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.0, 0.0], [1000.0, 1.0, -3.0]])
    codes, scales = quantize_rows(x)
    assert torch.equal(scales.reshape(-1)[[0, 2]], torch.tensor([2.0 / 448, 1000.0 / 448]))
    assert codes[0, 1].float() == -448 and not codes[1].float().any()
    codes, scales = quantize_rows(x, torch.tensor([0.01]))  # static: 1000 / 0.01 saturates at 448
    assert codes[2, 0].float() == 448 and torch.equal(scales, torch.full((3, 1), 0.01))


def test_linear_is_the_scaled_product_of_codes() -> None:
    g = torch.Generator().manual_seed(1)
    weight = Fp8Weight.from_float(torch.randn(32, 64, generator=g))
    x = torch.randn(2, 12, 64, generator=g)  # 24 rows: above W8A16_MAX_M, activations quantized per token
    xq, sx = quantize_rows(x.reshape(-1, 64))
    expected = (xq.float() * sx) @ weight.dequantize().t()
    torch.testing.assert_close(weight.linear(x).reshape(-1, 32), expected, rtol=1e-5, atol=1e-5)
    small = x[0, :3]  # 3 rows (decode sizes): weight-only, the activations unquantized
    torch.testing.assert_close(weight.linear(small), small @ weight.dequantize().t(), rtol=1e-5, atol=1e-5)
    assert weight.linear(x.to(torch.bfloat16)).dtype == torch.bfloat16


@pytest.mark.parametrize("preset", ["FP8", "FP8_DYNAMIC"])
def test_checkpoint_weights_equal_compressed_tensors_decompression(checkpoints, preset: str) -> None:
    from compressed_tensors.quantization.lifecycle.forward import dequantize

    ct_dir = checkpoints[preset]
    tensors = load_file(str(ct_dir / "model.safetensors"))
    runner = _runner(ct_dir)
    info = read_checkpoint_quantization(ct_dir)
    assert info is not None and info.static_activations == (preset == "FP8")
    args = _ct_weight_args(preset)
    layer = runner.model.layers[1]
    fused = layer.self_attn.qkv_proj.quantized
    assert isinstance(fused, Fp8Weight) and layer.self_attn.qkv_proj.weight.numel() == 0
    rows = []
    for part in ("q_proj", "k_proj", "v_proj"):
        prefix = f"model.layers.1.self_attn.{part}."
        rows.append(dequantize(x_q=tensors[prefix + "weight"], scale=tensors[prefix + "weight_scale"], args=args))
    assert torch.equal(fused.dequantize(), torch.cat(rows).float())
    if preset == "FP8":  # a fused layer takes the largest static input scale of its parts
        parts = [tensors[f"model.layers.1.self_attn.{p}.input_scale"] for p in ("q_proj", "k_proj", "v_proj")]
        assert fused.input_scale.item() == max(p.item() for p in parts)
    assert runner.model.lm_head.quantized is None  # ignored: unquantized in the checkpoint


@pytest.mark.parametrize("source,bound", [("online", 0.04), ("FP8_DYNAMIC", 0.04), ("FP8", 0.08), ("fp8-method", 0.08)])
def test_fp8_logits_close_to_float32(checkpoints, source: str, bound: float) -> None:
    if source == "online":
        runner = _runner(checkpoints["base"], quantization="fp8")
    else:
        runner = _runner(checkpoints[source])
    assert runner.quantization == "fp8"
    _check_close(runner, checkpoints["base"], bound)


@pytest.mark.parametrize("kv_dtype", ["fp8_e4m3", "fp8_e5m2"])
def test_fp8_kv_cache_logits_close_and_pool_doubles(checkpoints, kv_dtype: str) -> None:
    runner = _runner(checkpoints["base"], kv_cache_dtype=kv_dtype)
    assert runner.kv_pool.k_buffer[0].dtype.itemsize == 1
    float_pool = TokenToKVPool.bytes_per_token(2, 2, 16, torch.bfloat16)
    assert TokenToKVPool.bytes_per_token(2, 2, 16, runner.kv_cache_dtype) * 2 == float_pool
    _check_close(runner, checkpoints["base"], 0.04)


def test_checkpoint_kv_scales_reach_the_pool(checkpoints, tmp_path: Path) -> None:
    """k_scale / v_scale under compressed-tensors' names (self_attn.k_scale; the package writes them
    for a kv_cache_scheme, which it cannot attach to this transformers version's attention, so they
    are added to its checkpoint here). A K scale of 0.5 halves every stored code's value: logits stay close."""
    src = checkpoints["FP8_DYNAMIC"]
    out = tmp_path / "kv"
    out.mkdir()
    for f in src.iterdir():
        if f.name != "model.safetensors":
            (out / f.name).write_bytes(f.read_bytes())
    tensors = load_file(str(src / "model.safetensors"))
    for i in range(2):
        tensors[f"model.layers.{i}.self_attn.k_scale"] = torch.tensor(0.5)
        tensors[f"model.layers.{i}.self_attn.v_scale"] = torch.tensor(0.25 * (i + 1))
    save_file(tensors, str(out / "model.safetensors"))
    runner = _runner(out, kv_cache_dtype="fp8_e4m3")
    assert runner.kv_pool.k_scales == [0.5, 0.5] and runner.kv_pool.v_scales == [0.25, 0.5]
    _check_close(runner, checkpoints["base"], 0.05)
    assert _runner(out).kv_pool.k_scales == [1.0, 1.0]  # a float pool ignores them


def test_flags_and_checkpoints_that_do_not_fit_are_refused(checkpoints, tmp_path: Path) -> None:
    cpu = torch.device("cpu")
    ct = read_checkpoint_quantization(checkpoints["FP8"])
    with pytest.raises(ValueError, match="compressed-tensors"):
        resolve_quantization("compressed-tensors", "auto", cpu, False, False, None)
    with pytest.raises(ValueError, match="does not match"):
        resolve_quantization("gguf", "auto", cpu, False, False, ct)
    with pytest.raises(ValueError, match="tp_size 1"):
        resolve_quantization("none", "auto", cpu, False, True, ct, tp_size=2)
    assert resolve_quantization("none", "auto", cpu, False, False, ct) == "fp8"  # loads as published
    assert resolve_quantization("fp8", "auto", cpu, False, True, None, tp_size=2) == "fp8"  # online: per rank
    for config, message in (
        ({"quant_method": "fp8", "weight_block_size": [128, 128]}, "block-wise"),
        ({"quant_method": "bitsandbytes", "load_in_4bit": True}, "'bitsandbytes' is not supported"),
    ):
        (tmp_path / "config.json").write_text(json.dumps({"quantization_config": config}))
        with pytest.raises(ValueError, match=message):
            read_checkpoint_quantization(tmp_path)
    cfg = json.loads((checkpoints["FP8"] / "config.json").read_text())
    cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="num_bits=4"):
        read_checkpoint_quantization(tmp_path)
    with pytest.raises(ValueError, match="kv_cache_dtype"):
        ServerArgs(kv_cache_dtype="int8")


CHAT_PROMPTS = ["What is the capital of France?", "Write a Python function that reverses a string.",
                "Give me three tips for better sleep.", "Explain what a prime number is.",
                "Translate 'good morning' into Spanish.", "What is 12 times 7?",
                "Name the planets of the solar system.", "Write a haiku about the sea."]


def _greedy_steps(runner: ModelRunner, prompts: list[list[int]], steps: int,
                  forced: list[list[int]] | None = None) -> list[list[int]]:
    """Serve the prompts as the scheduler would (one batched prefill, then one batched decode step per
    token) and return each step's argmax; with `forced`, decode feeds those tokens instead of the
    model's own choices (teacher forcing: one divergence must not make every later token disagree)."""
    reqs = []
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    for i, ids in enumerate(prompts):
        req = Req(str(i), list(ids), SamplingParams(), 0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        req.slots = runner.kv_pool.alloc(len(ids) + steps)
        reqs.append(req)
        batch.add(req, req.slots[: len(ids)], prefix_len=0)
    chosen: list[list[int]] = [[] for _ in prompts]
    for step in range(steps):
        if step:
            for req, own, fed in zip(reqs, chosen, forced or chosen):
                req.output_ids = fed[:step] if forced else list(own)
            pos = [len(r.input_ids) + step - 1 for r in reqs]
            batch = ScheduledBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), pos,
                                   new_slots=[r.slots[p : p + 1] for r, p in zip(reqs, pos)])
        fb, slot_writes = batch.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(slot_writes)
        for row, token in zip(chosen, runner.forward(fb).argmax(-1).tolist()):
            row.append(token)
    return chosen


@pytest.mark.xfail(strict=True, reason="measured 92.7% (356/384) < 95% goal, issue 19")
def test_default_model_fp8_greedy_agrees_with_float32(default_model_dir: Path) -> None:
    """The default model (its GGUF weights dequantized to float32, then quantized to FP8 at load) on 8
    chat prompts: our float32 runner's greedy continuations of 48 tokens (test_model_logits checks that
    runner against transformers), then the FP8 model's greedy choice at each of those positions, served
    as on a GPU: the prompts prefilled together (W8A8, > 16 rows), the continuations teacher-forced
    through batched decode steps (8 rows: W8A16). Goal >= 95% of tokens (issue 19). Measured 356/384 =
    92.7%; W8A8 at every step would give 351/384 (91.4%), W8A16 at every step 356/384: the gap is the
    per-channel FP8 rounding of the weights themselves. benchmarks/fp8_error_sources.py (transformers
    with FP8-rounded weights, same prompts and path) reproduces 356/384 and finds no scheme of scales that
    helps: block 128x128 and group 1x128 scales also give 356/384 (e4m3's error is relative, ~3 mantissa
    bits, whatever the scale), a least-squares scale per row 362/384 with the same logit error (a luckier
    draw at near-ties, not a smaller error); qkv and gate/up dominate (94.8% / 95.1% alone, o 97.9%, down
    97.1%). The mean max |logit error| is ~2 while 54 of the 384 reference positions have a top-2
    margin below 0.3."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                                  tokenize=False)) for q in CHAT_PROMPTS]
    steps = 48

    def runner(**options) -> ModelRunner:
        args = ServerArgs(dtype="float32", max_total_tokens=4096, device="cpu", **options).resolve()
        return ModelRunner(args, default_model_dir)

    reference = _greedy_steps(runner(), prompts, steps)
    fp8 = runner(quantization="fp8")
    assert fp8.quantization == "fp8"
    chosen = _greedy_steps(fp8, prompts, steps, forced=reference)
    agree = sum(a == b for ours, ref in zip(chosen, reference) for a, b in zip(ours, ref))
    total = steps * len(prompts)
    print(f"FP8 greedy agreement with float32: {agree}/{total} = {agree / total:.1%}")
    assert agree / total >= 0.95

"""Triton elementwise ops against ops_ref: same signatures, same results, inputs left untouched."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import ops_ref

DTYPES = [torch.float32, torch.bfloat16]


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(7)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(5, 96), (2, 3, 64)])
def test_rms_norm(device, assert_close, dtype, shape):
    from radixlm.kernels.ops import rms_norm

    x = torch.randn(shape, dtype=dtype, device=device)
    w = torch.rand(shape[-1], dtype=dtype, device=device) + 0.5
    assert_close(rms_norm(x, w, 1e-6), ops_ref.rms_norm_ref(x, w, 1e-6), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm(device, assert_close, dtype):
    from radixlm.kernels.ops import fused_add_rms_norm

    x = torch.randn(6, 80, dtype=dtype, device=device)
    res = torch.randn(6, 80, dtype=dtype, device=device)
    w = torch.rand(80, dtype=dtype, device=device) + 0.5
    x0, res0 = x.clone(), res.clone()
    normed, new_res = fused_add_rms_norm(x, res, w, 1e-5)
    ref_normed, ref_res = ops_ref.fused_add_rms_norm_ref(x, res, w, 1e-5)
    assert_close(normed, ref_normed, dtype)
    assert_close(new_res, ref_res, dtype)  # (the CPU interpreter truncates to bf16 instead of rounding)
    if dtype == torch.float32:
        assert torch.equal(new_res, ref_res)
    assert torch.equal(x, x0) and torch.equal(res, res0)


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_is_the_norm_of_the_rounded_sum(device, dtype):
    """The decode step's final norm takes one launch (models/llama.py `_final_norm`): the bits of
    rms_norm(x + residual). (bf16 on a GPU only: the CPU interpreter truncates the sum to bf16.)"""
    from radixlm.kernels.ops import fused_add_rms_norm, rms_norm

    if dtype == torch.bfloat16 and device == "cpu":
        pytest.skip("the CPU interpreter truncates to bf16 instead of rounding")
    x = torch.randn(5, 4096, dtype=dtype, device=device)
    res = torch.randn(5, 4096, dtype=dtype, device=device)
    w = torch.rand(4096, dtype=dtype, device=device) + 0.5
    assert torch.equal(fused_add_rms_norm(x, res, w, 1e-5)[0], rms_norm(x + res, w, 1e-5))


@pytest.mark.parametrize("dtype", DTYPES)
def test_silu_and_mul(device, assert_close, dtype):
    from radixlm.kernels.ops import silu_and_mul

    x = torch.randn(2, 3, 2 * 40, dtype=dtype, device=device)
    out = silu_and_mul(x)
    assert out.shape == (2, 3, 40)
    assert_close(out, ops_ref.silu_and_mul_ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rotary_on_strided_qkv_views(device, assert_close, dtype):
    from radixlm.kernels.ops import rotary

    tokens, hq, hkv, d, max_pos = 7, 6, 2, 64, 50
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q = qkv[:, : hq * d].view(tokens, hq, d)
    k = qkv[:, hq * d : (hq + hkv) * d].view(tokens, hkv, d)
    qkv0 = qkv.clone()
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).to(device)
    pos = torch.randint(0, max_pos, (tokens,), device=device)
    q_out, k_out = rotary(q, k, pos, cache)
    q_ref, k_ref = ops_ref.rotary_ref(q, k, pos, cache)
    assert_close(q_out, q_ref, dtype)
    assert_close(k_out, k_ref, dtype)
    assert torch.equal(qkv, qkv0)


@pytest.mark.parametrize(("dtype", "hkv", "d"), [(torch.float32, 2, 64), (torch.bfloat16, 3, 80)])
def test_rotary_store_kv_equals_rotary_then_store(device, dtype, hkv, d):
    """One launch writes the rotated K and V into the pool slots: the same bits as rotary, then store_kv."""
    from radixlm.kernels.ops import rotary, rotary_store_kv, store_kv

    tokens, hq, max_pos, slots_total = 5, 6, 40, 24
    qkv = torch.randn(tokens, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(tokens, hq, d), k.view(tokens, hkv, d), v.view(tokens, hkv, d)
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).to(device)
    pos = torch.randint(0, max_pos, (tokens,), device=device)
    slots = (torch.randperm(slots_total - 1)[:tokens] + 1).to(device)
    k_buf = torch.randn(slots_total, hkv, d, dtype=dtype, device=device)
    v_buf = torch.randn(slots_total, hkv, d, dtype=dtype, device=device)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    q_ref, k_rot = rotary(q, k, pos, cache)
    store_kv(k_ref, v_ref, slots, k_rot, v)
    q_out = rotary_store_kv(q, k, v, pos, cache, k_buf, v_buf, slots)
    assert torch.equal(q_out, q_ref)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)  # the other slots untouched too
    with pytest.raises(ValueError, match="pool"):
        rotary_store_kv(q, k, v, pos, cache, k_buf.to(torch.float16), v_buf, slots)


@pytest.mark.parametrize(("pool_dtype", "slot_dtype"), [(torch.bfloat16, torch.int64), (torch.float32, torch.int32)])
def test_store_kv(device, pool_dtype, slot_dtype):
    from radixlm.kernels.ops import store_kv

    tokens, hkv, d, slots_total = 9, 2, 64, 30
    kv = torch.randn(tokens, 2 * hkv * d, dtype=torch.bfloat16, device=device)
    k = kv[:, : hkv * d].view(tokens, hkv, d)  # strided views, as sliced from a fused projection
    v = kv[:, hkv * d :].view(tokens, hkv, d)
    slots = (torch.randperm(slots_total - 1)[:tokens] + 1).to(slot_dtype).to(device)
    k_buf = torch.randn(slots_total, hkv, d, dtype=pool_dtype, device=device)
    v_buf = torch.randn(slots_total, hkv, d, dtype=pool_dtype, device=device)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, slots, k, v)
    ops_ref.store_kv_ref(k_ref, v_ref, slots, k, v)
    assert torch.equal(k_buf, k_ref) and torch.equal(v_buf, v_ref)

"""FP8 KV cache in the Triton kernels against the torch references (the CPU interpreter on a machine
without CUDA): the store writes the reference's codes bit for bit (scales are powers of two, so
x * (1 / scale) is exact in both), decode and extend attention over an FP8 pool with per-layer scales
equal the reference's within the float tolerance, and the FP8 pool itself stays within a stated bound
of attention over the unquantized K/V (relative error <= 6% for e4m3, <= 12% for e5m2)."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import ops_ref
from radixlm.kernels.attention_ref import decode_attention_ref, extend_attention_ref
from tests.kernels.conftest import rel_err

FP8_DTYPES = [torch.float8_e4m3fn, torch.float8_e5m2]
HEAD_DIM, NUM_KV_HEADS = 64, 2
QUANT_BOUND = {torch.float8_e4m3fn: 0.06, torch.float8_e5m2: 0.12}


def _quantized(pool, dtype: torch.dtype, k_scale: float, v_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The pool's float K/V stored as FP8 by the reference store (every slot, garbage included)."""
    slots = torch.arange(pool.k_buffer.shape[0], device=pool.k_buffer.device)
    k = torch.empty(pool.k_buffer.shape, dtype=dtype, device=pool.k_buffer.device)
    v = torch.empty_like(k)
    ops_ref.store_kv_ref(k, v, slots, pool.k_buffer, pool.v_buffer, k_scale, v_scale)
    return k, v


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("scales", [(1.0, 1.0), (0.5, 2.0)])
def test_store_kv_fp8_matches_ref_bit_for_bit(device, dtype, scales):
    from radixlm.kernels.ops import store_kv

    tokens, hkv, d, total = 9, 2, 64, 30
    kv = torch.randn(tokens, 2 * hkv * d, dtype=torch.bfloat16, device=device) * 4
    kv[0, :4] = torch.tensor([1e5, -1e5, 3e4, 0.0])  # saturate to +-max, never inf / NaN
    k, v = kv[:, : hkv * d].view(tokens, hkv, d), kv[:, hkv * d :].view(tokens, hkv, d)
    slots = (torch.randperm(total - 1)[:tokens] + 1).to(device)
    k_buf = torch.zeros(total, hkv, d, dtype=dtype, device=device)
    v_buf = torch.zeros_like(k_buf)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    store_kv(k_buf, v_buf, slots, k, v, *scales)
    ops_ref.store_kv_ref(k_ref, v_ref, slots, k, v, *scales)
    assert torch.equal(k_buf.view(torch.uint8), k_ref.view(torch.uint8))
    assert torch.equal(v_buf.view(torch.uint8), v_ref.view(torch.uint8))
    assert torch.isfinite(k_ref.float()).all() and k_ref.float().abs().max() == torch.finfo(dtype).max


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize(("q_dtype", "splits"), [(torch.float32, 3), (torch.bfloat16, 1)])
def test_decode_fp8_pool_matches_ref(device, make_pool, assert_close, dtype, q_dtype, splits):
    from radixlm.kernels.decode_attention import decode_attention

    seq_lens = [37, 1, 16]
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, torch.float32, device)
    k8, v8 = _quantized(pool, dtype, 0.5, 0.25)
    q = torch.randn(len(seq_lens), NUM_KV_HEADS * 3, HEAD_DIM, dtype=q_dtype, device=device)
    idx, lens = torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device)
    scale = HEAD_DIM**-0.5
    got = decode_attention(q, k8, v8, pool.req_to_token, idx, lens, scale, num_kv_splits=splits,
                           k_scale=0.5, v_scale=0.25)
    ref = decode_attention_ref(q, k8, v8, pool.req_to_token, idx, lens, scale, k_scale=0.5, v_scale=0.25)
    assert_close(got, ref, q_dtype)
    exact = decode_attention_ref(q.float(), pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale)
    assert rel_err(ref, exact) < QUANT_BOUND[dtype]


@pytest.mark.parametrize("dtype", FP8_DTYPES, ids=str)
@pytest.mark.parametrize("q_dtype", [torch.float32, torch.bfloat16])
def test_extend_fp8_pool_matches_ref(device, make_pool, assert_close, dtype, q_dtype):
    from radixlm.kernels.extend_attention import extend_attention

    prefix_lens, extend_lens = [0, 23, 5], [20, 17, 1]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, torch.float32, device)
    k8, v8 = _quantized(pool, dtype, 2.0, 0.5)
    q = torch.randn(sum(extend_lens), NUM_KV_HEADS * 3, HEAD_DIM, dtype=q_dtype, device=device)
    starts = torch.tensor([sum(extend_lens[:i]) for i in range(len(extend_lens))], device=device)
    scale = HEAD_DIM**-0.5
    got = extend_attention(
        q, k8, v8, pool.req_to_token, torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device),
        torch.tensor(extend_lens, device=device), starts, scale, max_extend_len=max(extend_lens),
        k_scale=2.0, v_scale=0.5,
    )
    ref = extend_attention_ref(q, k8, v8, pool.req_to_token, pool.rows, seq_lens, extend_lens, scale,
                               k_scale=2.0, v_scale=0.5)
    assert_close(got, ref, q_dtype)
    exact = extend_attention_ref(q.float(), pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens,
                                 extend_lens, scale)
    assert rel_err(ref, exact) < QUANT_BOUND[dtype]

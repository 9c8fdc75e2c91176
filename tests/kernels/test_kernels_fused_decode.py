"""The decode layer's fused kernels (issue 22.2) against the unfused references they replace:
rotary + KV store in one launch (`rope_store.rotary_store_kv` vs `ops_ref.rotary_store_kv_ref`),
the tail's add + gather + norm (`ops.add_rms_norm_rows`), and one-launch decode attention (the last
split merges) vs the two-launch kernel and the reference."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import ops_ref
from radixlm.kernels.attention_ref import decode_attention_ref

TOKENS, HQ, HKV, D, MAX_POS, SLOTS = 5, 6, 2, 64, 40, 24
NUM_KV = 2  # KV heads of the attention tests' pools


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(11)


def _cache(device: str) -> torch.Tensor:
    inv = 1.0 / (10000.0 ** (torch.arange(0, D, 2, dtype=torch.float32) / D))
    ang = torch.arange(MAX_POS, dtype=torch.float32)[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), dim=-1).to(device)


def _run_both(device: str, dtype: torch.dtype, pool_dtype: torch.dtype, scales: tuple[float, float],
              qk_norm: bool, strided: bool):
    from radixlm.kernels.rope_store import rotary_store_kv

    width = (HQ + 2 * HKV) * D
    wide = torch.randn(TOKENS, width + (32 if strided else 0), dtype=dtype, device=device) * 3
    qkv = wide[:, :width]  # a row stride larger than the width, as a slice of a wider buffer
    pos = torch.randint(0, MAX_POS, (TOKENS,), device=device)
    slots = (torch.randperm(SLOTS - 1)[:TOKENS] + 1).to(device)
    norms = (torch.rand(D, dtype=dtype, device=device) + 0.5, torch.rand(D, dtype=dtype, device=device) + 0.5,
             1e-6) if qk_norm else (None, None, 0.0)
    k_buf = torch.randn(SLOTS, HKV, D, device=device).to(pool_dtype)
    v_buf = torch.randn(SLOTS, HKV, D, device=device).to(pool_dtype)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    qkv0 = qkv.clone()
    q = rotary_store_kv(qkv, HQ, HKV, pos, _cache(device), k_buf, v_buf, slots, *scales, *norms)
    q_ref = ops_ref.rotary_store_kv_ref(qkv, HQ, HKV, pos, _cache(device), k_ref, v_ref, slots, *scales, *norms)
    assert torch.equal(qkv, qkv0), "the projection's output must be left untouched"
    return (q, k_buf, v_buf), (q_ref, k_ref, v_ref), slots


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
@pytest.mark.parametrize("strided", [False, True], ids=["dense", "strided"])
def test_rotary_store_kv_float32_bit_for_bit(device, qk_norm, strided):
    (q, k, v), (q_ref, k_ref, v_ref), _ = _run_both(device, torch.float32, torch.float32, (1.0, 1.0), qk_norm, strided)
    assert q.shape == (TOKENS, HQ, D)
    assert torch.allclose(q, q_ref, rtol=1e-6, atol=1e-6)
    assert torch.allclose(k, k_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(v, v_ref)  # a plain copy


@pytest.mark.parametrize("qk_norm", [False, True], ids=["plain", "qk_norm"])
def test_rotary_store_kv_bf16(device, assert_close, qk_norm):
    (q, k, v), (q_ref, k_ref, v_ref), slots = _run_both(device, torch.bfloat16, torch.bfloat16, (1.0, 1.0),
                                                        qk_norm, True)
    assert_close(q, q_ref, torch.bfloat16)
    assert_close(k, k_ref, torch.bfloat16)
    assert torch.equal(v, v_ref)
    others = torch.ones(SLOTS, dtype=torch.bool, device=k.device)
    others[slots] = False
    assert torch.equal(k[others], k_ref[others]), "slots outside the batch must keep their values"


@pytest.mark.parametrize("pool_dtype", [torch.float8_e4m3fn, torch.float8_e5m2], ids=str)
def test_rotary_store_kv_fp8_pool(device, pool_dtype):
    """FP8 codes of the reference bit for bit on float32 inputs (powers-of-two scales are exact)."""
    (q, k, v), (q_ref, k_ref, v_ref), _ = _run_both(device, torch.float32, pool_dtype, (0.5, 2.0), False, False)
    assert torch.allclose(q, q_ref, rtol=1e-6, atol=1e-6)
    assert torch.equal(v.view(torch.uint8), v_ref.view(torch.uint8))
    mismatched = (k.view(torch.uint8) != k_ref.view(torch.uint8)).float().mean().item()
    assert mismatched < 0.01  # rotated K: a last-ulp float32 difference may move a code at a rounding tie


def test_rotary_store_kv_rejects_a_bad_width(device):
    from radixlm.kernels.rope_store import rotary_store_kv

    qkv = torch.randn(2, (HQ + 2 * HKV) * D + 2, device=device)
    buf = torch.zeros(SLOTS, HKV, D, device=device)
    with pytest.raises(ValueError, match="width"):
        rotary_store_kv(qkv, HQ, HKV, torch.zeros(2, dtype=torch.int64, device=device), _cache(device), buf, buf,
                        torch.arange(2, device=device))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_add_rms_norm_rows(device, assert_close, dtype):
    from radixlm.kernels.ops import add_rms_norm_rows

    x = torch.randn(7, 96, dtype=dtype, device=device)
    res = torch.randn(7, 96, dtype=dtype, device=device)
    w = torch.rand(96, dtype=dtype, device=device) + 0.5
    rows = torch.tensor([6, 0, 3], device=device)
    got = add_rms_norm_rows(x, res, w, 1e-5, rows)
    ref = ops_ref.add_rms_norm_rows_ref(x, res, w, 1e-5, rows)
    assert got.shape == (3, 96)
    assert_close(got, ref, dtype)
    if dtype == torch.float32:
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("group", "dtype", "splits", "seq_lens"),
    [
        (4, torch.float32, 4, [1, 40, 25, 9]),  # one, several and all splits active
        (3, torch.float32, 8, [70, 16]),
        (4, torch.bfloat16, 3, [29, 48, 3]),
    ],
)
def test_single_launch_decode_equals_two_stage(device, make_pool, assert_close, group, dtype, splits, seq_lens):
    """The in-kernel merge is stage 2's arithmetic: the same bits as two launches, the reference's
    values, and the split counters are left at zero (ready for the next layer / graph replay)."""
    from radixlm.kernels.decode_attention import decode_attention, split_counters

    pool = make_pool(seq_lens, NUM_KV, D, dtype, device)
    q = torch.randn(len(seq_lens), NUM_KV * group, D, dtype=dtype, device=device)
    idx, lens = torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device)
    args = (q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, D**-0.5)
    one = decode_attention(*args, num_kv_splits=splits)
    again = decode_attention(*args, num_kv_splits=splits)
    two = decode_attention(*args, num_kv_splits=splits, single_launch=False)
    assert torch.equal(one, two) and torch.equal(one, again)
    assert_close(one, decode_attention_ref(*args), dtype)
    assert int(split_counters(q.device, len(seq_lens) * NUM_KV).abs().sum()) == 0



def _decode_case(device: str, make_pool, seq_lens: list[int], group: int, dtype: torch.dtype,
                 pool_dtype: torch.dtype):
    """A pool holding every request's KV but the newest token's, whose slot holds garbage, and the
    fused projection's output for that token."""
    pool = make_pool(seq_lens, NUM_KV, D, torch.float32, device)
    k_buf, v_buf = pool.k_buffer.to(pool_dtype), pool.v_buffer.to(pool_dtype)
    bsz, hq = len(seq_lens), NUM_KV * group
    qkv = torch.randn(bsz, (hq + 2 * NUM_KV) * D, dtype=dtype, device=device)
    rows = torch.tensor(pool.rows, device=device)
    lens = torch.tensor(seq_lens, device=device)
    slots = pool.req_to_token[rows, lens - 1].long()
    pos = torch.randint(0, MAX_POS, (bsz,), device=device)
    return qkv, hq, pos, k_buf, v_buf, slots, pool.req_to_token, rows, lens


@pytest.mark.parametrize(
    ("group", "dtype", "pool_dtype", "splits", "seq_lens"),
    [
        (4, torch.float32, torch.float32, 4, [1, 40, 25, 16]),  # newest alone, mid-block, block edge
        (3, torch.float32, torch.float32, 1, [33, 2]),  # one split writes the output itself
        (4, torch.bfloat16, torch.bfloat16, 3, [29, 48, 17]),
        (4, torch.float32, torch.float8_e4m3fn, 2, [37, 5]),
    ],
)
def test_decode_attention_qkv_matches_composed_ref(device, make_pool, assert_close, group, dtype, pool_dtype,
                                                   splits, seq_lens):
    """Rotary + KV store + decode attention in one launch against rotary_store_kv_ref then
    decode_attention_ref on a copy of the pool: the same K/V written, the same output."""
    from radixlm.kernels.decode_attention_qkv import decode_attention_qkv

    qkv, hq, pos, k_buf, v_buf, slots, r2t, rows, lens = _decode_case(device, make_pool, seq_lens, group, dtype,
                                                                       pool_dtype)
    scales = (0.5, 2.0) if pool_dtype.itemsize == 1 else (1.0, 1.0)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    q_ref = ops_ref.rotary_store_kv_ref(qkv, hq, NUM_KV, pos, _cache(device), k_ref, v_ref, slots, *scales)
    ref = decode_attention_ref(q_ref, k_ref, v_ref, r2t, rows, lens, D**-0.5, k_scale=scales[0], v_scale=scales[1])
    got = decode_attention_qkv(qkv, hq, NUM_KV, pos, _cache(device), k_buf, v_buf, slots, r2t, rows, lens, D**-0.5,
                               k_scale=scales[0], v_scale=scales[1], num_kv_splits=splits)
    assert got.shape == (len(seq_lens), hq, D)
    assert_close(got, ref, dtype)
    if dtype == torch.float32:
        assert torch.equal(v_buf.view(torch.uint8), v_ref.view(torch.uint8))
        mismatched = (k_buf.view(torch.uint8) != k_ref.view(torch.uint8)).float().mean().item()
        assert mismatched < 0.01  # a last-ulp float32 rotation difference may move a rounding tie
    else:
        assert_close(k_buf, k_ref, dtype)
        assert torch.equal(v_buf, v_ref)

"""Decode attention with rotary and the KV store in its first stage (`decode_attention(..., rope=RopeStore)`):
the same output and the same pool as `ops.rotary_store_kv` then `decode_attention`, for one and several splits,
odd head sizes and requests whose new token's slot holds stale values; and the attention backend's choice of it."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import decode_attention as da


def _case(make_pool, device, dtype, seq_lens, hq, hkv, d):
    pool = make_pool(seq_lens, hkv, d, dtype, device)
    b = len(seq_lens)
    qkv = torch.randn(b, (hq + 2 * hkv) * d, dtype=dtype, device=device)
    q, k, v = qkv.split([hq * d, hkv * d, hkv * d], -1)
    q, k, v = q.view(b, hq, d), k.view(b, hkv, d), v.view(b, hkv, d)
    max_pos = max(seq_lens) + 7
    inv = 1.0 / (10000.0 ** (torch.arange(0, d, 2, dtype=torch.float32) / d))
    ang = torch.arange(max_pos, dtype=torch.float32)[:, None] * inv[None, :]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1).to(device)
    lens = torch.tensor(seq_lens, device=device)
    idx = torch.tensor(pool.rows, device=device)
    positions = lens - 1 + torch.tensor([3 * i for i in range(b)], device=device)  # angles apart from the index
    slots = pool.req_to_token[idx, lens - 1].to(torch.int64)  # the new token's slot (stale values there now)
    return pool, q, k, v, cache, lens, idx, positions, slots


@pytest.mark.parametrize(("dtype", "seq_lens", "hq", "hkv", "d", "splits"), [
    (torch.float32, [1, 17, 40], 4, 2, 64, 4),
    (torch.float32, [33], 8, 2, 64, 1),  # one split: stage 1 writes the output
    (torch.bfloat16, [5, 16, 50], 6, 3, 80, 3),  # head size not a power of two (masked tail of the rotation)
    (torch.bfloat16, [64], 4, 1, 64, 8),  # more splits than blocks: empty splits, the last one stores
    (torch.float32, [1, 16, 17], 4, 2, 64, 2),  # only the new token; a last block holding only the new token
])
def test_rope_in_stage1_equals_rotary_store_then_attention(make_pool, device, assert_close, dtype, seq_lens, hq, hkv,
                                                          d, splits):
    """The pool bit for bit; the output within the attention's tolerance (the new key's score is a float32 sum
    folded in after the loop, not a term of the block's dot)."""
    from radixlm.kernels.attention_ref import decode_attention_ref
    from radixlm.kernels.ops import rotary_store_kv

    pool, q, k, v, cache, lens, idx, positions, slots = _case(make_pool, device, dtype, seq_lens, hq, hkv, d)
    k_ref, v_ref = pool.k_buffer.clone(), pool.v_buffer.clone()
    q_rot = rotary_store_kv(q, k, v, positions, cache, k_ref, v_ref, slots)
    scale = d**-0.5
    ref = da.decode_attention(q_rot, k_ref, v_ref, pool.req_to_token, idx, lens, scale, num_kv_splits=splits)
    q0, k0, v0 = q.clone(), k.clone(), v.clone()
    out = da.decode_attention(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale,
                              num_kv_splits=splits, rope=da.RopeStore(k, v, positions, cache, slots))
    assert torch.equal(pool.k_buffer, k_ref) and torch.equal(pool.v_buffer, v_ref)  # the new K/V, nothing else
    assert_close(out, ref, dtype)
    assert_close(out, decode_attention_ref(q_rot, k_ref, v_ref, pool.req_to_token, idx, lens, scale), dtype)
    if dtype == torch.float32:
        torch.testing.assert_close(out, ref, rtol=2e-6, atol=2e-6)
    assert torch.equal(q, q0) and torch.equal(k, k0) and torch.equal(v, v0)


def test_rope_refuses_what_it_cannot_store(make_pool, device) -> None:
    pool, q, k, v, cache, lens, idx, positions, slots = _case(make_pool, device, torch.float32, [9], 4, 2, 64)
    with pytest.raises(ValueError, match="rope"):
        da.decode_attention(q, pool.k_buffer.to(torch.bfloat16), pool.v_buffer.to(torch.bfloat16), pool.req_to_token,
                            idx, lens, 0.125, rope=da.RopeStore(k, v, positions, cache, slots))


def test_backend_takes_the_one_launch_only_for_plain_triton_decode(monkeypatch) -> None:
    """`PagedAttentionBackend.decode_with_rotary`: the Triton bundle, plain decode, a pool of k's dtype and the
    switch on; None otherwise (the caller runs rotary_and_store, then forward)."""
    from types import SimpleNamespace

    from radixlm.kernels import AttentionMetadata, get_kernel_ops
    from radixlm.runtime.attention import PagedAttentionBackend
    from radixlm.runtime.forward_batch import ForwardMode

    calls: list[dict] = []
    triton_ops = SimpleNamespace(decode_takes_rope=True, rotary_table=None,
                                 decode_attention=lambda *a, **kw: calls.append(kw) or "out")
    kv_pool = SimpleNamespace(dtype=torch.bfloat16, k_buffer=["k0"], v_buffer=["v0"], k_scales=[1.0], v_scales=[1.0])
    backend = object.__new__(PagedAttentionBackend)
    backend.ops, backend.kv_pool, backend.sm_scale = triton_ops, kv_pool, 0.1
    backend.meta = AttentionMetadata.for_decode(torch.zeros(1, 4, dtype=torch.int32), torch.zeros(1), torch.ones(1))
    k = torch.zeros(1, 2, 8, dtype=torch.bfloat16)
    batch = SimpleNamespace(mode=ForwardMode.DECODE, positions="pos", out_cache_loc="slots")
    assert backend.decode_with_rotary("q", k, "v", 0, batch, "cs") == "out"
    assert calls[-1]["rope"] == da.RopeStore(k, "v", "pos", "cs", "slots")
    monkeypatch.setattr(da, "ROPE_IN_STAGE1", False)
    assert backend.decode_with_rotary("q", k, "v", 0, batch, "cs") is None
    monkeypatch.setattr(da, "ROPE_IN_STAGE1", True)
    assert backend.decode_with_rotary("q", k.float(), "v", 0, batch, "cs") is None  # an FP8 / other-dtype pool
    assert backend.decode_with_rotary("q", k, "v", 0, SimpleNamespace(mode=ForwardMode.EXTEND), "cs") is None
    backend.meta = AttentionMetadata.for_decode(backend.meta.req_to_token, torch.zeros(1), torch.ones(1), cascade="c")
    assert backend.decode_with_rotary("q", k, "v", 0, batch, "cs") is None
    backend.ops = get_kernel_ops(False)  # the torch references: no such launch
    assert backend.decode_with_rotary("q", k, "v", 0, batch, "cs") is None
    assert len(calls) == 1


def test_scheduler_decodes_the_same_tokens_with_rotary_in_the_attention(tiny_model_dir, monkeypatch) -> None:
    """The tiny Llama's decode steps with the Triton decode attention taking rotary and the KV store (the rest
    torch): the same greedy tokens as with rotary + store in their own launch, and the one launch ran."""
    import dataclasses

    from radixlm.kernels.api import decode_attention_triton
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion
    from tests.runtime.test_cascade import shared_workload

    ropes: list[bool] = []

    def attention(*args, rope=None, **kwargs):
        ropes.append(rope is not None)
        return decode_attention_triton(*args, rope=rope, **kwargs)

    def triton_decode(sched):
        sched.runner.model.decode_stack = None  # the layers in Python (not the CPU's one-call decode step)
        ops = dataclasses.replace(sched.runner.attn_backend.ops, decode_attention=attention, decode_takes_rope=True,
                                  rotary_table=None)
        sched.runner.attn_backend.ops = sched.runner.model.ops = ops
        return sched

    model_dir = tiny_model_dir("llama")
    torch.set_num_threads(1)
    runs = {}
    for fused in (False, True):
        monkeypatch.setattr(da, "ROPE_IN_STAGE1", fused)
        sched = triton_decode(make_scheduler(model_dir, cascade_attention="off"))
        work = shared_workload(3, sched.runner.vocab_size, groups=1, max_new=(3, 4))
        runs[fused] = {k: v["output_ids"] for k, v in run_to_completion(sched, work).items()}
        assert_pool_idle(sched)
        assert ropes and all(ropes) == fused and any(ropes) == fused
        ropes.clear()
    assert runs[True] == runs[False]

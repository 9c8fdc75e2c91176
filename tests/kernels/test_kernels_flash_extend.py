"""kernels/flash_extend.py: the gather plan (every request's KV slots in order, cumulative lengths) and the varlen
causal attention aligned to the end of the keys, against the extend reference over a pool with scattered slots and
garbage elsewhere; requests with and without a prefix and a decode row (one new token). On a CPU `varlen_attention`
is its per-request reference (torch's flash kernel runs on CUDA: benchmarks/throughput_probe.py checks it there)."""
from __future__ import annotations

import torch

from radixlm.kernels import flash_extend
from radixlm.kernels.api import AttentionMetadata, extend_attention_triton
from radixlm.kernels.attention_ref import extend_attention_ref


def _meta(pool, seq_lens: list[int], extend_lens: list[int]) -> AttentionMetadata:
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    return AttentionMetadata(
        req_to_token=pool.req_to_token, req_pool_indices=torch.tensor(pool.rows), seq_lens=torch.tensor(seq_lens),
        extend_seq_lens=torch.tensor(extend_lens), extend_start_loc=torch.tensor(starts),
        max_extend_len=max(extend_lens), req_pool_indices_host=tuple(pool.rows), seq_lens_host=tuple(seq_lens),
        extend_seq_lens_host=tuple(extend_lens))


def test_flash_extend_matches_the_reference(make_pool, assert_close):
    prefix_lens, extend_lens = [0, 17, 40, 0], [23, 9, 1, 1]  # no prefix, a chunk's continuation, decode rows
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, 2, 16, torch.bfloat16, "cpu")
    q = torch.randn(sum(extend_lens), 8, 16, dtype=torch.bfloat16)
    meta = _meta(pool, seq_lens, extend_lens)
    got = flash_extend.extend_attention_flash(q, pool.k_buffer, pool.v_buffer, meta, 0.25)
    ref = extend_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens, extend_lens, 0.25)
    assert_close(got, ref, torch.bfloat16)
    index, cu_q, cu_k, max_q, max_k = flash_extend.gather_plan(meta)
    assert meta.scratch["flash_extend"][0] is index  # built once per forward pass, shared by the layers
    assert cu_q.tolist() == [0, 23, 32, 33, 34] and cu_k.tolist() == [0, 23, 49, 90, 91] and (max_q, max_k) == (23, 41)
    for b, row in enumerate(pool.rows):  # each request's slots, in position order
        assert torch.equal(index[cu_k[b]:cu_k[b + 1]], pool.req_to_token[row, :seq_lens[b]].long())
    out = torch.full_like(q, float("nan"))
    assert flash_extend.extend_attention_flash(q, pool.k_buffer, pool.v_buffer, meta, 0.25, out=out) is out
    assert torch.equal(out, got)


def test_flash_extend_is_taken_only_where_eligible(make_pool, monkeypatch):
    """CUDA bf16 / fp16 pools of q's dtype without trees, keys at most twice the new tokens: on a CPU never, so the
    Triton kernel (interpreter) runs."""
    seq_lens, extend_lens = [5, 7], [5, 3]
    pool = make_pool(seq_lens, 2, 16, torch.float32, "cpu")
    q = torch.randn(8, 4, 16)
    meta = _meta(pool, seq_lens, extend_lens)
    assert not flash_extend.eligible(q, pool.k_buffer, meta)  # a CPU tensor, float32
    as_cuda = type("CudaLike", (), {"is_cuda": True, "dtype": torch.bfloat16, "shape": q.shape})()
    bf16_pool = pool.k_buffer.to(torch.bfloat16)
    assert flash_extend.eligible(as_cuda, bf16_pool, meta)  # 12 keys for 8 new tokens
    assert not flash_extend.eligible(as_cuda, bf16_pool, _meta(pool, seq_lens, [1, 1]))  # decode rows: 12 keys for 2
    assert not flash_extend.eligible(as_cuda, pool.k_buffer, meta)  # a pool of another dtype
    monkeypatch.setattr(flash_extend, "ENABLED", True)
    got = extend_attention_triton(q, pool.k_buffer, pool.v_buffer, meta, 0.25)
    assert "flash_extend" not in meta.scratch
    ref = extend_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens, extend_lens, 0.25)
    assert torch.allclose(got, ref, atol=1e-5)

"""The CPU bundle (`kernels/cpu_ops.py`) against the torch references it stands in for: the same
floats for the elementwise ops (rotary bit for bit), the same attention up to float32 summation order."""
from __future__ import annotations

import shutil

import pytest
import torch

from radixlm.kernels import AttentionMetadata, cpu_native, cpu_ops, get_cpu_kernel_ops, ops_ref
from radixlm.kernels.api import decode_attention_torch
from radixlm.kernels.cpu_native import decode_kernels_library
from radixlm.kernels.cpu_ops import RopeRows, decode_attention_cpu, decode_metadata, rope_rows, rotary_cpu


@pytest.mark.parametrize("kernels", ["c", "torch"])
def test_elementwise_ops_match_the_references(kernels: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The torch path computes the references' floats exactly; the C kernels (their own summation
    order for the RMS, glibc's expf in SiLU) within float32 rounding. Strided rows as the model passes them."""
    if kernels == "torch":
        monkeypatch.setattr(cpu_ops, "decode_kernels_library", lambda: None)
    else:
        assert shutil.which("cc") is None or decode_kernels_library() is not None
    g = torch.Generator().manual_seed(0)
    for rows in (5, 70):  # 70: the C row loops' threaded branch
        x, r, w = (torch.randn(rows, 576, generator=g) for _ in range(3))
        wide = torch.randn(rows, 700, generator=g)[:, 50:626]  # rows with a stride of 700
        ops = get_cpu_kernel_ops()
        check = torch.testing.assert_close if kernels == "c" else (lambda a, b, **_: torch.equal(a, b) or pytest.fail("not equal"))
        for inp in (x, wide):
            check(ops.rms_norm(inp, w[0], 1e-5), ops_ref.rms_norm_ref(inp, w[0], 1e-5), rtol=2e-6, atol=2e-6)
            for got, ref in zip(ops.fused_add_rms_norm(inp, r, w[0], 1e-6), ops_ref.fused_add_rms_norm_ref(inp, r, w[0], 1e-6)):
                check(got, ref, rtol=2e-6, atol=2e-6)
        gate_up = torch.randn(rows, 2 * 96 + 8, generator=g)[:, 8:] * 4
        check(ops.silu_and_mul(gate_up), ops_ref.silu_and_mul_ref(gate_up), rtol=2e-6, atol=2e-6)
    # Qwen3's q/k norm: [T, H, D] heads (the torch op)
    heads = torch.randn(3, 4, 64, generator=g)
    torch.testing.assert_close(ops.rms_norm(heads, w[0, :64], 1e-6), ops_ref.rms_norm_ref(heads, w[0, :64], 1e-6))


def test_rotary_bit_for_bit_from_cache_and_from_step_rows() -> None:
    g = torch.Generator().manual_seed(1)
    cache = torch.randn(500, 64, generator=g)
    positions = torch.tensor([0, 7, 499, 7, 130])
    qkv = torch.randn(5, 15 * 64, generator=g)  # q and k as views of one fused projection, as in the model
    q, k = qkv[:, : 9 * 64].view(5, 9, 64), qkv[:, 9 * 64 : 12 * 64].view(5, 3, 64)
    ref = ops_ref.rotary_ref(q, k, positions, cache)
    rows = rope_rows(positions, cache)
    assert isinstance(rows, RopeRows) and rows.cos2.shape == (5, 1, 64)
    for got in (rotary_cpu(q, k, positions, cache), rotary_cpu(q, k, positions, rows)):
        assert torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    # Other dtypes take the reference.
    qb, kb = q.bfloat16(), k.bfloat16()
    assert torch.equal(rotary_cpu(qb, kb, positions, cache)[0], ops_ref.rotary_ref(qb, kb, positions, cache)[0])


def test_store_kv_writes_the_slots() -> None:
    k_buf, v_buf = torch.zeros(16, 3, 8), torch.zeros(16, 3, 8)
    k, v = torch.randn(4, 3, 8), torch.randn(4, 3, 8)
    slots = torch.tensor([9, 2, 15, 4])
    get_cpu_kernel_ops().store_kv(k_buf, v_buf, slots, k, v)
    assert torch.equal(k_buf[slots], k) and torch.equal(v_buf[slots], v)
    assert int((k_buf.abs().sum((1, 2)) > 0).sum()) == 4


def test_decode_attention_torch_path_matches_reference_ragged_and_uniform(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cpu_ops, "decode_kernels_library", lambda: None)  # as on a machine without a compiler
    g = torch.Generator().manual_seed(2)
    slots_total, hkv, group, dim = 300, 3, 3, 64
    k_buf, v_buf = torch.randn(slots_total, hkv, dim, generator=g), torch.randn(slots_total, hkv, dim, generator=g)
    req_to_token = (torch.randperm(slots_total - 1, generator=g)[: 4 * 60].view(4, 60) + 1).int()
    rows = torch.tensor([2, 0, 3])
    for lens in ([60, 17, 33], [41, 41, 41]):
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(3, hkv * group, dim, generator=g)
        meta = decode_metadata(req_to_token, rows, seq_lens, lens)
        assert not meta.kv_in_place and meta.kv_slots is not None and meta.kv_slots.shape == (3, max(lens))
        assert (meta.kv_valid is None) == (len(set(lens)) == 1)
        ref = decode_attention_torch(q, k_buf, v_buf, AttentionMetadata.for_decode(req_to_token, rows, seq_lens), 0.125)
        got = decode_attention_cpu(q, k_buf, v_buf, meta, 0.125)
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
        # Without the gathered slots (e.g. metadata built elsewhere) it is the reference itself.
        plain = AttentionMetadata.for_decode(req_to_token, rows, seq_lens)
        assert torch.equal(decode_attention_cpu(q, k_buf, v_buf, plain, 0.125), ref)


@pytest.mark.skipif(shutil.which("cc") is None, reason="the C kernel needs a C compiler")
@pytest.mark.parametrize(("hkv", "group", "dim"), [(3, 3, 64), (2, 4, 128), (4, 1, 64), (1, 2, 48), (2, 2, 72)])
def test_decode_attention_in_place_matches_reference(hkv: int, group: int, dim: int) -> None:
    """The C kernel (pool read in place) against the reference: ragged and uniform lengths, rows out of
    order, GQA groups, head dims with their own code (64, 128), the generic loop (48) and none (72: torch)."""
    assert decode_kernels_library() is not None
    g = torch.Generator().manual_seed(hkv * 100 + dim)
    slots_total, max_ctx = 1100, 200
    k_buf = torch.randn(slots_total, hkv, dim, generator=g) * 3
    v_buf = torch.randn(slots_total, hkv, dim, generator=g)
    req_to_token = torch.zeros(6, max_ctx, dtype=torch.int32)
    req_to_token[1:] = (torch.randperm(slots_total - 1, generator=g)[: 5 * max_ctx].view(5, max_ctx) + 1).int()
    rows = torch.tensor([4, 1, 5, 2])
    for lens in ([200, 1, 77, 130], [96, 96, 96, 96], [1, 1, 1, 1]):
        seq_lens = torch.tensor(lens, dtype=torch.int32)
        q = torch.randn(4, hkv * group, dim, generator=g)
        meta = decode_metadata(req_to_token, rows, seq_lens, lens)
        assert meta.kv_in_place and meta.kv_slots is None
        ref = decode_attention_torch(q, k_buf, v_buf, AttentionMetadata.for_decode(req_to_token, rows, seq_lens), 0.1)
        threads = torch.get_num_threads()
        try:
            for count in (1, 2):
                torch.set_num_threads(count)
                got = decode_attention_cpu(q[:, None].expand(4, 2, -1, -1)[:, 0], k_buf, v_buf, meta, 0.1)  # strided q
                torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)
                # batch 1: with 2 threads each KV head (and its query heads) is a work item of its own
                one = decode_metadata(req_to_token, rows[1:2], seq_lens[1:2], lens[1:2])
                got = decode_attention_cpu(q[1:2], k_buf, v_buf, one, 0.1)
                torch.testing.assert_close(got, ref[1:2], rtol=1e-5, atol=1e-5)
        finally:
            torch.set_num_threads(threads)


def test_decode_metadata_refuses_lengths_outside_req_to_token() -> None:
    req_to_token = torch.ones(3, 16, dtype=torch.int32)
    rows = torch.tensor([1, 2])
    for lens in ([16, 17], [0, 3]):
        with pytest.raises(ValueError, match="seq_lens"):
            decode_metadata(req_to_token, rows, torch.tensor(lens, dtype=torch.int32), lens)


def test_kernel_library_builds_into_the_cache_and_is_none_without_a_compiler(tmp_path, monkeypatch) -> None:
    build = cpu_native.decode_kernels_library.__wrapped__  # uncached: builds (or not) afresh
    monkeypatch.setenv("RADIXLM_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(tmp_path / "no-such-cc"))
    assert build() is None and not (tmp_path / "kernels").exists()
    if shutil.which("cc") is None:
        return
    monkeypatch.setenv("CC", "cc")
    lib = build()
    assert lib is not None and len(list((tmp_path / "kernels").glob("cpu_decode_kernels-*.so"))) == 1
    x, w = torch.randn(2, 64), torch.randn(64)
    out = torch.empty(2, 64)
    lib.radixlm_rms_norm_f32(x.data_ptr(), 64, w.data_ptr(), 1e-6, out.data_ptr(), 2, 64, 1)
    torch.testing.assert_close(out, ops_ref.rms_norm_ref(x, w, 1e-6))

"""The KernelOps bundle: one calling convention for both backends."""
from __future__ import annotations

import dataclasses

import pytest
import torch

from radixlm.kernels import AttentionMetadata, KernelOps, get_kernel_ops, ops_ref, triton_available


def test_bundles():
    ref = get_kernel_ops(False)
    assert ref.name == "torch" and ref.rms_norm is ops_ref.rms_norm_ref
    assert triton_available()  # conftest: interpreter or CUDA
    tri = get_kernel_ops(True)
    assert tri.name == "triton" and tri.rms_norm is not ops_ref.rms_norm_ref
    assert get_kernel_ops(True) is tri  # cached
    with pytest.raises(dataclasses.FrozenInstanceError):
        tri.name = "x"  # type: ignore[misc]
    assert {f.name for f in dataclasses.fields(KernelOps)} >= {"decode_attention", "extend_attention", "store_kv"}


def test_extend_metadata_from_host_lists():
    r2t = torch.zeros(4, 8, dtype=torch.int32)
    meta = AttentionMetadata.for_extend(r2t, [3, 1, 0], [7, 2, 5], [4, 2, 1])
    assert meta.extend_start_loc.tolist() == [0, 4, 6]
    assert meta.max_extend_len == 4 and meta.max_seq_len == 7
    assert meta.seq_lens_host == (7, 2, 5) and meta.batch_size == 3


def test_backends_agree_through_metadata(device, make_pool, assert_close):
    """Decode then extend through the uniform signature, `out=` included, on both backends."""
    ref_ops, tri_ops = get_kernel_ops(False), get_kernel_ops(True)
    prefix, ext = [5, 0, 12], [3, 9, 1]
    seq_lens = [p + e for p, e in zip(prefix, ext)]
    pool = make_pool(seq_lens, 2, 64, torch.float32, device)
    r2t = pool.req_to_token
    meta = AttentionMetadata.for_extend(r2t, pool.rows, seq_lens, ext)
    q = torch.randn(sum(ext), 4, 64, device=device)
    outs = [torch.full_like(q, float("nan")) for _ in range(2)]
    for ops, out in zip((ref_ops, tri_ops), outs):
        assert ops.extend_attention(q, pool.k_buffer, pool.v_buffer, meta, 0.125, out=out) is out
    assert_close(outs[1], outs[0], torch.float32)

    dmeta = AttentionMetadata.for_decode(r2t, meta.req_pool_indices, meta.seq_lens, num_kv_splits=2)
    qd = torch.randn(3, 4, 64, device=device)
    a = ref_ops.decode_attention(qd, pool.k_buffer, pool.v_buffer, dmeta, 0.125)
    b = tri_ops.decode_attention(qd, pool.k_buffer, pool.v_buffer, dmeta, 0.125)
    assert_close(b, a, torch.float32)

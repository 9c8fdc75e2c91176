"""The decode-overlap kernels' host side: PDL launch options and bundles (kernels/gdc.py). The PTX itself is
checked by benchmarks/compile_check_decode_overlap.py (sm_90 compile) and on the GPU by benchmarks/decode_overlap.py."""
from __future__ import annotations

import torch

from radixlm.kernels import AttentionMetadata, gdc, get_kernel_ops


def test_launch_options_never_ask_a_cpu_or_old_gpu_for_pdl() -> None:
    cpu = torch.device("cpu")
    assert gdc.launch_options(True, cpu) == {"USE_PDL": False}
    assert gdc.launch_options(False, cpu) == {"USE_PDL": False}
    assert not gdc.supported(cpu)
    for mode in ("auto", "on", "off"):
        assert gdc.enabled(mode, cpu) is False


def test_pdl_bundle_computes_the_same_bits(device) -> None:
    """Under the interpreter PDL is off whatever the bundle asks, so this checks the plumbing: every
    op of the PDL bundle takes the same arguments and gives the same result as the plain one."""
    plain, pdl = get_kernel_ops(True), get_kernel_ops(True, True)
    assert pdl.name == "triton+pdl" and plain.name == "triton"
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 64, generator=g).to(device=device, dtype=torch.bfloat16)
    r = torch.randn(3, 64, generator=g).to(device=device, dtype=torch.bfloat16)
    w = torch.rand(64, generator=g).to(device=device, dtype=torch.bfloat16)
    assert torch.equal(plain.rms_norm(x, w, 1e-5), pdl.rms_norm(x, w, 1e-5))
    for a, b in zip(plain.fused_add_rms_norm(x, r, w, 1e-5), pdl.fused_add_rms_norm(x, r, w, 1e-5)):
        assert torch.equal(a, b)
    assert torch.equal(plain.silu_and_mul(x), pdl.silu_and_mul(x))
    q = torch.randn(3, 4, 16, generator=g).to(device)
    k = torch.randn(3, 2, 16, generator=g).to(device)
    pos = torch.tensor([0, 5, 9], device=device)
    cache = torch.randn(16, 16, generator=g).to(device)
    for a, b in zip(plain.rotary(q, k, pos, cache), pdl.rotary(q, k, pos, cache)):
        assert torch.equal(a, b)
    bufs = [torch.zeros(12, 2, 16, device=device) for _ in range(4)]
    slots = torch.tensor([3, 7, 1], device=device)
    plain.store_kv(bufs[0], bufs[1], slots, k, k)
    pdl.store_kv(bufs[2], bufs[3], slots, k, k)
    assert torch.equal(bufs[0], bufs[2]) and torch.equal(bufs[1], bufs[3])
    bufs[0][0] = 0.5  # slot 0 is read by the requests below
    r2t = torch.tensor([[1, 3, 7, 0], [7, 1, 0, 0]], dtype=torch.int32, device=device)
    meta = AttentionMetadata.for_decode(r2t, torch.tensor([0, 1], device=device),
                                        torch.tensor([4, 2], dtype=torch.int32, device=device))
    qd = torch.randn(2, 4, 16, generator=g).to(device)
    assert torch.equal(plain.decode_attention(qd, bufs[0], bufs[1], meta, 0.25),
                       pdl.decode_attention(qd, bufs[0], bufs[1], meta, 0.25))

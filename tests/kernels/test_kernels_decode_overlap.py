"""The decode-overlap kernels' host side: PDL launch options and bundles (kernels/gdc.py), and the L2
prefetch launch plan (kernels/l2_prefetch.py). The PTX itself is checked by
benchmarks/compile_check_decode_overlap.py (sm_90 compile) and on the GPU by benchmarks/decode_overlap.py."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import AttentionMetadata, gdc, get_kernel_ops
from radixlm.kernels.l2_prefetch import ALIGN, LINE, plan, prefetch_l2, row_plan


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


@pytest.mark.parametrize("nbytes", [0, 16, 4096, 16384 * 37 + 48, 33_554_432, 8 << 20])
@pytest.mark.parametrize("mode,chunk,programs,lanes", [("bulk", 16384, 32, 32), ("bulk", 65536, 132, 32),
                                                       ("line", 128, 64, 128), ("bulk", 4096, 7, 64)])
def test_prefetch_plan_covers_the_bytes_with_at_most_the_programs(nbytes, mode, chunk, programs, lanes) -> None:
    launch = plan(nbytes, mode, chunk, programs, lanes)
    assert launch.programs <= programs and launch.lanes == lanes
    assert launch.piece == (chunk if mode == "bulk" else LINE)
    assert launch.covered >= nbytes  # every byte has a hint
    if nbytes:  # and no program is all past the end
        assert (launch.programs - 1) * launch.lanes * launch.per_lane * launch.piece < nbytes
    else:
        assert launch.programs == 0


def test_prefetch_refuses_bad_plans_and_is_a_no_op_on_the_cpu() -> None:
    with pytest.raises(ValueError, match="mode"):
        plan(1024, "stream", 16384, 8)
    with pytest.raises(ValueError, match="multiple"):
        plan(1024, "bulk", 1000, 8)
    assert ALIGN == 16
    assert prefetch_l2(torch.ones(1024)) == 0  # nothing is launched for a CPU tensor


def test_row_plan_spreads_the_bytes_over_the_rows_heads() -> None:
    assert row_plan(8 << 20, 28672, 8192) == 288  # gate_up: 8 MB as the first 288 bytes of each row
    assert row_plan(1 << 40, 4096, 8192) == 8192  # never past a row
    assert row_plan(10, 4096, 8192) == ALIGN  # at least one 16-byte hint
    with pytest.raises(ValueError, match="layout"):
        prefetch_l2(torch.ones(4, 4), layout="diagonal")

"""The 4-bit weight-only linear's Triton kernels (CPU interpreter without CUDA) against the float32
reference of the same codes, scales and zeros (`W4Weight.dequantize`): the GEMM through one launch,
through split-K and through the tiled (large-M) tiles, every group size the layout takes, symmetric
and asymmetric, with and without act-order; the dequantize kernel bit for bit; and the bf16 / fp16
code conversion (a bit pattern OR'ed into the exponent, then the zero point added) exactly c - z, and the
GEMM with it (bf16 / fp16 activations; the interpreter then widens both dot operands to float32)."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from radixlm.kernels.w4a16_gemm import _codes_minus_zero
from radixlm.runtime.quantization.w4_formats import quantize_rtn
from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight


def _weight(n: int, k: int, group: int, symmetric: bool, act_order: bool, device: str) -> W4Weight:
    g = torch.Generator().manual_seed(n * 31 + k + group)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 3
    size = group if group > 0 else k
    part = quantize_rtn(w, size, symmetric)
    if act_order:
        g_idx = (torch.arange(k) // size)[torch.randperm(k, generator=g)]
        part = W4Part(part.codes, part.scales, part.zeros, g_idx)
    part = W4Part(part.codes.to(device), part.scales.to(device), None if part.zeros is None else part.zeros.to(device),
                  None if part.g_idx is None else part.g_idx.to(device))
    return W4Weight([part], size, "test")


CASES = [  # m, n, k, group, symmetric, act-order
    (1, 96, 512, 128, True, False),
    (3, 80, 256, 32, False, True),
    (16, 48, 384, 64, False, False),
    (5, 64, 160, -1, True, False),  # per channel, K not a multiple of 128: padded
    (33, 64, 256, 128, False, True),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize(("m", "n", "k", "group", "symmetric", "act_order"), CASES)
def test_w4a16_matches_reference(device, dtype, m, n, k, group, symmetric, act_order):
    from radixlm.kernels.w4a16_gemm import W4Config, plan, w4a16_matmul

    w = _weight(n, k, group, symmetric, act_order, device)
    assert (w.perm is not None) == act_order and (w.zeros is None) == symmetric
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    args = (w.codes, w.scales, w.zeros, w.perm, k, w.group_size)
    got = w4a16_matmul(x, *args)
    assert got.dtype == dtype and got.shape == (m, n)
    tol = 1e-5 if dtype == torch.float32 else 2**-7  # bf16 / fp16: the output rounding (and B + c cancelling)
    one = W4Config(block_m=16, block_n=32, swap=False)  # the other orientation and tile; no split-K where K is short
    for out in (got, w4a16_matmul(x, *args, cfg=one)):
        assert ((out.float() - ref).abs() <= ref.abs() * tol + 1e-5 * ref.abs().max()).all()
    assert plan(m, n, w.codes.shape[1] * 4, one, x.device)[0] >= 1


def test_w4a16_splits_k_at_decode_sizes(device):
    from radixlm.kernels.w4a16_gemm import default_config, plan

    split, per = plan(1, 64, 4096, default_config(1), torch.device(device))
    assert split > 1 and (split - 1) * per < 4096 // 128 <= split * per


@pytest.mark.parametrize(("group", "symmetric", "act_order"), [(128, True, False), (32, False, True), (-1, False, False)])
def test_dequantize_kernel_is_exact(device, group, symmetric, act_order):
    from radixlm.kernels.w4a16_gemm import w4_dequantize

    w = _weight(40, 288 if group != 128 else 256, group, symmetric, act_order, device)
    got = w4_dequantize(w.codes, w.scales, w.zeros, w.perm, w.in_features, w.group_size, torch.float32)
    assert torch.equal(got.cpu(), w.dequantize().cpu())


@triton.jit
def _convert(H, Z, Out, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """The kernel's code-to-operand step on a [16, 32] tile of halfwords, each nibble plane stored."""
    r = tl.arange(0, 16)
    h = tl.load(H + r[:, None] * 32 + tl.arange(0, 32)[None, :])
    z = tl.load(Z + r)
    for j in tl.static_range(4):
        tl.store(Out + j * 512 + r[:, None] * 32 + tl.arange(0, 32)[None, :], _codes_minus_zero(h, z, j, MAGIC, ASM))


@pytest.mark.parametrize(("magic", "dtype"), [(1, torch.bfloat16), (2, torch.float16), (0, torch.float32)])
def test_code_conversion_is_exact(device, magic, dtype):
    g = torch.Generator().manual_seed(0)
    h = torch.randint(-(1 << 15), 1 << 15, (16, 32), dtype=torch.int32, generator=g).to(torch.int16).to(device)
    z = torch.randint(0, 16, (16,), generator=g).float().to(device)
    out = torch.empty(4, 16, 32, dtype=dtype, device=device)
    _convert[(1,)](h, z, out, MAGIC=magic, ASM=device == "cuda")  # the inline PTX where it can run
    expected = torch.stack([((h.int() >> (4 * j)) & 15).float() - z[:, None] for j in range(4)])
    assert torch.equal(out.float(), expected)


def test_layout_round_trips_and_refuses_bad_shapes(device):
    from radixlm.kernels.w4a16_gemm import pack_codes, unpack_codes, w4a16_matmul

    codes = torch.randint(0, 16, (24, 200), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    packed = pack_codes(codes)
    assert packed.shape == (24, 256 // 4) and torch.equal(unpack_codes(packed, 200), codes)
    w = _weight(32, 256, 128, True, False, device)
    with pytest.raises(ValueError, match="do not fit"):
        w4a16_matmul(torch.zeros(2, 128, device=device), w.codes, w.scales, None, None, 128, 128)


def test_inline_ptx_failure_falls_back_once_to_plain_triton():
    """The first launch asking for the inline-PTX conversion decides for the process: a compile
    failure is logged and every later launch uses the plain conversion (same numbers)."""
    from radixlm.kernels import w4a16_gemm as kg

    saved = dict(kg._asm_conversion)
    kg._asm_conversion.clear()
    calls = []

    def launch(asm: bool) -> None:
        calls.append(asm)
        if asm:
            raise RuntimeError("PTX rejected")

    try:
        kg._launch_with_asm_fallback(launch, True)
        kg._launch_with_asm_fallback(launch, True)
        assert calls == [True, False, False] and kg.asm_conversion_works() is False
    finally:
        kg._asm_conversion.clear()
        kg._asm_conversion.update(saved)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_affine_offsets_gguf_form(device, dtype):
    """W = (c - 8) * s + o per 32-column group (GGUF Q4_0 / Q4_1 via w4_gguf.py): GEMM and dequantize."""
    from radixlm.kernels.w4a16_gemm import w4_dequantize, w4a16_matmul

    g = torch.Generator().manual_seed(5)
    n, k = 64, 288
    part = W4Part(torch.randint(0, 16, (n, k), dtype=torch.uint8, generator=g), torch.rand(k // 32, n, generator=g).half(),
                  None, None, torch.randn(k // 32, n, generator=g))
    w = W4Weight([W4Part(*(t.to(device) if t is not None else None for t in (part.codes, part.scales, None, None,
                                                                                part.offsets)))], 32, "gguf")
    x = (torch.randn(5, k, generator=g) * 2).to(dtype).to(device)
    ref = x.float() @ w.dequantize().t()
    got = w4a16_matmul(x, w.codes, w.scales, None, None, k, 32, offsets=w.offsets).float()
    tol = 1e-5 if dtype == torch.float32 else 2**-7
    assert ((got - ref).abs() <= ref.abs() * tol + 1e-5 * ref.abs().max()).all()
    deq = w4_dequantize(w.codes, w.scales, None, None, k, 32, torch.float32, w.offsets)
    assert torch.equal(deq.cpu(), w.dequantize().cpu())

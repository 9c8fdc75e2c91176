"""The FP8 linear's Triton kernels (CPU interpreter without CUDA) against torch references with the
same numerics: the W8A16 GEMM equals x @ (codes * scale)^T summed in float32 (fp32: within 1e-5
relative; bf16: within one bf16 ulp of the output), through one launch and through the split-K reduction;
the fused activation quantization gives `fp8.quantize_rows`' codes and scales bit for bit."""
from __future__ import annotations

import pytest
import torch
import triton
import triton.language as tl

from radixlm.kernels.fp8_gemm import _div_rn_by_row
from radixlm.runtime.quantization.fp8 import _MIN_SCALE, Fp8Weight, quantize_rows


def _weight(n: int, k: int, device: str) -> Fp8Weight:
    g = torch.Generator().manual_seed(n * 7 + k)
    w = torch.randn(n, k, generator=g) * torch.rand(n, 1, generator=g) * 4
    q = Fp8Weight.from_float(w)
    return Fp8Weight(q.codes.to(device), q.scales.to(device), None, "online")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("m", "n", "k"), [(1, 96, 512), (5, 80, 1000), (16, 48, 64), (33, 64, 256)])
def test_w8a16_matches_reference(device, dtype, m, n, k):
    from radixlm.kernels.fp8_gemm import W8A16Config, plan, w8a16_matmul

    weight = _weight(n, k, device)
    x = (torch.randn(m, k, generator=torch.Generator().manual_seed(m)) * 3).to(dtype).to(device)
    got = w8a16_matmul(x, weight.codes, weight.scales.reshape(-1))
    ref = weight.reference_w8a16(x)
    assert got.dtype == dtype and got.shape == (m, n)
    if dtype == torch.float32:
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())
    else:  # the fp32 sums agree; the outputs differ by the bf16 rounding (the interpreter truncates: <= 1 ulp)
        err = (got.float() - ref).abs()
        assert (err <= ref.abs() * 2**-7 + 1e-5 * ref.abs().max()).all(), err.max()
    # both reduction paths are exercised: one launch at a long K tile, split-K at the default tiles
    one = W8A16Config(block_m=16, block_n=64, block_k=1024)
    assert plan(m, n, k, one, x.device)[0] == 1 or k > 1024
    torch.testing.assert_close(w8a16_matmul(x, weight.codes, weight.scales.reshape(-1), one).float(),
                               got.float(), rtol=2**-7, atol=1e-3)


def test_w8a16_splits_k_at_decode_sizes(device):
    from radixlm.kernels.fp8_gemm import default_config, plan

    split, per = plan(1, 64, 4096, default_config(1), torch.device(device))
    assert split > 1 and per % default_config(1).block_k == 0 and (split - 1) * per < 4096 <= split * per


def test_fp8_linear_dispatches_by_rows_on_the_reference_path():
    weight = _weight(32, 64, "cpu")
    small = torch.randn(2, 8, 64)  # 16 rows: weight-only
    torch.testing.assert_close(weight.linear(small).reshape(-1, 32), weight.reference_w8a16(small.reshape(-1, 64)))
    big = torch.randn(17, 64)  # 17 rows: activations quantized per token
    torch.testing.assert_close(weight.linear(big), weight.reference_matmul(*quantize_rows(big)))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_fused_activation_quantization_is_bit_exact(device, static, dtype):
    from radixlm.kernels.fp8_gemm import quantize_rows_fp8

    g = torch.Generator().manual_seed(3)
    x = torch.randn(9, 300, generator=g) * torch.rand(9, 1, generator=g) * 20
    x[2] = 0.0  # a zero token: the minimum scale, zero codes
    x[3, :6] = torch.tensor([1e-9, 2e-8, 5.0, -5.0, 0.3, 3e-3])  # subnormal codes and ties
    x[4, 0] = 1e4  # saturates under the static scale
    x[5, :2] = torch.tensor([-0.0, 1e-30])  # a negative zero keeps its code; a quotient far below e4m3's range
    if static:  # an infinite x saturates
        x[6, 7] = float("inf")
    x = x.to(dtype)
    st = torch.tensor([0.02]) if static else None
    codes, scales = quantize_rows_fp8(x.to(device), _MIN_SCALE, None if st is None else st.to(device))
    ref_codes, ref_scales = quantize_rows(x, st)
    assert torch.equal(codes.cpu().view(torch.uint8), ref_codes.view(torch.uint8))
    assert torch.equal(scales.cpu(), ref_scales)
    if not static:  # a row holding inf: an infinite scale, its finite values (signed) zeros; (inf / inf is NaN,
        # whose e4m3 code the interpreter's cast does not give: the GPU's is checked by quantized.py's gemmlarge)
        row = torch.tensor([[float("inf"), 3.0, -2.0, 0.0]]).to(dtype)
        codes, scales = quantize_rows_fp8(row.to(device), _MIN_SCALE)
        ref_codes, ref_scales = quantize_rows(row)
        assert torch.equal(codes.cpu().view(torch.uint8)[:, 1:], ref_codes.view(torch.uint8)[:, 1:])
        assert torch.equal(scales.cpu(), ref_scales)


def test_row_division_by_fmas_is_correctly_rounded(device):
    """`_div_rn_by_row` (the quantization's x / s from the row's reciprocal and two FMAs) equals IEEE float32
    division bit for bit, wherever the e4m3 code depends on it, on random and adversarial pairs: divisors with
    all-ones significands, quotients at every exponent of e4m3's range, dividends that are exact multiples of
    the divisor, signed zeros, dividends at float32's underflow."""
    import numpy as np

    rng = np.random.default_rng(5)
    block = 4096
    allones = np.float32(np.nextafter(np.float32(2.0), np.float32(0.0)))  # 1.11...1 x 2^0
    scales = np.concatenate([allones * np.float32(2.0) ** rng.integers(-20, 10, 8).astype(np.float32),
                             (rng.random(24) * 10 ** rng.uniform(-6, 3, 24)).astype(np.float32)]).astype(np.float32)
    q = (rng.standard_normal((len(scales), block)) * 2.0 ** rng.integers(-12, 9, (len(scales), block))).astype(np.float32)
    x = (q * scales[:, None]).astype(np.float32)
    x[:, :64] = (np.round(q[:, :64]) * scales[:, None]).astype(np.float32)  # exact multiples (exact quotients)
    x[:, 64:72] = np.array([-0.0, 0.0, 1e-38, -1e-38, 3e-39, -3e-39, 1e30, -1e30], dtype=np.float32)  # signs, tiny, huge
    out = torch.empty(x.shape, dtype=torch.float32, device=device)
    _divide_rows[(len(scales),)](torch.from_numpy(x).to(device), torch.from_numpy(scales).to(device), out, BLOCK=block)
    got = out.cpu().numpy()
    ref = (x / scales[:, None]).astype(np.float32)
    # bit for bit wherever e4m3 can tell (|q| from 2^-10: half its smallest subnormal, 2^-9); below, only
    # dividends near float32's underflow differ (their residual underflows), and both round to the same zero
    seen = np.abs(ref) >= 2.0**-10
    assert np.array_equal(got[seen].view(np.uint32), ref[seen].view(np.uint32))
    fp8 = torch.float8_e4m3fn
    assert torch.equal(torch.from_numpy(got[~seen]).to(fp8).view(torch.uint8), torch.from_numpy(ref[~seen]).to(fp8).view(torch.uint8))



@triton.jit
def _divide_rows(X, S, Out, BLOCK: tl.constexpr):
    """Each row of X divided by its S by `_div_rn_by_row`."""
    row = tl.program_id(0)
    cols = tl.arange(0, BLOCK)
    tl.store(Out + row * BLOCK + cols, _div_rn_by_row(tl.load(X + row * BLOCK + cols), tl.load(S + row)))

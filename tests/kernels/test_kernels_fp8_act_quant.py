"""The norm / SiLU kernels that emit the FP8 linear's input (kernels/fp8_act_quant.py; the CPU interpreter without
CUDA): their codes and scales equal, bit for bit, the separate kernels' output (ops.fused_add_rms_norm / rms_norm /
silu_and_mul) quantized by the reference quantizer (`fp8.quantize_rows`), and the new residual equals the separate
kernel's; dynamic and static scales, bf16 and float32, hidden sizes that are not powers of two."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels import ops
from radixlm.kernels.fp8_act_quant import add_rms_norm_fp8, silu_and_mul_fp8
from radixlm.runtime.quantization.fp8 import _MIN_SCALE, quantize_rows


def _same(codes: torch.Tensor, scales: torch.Tensor, ref: tuple[torch.Tensor, torch.Tensor]) -> None:
    assert codes.dtype == torch.float8_e4m3fn and scales.dtype == torch.float32 and scales.shape == (codes.shape[0], 1)
    assert torch.equal(codes.cpu().view(torch.uint8), ref[0].cpu().view(torch.uint8))
    assert torch.equal(scales.cpu(), ref[1].cpu())


def _rows(m: int, k: int, seed: int, dtype: torch.dtype) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=g) * torch.rand(m, 1, generator=g) * 8
    x[1, :5] = torch.tensor([40.0, -0.0, 1e-6, -3e-5, 7.0])  # an outlier, a signed zero, values that land subnormal
    return x.to(dtype)


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("k", [96, 256])
def test_add_rms_norm_emits_the_reference_codes(device, static, dtype, k):
    x, res = _rows(19, k, 1, dtype).to(device), _rows(19, k, 2, dtype).to(device)
    x[3] = -res[3]  # a row whose sum is zero: the minimum scale, zero codes
    w = (torch.rand(k, generator=torch.Generator().manual_seed(3)) + 0.5).to(dtype).to(device)
    st = torch.tensor([0.01], device=device) if static else None
    codes, scales, summed = add_rms_norm_fp8(x, res, w, 1e-5, _MIN_SCALE, st)
    normed, ref_sum = ops.fused_add_rms_norm(x, res, w, 1e-5)
    assert torch.equal(summed, ref_sum)
    _same(codes, scales, quantize_rows(normed.cpu(), None if st is None else st.cpu()))
    codes, scales, summed = add_rms_norm_fp8(x, None, w, 1e-5, _MIN_SCALE, st)  # the first layer: no residual
    assert summed is None
    _same(codes, scales, quantize_rows(ops.rms_norm(x, w, 1e-5).cpu(), None if st is None else st.cpu()))


@pytest.mark.parametrize("static", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("inter", [80, 128])
def test_silu_and_mul_emits_the_reference_codes(device, static, dtype, inter):
    x = _rows(21, 2 * inter, 4, dtype).to(device)
    x[2, inter:] = 0.0  # up all zero: a zero row
    st = torch.tensor([0.05], device=device) if static else None
    ref = quantize_rows(ops.silu_and_mul(x).cpu(), None if st is None else st.cpu())
    # the whole row in one pass (the default at these widths; one warp too), and in chunks of 32 / 16 columns (the
    # last one partial at 80): the row's max over the chunks, then its codes chunk by chunk
    for block, warps in ((None, None), (None, 1), (32, None), (16, 1)):
        codes, scales = silu_and_mul_fp8(x, _MIN_SCALE, st, block=block, num_warps=warps)
        _same(codes, scales, ref)
    assert scales[2].item() == torch.tensor(0.05 if static else _MIN_SCALE).item()  # (float32)


def test_shapes_they_refuse_and_empty_batches(device):
    x = torch.randn(4, 64, device=device)
    with pytest.raises(ValueError, match="dense rows"):
        add_rms_norm_fp8(x.t(), None, torch.ones(4, device=device), 1e-5, _MIN_SCALE)
    with pytest.raises(ValueError, match="2 \\* intermediate"):
        silu_and_mul_fp8(torch.randn(4, 63, device=device), _MIN_SCALE)
    codes, scales, summed = add_rms_norm_fp8(x[:0], x[:0], torch.ones(64, device=device), 1e-5, _MIN_SCALE)
    assert codes.shape == (0, 64) and scales.shape == (0, 1) and summed is not None and summed.shape == (0, 64)
    codes, scales = silu_and_mul_fp8(x[:0], _MIN_SCALE)
    assert codes.shape == (0, 32) and scales.shape == (0, 1)

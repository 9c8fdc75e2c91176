"""GGUF weights kept quantized on the CPU: block parsing, the packed int4 weight, and the default model.

Bounds: parsing is exact (the planes dequantize to gguf's own dequantizer bit for bit). The packed
weight rounds each group's scale and zero to bfloat16, so an element differs from gguf's value by at
most 2^-8 * sum_p (8 |s_p| + |z_p|) (+ fp32 rounding). Its matmul also rounds the input and the
output to bfloat16: within 1% of max |y| of the float32 product with gguf's weight.
"""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization.gguf_blocks import GROUP, parse_blocks
from radixlm.runtime.quantization.int4_cpu import (
    DENSE_MIN_ROWS,
    DENSE_RAM_SHARE,
    DEQUANT_MIN_ROWS,
    Int4PackedWeight,
    int4_cpu_kernel_available,
    keep_dense_copies,
    native_bf16_matmul,
)
from radixlm.runtime.quantization.select import GGUFTensor, build_quantized_weight, resolve_quantization

TYPES = [QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.Q8_0]
needs_kernel = pytest.mark.skipif(not int4_cpu_kernel_available(), reason="torch lacks the packed int4 CPU matmul")


def _gguf_weight(qtype: QType, rows: int = 96, cols: int = 128, seed: int = 0) -> tuple[np.ndarray, torch.Tensor]:
    rng = np.random.default_rng(seed)
    w = (rng.standard_normal((rows, cols)) * rng.uniform(0.01, 2.0, (rows, 1))).astype(np.float32)
    raw = gguf.quants.quantize(w, qtype)
    return raw, torch.from_numpy(gguf.quants.dequantize(raw, qtype).reshape(rows, cols).copy())


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_planes_dequantize_exactly_like_gguf(qtype: QType) -> None:
    raw, ref = _gguf_weight(qtype)
    planes = parse_blocks(qtype, raw, ref.shape[0])
    assert planes.codes.min() >= 0 and planes.codes.max() <= 15
    np.testing.assert_array_equal(planes.dequantize(), ref.numpy())


@needs_kernel
@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_packed_weight_within_stated_bound_of_gguf(qtype: QType) -> None:
    raw, ref = _gguf_weight(qtype)
    planes = parse_blocks(qtype, raw, ref.shape[0])
    weight = Int4PackedWeight(planes, qtype.name)
    bound = (8 * np.abs(planes.scales) + np.abs(planes.zeros)).sum(0) * 2.0**-8  # [N, K/32]
    bound = torch.from_numpy(np.repeat(bound, GROUP, axis=1)) + 1e-6 * ref.abs()
    assert bool(((weight.dequantize() - ref).abs() <= bound).all())
    # The kernel's own view of the weight (x = identity), which also rounds its output to bfloat16.
    eye = torch.eye(weight.in_features, dtype=torch.bfloat16).repeat(1, weight.planes)
    seen = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, weight.packed, GROUP, weight.scales_and_zeros).float().t()
    assert bool(((seen - ref).abs() <= bound + 2.0**-8 * ref.abs()).all())
    ids = torch.tensor([5, 0, 95, 5])
    torch.testing.assert_close(weight.rows(ids), weight.dequantize()[ids], rtol=0, atol=0)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 7, DEQUANT_MIN_ROWS + 3])  # int4 kernel, and dequantize + GEMM
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0], ids=lambda t: t.name)
def test_quantized_linear_close_to_float32_reference(qtype: QType, rows: int) -> None:
    raw, ref = _gguf_weight(qtype)
    weight = Int4PackedWeight(parse_blocks(qtype, raw, ref.shape[0]), qtype.name)
    x = torch.randn(rows, ref.shape[1], generator=torch.Generator().manual_seed(rows))
    expected = x @ ref.t()
    got = weight.linear(x)
    assert got.dtype == torch.float32 and got.shape == expected.shape
    assert (got - expected).abs().max() <= 0.01 * expected.abs().max()
    assert weight.linear(x.view(1, rows, -1)).shape == (1, rows, ref.shape[0])


@needs_kernel
def test_fused_parts_of_mixed_types_stack_along_rows() -> None:
    parts = []
    refs = []
    for i, qtype in enumerate([QType.Q4_1, QType.Q8_0, QType.Q4_0]):
        raw, ref = _gguf_weight(qtype, rows=32 * (i + 1), seed=i)
        parts.append(GGUFTensor(qtype, raw, tuple(ref.shape)))
        refs.append(ref)
    weight = build_quantized_weight(parts)
    assert weight is not None and weight.planes == 2 and weight.format == "int4x2[Q4_0+Q4_1+Q8_0]"
    ref = torch.cat(refs)
    x = torch.randn(3, ref.shape[1])
    assert (weight.linear(x) - x @ ref.t()).abs().max() <= 0.01 * (x @ ref.t()).abs().max()
    q6 = GGUFTensor(QType.Q6_K, np.zeros((2, 210), np.uint8), (2, 256))
    assert build_quantized_weight([parts[0], q6]) is None  # loads dequantized instead


def test_resolve_quantization_rules() -> None:
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    expected = "gguf" if int4_cpu_kernel_available() else "none"
    assert resolve_quantization("auto", "auto", cpu, True, False) == expected
    assert resolve_quantization("auto", "float32", cpu, True, False) == "none"  # --dtype float32: fp32 weights
    assert resolve_quantization("none", "auto", cpu, True, False) == "none"
    assert resolve_quantization("auto", "auto", cpu, False, False) == "none"
    assert resolve_quantization("auto", "auto", gpu, True, False) == "none"
    assert resolve_quantization("auto", "auto", cpu, True, True) == "none"
    with pytest.raises(ValueError, match="quantization: gguf is not possible here: .*GGUF"):
        resolve_quantization("gguf", "auto", cpu, False, False)
    with pytest.raises(ValueError, match="quantization: 'int3' is not one of"):
        resolve_quantization("int3", "auto", cpu, True, False)
    assert resolve_quantization("fp8", "auto", cpu, True, False) == "fp8"  # FP8 of the dequantized GGUF weights


@needs_kernel
@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q8_0], ids=lambda t: t.name)
def test_dense_copy_serves_batched_rows_within_bfloat16_of_gguf(qtype: QType) -> None:
    """The bfloat16 copy is the packed weight rounded once more (2^-9 relative); rows below
    DENSE_MIN_ROWS still take the int4 kernel, so both paths are checked against gguf's weight."""
    raw, ref = _gguf_weight(qtype)
    weight = Int4PackedWeight(parse_blocks(qtype, raw, ref.shape[0]), qtype.name)
    before = weight.nbytes
    weight.keep_dense()
    assert weight.dense is not None and weight.dense.dtype == torch.bfloat16
    assert weight.nbytes == before + weight.dense_nbytes
    assert torch.equal(weight.dense, weight.dequantize().to(torch.bfloat16))
    for rows in (1, DENSE_MIN_ROWS - 1, DENSE_MIN_ROWS, 40):
        x = torch.randn(rows, ref.shape[1], generator=torch.Generator().manual_seed(rows))
        expected = x @ ref.t()
        assert (weight.linear(x) - expected).abs().max() <= 0.01 * expected.abs().max()


def test_dense_copies_kept_only_within_the_ram_share() -> None:
    raw, ref = _gguf_weight(QType.Q4_1)
    weights = [Int4PackedWeight(parse_blocks(QType.Q4_1, raw, ref.shape[0]), "Q4_1") for _ in range(2)]
    size = sum(w.dense_nbytes for w in weights)
    assert keep_dense_copies(weights, int(size / DENSE_RAM_SHARE) - 1) == 0
    assert all(w.dense is None for w in weights)
    added = keep_dense_copies(weights + weights[:1], int(size / DENSE_RAM_SHARE) + 1)  # shared weights once
    if native_bf16_matmul():
        assert added == size and all(w.dense is not None for w in weights)
    else:
        assert added == 0

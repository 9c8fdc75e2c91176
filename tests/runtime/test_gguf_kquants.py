"""GGUF K-quants and Q8_0 kept quantized (`gguf_kquants.py`, `int8_weight.py`, Q4_K in `w4_gguf.py` and
`gguf_blocks.py`): every form against the gguf package's dequantizer. Bit for bit: the integer codes
with their group scales / offsets, the GPU's W4 form of Q4_K and the int8 form of Q8_0 / Q6_K / mixed
layers; within Q4_K's one float32 rounding of 8 d sc - dmin m: the CPU's affine planes. (The int8
kernel: tests/kernels/test_kernels_w8a16_group.py.)"""
from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402

from radixlm.runtime.quantization.gguf_blocks import KEPT_QTYPES, parse_blocks  # noqa: E402
from radixlm.runtime.quantization.gguf_kquants import group_codes  # noqa: E402
from radixlm.runtime.quantization.int8_weight import Int8Weight  # noqa: E402
from radixlm.runtime.quantization.select import GGUFTensor, build_quantized_weight  # noqa: E402
from radixlm.runtime.quantization.w4_gguf import w4_from_gguf  # noqa: E402
from radixlm.runtime.quantization.w4a16 import W4Weight  # noqa: E402
from radixlm.tests.fixtures.gguf_blocks import gguf_blocks, gguf_reference  # noqa: E402

TYPES = [QType.Q4_K, QType.Q6_K, QType.Q8_0, QType.Q4_0, QType.Q4_1]


def _tensor(qtype: QType, rows: int, cols: int, seed: int) -> tuple[GGUFTensor, torch.Tensor]:
    raw = gguf_blocks(qtype, rows, cols, seed)
    return GGUFTensor(qtype, raw, (rows, cols)), torch.from_numpy(gguf_reference(qtype, raw, rows, cols))


@pytest.mark.parametrize("qtype", TYPES, ids=lambda t: t.name)
def test_group_codes_equal_gguf(qtype: QType) -> None:
    t, ref = _tensor(qtype, 24, 512, 0)
    codes = group_codes(qtype, t.raw, 24)
    assert np.array_equal(codes.dequantize(), ref.numpy())
    assert np.array_equal(codes.regroup(16).dequantize(), ref.numpy())
    lo, hi = {QType.Q4_K: (0, 15), QType.Q6_K: (-32, 31), QType.Q4_0: (-8, 7), QType.Q4_1: (0, 15)}.get(qtype, (-128, 127))
    assert lo <= codes.q.min() and codes.q.max() <= hi
    assert t.dequantize().equal(ref) and qtype in KEPT_QTYPES


def test_q4_k_planes_within_one_rounding() -> None:
    t, ref = _tensor(QType.Q4_K, 16, 512, 1)
    planes = parse_blocks(QType.Q4_K, t.raw, 16)
    ours = torch.from_numpy(planes.dequantize())
    zeros = torch.from_numpy(np.repeat(np.abs(planes.zeros[0]), 32, axis=1))
    assert ((ours - ref).abs() <= torch.finfo(torch.float32).eps * (zeros + ref.abs())).all()


def test_q4_k_as_w4_weight_is_exact_and_fuses_with_q4_0() -> None:
    (k4, ref_k), (q0, ref_q) = _tensor(QType.Q4_K, 48, 256, 2), _tensor(QType.Q4_0, 32, 256, 3)
    w = w4_from_gguf([k4, q0], torch.device("cpu"))
    assert isinstance(w, W4Weight) and w.group_size == 32 and w.zeros is not None and w.offsets is not None
    assert w.format.startswith("w4a16[gguf Q4_0+Q4_K g32 asym affine")
    assert torch.equal(w.dequantize(), torch.cat([ref_k, ref_q]))
    assert torch.equal(w.rows(torch.tensor([47, 0, 50])), torch.cat([ref_k, ref_q])[[47, 0, 50]])


def test_int8_weight_exact_for_q8_0_q6_k_and_mixed_layers() -> None:
    (v6, ref6), (q4k, ref4), (q8, ref8) = (_tensor(QType.Q6_K, 16, 512, 4), _tensor(QType.Q4_K, 32, 512, 5),
                                           _tensor(QType.Q8_0, 8, 512, 6))
    parts = [q4k, v6, q8]  # e.g. Q4_K_M's q / k in Q4_K and v in Q6_K
    w = Int8Weight([group_codes(p.qtype, p.raw, p.shape[0]) for p in parts], "gguf mixed", torch.device("cpu"))
    ref = torch.cat([ref4, ref6, ref8])
    assert w.group == 16 and w.codes.dtype == torch.int8 and w.offsets is not None
    assert torch.equal(w.dequantize(), ref)
    assert torch.equal(w.rows(torch.tensor([40, 3])), ref[[40, 3]])
    x = torch.randn(3, 512)
    assert torch.allclose(w.linear(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    assert w.nbytes >= 56 * 512 and w.format.startswith("int8[gguf mixed g16 affine")
    alone = Int8Weight([group_codes(QType.Q8_0, q8.raw, 8)], "gguf Q8_0", torch.device("cpu"))
    assert alone.group == 32 and alone.offsets is None and torch.equal(alone.dequantize(), ref8)


def test_cpu_keeps_q4_k_packed_and_notes_q6_k_dequantized(caplog: pytest.LogCaptureFixture) -> None:
    from radixlm.runtime.quantization import select
    from radixlm.runtime.quantization.int4_cpu import int4_cpu_kernel_available

    (k4, _), (v6, _) = _tensor(QType.Q4_K, 32, 256, 7), _tensor(QType.Q6_K, 32, 256, 8)
    select._noted.clear()
    with caplog.at_level(logging.INFO, logger=select.__name__):
        assert build_quantized_weight([k4, v6]) is None
    assert "Q4_K+Q6_K load dequantized on the CPU" in caplog.text
    if int4_cpu_kernel_available():
        assert build_quantized_weight([k4]).format.startswith("int4")

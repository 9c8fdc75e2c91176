"""GGUF Q4_0 / Q4_1 blocks as the GPU's W4A16 weights (`w4_gguf.py`), checked on the CPU.

Blocks are made by the gguf package's own quantizer. The W4 weight equals the CPU path's
`AffinePlanes` bit for bit, and the gguf package's dequantization bit for bit for Q4_0 and within the
one float32 rounding of m + 8 d for Q4_1. (The kernels' offset path: tests/kernels/test_kernels_w4a16.py.)
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

gguf = pytest.importorskip("gguf")
from gguf import GGMLQuantizationType as QType  # noqa: E402

from radixlm.runtime.quantization.select import GGUFTensor, build_quantized_weight, resolve_quantization  # noqa: E402
from radixlm.runtime.quantization.w4_gguf import w4_from_gguf  # noqa: E402
from radixlm.runtime.quantization.w4a16 import W4Weight  # noqa: E402


def _tensor(qtype: QType, rows: int, cols: int, seed: int) -> GGUFTensor:
    w = np.random.default_rng(seed).standard_normal((rows, cols)).astype(np.float32)
    w[0] = np.abs(w[0])  # a row of one sign: Q4_1's minimum is far from zero
    raw = gguf.quants.quantize(w, qtype)
    return GGUFTensor(qtype, np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1), (rows, cols))


@pytest.mark.parametrize("qtype", [QType.Q4_0, QType.Q4_1])
def test_w4_weight_equals_the_blocks(qtype: QType) -> None:
    t = _tensor(qtype, 48, 160, 0)  # 160 columns: 5 groups, padded to the layout's 256
    w4 = w4_from_gguf([t], torch.device("cpu"))
    assert isinstance(w4, W4Weight) and w4.offsets is not None and w4.zeros is None
    ours = w4.dequantize()
    assert torch.equal(ours, torch.from_numpy(t.planes().dequantize()))  # the CPU path's weight, bit for bit
    ref = t.dequantize()
    if qtype == QType.Q4_0:
        assert torch.equal(ours, ref)
    else:  # o = m + 8 d is rounded once to float32
        ulp = torch.finfo(torch.float32).eps * (ours.abs() + 16 * ours.abs().amax()).max()
        assert (ours - ref).abs().max() <= ulp
    ids = torch.tensor([3, 0, 47])
    assert torch.equal(w4.rows(ids), ours[ids])


def test_fused_parts_and_types_without_a_gpu_layout() -> None:
    q, k = _tensor(QType.Q4_0, 64, 128, 1), _tensor(QType.Q4_1, 32, 128, 2)
    fused = w4_from_gguf([q, k], torch.device("cpu"))
    assert fused is not None and fused.format.startswith("w4a16[gguf Q4_0+Q4_1 g32 sym affine")
    assert torch.equal(fused.dequantize(), torch.cat([q.dequantize(), torch.from_numpy(k.planes().dequantize())]))
    assert w4_from_gguf([q, _tensor(QType.Q8_0, 32, 128, 3)], torch.device("cpu")) is None  # two planes: dequantized
    assert not isinstance(build_quantized_weight([q]), W4Weight)  # the CPU keeps its packed int4 form


def test_gguf_on_a_gpu_only_when_asked() -> None:
    gpu = torch.device("cuda")
    assert resolve_quantization("auto", "auto", gpu, True, False) == "none"
    assert resolve_quantization("gguf", "auto", gpu, True, False) == "gguf"
    with pytest.raises(ValueError, match="not a converted GGUF"):
        resolve_quantization("gguf", "auto", gpu, False, False)

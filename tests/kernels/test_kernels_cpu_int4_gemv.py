"""The C int4 GEMV (`kernels/cpu_int4_gemv.c`) against the affine planes' float64 product: random codes,
fp16 scales and zeros as GGUF stores them, odd row counts, 1-16 input rows (several chunks of the
register-blocked path), one and two planes; GGUF Q4_1 / Q8_0 blocks from the gguf package against its
dequantizer; every row's result bit for bit the same alone or among others (verify rows = decode rows);
and the plain-C branch (CPUs without AVX-512) built on its own."""
from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch

from radixlm.kernels import cpu_native
from radixlm.kernels.cpu_native import decode_kernels_library
from radixlm.runtime.quantization.gguf_blocks import AffinePlanes
from radixlm.runtime.quantization.int4_cpu import GEMV_MAX_ROWS, Int4PackedWeight, gemv_blocks

pytestmark = pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: the torch path runs instead")


def _planes(rng: np.random.Generator, p: int, n: int, k: int) -> AffinePlanes:
    """Q4_1-like planes: d and m fp16 values, z = m + 8 d (what gguf_blocks builds)."""
    d = (rng.standard_normal((p, n, k // 32)) * 0.02).astype(np.float16).astype(np.float32)
    m = (rng.standard_normal((p, n, k // 32)) * 0.01).astype(np.float16).astype(np.float32)
    return AffinePlanes(rng.integers(0, 16, (p, n, k), dtype=np.uint8), d, m + 8 * d)


def _gemv(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor, n: int, planes: int, threads: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], n)
    status = lib.radixlm_int4_gemv(x.data_ptr(), x.stride(0), x.shape[0], blocks.data_ptr(), n, x.shape[1], planes,
                                   out.data_ptr(), threads)
    assert status == 0
    return out


def _check(lib: ctypes.CDLL, seed: int) -> None:
    rng = np.random.default_rng(seed)
    for p, n, k, m, threads in ((1, 1, 32, 1, 1), (1, 37, 96, 1, 2), (2, 53, 64, 3, 1), (1, 131, 576, 7, 2),
                                (2, 19, 160, 8, 2), (1, 67, 1536, 2, 1), (1, 5, 32, 5, 2), (1, 70, 576, 13, 1),
                                (2, 9, 96, 16, 2), (1, 33, 64, 6, 1)):
        planes = _planes(rng, p, n, k)
        blocks = gemv_blocks(planes)
        assert blocks is not None and blocks.shape == (n, p * k // 32 * 20)
        wide = torch.randn(m, k + 40, dtype=torch.float32) * 3
        x = wide[:, 40:]  # rows with a stride
        ref = x.double() @ torch.from_numpy(planes.dequantize()).double().t()
        got = _gemv(lib, x, blocks, n, p, threads)
        torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_gemv_matches_the_planes_float64_product() -> None:
    lib = decode_kernels_library()
    assert lib is not None
    _check(lib, 0)


def _plain_library(tmp_path: Path) -> ctypes.CDLL:
    """The GEMV sources compiled for CPUs without AVX-512 (their plain-C branches)."""
    target = tmp_path / "plain.so"
    sources = [str(Path(cpu_native.__file__).with_name(n)) for n in ("cpu_int4_gemv.c", "cpu_int8_gemv.c")]
    flags = [f for f in cpu_native.FLAGS if f != "-march=native"]
    subprocess.run([shutil.which("cc"), *flags, "-mno-avx512f", *sources, "-o", str(target), "-lm"], check=True)
    lib = ctypes.CDLL(str(target))
    p, i64, n = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.radixlm_int4_gemv.argtypes, lib.radixlm_int4_gemv.restype = [p, i64, i64, p, i64, i64, i64, p, n], n
    lib.radixlm_int8_gemv.argtypes, lib.radixlm_int8_gemv.restype = [p, i64, i64, p, i64, i64, p, n], n
    return lib


def test_plain_c_branch_matches_too(tmp_path: Path) -> None:
    _check(_plain_library(tmp_path), 1)


def test_weights_route_few_rows_to_the_gemv_and_refuse_non_fp16_scales() -> None:
    rng = np.random.default_rng(2)
    planes = _planes(rng, 1, 48, 64)
    w = Int4PackedWeight(planes, "Q4_1")
    ref = torch.from_numpy(planes.dequantize())
    for rows in (1, GEMV_MAX_ROWS):
        x = torch.randn(rows, 64)
        torch.testing.assert_close(w.linear(x), x @ ref.t(), rtol=1e-5, atol=1e-5)
    odd = AffinePlanes(planes.codes, planes.scales * np.float32(1 + 2**-20), planes.zeros)  # not an fp16 value
    assert gemv_blocks(odd) is None
    fallback = Int4PackedWeight(odd, "Q4_K")
    x = torch.randn(2, 64)
    torch.testing.assert_close(fallback.linear(x), x @ torch.from_numpy(odd.dequantize()).t(), rtol=0.02, atol=0.02)


@pytest.mark.parametrize("build", ["native", "plain"])
def test_q8_0_planes_take_the_int8_kernel(build: str, tmp_path: Path) -> None:
    """GGUF Q8_0 blocks (the gguf package's quantizer) as gguf_blocks' two planes, back to int8 codes:
    the kernel's product equals the gguf dequantization's in float64, for 1-8 rows and odd row counts."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as QType

    from radixlm.runtime.quantization.gguf_blocks import parse_blocks
    from radixlm.runtime.quantization.int4_cpu import int8_gemv_blocks

    lib = decode_kernels_library() if build == "native" else _plain_library(tmp_path)
    g = np.random.default_rng(3)
    for n, k, m in ((48, 96, 1), (33, 64, 8), (101, 576, 3), (70, 576, 9), (16, 1536, 14)):
        w = g.standard_normal((n, k)).astype(np.float32)
        raw = gguf.quants.quantize(w, QType.Q8_0)
        ref_w = torch.from_numpy(gguf.quants.dequantize(raw, QType.Q8_0).astype(np.float64)).view(n, k)
        planes = parse_blocks(QType.Q8_0, raw, n)
        blocks = int8_gemv_blocks(planes)
        assert blocks is not None and blocks.shape == (n, k // 32 * 34)
        x = torch.randn(m, k)
        out = torch.empty(m, n)
        assert lib.radixlm_int8_gemv(x.data_ptr(), x.stride(0), m, blocks.data_ptr(), n, k, out.data_ptr(), 2) == 0
        ref = x.double() @ ref_w.t()
        torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
        if n % 16 == 0 and build == "native":  # torch's packing needs it
            weight = Int4PackedWeight(planes, "Q8_0")
            assert weight.int8_blocks is not None and weight.gemv_blocks is None
            torch.testing.assert_close(weight.linear(x).double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))
    assert int8_gemv_blocks(_planes(g, 2, 16, 64)) is None  # two planes that are not Q8_0's


def _int8(lib: ctypes.CDLL, x: torch.Tensor, blocks: torch.Tensor, n: int) -> torch.Tensor:
    out = torch.empty(x.shape[0], n)
    assert lib.radixlm_int8_gemv(x.data_ptr(), x.stride(0), x.shape[0], blocks.data_ptr(), n, x.shape[1],
                                 out.data_ptr(), 1) == 0
    return out


@pytest.mark.parametrize("build", ["native", "plain"])
def test_q4_1_blocks_match_gguf_dequantizer_for_verify_sized_row_counts(build: str, tmp_path: Path) -> None:
    """GGUF Q4_1 blocks (the gguf package's quantizer, the default model's linears) through gguf_blocks to
    the kernel's layout: the product equals gguf's dequantization times x in float64 for 1..16 rows."""
    gguf = pytest.importorskip("gguf")
    from gguf import GGMLQuantizationType as QType

    from radixlm.runtime.quantization.gguf_blocks import parse_blocks

    lib = decode_kernels_library() if build == "native" else _plain_library(tmp_path)
    g = np.random.default_rng(5)
    for n, k in ((96, 576), (37, 1536)):
        w = g.standard_normal((n, k)).astype(np.float32)
        raw = gguf.quants.quantize(w, QType.Q4_1)
        ref_w = torch.from_numpy(gguf.quants.dequantize(raw, QType.Q4_1).astype(np.float64)).view(n, k)
        blocks = gemv_blocks(parse_blocks(QType.Q4_1, raw, n))
        assert blocks is not None
        for m in (1, 2, 5, 6, 7, 9, 12, 16):
            x = torch.randn(m, k)
            ref = x.double() @ ref_w.t()
            got = _gemv(lib, x, blocks, n, 1, 1)
            torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-5 * float(ref.abs().max()))


def test_a_row_computes_the_same_bits_alone_or_among_others() -> None:
    """A verify step's k + 1 rows (and a decode batch's rows) go through the multi-row path: each row's
    output must be bit for bit the one-row result, or greedy speculation would drift from plain decoding."""
    lib = decode_kernels_library()
    assert lib is not None
    rng = np.random.default_rng(7)
    for p, n, k in ((1, 131, 576), (2, 45, 160), (1, 70, 1536)):
        planes = _planes(rng, p, n, k)
        blocks = gemv_blocks(planes)
        q8 = int8_gemv_blocks_of(rng, n, k)
        x = torch.randn(17, k) * 2
        alone = torch.cat([_gemv(lib, x[i : i + 1], blocks, n, p, 1) for i in range(17)])
        alone8 = torch.cat([_int8(lib, x[i : i + 1], q8, n) for i in range(17)])
        for m in range(2, 18):
            for threads in (1, 2):
                assert torch.equal(_gemv(lib, x[:m], blocks, n, p, threads), alone[:m]), (p, n, k, m, threads)
            assert torch.equal(_int8(lib, x[:m], q8, n), alone8[:m]), (n, k, m)
            assert torch.equal(_int8(lib, x[17 - m :], q8, n), alone8[17 - m :]), (n, k, m)


def int8_gemv_blocks_of(rng: np.random.Generator, n: int, k: int) -> torch.Tensor:
    """Q8_0-shaped kernel blocks: per row K/32 fp16 d, then the int8 codes."""
    d = (rng.standard_normal((n, k // 32)) * 0.01).astype(np.float16)
    q = rng.integers(-128, 128, (n, k), dtype=np.int8)
    return torch.from_numpy(np.concatenate((d.view(np.uint8), q.view(np.uint8)), axis=-1))

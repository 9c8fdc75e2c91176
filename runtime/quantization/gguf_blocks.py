"""GGUF block formats read as 4-bit affine planes, the one layout our quantized kernels take.

A weight [N, K] becomes P planes of 4-bit codes c_p in [0, 15] with one scale s and one zero z
per group of 32 columns:  W = sum_p ((c_p - 8) * s_p + z_p).  The (c - 8) * s + z form is what
torch's packed int4 matmul computes, so a 4-bit GGUF type is one plane, exactly; a type with more
bits splits each code into a high and a low nibble (two planes, still exact): Q8_0's q + 128 =
16 hi + lo, Q5's q = 16 h + lo. A high plane stores its digit h as the code h + 8 with zero 0, so
(c - 8) * s = 16 d h and the whole offset sits on the low plane, where it is small: rounding the
scales and zeros to bfloat16 (the kernel's) then costs at most 2^-8 (8 |s| + |z|) per plane. Scales and zeros
are float32 here (exact for the fp16 GGUF
scales up to the one rounding of m + 8 d); kernels may round them further and say by how much.
Q4_K is one plane too (scale d sc, zero 8 d sc - dmin m, that sum rounded once to float32, like Q4_1's).
Types without a parser here (the other K-quants) load dequantized through the gguf package on a CPU;
`KEPT_QTYPES` also lists those a GPU keeps as int8 (`gguf_kquants.py`).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QType

from radixlm.runtime.quantization.gguf_kquants import GROUP_PARSERS, q4_k

GROUP = 32  # columns per scale/zero; every format below uses 32-element blocks


@dataclass(frozen=True)
class AffinePlanes:
    """W [N, K] = sum_p ((codes[p] - 8) * scales[p] + zeros[p]) with one scale/zero per 32 columns."""

    codes: np.ndarray  # uint8 [P, N, K], values 0..15
    scales: np.ndarray  # float32 [P, N, K // 32]
    zeros: np.ndarray  # float32 [P, N, K // 32]

    @property
    def shape(self) -> tuple[int, int]:
        return int(self.codes.shape[1]), int(self.codes.shape[2])

    def dequantize(self) -> np.ndarray:
        """float32 [N, K], for tests and for layers the kernels do not take."""
        p, n, k = self.codes.shape
        grouped = (self.codes.astype(np.float32) - 8.0).reshape(p, n, k // GROUP, GROUP)
        w = grouped * self.scales[..., None] + self.zeros[..., None]
        return w.sum(0).reshape(n, k)


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    """Raw GGUF bytes of a [rows, K] tensor -> [rows, K // 32, block_bytes] uint8."""
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    if flat.shape[1] % block_bytes:
        raise ValueError(f"row of {flat.shape[1]} bytes is not a whole number of {block_bytes}-byte blocks")
    return flat.reshape(rows, -1, block_bytes)


def _f16(blocks: np.ndarray, offset: int) -> np.ndarray:
    """The fp16 field at byte `offset` of each block, as float32 [rows, blocks]."""
    return blocks[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """16 bytes of packed 4-bit values -> 32 codes: low nibbles are elements 0-15, high ones 16-31."""
    return np.concatenate((qs & 0x0F, qs >> 4), axis=-1)


def _high_bits(qh: np.ndarray) -> np.ndarray:
    """Q5's 4-byte field -> bit j (little-endian) of element j, [rows, blocks, 32] in {0, 1}."""
    bits = np.unpackbits(qh, axis=-1, bitorder="little")
    return bits.astype(np.uint8)


def _planes(codes: list[np.ndarray], scales: list[np.ndarray], zeros: list[np.ndarray]) -> AffinePlanes:
    rows, blocks = scales[0].shape
    return AffinePlanes(
        codes=np.stack([c.reshape(rows, blocks * GROUP) for c in codes]).astype(np.uint8),
        scales=np.stack(scales).astype(np.float32),
        zeros=np.stack(zeros).astype(np.float32),
    )


def _q4_0(raw: np.ndarray, rows: int) -> AffinePlanes:
    b = _blocks(raw, rows, 18)  # d: f16, qs: 16 bytes; value = (q - 8) * d
    d = _f16(b, 0)
    return _planes([_nibbles(b[..., 2:])], [d], [np.zeros_like(d)])


def _q4_1(raw: np.ndarray, rows: int) -> AffinePlanes:
    b = _blocks(raw, rows, 20)  # d, m: f16, qs: 16 bytes; value = q * d + m
    d, m = _f16(b, 0), _f16(b, 2)
    return _planes([_nibbles(b[..., 4:])], [d], [m + 8 * d])


def _q5_0(raw: np.ndarray, rows: int) -> AffinePlanes:
    b = _blocks(raw, rows, 22)  # d: f16, qh: 4 bytes, qs: 16 bytes; value = (q - 16) * d, q = 16 h + lo
    d = _f16(b, 0)
    return _planes([_high_bits(b[..., 2:6]) + 8, _nibbles(b[..., 6:])], [16 * d, d], [np.zeros_like(d), -8 * d])


def _q5_1(raw: np.ndarray, rows: int) -> AffinePlanes:
    b = _blocks(raw, rows, 24)  # d, m: f16, qh: 4 bytes, qs: 16 bytes; value = q * d + m
    d, m = _f16(b, 0), _f16(b, 2)
    return _planes([_high_bits(b[..., 4:8]) + 8, _nibbles(b[..., 8:])], [16 * d, d], [np.zeros_like(d), m + 8 * d])


def _q8_0(raw: np.ndarray, rows: int) -> AffinePlanes:
    b = _blocks(raw, rows, 34)  # d: f16, qs: 32 x int8; value = q * d, q + 128 = 16 hi + lo
    d = _f16(b, 0)
    u = (b[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
    # 16 d (hi - 8) + d (lo - 8) = d (q + 128) - 136 d; the value is d q: zero 8 d on the low plane.
    return _planes([u >> 4, u & 0x0F], [16 * d, d], [np.zeros_like(d), 8 * d])


def _q4_k(raw: np.ndarray, rows: int) -> AffinePlanes:
    k4 = q4_k(raw, rows)  # W = c s + o per 32 columns = (c - 8) s + (8 s + o)
    return _planes([k4.q.view(np.uint8)], [k4.scales], [8 * k4.scales + k4.offsets])


PARSERS: dict[QType, Callable[[np.ndarray, int], AffinePlanes]] = {
    QType.Q4_0: _q4_0,
    QType.Q4_1: _q4_1,
    QType.Q5_0: _q5_0,
    QType.Q5_1: _q5_1,
    QType.Q8_0: _q8_0,
    QType.Q4_K: _q4_k,
}
KEPT_QTYPES = frozenset(PARSERS) | frozenset(GROUP_PARSERS)  # the types a converted folder keeps as raw blocks


def parse_blocks(qtype: QType, raw: np.ndarray, rows: int) -> AffinePlanes:
    """The affine planes of a [rows, K] GGUF tensor of type `qtype` (one of PARSERS)."""
    parser = PARSERS.get(qtype)
    if parser is None:
        raise ValueError(f"no 4-bit plane layout for GGUF type {qtype.name}")
    return parser(raw, rows)

"""GGUF Q4_K / Q6_K / Q8_0 blocks read as integer codes with one float32 scale (and offset) per group.

    W[n, k] = q[n, k] * s[n, g] + o[n, g]        g = k // group

Every field is computed as the gguf package's dequantizer computes it (float32 products of the fp16
super-block scales and the small integer sub-block scales, exact), so W in float32 equals its
dequantization bit for bit:

  Q4_K  super-blocks of 256: d, dmin (fp16), 8 sub-blocks of 32 with 6-bit scale sc and min m
        packed in 12 bytes, 4-bit q:  W = (d sc) q - (dmin m)          group 32, q in [0, 15]
  Q6_K  super-blocks of 256: 16 sub-blocks of 16 with int8 scales, d (fp16), q = lo | hi << 4:
        W = (d sc) (q - 32)                                            group 16, q - 32 in [-32, 31]
  Q8_0  blocks of 32: d (fp16), 32 int8:  W = d q                      group 32

`runtime/quantization/int8_weight.py` keeps these codes as int8 on a GPU; Q4_K alone also fits the
4-bit layout (`w4_gguf.py`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from gguf import GGMLQuantizationType as QType

SUPER = 256  # columns per K-quant super-block


@dataclass(frozen=True)
class GroupCodes:
    """W = q * scales + offsets per `group` columns; q int8 [N, K], scales / offsets float32 [N, K // group]."""

    q: np.ndarray
    scales: np.ndarray
    offsets: np.ndarray | None
    group: int

    def dequantize(self) -> np.ndarray:
        n, k = self.q.shape
        w = self.q.astype(np.float32).reshape(n, -1, self.group) * self.scales[..., None]
        if self.offsets is not None:
            w = w + self.offsets[..., None]
        return w.reshape(n, k)

    def regroup(self, group: int) -> "GroupCodes":
        """The same weight with `group` (a divisor of this one's) columns per scale: scales repeated."""
        if self.group % group:
            raise ValueError(f"cannot regroup {self.group}-column groups into {group}")
        rep = self.group // group
        return GroupCodes(self.q, np.repeat(self.scales, rep, axis=1),
                          None if self.offsets is None else np.repeat(self.offsets, rep, axis=1), group)


def _blocks(raw: np.ndarray, rows: int, block_bytes: int) -> np.ndarray:
    flat = np.ascontiguousarray(raw).view(np.uint8).reshape(rows, -1)
    if flat.shape[1] % block_bytes:
        raise ValueError(f"row of {flat.shape[1]} bytes is not a whole number of {block_bytes}-byte blocks")
    return flat.reshape(rows, -1, block_bytes)


def _f16(b: np.ndarray, offset: int) -> np.ndarray:
    return b[..., offset : offset + 2].copy().view(np.float16)[..., 0].astype(np.float32)


def _q4_k_scales(packed: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """12 bytes -> 8 six-bit scales and 8 six-bit mins: bytes 0-3 hold scales 0-3 (low 6 bits) and the
    top 2 bits of scales 4-7, bytes 4-7 the same for the mins, bytes 8-11 the low nibbles of scale /
    min 4-7 (low / high nibble)."""
    lo_s, lo_m, nib = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    scales = np.concatenate([lo_s & 0x3F, (nib & 0x0F) | ((lo_s >> 2) & 0x30)], axis=-1)
    mins = np.concatenate([lo_m & 0x3F, (nib >> 4) | ((lo_m >> 2) & 0x30)], axis=-1)
    return scales.astype(np.float32), mins.astype(np.float32)


def q4_k(raw: np.ndarray, rows: int) -> GroupCodes:
    b = _blocks(raw, rows, 144)  # d, dmin: fp16; scales: 12 bytes; qs: 128 bytes
    d, dmin = _f16(b, 0), _f16(b, 2)
    sc, m = _q4_k_scales(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, -1, 4, 1, 32)  # 32 bytes give sub-blocks 2i (low nibbles) and 2i + 1 (high)
    q = np.concatenate([qs & 0x0F, qs >> 4], axis=3).reshape(rows, -1)
    return GroupCodes(q.astype(np.int8), (d[..., None] * sc).reshape(rows, -1),
                      -(dmin[..., None] * m).reshape(rows, -1), 32)


def q6_k(raw: np.ndarray, rows: int) -> GroupCodes:
    b = _blocks(raw, rows, 210)  # ql: 128 bytes, qh: 64, scales: 16 x int8, d: fp16
    ql = b[..., :128].reshape(rows, -1, 2, 1, 64)  # per half of 128: low nibbles (0-63), high nibbles (64-127)
    lo = np.concatenate([ql & 0x0F, ql >> 4], axis=3).reshape(rows, -1, 2, 128)
    qh = b[..., 128:192].reshape(rows, -1, 2, 1, 32)  # per half: 2 bits each for elements 0-31, 32-63, 64-95, 96-127
    hi = np.concatenate([(qh >> s) & 0x03 for s in (0, 2, 4, 6)], axis=3).reshape(rows, -1, 2, 128)
    q = ((lo | (hi << 4)).astype(np.int16) - 32).astype(np.int8).reshape(rows, -1)
    sc = b[..., 192:208].copy().view(np.int8).astype(np.float32)
    d = _f16(b, 208)
    return GroupCodes(q, (d[..., None] * sc).reshape(rows, -1), None, 16)


def q8_0(raw: np.ndarray, rows: int) -> GroupCodes:
    b = _blocks(raw, rows, 34)  # d: fp16, 32 x int8
    return GroupCodes(b[..., 2:].copy().view(np.int8).reshape(rows, -1), _f16(b, 0), None, 32)


def q4_0(raw: np.ndarray, rows: int) -> GroupCodes:
    b = _blocks(raw, rows, 18)  # d: fp16, 16 bytes of nibbles (elements 0-15 low, 16-31 high); W = (q - 8) d
    q = np.concatenate([b[..., 2:] & 0x0F, b[..., 2:] >> 4], axis=-1).astype(np.int8) - 8
    return GroupCodes(q.reshape(rows, -1), _f16(b, 0), None, 32)


def q4_1(raw: np.ndarray, rows: int) -> GroupCodes:
    b = _blocks(raw, rows, 20)  # d, m: fp16, 16 bytes of nibbles; W = q d + m
    q = np.concatenate([b[..., 4:] & 0x0F, b[..., 4:] >> 4], axis=-1).astype(np.int8)
    return GroupCodes(q.reshape(rows, -1), _f16(b, 0), _f16(b, 2), 32)


GROUP_PARSERS = {QType.Q4_K: q4_k, QType.Q6_K: q6_k, QType.Q8_0: q8_0, QType.Q4_0: q4_0, QType.Q4_1: q4_1}


def group_codes(qtype: QType, raw: np.ndarray, rows: int) -> GroupCodes:
    parser = GROUP_PARSERS.get(qtype)
    if parser is None:
        raise ValueError(f"no integer-code layout for GGUF type {qtype.name}")
    return parser(raw, rows)

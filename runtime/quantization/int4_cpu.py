"""GGUF weights kept 4-bit on the CPU: torch's packed int4 matmul over affine planes.

`torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, scales_and_zeros)` computes
x @ W^T with W = (c - 8) * s + z per group of 32 input columns; its fast path wants bfloat16
activations and scales (float32 ones take a scalar fallback 10-30x slower), so activations are
rounded to bfloat16 for the matmul and the output is cast back. A weight of P planes
(`gguf_blocks.AffinePlanes`) is packed as one matrix over P * K columns, the planes side by side,
and the input is repeated P times: one call, and Q8_0 stays exact (two nibbles per int8).

From a few rows up the int4 kernel is compute-bound (it dequantizes per tile) and loses to a dense
GEMM. Where the CPU multiplies bfloat16 natively (AVX512-BF16 / AMX: oneDNN) and the model is small
enough, each weight also keeps a dense bfloat16 copy (`keep_dense_copies`, decided once at load) and
inputs of >= DENSE_MIN_ROWS rows (batched decode, prefill) go through it: the same bfloat16-rounded
activations as the int4 path, weights rounded once more to bfloat16 (2^-9 relative). Without that
copy, inputs of >= DEQUANT_MIN_ROWS rows use a float32 GEMM on a weight dequantized for the call.
"""
from __future__ import annotations

import numpy as np
import torch

from radixlm.kernels.cpu_native import decode_kernels_library
from radixlm.runtime.quantization.base import QuantizedWeight
from radixlm.runtime.quantization.gguf_blocks import GROUP, AffinePlanes

# Rows of input from which dequantize + float32 GEMM beats the int4 kernel (measured on a 2-core
# AVX-512 Xeon with the default model's shapes; see benchmarks/RESULTS.md).
DEQUANT_MIN_ROWS = 48
# Rows from which the dense bfloat16 copy beats the int4 kernel (same machine: about equal at 8 rows,
# 2.5-3x faster at 16, 5x at 32).
DENSE_MIN_ROWS = 8
# Rows up to which the C kernel (kernels/cpu_int4_gemv.c / cpu_int8_gemv.c: float32, exact scales) replaces
# both: it decodes a group once for up to 6 rows (more rows: another pass over cached weights), and a
# row's result is the same at any row count, so a decode batch and its verify rows (issue 18) round alike
# up to here. 16 = batch 8 with 8 drafts; a step of more rows goes dense (row_regimes caps drafts below it).
GEMV_MAX_ROWS = 16
# Dense bfloat16 copies are kept while they fit in this share of the available RAM.
DENSE_RAM_SHARE = 0.1


def native_bf16_matmul() -> bool:
    """True when the CPU multiplies bfloat16 in hardware (oneDNN takes AVX512-BF16 or AMX tiles)."""
    cpu = torch.cpu
    checks = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(cpu, name, lambda: False)() for name in checks)


def int4_cpu_kernel_available() -> bool:
    ops = torch.ops.aten
    return hasattr(ops, "_weight_int4pack_mm_for_cpu") and hasattr(ops, "_convert_weight_to_int4pack_for_cpu")


def merge_planes(parts: list[AffinePlanes]) -> AffinePlanes:
    """Stack weights along the output rows (fused qkv / gate_up); a part with fewer planes gets
    zero planes (code 8, scale 0, zero 0: contributes nothing)."""
    planes = max(int(p.codes.shape[0]) for p in parts)

    def padded(p: AffinePlanes) -> AffinePlanes:
        extra = planes - int(p.codes.shape[0])
        if not extra:
            return p
        _, n, k = p.codes.shape
        return AffinePlanes(
            codes=np.concatenate([p.codes, np.full((extra, n, k), 8, np.uint8)]),
            scales=np.concatenate([p.scales, np.zeros((extra, n, k // GROUP), np.float32)]),
            zeros=np.concatenate([p.zeros, np.zeros((extra, n, k // GROUP), np.float32)]),
        )

    parts = [padded(p) for p in parts]
    return AffinePlanes(
        codes=np.concatenate([p.codes for p in parts], axis=1),
        scales=np.concatenate([p.scales for p in parts], axis=1),
        zeros=np.concatenate([p.zeros for p in parts], axis=1),
    )


def gemv_blocks(planes: AffinePlanes) -> torch.Tensor | None:
    """The C kernel's weight (kernels/cpu_int4_gemv.c): uint8 [N, 20 G] with G = P*K/32 groups (planes side
    by side), per row G fp16 d, G fp16 m0 = z - 8 d, G x 16 bytes of codes (byte j = code 2j | code 2j+1 << 4).
    None when some d or m0 is not exactly an fp16 (Q4_0 / Q4_1 / Q8_0 / Q5 scales are; Q4_K's need not be)."""
    p, n, k = planes.codes.shape
    d = planes.scales.transpose(1, 0, 2).reshape(n, -1)
    m0 = (planes.zeros - 8.0 * planes.scales).transpose(1, 0, 2).reshape(n, -1)
    d16, m16 = d.astype(np.float16), m0.astype(np.float16)
    if not (np.array_equal(d16.astype(np.float32), d) and np.array_equal(m16.astype(np.float32), m0)):
        return None
    codes = planes.codes.transpose(1, 0, 2).reshape(n, -1, GROUP)  # [N, P*K/32, 32]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).astype(np.uint8)
    halves = [np.ascontiguousarray(h).view(np.uint8) for h in (d16, m16)]
    blocks = np.concatenate((*halves, packed.reshape(n, -1)), axis=-1)
    return torch.from_numpy(np.ascontiguousarray(blocks))


def int8_gemv_blocks(planes: AffinePlanes) -> torch.Tensor | None:
    """Q8_0's two planes (gguf_blocks._q8_0: codes q + 128 = 16 hi + lo, scales 16 d and d, zeros 0 and 8 d)
    back as the int8 kernel's weight (kernels/cpu_int8_gemv.c): uint8 [N, 34 G], per row G fp16 d then
    G x 32 int8 codes. None for any other planes, or d not an fp16 value."""
    if planes.codes.shape[0] != 2:
        return None
    _, n, k = planes.codes.shape
    d = planes.scales[1]
    d16 = d.astype(np.float16)
    if not (np.array_equal(planes.scales[0], 16 * d) and not planes.zeros[0].any()
            and np.array_equal(planes.zeros[1], 8 * d) and np.array_equal(d16.astype(np.float32), d)):
        return None
    q = (planes.codes[0].astype(np.int16) * 16 + planes.codes[1] - 128).astype(np.int8)
    return torch.from_numpy(np.concatenate((np.ascontiguousarray(d16).view(np.uint8), q.view(np.uint8)), axis=-1))


class Int4PackedWeight(QuantizedWeight):
    """A weight as P int4 planes: torch's packed layout for the matmul, nibbles for dequantizing."""

    def __init__(self, planes: AffinePlanes, source: str) -> None:
        p, n, k = planes.codes.shape
        if k % GROUP:
            raise ValueError(f"in_features {k} is not a multiple of {GROUP}")
        self.planes, self.out_features, self.in_features = int(p), int(n), int(k)
        self.source = source
        side_by_side = np.ascontiguousarray(planes.codes.transpose(1, 0, 2).reshape(n, p * k))  # [N, P*K]
        codes = torch.from_numpy(side_by_side)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32), 1)
        scales = torch.from_numpy(np.ascontiguousarray(planes.scales.transpose(1, 0, 2).reshape(n, -1)))  # [N, P*K/32]
        zeros = torch.from_numpy(np.ascontiguousarray(planes.zeros.transpose(1, 0, 2).reshape(n, -1)))
        self.scales_and_zeros = torch.stack([scales.t(), zeros.t()], dim=-1).to(torch.bfloat16).contiguous()
        # Our own copy of the codes for dequantizing (two a byte); it uses the kernel's bfloat16
        # scales and zeros, so both paths compute with the same weight.
        self.nibbles = (codes[:, 0::2] | (codes[:, 1::2] << 4)).contiguous()
        self.dense: torch.Tensor | None = None  # bfloat16 [N, K] for batched inputs (keep_dense_copies)
        # The C kernels' layouts: Q8_0 as int8 codes where the planes are Q8_0's, else the 4-bit one
        # (None where fp16 cannot hold d / m0: such a weight keeps torch's kernel).
        self.int8_blocks = int8_gemv_blocks(planes)
        self.gemv_blocks = None if self.int8_blocks is not None else gemv_blocks(planes)

    def keep_dense(self) -> None:
        """Keep the weight also as dense bfloat16, for inputs of >= DENSE_MIN_ROWS rows (once: a weight
        shared by several models of one process, `packed_cache`, is copied once)."""
        if self.dense is None:
            self.dense = self.dequantize().to(torch.bfloat16)

    @property
    def dense_nbytes(self) -> int:
        return self.out_features * self.in_features * 2

    @property
    def format(self) -> str:
        return f"int4x{self.planes}[{self.source}]"

    @property
    def nbytes(self) -> int:
        tensors = (self.packed, self.scales_and_zeros, self.nibbles, self.dense, self.gemv_blocks, self.int8_blocks)
        return sum(t.numel() * t.element_size() for t in tensors if t is not None)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if x2.shape[0] <= GEMV_MAX_ROWS and x2.dtype == torch.float32 and x2.stride(-1) == 1:
            out = self.gemv(x2)
            if out is not None:
                return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)
        if self.dense is not None and x2.shape[0] >= DENSE_MIN_ROWS:
            out = torch.nn.functional.linear(x2.to(torch.bfloat16), self.dense).to(x.dtype)
        elif x2.shape[0] >= DEQUANT_MIN_ROWS:
            out = torch.matmul(x2.float(), self.dequantize().t()).to(x.dtype)
        else:
            xb = x2.to(torch.bfloat16)
            if self.planes > 1:
                xb = xb.repeat(1, self.planes)
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(xb.contiguous(), self.packed, GROUP, self.scales_and_zeros)
            out = out.to(x.dtype)
        return out if x.dim() == 2 else out.reshape(*x.shape[:-1], self.out_features)

    def gemv(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [M, K] float32 @ W^T by the C kernel (any M; linear() sends M <= GEMV_MAX_ROWS), or None where
        it did not build."""
        lib = decode_kernels_library()
        if lib is None or (self.gemv_blocks is None and self.int8_blocks is None):
            return None
        out = torch.empty((x.shape[0], self.out_features), dtype=torch.float32)
        if not x.shape[0]:
            return out
        if self.int8_blocks is not None:
            status = lib.radixlm_int8_gemv(x.data_ptr(), x.stride(0), x.shape[0], self.int8_blocks.data_ptr(),
                                           self.out_features, self.in_features, out.data_ptr(), torch.get_num_threads())
        else:
            status = lib.radixlm_int4_gemv(x.data_ptr(), x.stride(0), x.shape[0], self.gemv_blocks.data_ptr(),
                                           self.out_features, self.in_features, self.planes, out.data_ptr(),
                                           torch.get_num_threads())
        if status != 0:
            raise MemoryError(f"int4 gemv: the C kernel failed ({status})")
        return out

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        return self._dequantize(self.nibbles[ids], self.scales_and_zeros[:, ids])

    def dequantize(self) -> torch.Tensor:
        return self._dequantize(self.nibbles, self.scales_and_zeros)

    def _dequantize(self, nibbles: torch.Tensor, scales_and_zeros: torch.Tensor) -> torch.Tensor:
        n = nibbles.shape[0]
        codes = torch.stack((nibbles & 0x0F, nibbles >> 4), dim=-1).view(n, -1, GROUP)
        # [n, groups, 2] made contiguous: on the transposed view addcmul wrote its output in that view's
        # order and the reshape below copied it (twice the time of the whole dequantize, same values)
        sz = scales_and_zeros.float().transpose(0, 1).contiguous()
        w = torch.addcmul(sz[..., 1:], codes.float().sub_(8.0), sz[..., :1])
        w = w.reshape(n, self.planes, self.in_features)
        return w[:, 0] if self.planes == 1 else w.sum(1)


def keep_dense_copies(weights: list[QuantizedWeight], available_bytes: int) -> int:
    """Give every `Int4PackedWeight` in `weights` a dense bfloat16 copy when the CPU multiplies
    bfloat16 natively and all the copies fit in DENSE_RAM_SHARE of `available_bytes`; bytes added."""
    packed = list({id(w): w for w in weights if isinstance(w, Int4PackedWeight)}.values())
    total = sum(w.dense_nbytes for w in packed)
    if not packed or not native_bf16_matmul() or total > DENSE_RAM_SHARE * available_bytes:
        return 0
    for w in packed:
        w.keep_dense()
    return total

"""Triton kernels of the 4-bit weight-only linear (runtime/quantization/w4a16.py picks between them by M).

Weight layout (`pack_codes`, built once at load from AWQ / GPTQ / compressed-tensors tensors): codes c in [0, 15] of a
[N, K] weight, K padded to a multiple of 128 with code 8, stored as int16 [N, Kp / 4]: in each 128-column chunk,
halfword i holds columns i, 32 + i, 64 + i, 96 + i in its nibbles 0..3. A chunk's halfwords are one 64-byte run of a row
(`blocked`: of each row of a tile, the tile's runs contiguous: kernels/w4_blocked.py), and nibble j of the 32 halfwords
is the 32 consecutive columns j*32 .. j*32 + 31, so unpacking needs one shift and one mask per code and no shuffle.
Scales (the checkpoint's fp16 / bf16 / fp32) and zero points (uint8, asymmetric only; symmetric means z = 8) are
[G, N], one group per `group_size` columns (after act-order's permutation, see below).

    W[n, k] = (c[n, k] - z[g, n]) * s[g, n]  (+ o[g, n]),     g = k // group_size
    y[m, n] = sum_g s[g, n] * sum_{k in g} x[m, k] * (c[n, k] - z[g, n])  (+ o[g, n] * sum_{k in g} x[m, k])

(The offsets o, float32 [G, N], are GGUF's affine blocks in `gguf_blocks.AffinePlanes` form; only
then does the kernel sum the activations per group.)

The scale is applied once per group to a dot product of the activations with c - z, so the inner
loop only turns a code into c - z, exactly, in the activations' type: for bf16 `0x4300 | c` read as
bf16 is 128 + c (an OR, no conversion instruction), plus -(128 + z): small integers, exact; on a GPU
in inline PTX two codes per instruction (a shift, a LOP3 and one bf16x2 FMA per two weights, see
`_codes_asm_bf16`). fp16 the same with `0x6400` (1024 + c); float32 converts. Products are exact
and summed in float32. (The CPU interpreter runs the plain-Triton conversions, then widens both
operands to float32 for its dot.)

Act-order (GPTQ desc_act): the columns are stored sorted by group (`perm`), and the kernel reads the
activations through the same permutation, so every group is a contiguous run of columns.

`w4a16_matmul`: a [BLOCK_M, BLOCK_N] output tile per program; at decode sizes the grid is split
along K as well (partial sums summed in a fixed order by a second kernel: deterministic, no atomics).
`w4_dequantize`: the whole weight as bf16 / fp16 in the original column order, for prefill sizes
where dequantize + cuBLAS beats the tiled kernel (`DEQUANT_MIN_M` in w4a16.py, set by measurement).
Launch parameters depend only on static shapes, so the kernels capture into CUDA graphs.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp8_gemm import sm_count
from .w4_blocked import chunk_stride, row_offsets

logger = logging.getLogger(__name__)

CHUNK = 128  # columns per 32 halfwords; K is padded to a multiple of it
SLICE = 32  # columns per nibble plane of a chunk: the smallest group size the layout takes


@dataclass(frozen=True)
class W4Config:
    """Tile sizes of one launch; split_k is derived from the shape (see `plan`)."""

    block_m: int = 16
    block_n: int = 64
    num_warps: int = 4
    num_stages: int = 5
    split_k: int | None = None  # None: from the shape (`plan`); a number: at most that many splits
    swap: bool = True  # compute the tile transposed (weights as the MMA's register operand)
    asm: bool = True  # bf16 / fp16 code conversion in inline PTX on a GPU (`_codes_asm`)


def default_config(m: int) -> W4Config:
    """Decode sizes: narrow M, enough N tiles x K splits to fill the GPU; larger M: square-ish tiles."""
    if m <= 16:
        return W4Config()
    if m <= 64:
        return W4Config(block_m=64, block_n=64, num_warps=4, num_stages=4)
    return W4Config(block_m=128, block_n=128, num_warps=8, num_stages=3)


def plan(m: int, n: int, kp: int, cfg: W4Config, device: torch.device) -> tuple[int, int]:
    """(split_k, chunks per split): about three programs per SM (enough weight bytes in flight at
    M = 1), each split a whole number of chunks, and no more splits than keep the float32 partial
    sums (written and read back: 8 M N bytes a split) within a quarter of the weight's N K / 2 bytes."""
    tiles_mn = triton.cdiv(m, cfg.block_m) * triton.cdiv(n, cfg.block_n)
    chunks = kp // CHUNK
    want = max(1, min(triton.cdiv(3 * sm_count(device), tiles_mn), chunks, kp // (64 * m)))
    if cfg.split_k is not None:
        want = max(1, min(cfg.split_k, chunks))
    per_split = triton.cdiv(chunks, want)
    return triton.cdiv(chunks, per_split), per_split


def pack_codes(codes: torch.Tensor) -> torch.Tensor:
    """codes uint8 [N, K] in [0, 15] -> int16 [N, Kp / 4] in the chunked nibble layout above."""
    n, k = codes.shape
    kp = triton.cdiv(k, CHUNK) * CHUNK
    c = torch.full((n, kp), 8, dtype=torch.int32, device=codes.device)
    c[:, :k] = codes.to(torch.int32)
    c = c.view(n, kp // CHUNK, 4, SLICE)  # [n, chunk, nibble j, halfword i]
    words = c[:, :, 0] | (c[:, :, 1] << 4) | (c[:, :, 2] << 8) | (c[:, :, 3] << 12)
    return (words - ((words >= 1 << 15).to(torch.int32) << 16)).to(torch.int16).reshape(n, kp // 4)


def unpack_codes(packed: torch.Tensor, k: int) -> torch.Tensor:
    """The inverse of `pack_codes`: uint8 [N, K]."""
    n = packed.shape[0]
    words = packed.to(torch.int32).view(n, -1, 1, SLICE) & 0xFFFF
    shifts = torch.arange(0, 16, 4, device=packed.device, dtype=torch.int32).view(1, 1, 4, 1)
    return ((words >> shifts) & 0xF).to(torch.uint8).reshape(n, -1)[:, :k]


@triton.jit
def _codes_asm_bf16(h, nz, j: tl.constexpr):
    """c - z as bf16 in inline PTX, two halfwords per 32-bit register: a shift and a LOP3
    ((t & 0x000F000F) | 0x43004300: two bf16 128 + c) and one bf16x2 FMA adding nz = -(128 + z).
    A lane-wise op, so which two elements Triton pairs does not matter."""
    if j == 0:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3F803F80; lop3.b32 t, $1, 0x000F000F, 0x43004300, 0xea; "
            "fma.rn.bf16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.bfloat16, is_pure=True, pack=2)
    if j == 1:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3F803F80; shr.b32 t, $1, 4; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
            "fma.rn.bf16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.bfloat16, is_pure=True, pack=2)
    if j == 2:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3F803F80; shr.b32 t, $1, 8; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
            "fma.rn.bf16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.bfloat16, is_pure=True, pack=2)
    return tl.inline_asm_elementwise(
        "{.reg .b32 t, one; mov.b32 one, 0x3F803F80; shr.b32 t, $1, 12; lop3.b32 t, t, 0x000F000F, 0x43004300, 0xea; "
        "fma.rn.bf16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _codes_asm_fp16(h, nz, j: tl.constexpr):
    """`_codes_asm_bf16` for fp16: 0x6400 | c is 1024 + c, nz = -(1024 + z)."""
    if j == 0:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3C003C00; lop3.b32 t, $1, 0x000F000F, 0x64006400, 0xea; "
            "fma.rn.f16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.float16, is_pure=True, pack=2)
    if j == 1:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3C003C00; shr.b32 t, $1, 4; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xea; "
            "fma.rn.f16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.float16, is_pure=True, pack=2)
    if j == 2:
        return tl.inline_asm_elementwise(
            "{.reg .b32 t, one; mov.b32 one, 0x3C003C00; shr.b32 t, $1, 8; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xea; "
            "fma.rn.f16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.float16, is_pure=True, pack=2)
    return tl.inline_asm_elementwise(
        "{.reg .b32 t, one; mov.b32 one, 0x3C003C00; shr.b32 t, $1, 12; lop3.b32 t, t, 0x000F000F, 0x64006400, 0xea; "
        "fma.rn.f16x2 $0, t, one, $2;}", "=r,r,r", [h, nz], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _codes_minus_zero(h, z, j: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Nibble j of each halfword minus its row's zero point, exactly, as the dot's operand type
    (float32 / bf16 / fp16 for MAGIC 0 / 1 / 2). h: int16 [BLOCK_N, 32]; z: float32 [BLOCK_N], the
    zero points of this slice's group. ASM: the inline-PTX conversion (a GPU only)."""
    if MAGIC == 0:
        return _codes_minus_zero_f32(h, z, j)
    elif MAGIC == 1:
        return _codes_minus_zero_bf16(h, z, j, ASM)
    else:
        return _codes_minus_zero_fp16(h, z, j, ASM)


@triton.jit
def _codes_minus_zero_f32(h, z, j: tl.constexpr):
    return ((h.to(tl.int32) >> (4 * j)) & 15).to(tl.float32) - z[:, None]


@triton.jit
def _codes_minus_zero_bf16(h, z, j: tl.constexpr, ASM: tl.constexpr):
    nz = tl.broadcast_to((-128.0 - z)[:, None], h.shape).to(tl.bfloat16)
    if ASM:
        return _codes_asm_bf16(h, nz, j)
    w = ((((h.to(tl.int32) >> (4 * j)) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True))
    return (w.to(tl.float32) + nz.to(tl.float32)).to(tl.bfloat16)


@triton.jit
def _codes_minus_zero_fp16(h, z, j: tl.constexpr, ASM: tl.constexpr):
    nz = tl.broadcast_to((-1024.0 - z)[:, None], h.shape).to(tl.float16)
    if ASM:
        return _codes_asm_fp16(h, nz, j)
    w = ((((h.to(tl.int32) >> (4 * j)) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True))
    return (w.to(tl.float32) + nz.to(tl.float32)).to(tl.float16)


@triton.jit
def chunk_dot(h, c, acc, z, x_rows, m_mask, rn, n_mask, Scales, Zeros, Offsets, Perm, N, K, G, group_size,
              HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, MAGIC: tl.constexpr,
              IEEE: tl.constexpr, ASM: tl.constexpr, SLICES_PER_GROUP: tl.constexpr, SWAP: tl.constexpr,
              BLOCK_M: tl.constexpr):
    """acc + chunk c's contribution: h, the chunk's [BLOCK_N, 32] halfwords (zero rows where masked), against
    the activations' 128 columns; each group's scale (and offset) applied to its partial sum. z: the
    current group's zero points, reloaded at each group start and returned (a group may span chunks).
    Shared by the tiled kernel below and the small-M one (`w4a16_small_m.py`, SWAP only)."""
    ri = tl.arange(0, 32)
    part = tl.zeros_like(acc)
    xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)  # the group's sum of x, for its offsets (GGUF) only
    for j in tl.static_range(4):
        g = tl.minimum((c * 128 + j * 32) // group_size, G - 1)  # this slice's group
        if HAS_ZEROS and j % SLICES_PER_GROUP == 0:
            z = tl.load(Zeros + g * N + rn, mask=n_mask, other=0).to(tl.float32)
        kk = c * 128 + j * 32 + ri
        k_mask = kk < K
        if HAS_PERM:
            kx = tl.load(Perm + kk, mask=k_mask, other=0)
        else:
            kx = kk
        x = tl.load(x_rows + kx[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)
        w = _codes_minus_zero(h, z, j, MAGIC, ASM and not IEEE)
        if IEEE:  # fp32 activations, or the CPU interpreter (its bf16 dot is wrong): exact fp32 products
            x = x.to(tl.float32)
            w = w.to(tl.float32)
            if SWAP:
                part += tl.dot(w, tl.trans(x), input_precision="ieee")
            else:
                part += tl.dot(x, tl.trans(w), input_precision="ieee")
        elif SWAP:
            part += tl.dot(w, tl.trans(x))
        else:
            part += tl.dot(x, tl.trans(w))
        if HAS_OFFSETS:
            xsum += tl.sum(x.to(tl.float32), 1)
        if (j + 1) % SLICES_PER_GROUP == 0:  # a group (or a chunk of a larger one) ends here
            s = tl.load(Scales + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
            if SWAP:
                acc += part * s[:, None]
            else:
                acc += part * s[None, :]
            if HAS_OFFSETS:
                o = tl.load(Offsets + g * N + rn, mask=n_mask, other=0.0)
                if SWAP:
                    acc += o[:, None] * xsum[None, :]
                else:
                    acc += xsum[:, None] * o[None, :]
                xsum = tl.zeros((BLOCK_M,), dtype=tl.float32)
            part = tl.zeros_like(acc)
    return acc, z


@triton.jit
def _w4a16_kernel(
    X, Codes, Scales, Zeros, Offsets, Perm, Out, Part,
    M, N, K, G, group_size, chunks_per_split, n_chunks,
    stride_xm, stride_cn, stride_om,
    HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    MAGIC: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, SLICES_PER_GROUP: tl.constexpr, SWAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCKED: tl.constexpr = 0, CSTRIDE: tl.constexpr = 32,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m = tl.program_id(2)
    rm = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ri = tl.arange(0, 32)
    m_mask = rm < M
    n_mask = rn < N
    c_start = pid_k * chunks_per_split
    c_end = tl.minimum(c_start + chunks_per_split, n_chunks)
    x_rows = X + rm[:, None].to(tl.int64) * stride_xm
    c_ptrs = Codes + row_offsets(rn, stride_cn, BLOCKED)[:, None] + ri[None, :]  # (w4_blocked.py: BLOCKED rows a block)
    # SWAP: the output tile is computed transposed, (W - z) [BLOCK_N, 32] @ x^T: the unpacked weights are
    # the MMA's first operand, which Hopper's wgmma takes from registers (no shared-memory round trip).
    if SWAP:
        acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    z = tl.full((BLOCK_N,), 8.0, tl.float32)  # symmetric: every zero point is 8
    for c in range(c_start, c_end):
        h = tl.load(c_ptrs + c * CSTRIDE, mask=n_mask[:, None], other=0)
        acc, z = chunk_dot(h, c, acc, z, x_rows, m_mask, rn, n_mask, Scales, Zeros, Offsets, Perm, N, K, G, group_size,
                           HAS_ZEROS, HAS_OFFSETS, HAS_PERM, MAGIC, IEEE, ASM, SLICES_PER_GROUP, SWAP, BLOCK_M)
    if SWAP:
        mask = n_mask[:, None] & m_mask[None, :]
        offs = rm[None, :].to(tl.int64) * N + rn[:, None]
        out_offs = rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    else:
        mask = m_mask[:, None] & n_mask[None, :]
        offs = rm[:, None].to(tl.int64) * N + rn[None, :]
        out_offs = rm[:, None].to(tl.int64) * stride_om + rn[None, :]
    if PARTIAL:
        tl.store(Part + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
    else:
        tl.store(Out + out_offs, acc.to(Out.dtype.element_ty), mask=mask)


@triton.jit
def _sum_splits_kernel(Part, Out, M, N, stride_om, SPLIT, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in range(SPLIT):  # fixed order: the same sum every run
        acc += tl.load(Part + s * M * N + offs, mask=mask, other=0.0)
    tl.store(Out + (offs // N) * stride_om + offs % N, acc.to(Out.dtype.element_ty), mask=mask)


_asm_conversion: dict[str, bool] = {}  # "works": whether this process's Triton compiled `_codes_asm`


def asm_conversion_works() -> bool | None:
    """True / False once a GPU launch tried the inline-PTX conversion; None before."""
    return _asm_conversion.get("works")


def _launch_with_asm_fallback(launch, asm: bool) -> None:
    """Launch with the inline-PTX conversion when asked; if the first such launch fails to compile,
    say so once and use the plain-Triton conversion from then on (same numbers, more instructions)."""
    if not asm or _asm_conversion.get("works") is False:
        launch(False)
        return
    if _asm_conversion.get("works"):
        launch(True)
        return
    try:
        launch(True)
    except Exception as exc:  # noqa: BLE001 - any compile failure of the PTX variant: the plain one is equal
        logger.warning("w4a16: inline-PTX code conversion unavailable (%s: %s); using plain Triton",
                       type(exc).__name__, str(exc)[:200])
        _asm_conversion["works"] = False
        launch(False)
        return
    _asm_conversion["works"] = True


def _magic(dtype: torch.dtype) -> int:
    """MAGIC: the code-to-float trick for this activation dtype (0: float32, 1: bf16, 2: fp16)."""
    return {torch.float32: 0, torch.bfloat16: 1}.get(dtype, 2)


def w4a16_matmul(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 perm: torch.Tensor | None, k: int, group_size: int, cfg: W4Config | None = None,
                 offsets: torch.Tensor | None = None, blocked: int = 0) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ W^T -> [M, N] in x's dtype; W as described in the module docstring
    (`offsets`: float32 [G, N] added to its group's weights, GGUF's affine blocks; `blocked`: w4_blocked.py's rows)."""
    m = x.shape[0]
    n, kp = codes.shape[0], codes.shape[1] * 4
    if x.shape[1] != k or kp != triton.cdiv(k, CHUNK) * CHUNK or group_size % SLICE:
        raise ValueError(f"w4a16_matmul: codes {tuple(codes.shape)} / group {group_size} do not fit x {tuple(x.shape)}")
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or default_config(m)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, per_split = plan(m, n, kp, cfg, x.device)
    part = torch.empty(split, m, n, dtype=torch.float32, device=x.device) if split > 1 else out
    magic = _magic(x.dtype)
    grid = (triton.cdiv(n, cfg.block_n), split, triton.cdiv(m, cfg.block_m))

    def launch(asm: bool) -> None:
        _w4a16_kernel[grid](
            x, codes, scales, zeros if zeros is not None else scales, offsets if offsets is not None else scales,
            perm if perm is not None else codes, out, part,
            m, n, k, scales.shape[0], group_size, per_split, kp // CHUNK, x.stride(0), codes.stride(0), out.stride(0),
            HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None,
            PARTIAL=split > 1, MAGIC=magic,
            IEEE=x.dtype == torch.float32 or x.device.type == "cpu", ASM=asm,
            SLICES_PER_GROUP=min(group_size, CHUNK) // SLICE, SWAP=cfg.swap, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
            BLOCKED=blocked, CSTRIDE=chunk_stride(blocked), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )

    _launch_with_asm_fallback(launch, cfg.asm and x.is_cuda and magic != 0)
    if split > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](part, out, m, n, out.stride(0), split, BLOCK=block, num_warps=4)
    return out


@triton.jit
def _dequantize_kernel(Codes, Scales, Zeros, Offsets, Perm, Out, N, K, G, group_size, stride_cn, stride_on,
                       HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCKED: tl.constexpr = 0, CSTRIDE: tl.constexpr = 32):
    """One 128-column chunk of BLOCK_N rows per program: W in the original column order."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    c = tl.program_id(1)
    ri = tl.arange(0, 32)
    n_mask = rn < N
    h = tl.load(Codes + (row_offsets(rn, stride_cn, BLOCKED) + c * CSTRIDE)[:, None] + ri[None, :], mask=n_mask[:, None])
    for j in tl.static_range(4):
        kk = c * 128 + j * 32 + ri
        k_mask = kk < K
        g = tl.minimum((c * 128 + j * 32) // group_size, G - 1)
        s = tl.load(Scales + g * N + rn, mask=n_mask, other=0.0).to(tl.float32)
        if HAS_ZEROS:
            z = tl.load(Zeros + g * N + rn, mask=n_mask, other=0).to(tl.float32)
        else:
            z = tl.full((BLOCK_N,), 8.0, tl.float32)
        w = (((h.to(tl.int32) >> (4 * j)) & 15).to(tl.float32) - z[:, None]) * s[:, None]
        if HAS_OFFSETS:
            w += tl.load(Offsets + g * N + rn, mask=n_mask, other=0.0)[:, None]
        col = tl.load(Perm + kk, mask=k_mask, other=0) if HAS_PERM else kk
        tl.store(Out + rn[:, None].to(tl.int64) * stride_on + col[None, :], w.to(Out.dtype.element_ty),
                 mask=n_mask[:, None] & k_mask[None, :])


def w4_dequantize(codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, perm: torch.Tensor | None,
                  k: int, group_size: int, dtype: torch.dtype, offsets: torch.Tensor | None = None,
                  blocked: int = 0) -> torch.Tensor:
    """W [N, K] in `dtype`, columns in the checkpoint's order (each value rounded once from float32)."""
    n, kp = codes.shape[0], codes.shape[1] * 4
    out = torch.empty(n, k, dtype=dtype, device=codes.device)
    block_n = 32
    _dequantize_kernel[(triton.cdiv(n, block_n), kp // CHUNK)](
        codes, scales, zeros if zeros is not None else scales, offsets if offsets is not None else scales,
        perm if perm is not None else codes, out, n, k, scales.shape[0], group_size, codes.stride(0), out.stride(0),
        HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None, BLOCK_N=block_n,
        BLOCKED=blocked, CSTRIDE=chunk_stride(blocked), num_warps=4,
    )
    return out

"""The 4-bit weight-only linear of batch-1 decode (M = 1) on tensor cores, with the groups as the MMA's columns.

At M = 1 the CUDA-core GEMV (`w4a16_gemv.py`) pays ~4 instructions a weight (unpack, FMA, per-column
bookkeeping) and is issue-bound at ~2x its bytes floor. Here the MMA does the products: each code
becomes a bf16 128 + c (fp16: 1024 + c) by one LOP3 per two codes (plus a shift for three of the four
nibble planes of a word; inline PTX on a GPU) and enters the MMA as its row operand, kept in registers;
the activations are the column operand.

An MMA's column operand is 16 wide and M = 1 fills one column; the other fifteen carry the other
groups: column j of the [32, 16] activation tile holds x where the slice's group is the j-th group of
the current window and zero elsewhere, so the float32 accumulator [BLOCK_N, 16] collects each row's
raw sum sum_k x_k (off + c_k) of up to 16 groups side by side. The scales, zero points and offsets are
applied once per window of 16 groups (a [BLOCK_N, 16] tile of each, not per group inside the loop):

    y[n] = sum_j s[g_j, n] (P[n, j] - (off + z[g_j, n]) X_j)  (+ o[g_j, n] X_j)      X_j = sum of x in group g_j

(exact algebra; P sums products of bf16 values, exact in float32, so the offset costs only the float32
cancellation of off X_j, ~1e-5 relative at 128, ~1e-4 at fp16's 1024). Group sums X_j come from a second
small dot of a ones row with the same activation tiles, or (`Mma1Config.sums`, keys `-g1`) from the split's
activations loaded once before the loop and summed after it: a third fewer MMAs a step, and the load's latency
hidden under the weight stream. With `Mma1Config.window` 8 (keys `-j8`) the tile is 8 columns wide: one MMA
(m16n8k16) per 16 x 16 codes instead of two, each split inside a window of 8 groups (twice the splits).
`Mma1Config.split_major` (keys `-r1`): a row tile's splits are consecutive programs of the grid, so the programs
resident together read whole blocks of rows.

Layout: `w4a16_gemm.pack_codes` (one copy of the weight serves every kernel): halfword i of a chunk's 32
holds columns i, 32 + i, 64 + i, 96 + i, so nibble plane j of a [BLOCK_N, 32] halfword tile is the row
operand of slice j (columns 32 j .. 32 j + 31). A program owns BLOCK_N rows and walks its split of K,
CHUNKS chunks a loop step; split-K finishes in the same launch (`small_m.finish_tile`).
float32 activations (and the CPU interpreter) take the exact float32 dot of codes as float32 (offset 0).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .fp8_gemm import sm_count
from .l2_prefetch import L2Plan, launch_args, prefetch_next
from .small_m import Table, finish_tile, finish_tile_silu, paired_rows, register_defaults, table_in_use
from .split_norm import AddNorm, PendingNorm, finish_tile_add_norm, norm_launch_args, rstd_of
from .w4_blocked import chunk_stride, row_offsets
from .w4a16_gemm import CHUNK, SLICE, _launch_with_asm_fallback, _magic

MAX_M = 1  # rows this kernel takes
WINDOW = 16  # groups whose sums the accumulator holds side by side (the MMA's column count)
MAX_SUM_CHUNKS = 16  # chunks of a split whose group sums one pass before the loop takes (Mma1Config.sums)


@dataclass(frozen=True)
class Mma1Config:
    """One launch: BLOCK_N rows x CHUNKS chunks of 128 columns a loop step, warps (1-2: mma.sync, 4-8: wgmma),
    Triton pipeline stages; `sums`: the split's group sums of x in one vectorized pass before the loop
    (else a second small dot of a ones row every slice: a third of the loop's MMAs)."""

    block_n: int = 128
    chunks: int = 2
    num_warps: int = 2
    split_k: int | None = None  # None: from the shape (`mma1_plan`); a number: at most that many splits
    num_stages: int = 3
    waves: int = 4  # programs per SM the split-K plan aims for (split_k None)
    sums: bool = False
    window: int = WINDOW  # groups side by side in the MMA's columns: 16, or 8 (half the MMAs, twice the splits)
    split_major: bool = False  # the splits of one row tile are consecutive programs (they read one block of rows)

    def key(self) -> str:
        split = "a" if self.split_k is None else str(self.split_k)
        extra = ("" if self.waves == 4 else f"-v{self.waves}") + ("-g1" if self.sums else "")
        extra += "" if self.window == WINDOW else f"-j{self.window}"
        extra += "-r1" if self.split_major else ""
        return f"mma1-n{self.block_n}-c{self.chunks}-w{self.num_warps}-s{split}-st{self.num_stages}{extra}"

    @classmethod
    def parse(cls, key: str) -> "Mma1Config":
        """The inverse of `key` (the sweep's JSON and the DEFAULTS table hold keys)."""
        _, n, c, w, s, st, *extra = key.split("-")
        waves = next((int(e[1:]) for e in extra if e.startswith("v")), 4)
        window = next((int(e[1:]) for e in extra if e.startswith("j")), WINDOW)
        return cls(int(n[1:]), int(c[1:]), int(w[1:]), None if s == "sa" else int(s[1:]), int(st[2:]), waves,
                   "g1" in extra, window, "r1" in extra)


# (N, K) -> {1: config key}: the Llama-3.1-8B layers where this kernel beat the GEMV, measured by
# benchmarks/small_m_gemm_sweep.py --kinds mma1 on the H200. gate_up: the 2026-12-03 17:41 round (w4c, RESULTS.md):
# -j8 -r1 at two stages 23.6 us against 24.6 for the 14:50 table's n64-c2-w2-st2-g1 (-j8 alone 24.4, -r1 alone 24.4;
# the run's key also had -e1, evict-first codes, which Triton 3.6 drops from its pipelined copies: the same SASS);
# down: the 14:50 round (w4b) 14.2 vs the GEMV's 16.6, again the best at 17:41 (14.1). qkv / o stay on the GEMV.
# W4Weight sends M = 1 here for the listed shapes, before the GEMV.
DEFAULTS: Table = {
    (28672, 4096): {1: "mma1-n64-c2-w2-sa-st2-g1-j8-r1"},
    (4096, 14336): {1: "mma1-n64-c2-w2-sa-st3-g1"},
}
register_defaults("mma1", DEFAULTS)


def mma1_table_config(n: int, k: int) -> Mma1Config | None:
    """The table's config for this shape (None: not listed, the GEMV or the small-M kernel serves it)."""
    key = table_in_use("mma1").get((n, k), {}).get(1)
    return Mma1Config.parse(key) if key else None


def mma1_plan(n: int, kp: int, group_size: int, groups: int, cfg: Mma1Config,
              device: torch.device) -> tuple[int, int]:
    """(split_k, chunks per split): about `waves` programs per SM (or cfg.split_k), each split a whole number
    of loop steps and inside one window: at most cfg.window groups (a split of L columns starting anywhere
    touches at most (L - 1) // group_size + 2 groups, one fewer when group boundaries align with it)."""
    chunks = kp // CHUNK
    tiles = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(chunks, cfg.chunks)
    want = max(1, min(triton.cdiv(cfg.waves * sm_count(device), tiles), steps))
    if cfg.split_k is not None:
        want = max(1, min(cfg.split_k, steps))
    while True:
        per_split = triton.cdiv(steps, want) * cfg.chunks
        cols = per_split * CHUNK
        aligned = cols % group_size == 0
        touched = cols // group_size if aligned else (cols - 1) // group_size + 2
        if groups == 1 or touched <= cfg.window or want >= steps:
            return triton.cdiv(chunks, per_split), per_split
        want += 1


def step_groups(chunks: int, group_size: int) -> int:
    """The most groups one loop step of `chunks` chunks touches (steps start at multiples of their width)."""
    cols = chunks * CHUNK
    if cols % group_size == 0:
        return cols // group_size
    if group_size % cols == 0:
        return 1
    return (cols - 1) // group_size + 2


@triton.jit
def _plane_asm_bf16(h, j: tl.constexpr):
    """bf16 128 + c of nibble j, two halfwords per register: (shift,) LOP3 (t & 0x000F000F) | 0x43004300."""
    if j == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x43004300, 0xea;", "=r,r", [h],
                                         dtype=tl.bfloat16, is_pure=True, pack=2)
    if j == 1:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea;}",
                                         "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    if j == 2:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea;}",
                                         "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)
    return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, 0x43004300, 0xea;}",
                                     "=r,r", [h], dtype=tl.bfloat16, is_pure=True, pack=2)


@triton.jit
def _plane_asm_fp16(h, j: tl.constexpr):
    """`_plane_asm_bf16` for fp16: 0x6400 | c is 1024 + c."""
    if j == 0:
        return tl.inline_asm_elementwise("lop3.b32 $0, $1, 0x000F000F, 0x64006400, 0xea;", "=r,r", [h],
                                         dtype=tl.float16, is_pure=True, pack=2)
    if j == 1:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 4; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea;}",
                                         "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    if j == 2:
        return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 8; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea;}",
                                         "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)
    return tl.inline_asm_elementwise("{.reg .b32 t; shr.b32 t, $1, 12; lop3.b32 $0, t, 0x000F000F, 0x64006400, 0xea;}",
                                     "=r,r", [h], dtype=tl.float16, is_pure=True, pack=2)


@triton.jit
def _plane(h, j: tl.constexpr, MAGIC: tl.constexpr, ASM: tl.constexpr):
    """Nibble plane j of the int16 tile h as the MMA's operand: off + c (bf16 128 + c, fp16 1024 + c; float32
    c). ASM: inline PTX, one (shift +) LOP3 per two codes, the halfwords' pair in one register."""
    if MAGIC == 0:
        return ((h.to(tl.int32) >> (4 * j)) & 15).to(tl.float32)
    elif MAGIC == 1:
        if ASM:
            return _plane_asm_bf16(h, j)
        else:
            return (((h.to(tl.int32) >> (4 * j)) & 15) | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
    else:
        if ASM:
            return _plane_asm_fp16(h, j)
        else:
            return (((h.to(tl.int32) >> (4 * j)) & 15) | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)


@triton.jit
def _group_of(c, j, G, group_size, SLICE_SHIFT: tl.constexpr):
    """The group of slice j of chunk c (SLICE_SHIFT >= 0: 2**SLICE_SHIFT slices a group, a shift)."""
    if SLICE_SHIFT >= 0:
        return tl.minimum((c * 4 + j) >> SLICE_SHIFT, G - 1)
    else:
        return tl.minimum((c * 128 + j * 32) // group_size, G - 1)


@triton.jit
def _split_x(X, Perm, c_first, c_end, K, SUM_CHUNKS: tl.constexpr):
    """The activations of chunks c_first .. c_end - 1 (at most SUM_CHUNKS) as [SUM_CHUNKS * 4, 32] slices, zero
    past the end: loaded before the loop, summed after it (`_window_sums`), so the load's latency hides
    under the weights' stream instead of holding up the first weight loads."""
    rs = tl.arange(0, SUM_CHUNKS * 4)  # slices
    ri = tl.arange(0, 32)
    kk = (c_first + rs // 4)[:, None] * 128 + (rs % 4)[:, None] * 32 + ri[None, :]
    k_mask = (kk < K) & (kk < c_end * 128)
    if Perm is not None:
        kk = tl.load(Perm + kk, mask=k_mask, other=0)
    return tl.load(X + kk, mask=k_mask, other=0.0)


@triton.jit
def _window_sums(xsl, c_first, g_base, G, group_size, SLICE_SHIFT: tl.constexpr, SUM_CHUNKS: tl.constexpr,
                 WIN: tl.constexpr):
    """[WIN]: each window group's sum of x from `_split_x`'s slices (a 32-column slice lies in one group)."""
    rs = tl.arange(0, SUM_CHUNKS * 4)
    rj = tl.arange(0, WIN)
    per_slice = tl.sum(xsl.to(tl.float32), 1)
    col = _group_of(c_first + rs // 4, rs % 4, G, group_size, SLICE_SHIFT) - g_base
    return tl.sum(tl.where(col[:, None] == rj[None, :], per_slice[:, None], 0.0), 0)


@triton.jit
def _mma1_kernel(
    X, Codes, Scales, Zeros, Offsets, Perm, Out, Part, Tickets,
    N, K, G, group_size, chunks_per_split, n_chunks, split, stride_cn,
    HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    MAGIC: tl.constexpr, IEEE: tl.constexpr, ASM: tl.constexpr, SLICE_SHIFT: tl.constexpr, USE_PDL: tl.constexpr,
    SUM_CHUNKS: tl.constexpr, EVEN: tl.constexpr, WIN: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr, SPLIT_MAJOR: tl.constexpr, BLOCKED: tl.constexpr = 0, CHUNK_STRIDE: tl.constexpr = 32,
    # the split norm (kernels/split_norm.py, as in w4a16_gemv._gemv_kernel): NORM 1 producer, 2 consumer
    Res=None, NormW=None, NewRes=None, SumSq=None, n_sum=0, eps=0.0, NORM: tl.constexpr = 0, BLOCK_T: tl.constexpr = 16,
    # kernels/l2_prefetch.py: PF 1 / 2 hints the next linear's first bytes into L2 before / after the loop
    PfA=None, pf_a=0, piece_a=0, PfB=None, pf_b=0, piece_b=0, pf_first=0, pf_issuers=0, PF: tl.constexpr = 0,
    PF_THREADS: tl.constexpr = 32, PF_LANES: tl.constexpr = 1,
):
    pid_n = tl.program_id(1 if SPLIT_MAJOR else 0)
    pid_k = tl.program_id(0 if SPLIT_MAJOR else 1)
    rn = paired_rows(pid_n, N, BLOCK_N, SILU)
    ri = tl.arange(0, 32)
    rj = tl.arange(0, WIN)  # window columns
    r16 = tl.arange(0, 16)  # the ones operand's rows
    n_mask = rn < N
    c_first = pid_k * chunks_per_split
    c_end = tl.minimum(c_first + chunks_per_split, n_chunks)
    if BLOCKED == BLOCK_N and not SILU:  # w4_blocked.py: the tile's rows chunk by chunk, each chunk one 64 B x BLOCK_N run
        c_ptrs = Codes + pid_n.to(tl.int64) * n_chunks * (BLOCK_N * 32) + tl.arange(0, BLOCK_N)[:, None] * 32 + ri[None, :]
    else:  # the plain layout, or blocks of another row count (the SiLU epilogue's paired rows, another table's tile)
        c_ptrs = Codes + row_offsets(rn, stride_cn, BLOCKED)[:, None] + ri[None, :]
    g_base = _group_of(c_first, 0, G, group_size, SLICE_SHIFT)  # the split's groups: window columns 0..15
    # the group sums X_j by the MMA too: a row of ones against the same activation tiles (row 0 of xsum)
    if IEEE:
        ones = tl.where(r16[:, None] == 0, 1.0, 0.0) + tl.zeros((16, 32), dtype=tl.float32)
    elif MAGIC == 1:
        ones = (tl.where(r16[:, None] == 0, 1.0, 0.0) + tl.zeros((16, 32), dtype=tl.float32)).to(tl.bfloat16)
    else:
        ones = (tl.where(r16[:, None] == 0, 1.0, 0.0) + tl.zeros((16, 32), dtype=tl.float32)).to(tl.float16)
    acc = tl.zeros((BLOCK_N, WIN), dtype=tl.float32)  # raw sums sum x (off + c), one window column per group
    xsum = tl.zeros((16, WIN), dtype=tl.float32)
    if PF == 1:  # the next linear's first bytes toward L2 (constants: before the PDL wait too)
        prefetch_next(PfA, pf_a, piece_a, PfB, pf_b, piece_b, pf_first, pf_issuers, PF_THREADS, PF_LANES)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        if not SILU:  # the gate_up SiLU epilogue's successor is the down projection: it launches after the loop
            tl.extra.cuda.gdc_launch_dependents()
    if SUM_CHUNKS > 0:  # the split's group sums X_j from one load (no ones-row MMA in the loop)
        xsl = _split_x(X, Perm if HAS_PERM else None, c_first, c_end, K, SUM_CHUNKS)
    for c0 in range(c_first, c_end, CHUNKS):
        for cc in tl.static_range(CHUNKS):
            c = c0 + cc
            # the last split's short step: a chunk past its end reads zero codes and zero x
            live = (ri * 0 + c) < c_end
            if EVEN:  # whole steps, whole chunks, whole row tiles: no masks but the window column's
                h = tl.load(c_ptrs + c * CHUNK_STRIDE)
            else:
                h = tl.load(c_ptrs + c * CHUNK_STRIDE, mask=n_mask[:, None] & live[None, :], other=0)
            for j in tl.static_range(4):
                kk = c * 128 + j * 32 + ri
                if EVEN:
                    k_mask = ri >= 0
                else:
                    k_mask = (kk < K) & live
                if HAS_PERM:
                    kx = tl.load(Perm + kk, mask=k_mask, other=0)
                else:
                    kx = kk
                col = _group_of(c, j, G, group_size, SLICE_SHIFT) - g_base
                # [32, WIN]: x in its group's window column, zero in the others (read as such: no register shuffle)
                xt = tl.load(X + kx[:, None] + rj[None, :] * 0, mask=k_mask[:, None] & (rj[None, :] == col), other=0.0)
                w = _plane(h, j, MAGIC, ASM)
                if IEEE:
                    acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
                    if SUM_CHUNKS == 0:
                        xsum = tl.dot(ones, xt.to(tl.float32), xsum, input_precision="ieee")
                else:
                    acc = tl.dot(w, xt.to(w.dtype), acc)
                    if SUM_CHUNKS == 0:
                        xsum = tl.dot(ones, xt.to(w.dtype), xsum)
    # y[n] = sum_j s (P - (off + z) X) (+ o X) over the window's groups
    if SUM_CHUNKS == 0:
        xs = tl.sum(xsum, 0)  # [16]: row 0 holds the sums, the other rows zero
    else:
        xs = _window_sums(xsl, c_first, g_base, G, group_size, SLICE_SHIFT, SUM_CHUNKS, WIN)
    off = 0.0 if MAGIC == 0 else (128.0 if MAGIC == 1 else 1024.0)
    g = g_base + rj
    gmask = n_mask[:, None] & (g < G)[None, :]
    sg = g[None, :] * N + rn[:, None]
    s = tl.load(Scales + sg, mask=gmask, other=0.0).to(tl.float32)
    if HAS_ZEROS:
        z = tl.load(Zeros + sg, mask=gmask, other=0).to(tl.float32)
        total = s * (acc - (off + z) * xs[None, :])
    else:
        total = s * (acc - (off + 8.0) * xs[None, :])
    if HAS_OFFSETS:
        total += tl.load(Offsets + sg, mask=gmask, other=0.0) * xs[None, :]
    y = tl.sum(total, 1)[:, None]  # [BLOCK_N, 1]
    if PF == 2:  # after this launch's own loads
        prefetch_next(PfA, pf_a, piece_a, PfB, pf_b, piece_b, pf_first, pf_issuers, PF_THREADS, PF_LANES)
    if NORM == 2:
        y = y * rstd_of(SumSq, n_sum, K, eps, BLOCK_T)
    if USE_PDL and SILU:  # (early, its programs would hold the SMs this launch still needs)
        tl.extra.cuda.gdc_launch_dependents()
    rm = tl.arange(0, 1)
    if SILU:
        finish_tile_silu(y, Out, Part, Tickets, rn, pid_n, pid_k, N, split, PARTIAL, BLOCK_N, True)
    elif NORM == 1:
        finish_tile_add_norm(y, Out, Part, Tickets, rn, n_mask, pid_n, pid_k, N, split, Res, NormW, NewRes, SumSq,
                             PARTIAL)
    else:
        finish_tile(y, Scales, Out, Part, Tickets, rm, rn, rm < 1, n_mask, pid_n, pid_k, 1, N, split, 0, PARTIAL, False)


def w4a16_mma_m1(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
                 perm: torch.Tensor | None, k: int, group_size: int, offsets: torch.Tensor | None = None,
                 tickets: torch.Tensor | None = None, cfg: Mma1Config | None = None, pdl: bool = False,
                 silu_mul: bool = False, add_norm: AddNorm | None = None,
                 pending: PendingNorm | None = None, l2: L2Plan | None = None,
                 blocked: int = 0) -> torch.Tensor | tuple[PendingNorm, torch.Tensor]:
    """x [1, K] @ W^T -> [1, N] in x's dtype; the arguments as `w4a16_gemv.w4a16_gemv`'s (`silu_mul`: [1, N / 2],
    silu(gate) * up of the MLP's [gate | up] weight; `add_norm` / `pending`: the split norm's producer / consumer;
    `l2`: the next linear's bytes to hint into L2; `blocked`: `codes` is `w4_blocked.block_codes(codes, blocked)`:
    whole runs a step for a config of that row tile)."""
    if pending is not None:
        x = pending.u
    m = x.shape[0]
    n, kp = codes.shape[0], codes.shape[1] * 4
    if m > MAX_M or x.shape[1] != k or kp != triton.cdiv(k, CHUNK) * CHUNK or group_size % SLICE:
        raise ValueError(f"w4a16_mma_m1: x {tuple(x.shape)} / codes {tuple(codes.shape)} / group {group_size} do not fit")
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or mma1_table_config(n, k) or Mma1Config()
    slices = group_size // SLICE
    if step_groups(cfg.chunks, group_size) > cfg.window or cfg.block_n < 16 or cfg.window not in (8, 16):
        raise ValueError(f"w4a16_mma_m1: config {cfg.key()} (a step's groups must fit one window of {cfg.window})")
    if blocked and n % blocked:
        raise ValueError(f"w4a16_mma_m1: codes blocked by {blocked} rows: N {n} is not whole blocks")
    if silu_mul and (n // 2) % (cfg.block_n // 2):
        raise ValueError(f"w4a16_mma_m1: silu_mul needs N / 2 a multiple of half the row tile ({n}, {cfg.key()})")
    out = torch.empty(m, n // 2 if silu_mul else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, per_split = mma1_plan(n, kp, group_size, scales.shape[0], cfg, x.device)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        if tickets is None:
            tickets = torch.zeros(triton.cdiv(n, 8), dtype=torch.int32, device=x.device)
        if tickets.numel() < triton.cdiv(n, cfg.block_n):
            raise ValueError("w4a16_mma_m1: too few split-K tickets for this tile")
    else:
        part = out
        tickets = tickets if tickets is not None else codes
    if scales.shape[0] == 1:
        slice_shift = 30  # one group: every slice's group index is 0
    elif slices & (slices - 1) == 0:
        slice_shift = slices.bit_length() - 1
    else:
        slice_shift = -1
    magic = _magic(x.dtype)
    # the group sums before the loop where the split's chunks fit one vectorized pass (else the ones-row MMA)
    sum_chunks = MAX_SUM_CHUNKS if cfg.sums and per_split <= MAX_SUM_CHUNKS else 0  # one compile for every shape
    # every step whole (chunks, split ends) and every row tile full: the loop's loads need no masks of their own
    even = k % CHUNK == 0 and (kp // CHUNK) % cfg.chunks == 0 and per_split % cfg.chunks == 0 and n % cfg.block_n == 0
    grid = (split, triton.cdiv(n, cfg.block_n)) if cfg.split_major else (triton.cdiv(n, cfg.block_n), split)
    use_pdl = pdl and x.is_cuda
    if (add_norm is not None and silu_mul) or ((add_norm is not None or pending is not None) and m != 1):
        raise ValueError("w4a16_mma_m1: a split norm takes one row, and its producer no SiLU epilogue")
    norm, produced = norm_launch_args(x, n, triton.cdiv(n, cfg.block_n), add_norm, pending)
    if produced is not None:
        out = produced[0].u

    def launch(asm: bool) -> None:
        _mma1_kernel[grid](
            x, codes, scales, zeros if zeros is not None else scales, offsets if offsets is not None else scales,
            perm if perm is not None else codes, out, part, tickets,
            n, k, scales.shape[0], group_size, per_split, kp // CHUNK, split, codes.stride(0),
            HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None, PARTIAL=split > 1,
            MAGIC=magic, IEEE=x.dtype == torch.float32 or x.device.type == "cpu", ASM=asm, SLICE_SHIFT=slice_shift,
            SUM_CHUNKS=sum_chunks, WIN=cfg.window, SILU=silu_mul, BLOCK_N=cfg.block_n,
            EVEN=even, CHUNKS=cfg.chunks, SPLIT_MAJOR=cfg.split_major, BLOCKED=blocked, num_warps=cfg.num_warps,
            CHUNK_STRIDE=chunk_stride(blocked),
            num_stages=cfg.num_stages,
            **({"USE_PDL": True, "launch_pdl": True} if use_pdl else {"USE_PDL": False}), **norm,
            **launch_args(l2, grid[0] * grid[1], cfg.num_warps * 32, x.device),
        )

    _launch_with_asm_fallback(launch, x.is_cuda and magic != 0)
    return out if produced is None else produced

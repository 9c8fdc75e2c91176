"""The 4-bit weight-only GEMV of batch-1 decode (M = 1) on CUDA cores, at a few ALU ops per weight.

It reads the layout `w4a16_gemm.pack_codes` writes (one copy of the weight serves every kernel) as
int32 words: word i of a 128-column chunk is halfwords 2i, 2i + 1, so its nibble p (bits 4p..4p+3)
is column 32 (p % 4) + 2i + p // 4 of the chunk. A thread loads 4 consecutive words (16 bytes, 32
codes) of a row; a program owns BLOCK_N rows and walks its split of K CHUNKS chunks per loop step.

Why CUDA cores and these ops: at M = 1 the products are cheap and the budget is the ALU ops per weight
(132 SMs x 128 lanes: one op per weight costs 3.5 us on gate_up, whose bytes floor is 14.9 us), and a
tensor-core tile also pays for its operand's trip through shared memory. Each code becomes a float32
without a conversion instruction: a nibble at bits 16..19 OR'ed with 0x43000000 *is* the float
128 + c, and one at bits 12..15 OR'ed with 0x45000000 is 2048 + c. Of a word's 8 nibbles two sit in
place and each of the shifts by 8 left, 8 right, 16 left and 16 right brings one of each kind there,
so 8 codes cost 4 shifts and 8 AND+OR (one LOP3 each), then 8 FMAs with the activations. The offsets
and zero points come off once per group, from the activations' sums (exact algebra; the float32
sum of x (2048 + c) loses about 11 of its 24 bits to the offset, ~1e-4 relative, below bf16's 4e-3;
float32 activations take offset 128 for every code, 3 more shifts a word, ~1e-6):

    sum_k x_k (c_k - z) s  =  s (sum_k x_k m_k  -  sum_k off_k x_k  -  z sum_k x_k)      m_k = off_k + c_k

Per-thread partial sums stay elementwise in the loop; one reduction at the end. bf16 / fp16 activations
are read as 32-bit pairs (columns 2i, 2i + 1 of a plane: the two halfwords of a word). Split-K partials
finish in the same launch (`small_m.finish_tile`: an atomic ticket per row tile, the last split sums in
split order and resets it; deterministic, the tickets belong to the weight so CUDA graphs replay them).
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
from .w4a16_gemm import CHUNK, SLICE

MAX_M = 1  # rows this kernel takes (W4Weight sends M <= GEMV_MAX_M here)
MAGIC128 = 0x43000000  # float32 128.0: a nibble at bits 16..19 OR'ed in makes 128 + c
MAGIC2048 = 0x45000000  # float32 2048.0: a nibble at bits 12..15 makes 2048 + c
HI16 = tl.constexpr(-65536)  # 0xFFFF0000 as an int32


@dataclass(frozen=True)
class GemvConfig:
    """One launch's tile: BLOCK_N rows x CHUNKS chunks of 128 columns per loop step."""

    block_n: int = 16
    chunks: int = 4
    num_warps: int = 4
    split_k: int | None = None  # None: from the shape (`gemv_plan`); a number: at most that many splits
    waves: int = 4  # programs per SM the split-K plan aims for (split_k None)
    prefetch: bool = True  # load the next step's words and scales before this step's math (registers)

    def key(self) -> str:
        split = "a" if self.split_k is None else str(self.split_k)
        return f"gemv-n{self.block_n}-c{self.chunks}-w{self.num_warps}-s{split}-p{int(self.prefetch)}"

    @classmethod
    def parse(cls, key: str) -> "GemvConfig":
        """The inverse of `key` (the sweep's JSON and the DEFAULTS table hold keys)."""
        _, n, c, w, s, p = key.split("-")
        return cls(int(n[1:]), int(c[1:]), int(w[1:]), None if s == "sa" else int(s[1:]), prefetch=p == "p1")


# (N, K) -> {1: config key}: the Llama-3.1-8B layers where the GEMV beat the small-M kernel, measured by
# benchmarks/small_m_gemm_sweep.py --kinds gemv on the H200 (2026-12-03 10:57 lead's run of main cb91c46, after the
# scales-in-step / group-shift change; notes/gpuout/w4tc: qkv 7.9 vs 10.2 us, o 7.4 vs 9.0, gate_up 26.7 vs 30.3,
# down 16.6 vs 20.1; engine batch-1 decode on this table 363.0 tok/s). The small_m tables' format
# ($RADIXLM_SMALL_M_TABLE entries override it). W4Weight sends M = 1 here for the listed shapes.
DEFAULTS: Table = {
    (6144, 4096): {1: "gemv-n8-c16-w2-sa-p0"},
    (4096, 4096): {1: "gemv-n16-c4-w4-sa-p0"},
    (28672, 4096): {1: "gemv-n8-c16-w2-sa-p0"},
    (4096, 14336): {1: "gemv-n8-c8-w1-sa-p0"},
}
register_defaults("gemv", DEFAULTS)


def gemv_table_config(n: int, k: int) -> GemvConfig | None:
    """The table's config for this shape (None: not listed, the small-M kernel serves it)."""
    key = table_in_use("gemv").get((n, k), {}).get(1)
    return GemvConfig.parse(key) if key else None


def gemv_default_config(n: int, k: int) -> GemvConfig:
    return gemv_table_config(n, k) or GemvConfig()


def gemv_plan(n: int, kp: int, cfg: GemvConfig, device: torch.device) -> tuple[int, int]:
    """(split_k, chunks per split): about `waves` programs per SM, each split a whole number of loop steps."""
    tiles = triton.cdiv(n, cfg.block_n)
    steps = triton.cdiv(kp // CHUNK, cfg.chunks)
    want = max(1, min(triton.cdiv(cfg.waves * sm_count(device), tiles), steps))
    if cfg.split_k is not None:
        want = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, want)
    return triton.cdiv(steps, per_split), per_split * cfg.chunks


def tickets_for(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K tickets for any tile of at least 8 rows of an N-row weight."""
    return torch.zeros(triton.cdiv(n, 8), dtype=torch.int32, device=device)


@triton.jit
def _codes(w, p: tl.constexpr, magic128, magic2048, PRECISE: tl.constexpr):
    """Nibble p of every int32 word as a float32 off + c: off = 128 (p even, or PRECISE: every nibble
    shifted to bits 16..19) or 2048 (p odd, at bits 12..15). Without PRECISE a word costs 3 shifts: p 1-2
    8 left, p 5-6 8 right, p 0 and 7 a rotation by 16 (p 3-4 in place). The magic numbers come in as
    arguments, in registers, so the AND and the OR are one LOP3 (two immediates do not fit one)."""
    u = w.to(tl.uint32, bitcast=True)
    if PRECISE:
        if p < 4:
            v = u << (16 - 4 * p)
        else:
            v = u >> (4 * p - 16)
        r = (v & 0x000F0000) | magic128
    elif p == 0 or p == 7:
        v = (u << 16) | (u >> 16)
        if p == 0:
            r = (v & 0x000F0000) | magic128
        else:
            r = (v & 0x0000F000) | magic2048
    elif p == 1 or p == 2:
        v = u << 8
        if p == 2:
            r = (v & 0x000F0000) | magic128
        else:
            r = (v & 0x0000F000) | magic2048
    elif p == 5 or p == 6:
        v = u >> 8
        if p == 6:
            r = (v & 0x000F0000) | magic128
        else:
            r = (v & 0x0000F000) | magic2048
    elif p == 4:
        r = (u & 0x000F0000) | magic128
    else:
        r = (u & 0x0000F000) | magic2048
    return r.to(tl.float32, bitcast=True)


@triton.jit
def _x_pair(X, Perm, pidx, mask, K, XMODE: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr):
    """The activations at columns 2 pidx and 2 pidx + 1 as two float32 tensors: XMODE 1 / 2 reads bf16 /
    fp16 pairs as one int32; 0 reads each (any dtype, or through the act-order permutation). EVEN_K:
    K a multiple of 128, no column mask (so the pair loads vectorize)."""
    col = pidx * 2
    if EVEN_K:
        m0 = mask
        m1 = mask
    else:
        m0 = mask & (col < K)
        m1 = mask & (col + 1 < K)
    if XMODE == 0 or HAS_PERM:
        if HAS_PERM:
            k0 = tl.load(Perm + col, mask=m0, other=0)
            k1 = tl.load(Perm + col + 1, mask=m1, other=0)
        else:
            k0 = col
            k1 = col + 1
        lo = tl.load(X + k0, mask=m0, other=0.0).to(tl.float32)
        hi = tl.load(X + k1, mask=m1, other=0.0).to(tl.float32)
    else:
        pair = tl.load(X.to(tl.pointer_type(tl.int32)) + pidx, mask=m0, other=0)
        if XMODE == 1:
            lo = (pair << 16).to(tl.float32, bitcast=True)
            hi = (pair & HI16).to(tl.float32, bitcast=True)
        else:
            lo = pair.to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
            hi = (pair >> 16).to(tl.int16).to(tl.float16, bitcast=True).to(tl.float32)
    return lo, hi


@triton.jit
def _load_words(w_ptrs, c0, rw, n_mask, c_end, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr, CSTRIDE: tl.constexpr):
    """The step's words [BLOCK_N, CHUNKS, 16]: loaded flat (threads spread along the row, each holding 4
    words of several rows, so the activations it reads serve all of them), then viewed per chunk (the
    scales broadcast over a chunk's 16 words; the view moves no data: sm_90 TTGIR has no convert)."""
    w = tl.load(w_ptrs + c0 * CSTRIDE, mask=n_mask[:, None] & (c0 * 16 + rw < c_end * 16)[None, :], other=0)
    return tl.reshape(w, (BLOCK_N, CHUNKS, 16))


@triton.jit
def _group_params(Scales, Zeros, Offsets, cc, rn, n_mask, c_end, N, G, group_size, first_col: tl.constexpr,
                  GROUP_SHIFT: tl.constexpr, HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr):
    """Scale, zero point and offset [BLOCK_N, CHUNKS, 1] (float32) of the group holding column first_col of
    each chunk cc (zero point and offset: the scale in their place when the weight has none). GROUP_SHIFT
    >= 0: a group is 2**GROUP_SHIFT chunks (no integer division in the loop); -1: any group size."""
    if GROUP_SHIFT >= 0:
        g = tl.minimum(cc >> GROUP_SHIFT, G - 1)
    else:
        g = tl.minimum((cc * 128 + first_col) // group_size, G - 1)
    sg = g[None, :] * N + rn[:, None]
    gmask = n_mask[:, None] & (cc < c_end)[None, :]
    s = tl.load(Scales + sg, mask=gmask, other=0.0).to(tl.float32)[:, :, None]
    z = s
    o = s
    if HAS_ZEROS:
        z = tl.load(Zeros + sg, mask=gmask, other=0).to(tl.float32)[:, :, None]
    if HAS_OFFSETS:
        o = tl.load(Offsets + sg, mask=gmask, other=0.0)[:, :, None]
    return s, z, o


@triton.jit
def _plane_dot(a, w, X, Perm, pidx, c_mask, K, q: tl.constexpr, magic128, magic2048, FIRST: tl.constexpr,
               SEPARATE: tl.constexpr, XMODE: tl.constexpr, HAS_PERM: tl.constexpr, EVEN_K: tl.constexpr,
               PRECISE: tl.constexpr):
    """Nibble plane q of the step (codes q and q + 4 of each word: columns 32 q + 2 i and + 1): a + the
    products x m [BLOCK_N, CHUNKS, 16] (one FFMA a code in one chain; FIRST: a starts here, `a` unused),
    and per word the activations' sum and offset-weighted sum (SEPARATE: both; else the second is the
    sum of x (off + 8), the whole symmetric correction)."""
    lo, hi = _x_pair(X, Perm, pidx + 16 * q, c_mask[:, None], K, XMODE, HAS_PERM, EVEN_K)
    if FIRST:
        a = _codes(w, q, magic128, magic2048, PRECISE) * lo[None, :, :]
    else:
        a = a + _codes(w, q, magic128, magic2048, PRECISE) * lo[None, :, :]
    a = a + _codes(w, q + 4, magic128, magic2048, PRECISE) * hi[None, :, :]
    pair = lo + hi
    off = 128.0 if (q % 2 == 0 or PRECISE) else 2048.0
    if SEPARATE:
        xo = pair * off
    else:
        xo = pair * (off + 8.0)
    return a, pair, xo


@triton.jit
def _gemv_kernel(
    X, Words, Scales, Zeros, Offsets, Perm, Out, Part, Tickets,
    N, K, G, group_size, chunks_per_split, n_chunks, split, stride_wn, magic128, magic2048,
    HAS_ZEROS: tl.constexpr, HAS_OFFSETS: tl.constexpr, HAS_PERM: tl.constexpr, PARTIAL: tl.constexpr,
    XMODE: tl.constexpr, PRECISE: tl.constexpr, EVEN_K: tl.constexpr, SLICES_PER_GROUP: tl.constexpr,
    PREFETCH: tl.constexpr, USE_PDL: tl.constexpr, GROUP_SHIFT: tl.constexpr, SILU: tl.constexpr, BLOCK_N: tl.constexpr,
    CHUNKS: tl.constexpr, BLOCKED: tl.constexpr = 0, CSTRIDE: tl.constexpr = 16,  # (w4_blocked.py, in int32 words)
    # kernels/split_norm.py: NORM 1 (a producer) finishes its tiles as `finish_tile_add_norm` (Res, NormW, NewRes;
    # SumSq its tile sums); NORM 2 (a consumer: X is the producer's u) scales its products by rstd from SumSq's n_sum
    Res=None, NormW=None, NewRes=None, SumSq=None, n_sum=0, eps=0.0, NORM: tl.constexpr = 0, BLOCK_T: tl.constexpr = 16,
    # kernels/l2_prefetch.py: PF 1 / 2 hints the next linear's first bytes into L2 before / after the loop
    PfA=None, pf_a=0, piece_a=0, PfB=None, pf_b=0, piece_b=0, pf_first=0, pf_issuers=0, PF: tl.constexpr = 0,
    PF_THREADS: tl.constexpr = 32, PF_LANES: tl.constexpr = 1,
):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = paired_rows(pid_n, N, BLOCK_N, SILU)
    rc = tl.arange(0, CHUNKS)
    ri = tl.arange(0, 16)
    n_mask = rn < N
    c_first = pid_k * chunks_per_split
    c_end = tl.minimum(c_first + chunks_per_split, n_chunks)
    rw = tl.arange(0, CHUNKS * 16)
    if BLOCKED:  # a row's chunks CSTRIDE words apart
        w_ptrs = Words + row_offsets(rn, stride_wn, BLOCKED, 16)[:, None] + ((rw // 16) * CSTRIDE + rw % 16)[None, :]
    else:
        w_ptrs = Words + rn[:, None].to(tl.int64) * stride_wn + rw[None, :]  # [BLOCK_N, CHUNKS * 16]: a row's step
    acc = tl.zeros((BLOCK_N, CHUNKS, 16), dtype=tl.float32)
    ONE_GROUP: tl.constexpr = SLICES_PER_GROUP == 4  # a chunk inside one group: one load of its parameters a step
    if PREFETCH:  # the next step's words are loaded before this step's math
        w_next = _load_words(w_ptrs, c_first, rw, n_mask, c_end, BLOCK_N, CHUNKS, CSTRIDE)
    if PF == 1:  # the next linear's first bytes toward L2 (constants: before the PDL wait too)
        prefetch_next(PfA, pf_a, piece_a, PfB, pf_b, piece_b, pf_first, pf_issuers, PF_THREADS, PF_LANES)
    if USE_PDL:  # launched beside its predecessor: the weights (constants) are in flight, now wait for x
        tl.extra.cuda.gdc_wait()
        if not SILU:  # the gate_up SiLU epilogue's successor is the down projection: it launches after the loop
            tl.extra.cuda.gdc_launch_dependents()
    for c0 in range(c_first, c_end, CHUNKS):
        cc = c0 + rc  # [CHUNKS]
        c_mask = cc < c_end
        if PREFETCH:
            w = w_next
            w_next = _load_words(w_ptrs, c0 + CHUNKS, rw, n_mask, c_end, BLOCK_N, CHUNKS, CSTRIDE)
        else:
            w = _load_words(w_ptrs, c0, rw, n_mask, c_end, BLOCK_N, CHUNKS, CSTRIDE)
        if ONE_GROUP:  # issued here, used after the math (a prefetch a step ahead was converted through
            # shared memory every step: sm_90 SASS)
            s1, z1, o1 = _group_params(Scales, Zeros, Offsets, cc, rn, n_mask, c_end, N, G, group_size, 0,
                                       GROUP_SHIFT, HAS_ZEROS, HAS_OFFSETS)
        pidx = cc[:, None] * 64 + ri[None, :]  # [CHUNKS, 16]: the x pair of nibble 0 of each word (plane 0)
        for jg in tl.static_range(4 // SLICES_PER_GROUP):  # one group per pass (the whole chunk when group >= 128)
            a, xs, xo = _plane_dot(w, w, X, Perm, pidx, c_mask, K, jg * SLICES_PER_GROUP, magic128, magic2048, True,
                                   HAS_ZEROS or HAS_OFFSETS, XMODE, HAS_PERM, EVEN_K, PRECISE)
            for jj in tl.static_range(1, SLICES_PER_GROUP):
                a, xs2, xo2 = _plane_dot(a, w, X, Perm, pidx, c_mask, K, jg * SLICES_PER_GROUP + jj, magic128,
                                         magic2048, False, HAS_ZEROS or HAS_OFFSETS, XMODE, HAS_PERM, EVEN_K, PRECISE)
                xs += xs2
                xo += xo2
            if ONE_GROUP:
                s, z, o = s1, z1, o1
            else:
                s, z, o = _group_params(Scales, Zeros, Offsets, cc, rn, n_mask, c_end, N, G, group_size,
                                        jg * SLICES_PER_GROUP * 32, GROUP_SHIFT, HAS_ZEROS, HAS_OFFSETS)
            if HAS_ZEROS:
                acc += s * (a - (xo[None, :, :] + z * xs[None, :, :]))
            elif HAS_OFFSETS:
                acc += s * (a - (xo + 8.0 * xs)[None, :, :])
            else:  # symmetric: z = 8 for every row, so the correction is per column only
                acc += s * (a - xo[None, :, :])
            if HAS_OFFSETS:
                acc += o * xs[None, :, :]
    y = tl.sum(tl.sum(acc, 2), 1)[:, None]  # [BLOCK_N, 1]
    if PF == 2:  # after this launch's own loads
        prefetch_next(PfA, pf_a, piece_a, PfB, pf_b, piece_b, pf_first, pf_issuers, PF_THREADS, PF_LANES)
    if NORM == 2:
        y = y * rstd_of(SumSq, n_sum, K, eps, BLOCK_T)
    if USE_PDL and SILU:  # (early, its programs would hold the SMs this launch still needs)
        tl.extra.cuda.gdc_launch_dependents()
    rm = tl.arange(0, 1)
    if SILU:
        finish_tile_silu(y, Out, Part, Tickets, rn, pid_n, pid_k, N, split, PARTIAL, BLOCK_N)
    elif NORM == 1:
        finish_tile_add_norm(y, Out, Part, Tickets, rn, n_mask, pid_n, pid_k, N, split, Res, NormW, NewRes, SumSq,
                             PARTIAL)
    else:
        finish_tile(y, Scales, Out, Part, Tickets, rm, rn, rm < 1, n_mask, pid_n, pid_k, 1, N, split, 0, PARTIAL, False)


def w4a16_gemv(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None,
               perm: torch.Tensor | None, k: int, group_size: int, offsets: torch.Tensor | None = None,
               tickets: torch.Tensor | None = None, cfg: GemvConfig | None = None, pdl: bool = False,
               silu_mul: bool = False, add_norm: AddNorm | None = None,
               pending: PendingNorm | None = None, l2: L2Plan | None = None,
               blocked: int = 0) -> torch.Tensor | tuple[PendingNorm, torch.Tensor]:
    """x [1, K] @ W^T -> [1, N] in x's dtype; the arguments as `w4a16_gemm.w4a16_matmul`'s, plus
    `tickets` (`tickets_for(N)`: zero at rest; a fresh zeroed buffer per call when None). `pdl`: launch with
    programmatic dependent launch (sm_90+): the kernel becomes resident while its predecessor runs, loads
    its first weight step (constants: no hazard) and waits for it before reading x or writing anything
    (results bit-identical; the launch and the first weight round trip are hidden). `silu_mul`: the weight is the
    MLP's [gate | up] and the result silu(gate) * up, [1, N / 2] (`small_m.finish_tile_silu`: ops.silu_and_mul's bits).
    `add_norm` / `pending` (kernels/split_norm.py): as the producer it returns (PendingNorm, new residual); as the
    consumer x is `pending.u` and the result the product of the normed row. `l2`: the next linear's bytes to hint
    into L2 (kernels/l2_prefetch.py; results unchanged). `blocked`: the codes are `w4_blocked.block_codes(codes, blocked)`."""
    if pending is not None:
        x = pending.u
    m = x.shape[0]
    n, kp = codes.shape[0], codes.shape[1] * 4
    if m > MAX_M or x.shape[1] != k or kp != triton.cdiv(k, CHUNK) * CHUNK or group_size % SLICE:
        raise ValueError(f"w4a16_gemv: x {tuple(x.shape)} / codes {tuple(codes.shape)} / group {group_size} do not fit")
    if not codes.is_contiguous():
        raise ValueError("w4a16_gemv: the codes must be contiguous (read as int32 words)")
    x = x if x.stride(1) == 1 else x.contiguous()
    cfg = cfg or gemv_default_config(n, k)
    if silu_mul and (n // 2) % (cfg.block_n // 2):
        raise ValueError(f"w4a16_gemv: silu_mul needs N / 2 a multiple of half the row tile ({n}, {cfg.key()})")
    out = torch.empty(m, n // 2 if silu_mul else n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out
    split, per_split = gemv_plan(n, kp, cfg, x.device)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        if tickets is None:
            tickets = tickets_for(n, x.device)
        if tickets.numel() < triton.cdiv(n, cfg.block_n):
            raise ValueError("w4a16_gemv: too few split-K tickets for this tile")
    else:
        part = out
        tickets = tickets if tickets is not None else codes
    # bf16 / fp16 activations as int32 pairs (an even K keeps every pair inside the row and 4-byte aligned)
    # a group of 2**j whole chunks (128, 256, ... columns; per channel: one group) is found by a shift, else a division
    group_chunks = group_size // CHUNK if group_size % CHUNK == 0 else 0
    if scales.shape[0] == 1:
        group_shift = 30
    elif group_chunks and group_chunks & (group_chunks - 1) == 0:
        group_shift = group_chunks.bit_length() - 1
    else:
        group_shift = -1
    xmode = {torch.bfloat16: 1, torch.float16: 2}.get(x.dtype, 0) if k % 2 == 0 and x.data_ptr() % 4 == 0 else 0
    grid = (triton.cdiv(n, cfg.block_n), split)
    if (add_norm is not None and silu_mul) or ((add_norm is not None or pending is not None) and m != 1):
        raise ValueError("w4a16_gemv: a split norm takes one row, and its producer no SiLU epilogue")
    norm, produced = norm_launch_args(x, n, grid[0], add_norm, pending)
    if produced is not None:
        out = produced[0].u
    _gemv_kernel[grid](
        x, codes.view(torch.int32), scales, zeros if zeros is not None else scales,
        offsets if offsets is not None else scales, perm if perm is not None else codes, out, part, tickets,
        n, k, scales.shape[0], group_size, per_split, kp // CHUNK, split, kp // 8, MAGIC128, MAGIC2048,
        HAS_ZEROS=zeros is not None, HAS_OFFSETS=offsets is not None, HAS_PERM=perm is not None, PARTIAL=split > 1,
        XMODE=xmode, PRECISE=x.dtype == torch.float32, EVEN_K=k % CHUNK == 0, PREFETCH=cfg.prefetch,
        GROUP_SHIFT=group_shift, SLICES_PER_GROUP=min(group_size, CHUNK) // SLICE, SILU=silu_mul, BLOCK_N=cfg.block_n,
        CHUNKS=cfg.chunks, BLOCKED=blocked, CSTRIDE=chunk_stride(blocked, 16),
        num_warps=cfg.num_warps, num_stages=1,  # Triton 3.6 does not pipeline these loads: PREFETCH does
        **({"USE_PDL": True, "launch_pdl": True} if pdl and x.is_cuda else {"USE_PDL": False}), **norm,
        **launch_args(l2, grid[0] * grid[1], cfg.num_warps * 32, x.device),
    )
    return out if produced is None else produced

"""Triton SGMV kernels: shrink and expand for every adapter of a batch in one launch each.

Grid: (work item, block of output columns [x K split]). A work item is one block of BLOCK_M rows
of one segment (tokens sorted by adapter, read through `order`); each program finds its item from
the segment lengths (a cumulative sum over the <= --max-loras-per-batch segments), so an
adapter's A / B tile is read once per row block, and no program is launched per unused segment:
the grid is bounded by min(segments, T) + cdiv(T, BLOCK_M) - 1 items, which depends only on the
token count T and the slot count. A CUDA graph captured for a batch size therefore stays valid
whatever adapters its rows use (items past the last one exit at once), and rows of the base
model are in no segment, so no program touches them.

Two launches per projection and no memset: when the rows alone give too few programs (decode),
the shrink splits its reduction over K and each split stores its own partial sum into
y [split, T, n·R]; the expand adds the splits as it loads y. Prefill-sized batches do not split
(y is read once per output tile). No atomics, so the result is the same bit for bit from run to
run, and y needs no zeroing (rows of no segment are never read). Tile sizes are picked from T
alone (`tiles`), so a graph's kernels are fixed by its batch size.
Imported only when triton is (the CPU path is `sgmv.py`).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import triton
import triton.language as tl

from radixlm.kernels.gdc import launch_options
from radixlm.runtime.lora.sgmv import LoRASegments
from radixlm.runtime.lora.smem import SM90_SMEM, device_smem, dot_bytes, loop_bytes

TARGET_PROGRAMS = 264  # ~2 per SM of an H100/H200: below this the shrink splits K
# From this many rows (prefill), the shrink splits K as finely as decode does (too few row blocks
# otherwise: 42 programs over K = 14336 at 1,100 rows), and its partial sums are added once, by one
# small sum on the same stream, so that the expand reads a single y (re-reading every split per
# output tile would cost more than the split saves at these sizes).
REDUCE_MIN_TOKENS = 1024
# From this many rows up to REDUCE_MIN_TOKENS, the split shrink adds its partial sums in the same
# launch (the last split of each tile to finish adds them, in order), so the expand reads one y
# instead of split_k partial sums per output tile (at 64 rows and 8 adapters the expand of
# gate_up re-read ~40 MB of partial sums from L2).
# H200 (lora_step.py, 32 layers, delta path): LoRA per step 0.578 -> 0.431 ms at 1 row, 1.555 -> 0.910 ms at
# 64 rows (8 adapters; the expand took 26.6 us a launch reading 16 partial sums), 2.740 -> 2.222 ms at 256.
INLINE_REDUCE_MIN_TOKENS = 1
# The expand's rank step: larger ranks loop over the rank in steps of this many columns (y and B
# tiles of [rows, 64] and [columns, 64] whatever --max-lora-rank is, so the tiles stay in shared memory)
EXPAND_MAX_BLOCK_R = 64
# (from this many rows, expand column blocks per program), first match: each program loops over that many
# column blocks of its part, loading its row block's rows once, so the grid has that many times fewer
# programs (each a few µs of dependent loads at decode sizes). One block a program unless set here:
# the H200 sweep (lora9, benchmarks/lora_step.py variants engine_stacked_s*) decides.
EXPAND_STEPS: tuple[tuple[int, int], ...] = ()
MIN_BLOCK = 16  # the smallest dot dimension
COUNTERS = 4096  # per counter buffer: (work item, column block) tiles of one shrink launch
_counters: dict[torch.device, torch.Tensor] = {}


def split_counters(device: torch.device) -> torch.Tensor:
    """A zeroed counter buffer for the in-launch sum of split partial sums (each launch leaves it
    zeroed again). One per device by default; a caller whose shrinks may run beside others on
    another stream passes its own."""
    if device not in _counters:
        _counters[device] = torch.zeros(COUNTERS, dtype=torch.int32, device=device)
    return _counters[device]


@dataclass(frozen=True)
class Tiles:
    """One launch's tile sizes, a function of the token count only (CUDA-graph stable)."""

    block_m: int  # rows per work item
    shrink_n: int  # shrink output columns per program (all n·R of small ranks at once)
    block_k: int
    expand_n: int
    split_k: int  # partial sums over K (1: none)
    warps: int | None = None  # launch options (None: Triton's defaults); fewer warps / stages take
    stages: int | None = None  # less of an SM, so a side-stream launch fits beside a GEMM's blocks
    expand_steps: int = 1  # expand column blocks per program, in a loop (its row block's y and rows loaded once)

    def launch_options(self) -> dict:
        return {k: v for k, v in (("num_warps", self.warps), ("num_stages", self.stages)) if v is not None}


def tiles(t: int, k: int, n_rank: int, block_m: int | None = None, expand_n: int | None = None,
          split_k: int | None = None, warps: int | None = None, stages: int | None = None, elt: int = 2,
          smem: int = SM90_SMEM, silu_mul: bool = False, expand_steps: int | None = None) -> Tiles:
    """The tiles for T tokens, a reduction of K and n·R shrink columns, operands of `elt` bytes, on a
    device with `smem` bytes of shared memory a program (overrides: the benchmark's sweep). The
    shrink's K step, then its column block, and the expand's column block halve until each launch
    fits (`smem.py`); on sm_90 the defaults fit at every size in bf16 and float32."""
    # rows per block 32 from 512 rows up, wider expand tiles past 4,096 (the H200 sweep at 8,192
    # rows: bm 32 / 256 columns beat 64 / 128 by 4-14% on qkv, gate_up and down)
    bm = block_m or (16 if t <= 512 else 32)
    shrink_n = min(max(MIN_BLOCK, triton.next_power_of_2(n_rank)), 64)
    block_k = 128
    while shrink_smem(bm, shrink_n, block_k, elt, stages, silu_mul) > smem and max(block_k, shrink_n) > MIN_BLOCK:
        if block_k >= shrink_n:
            block_k //= 2
        else:
            shrink_n //= 2
    if expand_n is None:
        expand_n = 256 if t > 4096 else 128
        while expand_smem(bm, expand_n, elt) > smem and expand_n > MIN_BLOCK:
            expand_n //= 2
    if split_k is None:
        programs = work_items(t, 1, bm) * triton.cdiv(n_rank, shrink_n)
        # below REDUCE_MIN_TOKENS capped so that the partial sums the expand re-reads per output
        # tile stay small next to its tile; from there on they are added once (`sgmv_shrink`)
        cap = 2048 // t if t < REDUCE_MIN_TOKENS else 32
        split_k = max(1, min(32, k // 256, TARGET_PROGRAMS // max(programs, 1), cap))
    if k > 0:  # no split without work (each one writes its partial sum)
        split_k = triton.cdiv(k, triton.cdiv(triton.cdiv(k, split_k), block_k) * block_k)
    steps = expand_steps or next((n for lo, n in EXPAND_STEPS if t >= lo), 1)
    return Tiles(bm, shrink_n, block_k, expand_n, split_k, warps, stages, steps)


def shrink_smem(block_m: int, block_n: int, block_k: int, elt: int, stages: int | None, silu_mul: bool = False) -> int:
    """Upper bound of a shrink launch's shared memory: the pipelined x / A tiles (x twice with `silu_mul`: the
    gate and up tiles) and the y tile."""
    return loop_bytes(block_m * (2 if silu_mul else 1), block_n, block_k, elt, stages) + block_m * block_n * 4


def expand_smem(block_m: int, block_n: int, elt: int) -> int:
    """Upper bound of an expand launch's shared memory: one rank step's y and B tiles (whatever the rank)."""
    return dot_bytes(block_m, block_n, EXPAND_MAX_BLOCK_R, elt)


def expand_loop_smem(block_m: int, block_n: int, elt: int, r_steps: int) -> int:
    """Upper bound of an expand launch looping over column blocks (`Tiles.expand_steps` > 1): Triton pipelines the
    loop, keeping `stages` buffers of each rank step's y and B tiles, plus the output tile re-laid out."""
    return loop_bytes(block_m, block_n, EXPAND_MAX_BLOCK_R, elt, None) * r_steps + block_m * block_n * 4


def expand_block_r(rank: int) -> int:
    return min(max(MIN_BLOCK, triton.next_power_of_2(rank)), EXPAND_MAX_BLOCK_R)


def work_items(t: int, segments: int, block_m: int) -> int:
    """Upper bound of (segment, row block) pairs for T rows in at most `segments` segments."""
    return max(min(segments, t) + triton.cdiv(t, block_m) - 1, 1)


@triton.jit
def _segment(w, len_ptr, start_ptr, slot_ptr, S, BLOCK_M: tl.constexpr, S_POW2: tl.constexpr):
    """Work item w -> (first row of its block within its segment, the segment's length, start and
    slot); slot -1: no work (past the last item, or an unused segment). The segment tensors are
    loaded whole, in one memory round trip (a decode-sized launch waits on its dependent loads)."""
    offs = tl.arange(0, S_POW2)
    in_range = offs < S
    lens = tl.load(len_ptr + offs, mask=in_range, other=0)
    starts = tl.load(start_ptr + offs, mask=in_range, other=0)
    slots = tl.load(slot_ptr + offs, mask=in_range, other=-1)
    blocks = (lens + BLOCK_M - 1) // BLOCK_M
    ends = tl.cumsum(blocks, 0)
    seg = tl.sum((ends <= w).to(tl.int32), 0)
    here = offs == seg
    begin = tl.sum(tl.where(here, ends - blocks, 0), 0)
    length = tl.sum(tl.where(here, lens, 0), 0)
    start = tl.sum(tl.where(here, starts, 0), 0)
    slot = tl.where(seg < S, tl.sum(tl.where(here, slots, 0), 0), -1)
    return (w - begin) * BLOCK_M, length, start, slot


@triton.jit
def _shrink_kernel(x_ptr, a_ptr, y_ptr, order_ptr, start_ptr, len_ptr, slot_ptr, count_ptr,
                   S, K, N, K_PER_SPLIT, SPLIT_K, stride_xm, stride_as, stride_an, stride_ys, stride_ym,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, S_POW2: tl.constexpr,
                   DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr, INLINE_SPLITS: tl.constexpr = 0,
                   SILU_MUL: tl.constexpr = False):
    m0, length, start, slot = _segment(tl.program_id(0), len_ptr, start_ptr, slot_ptr, S, BLOCK_M, S_POW2)
    pid_n = tl.program_id(1) // SPLIT_K
    split = tl.program_id(1) % SPLIT_K
    if slot >= 0:
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < length
        rows = tl.load(order_ptr + start + rm, mask=m_mask, other=0).to(tl.int64)
        rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        n_mask = rn < N
        rk = tl.arange(0, BLOCK_K)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        a_base = a_ptr + slot.to(tl.int64) * stride_as
        k_lo = split * K_PER_SPLIT
        k_hi = tl.minimum(k_lo + K_PER_SPLIT, K)
        for k0 in range(k_lo, k_hi, BLOCK_K):
            k_mask = k0 + rk < k_hi
            x_ptrs = x_ptr + rows[:, None] * stride_xm + (k0 + rk)[None, :]
            xt = tl.load(x_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            if SILU_MUL:  # x is [gate | up] (2K wide): silu(gate) * up, rounded as ops.silu_and_mul rounds it
                up = tl.load(x_ptrs + K, mask=m_mask[:, None] & k_mask[None, :], other=0.0).to(tl.float32)
                gate = xt.to(tl.float32)
                act = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
                xt = (act * up).to(x_ptr.dtype.element_ty)
            at = tl.load(a_base + rn[:, None] * stride_an + (k0 + rk)[None, :],
                         mask=n_mask[:, None] & k_mask[None, :], other=0.0)
            if DOT_FP32:  # the CPU interpreter mis-computes bf16 dots
                xt = xt.to(tl.float32)
                at = at.to(tl.float32)
            acc += tl.dot(xt, tl.trans(at), input_precision=DOT_PRECISION)
        y_ptrs = y_ptr + rows[:, None] * stride_ym + rn[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        tl.store(y_ptrs + split * stride_ys, acc, mask=y_mask)
        if INLINE_SPLITS > 1:
            # the last split of this tile to finish adds all of them (in split order: the same bits
            # whichever finishes last) into split 0's place, so the expand reads one y, not
            # INLINE_SPLITS partial sums per output tile; then resets the tile's counter for the
            # next launch. Every thread's store is done (barrier) before the counter's release.
            tl.debug_barrier()
            counter = count_ptr + tl.program_id(0) * tl.cdiv(N, BLOCK_N) + pid_n
            if tl.atomic_add(counter, 1, sem="acq_rel") == INLINE_SPLITS - 1:
                total = tl.load(y_ptrs, mask=y_mask, other=0.0, cache_modifier=".cg")
                for other in tl.static_range(1, INLINE_SPLITS):
                    total += tl.load(y_ptrs + other * stride_ys, mask=y_mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total, mask=y_mask)
                tl.atomic_xchg(counter, 0, sem="relaxed")


@triton.jit
def _expand_kernel(y_ptr, b_ptr, out_ptr, order_ptr, start_ptr, len_ptr, slot_ptr, off_ptr,
                   S, R, blocks_per_slice, stride_ys, stride_ym, stride_yslot, stride_bs, stride_bn, stride_om,
                   SPLIT_K: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   S_POW2: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                   ACCUMULATE: tl.constexpr = True, R_STEPS: tl.constexpr = 1, USE_PDL: tl.constexpr = False,
                   N_STEPS: tl.constexpr = 1, PDL_PROLOGUE: tl.constexpr = False):
    if USE_PDL and not PDL_PROLOGUE:  # launched beside its predecessor (batch-1 decode): wait for it before
        tl.extra.cuda.gdc_wait()  # touching memory (kernels/gdc.py)
        tl.extra.cuda.gdc_launch_dependents()
    m0, length, start, slot = _segment(tl.program_id(0), len_ptr, start_ptr, slot_ptr, S, BLOCK_M, S_POW2)
    pid_sn = tl.program_id(1)
    piece = pid_sn // blocks_per_slice
    n_lo = tl.load(off_ptr + piece)  # with the segment's loads: the same round trip
    n_hi = tl.load(off_ptr + piece + 1)
    if slot >= 0:
        rm = m0 + tl.arange(0, BLOCK_M)
        m_mask = rm < length
        rows = tl.load(order_ptr + start + rm, mask=m_mask, other=0).to(tl.int64)
        if USE_PDL and PDL_PROLOGUE:
            # the segments, offsets and rows above are inputs no predecessor writes (the step's host copies, the
            # pool): read while the GEMM before this launch drains; y and the output are its, read after the wait
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        n_first = n_lo + (pid_sn % blocks_per_slice) * (BLOCK_N * N_STEPS)
        for n_step in tl.static_range(N_STEPS):  # unrolled: one step is the code without the loop
            rn = n_first + n_step * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = rn < n_hi
            mask = m_mask[:, None] & n_mask[None, :]
            o_ptrs = out_ptr + rows[:, None] * stride_om + rn[None, :]
            if ACCUMULATE:  # issued with the y and B loads (one round trip), not after the dot
                delta = tl.load(o_ptrs, mask=mask, other=0.0).to(tl.float32)
            else:
                delta = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            # ranks above BLOCK_R in R_STEPS steps (unrolled: one step, the same code as no loop, up to 64)
            for r_step in tl.static_range(R_STEPS):
                rr = r_step * BLOCK_R + tl.arange(0, BLOCK_R)
                r_mask = rr < R
                y_ptrs = y_ptr + slot * stride_yslot + rows[:, None] * stride_ym + (piece * R + rr)[None, :]
                y_mask = m_mask[:, None] & r_mask[None, :]
                yt = tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
                # the shrink's partial sums, added in a fixed order; unrolled (SPLIT_K is a constexpr) so
                # that their loads are issued together: one memory round trip at decode, not SPLIT_K
                for split in tl.static_range(1, SPLIT_K):
                    yt += tl.load(y_ptrs + split * stride_ys, mask=y_mask, other=0.0).to(tl.float32)
                bt = tl.load(b_ptr + slot.to(tl.int64) * stride_bs + rn[:, None] * stride_bn + rr[None, :],
                             mask=n_mask[:, None] & r_mask[None, :], other=0.0)
                if DOT_FP32:
                    bt = bt.to(tl.float32)
                else:
                    yt = yt.to(bt.dtype)
                delta = tl.dot(yt, tl.trans(bt), input_precision=DOT_PRECISION) + delta
            tl.store(o_ptrs, delta.to(out_ptr.dtype.element_ty), mask=mask)


def _dot_options(x: torch.Tensor) -> dict:
    """fp32 operands off the GPU (the interpreter's bf16 dot is wrong); exact fp32 dots, not tf32."""
    return {"DOT_FP32": not x.is_cuda, "DOT_PRECISION": "ieee" if x.dtype == torch.float32 or not x.is_cuda else "tf32"}


def shrink_buffer(x: torch.Tensor, a: torch.Tensor, tile: Tiles | None = None, silu_mul: bool = False) -> torch.Tensor:
    """The y buffer `sgmv_shrink` writes for this x and A (allocated by the caller on its own stream
    when the shrink runs on another one)."""
    t = x.shape[0]
    tile = tile or tiles(t, a.shape[2], a.shape[1], elt=x.element_size(), smem=device_smem(x.device), silu_mul=silu_mul)
    return torch.empty(tile.split_k, t, a.shape[1], dtype=torch.float32, device=x.device)


def sgmv_shrink(x: torch.Tensor, a: torch.Tensor, seg: LoRASegments, tile: Tiles | None = None,
                y: torch.Tensor | None = None, counters: torch.Tensor | None = None,
                silu_mul: bool = False) -> torch.Tensor:
    """y [split, T, n·R] float32: partial sums over K whose sum is x·A[slot]ᵀ per segment (rows of
    no segment are left unwritten; `sgmv_expand` adds the splits; from INLINE_REDUCE_MIN_TOKENS
    rows they are added in the launch, from REDUCE_MIN_TOKENS by one sum after it, and the result
    is [1, T, n·R], a view of `y`: use the returned tensor). `a`: [slots, n·R, K] with unit stride
    along K (a view of the pool's packed slot buffer); `y`: from `shrink_buffer` (same tile);
    `counters`: zeroed int32 scratch of the in-launch sum (`split_counters`), one per stream that
    may run a shrink concurrently with another (the call site's own; default: one per device).
    `silu_mul`: x is the MLP's [gate | up] [T, 2K] and the shrink reads silu(gate) * up (the down
    projection's input, as ops.silu_and_mul rounds it) in its loads: no activation tensor needed."""
    t, k = x.shape[0], a.shape[2]
    if x.shape[1] != (2 * k if silu_mul else k):
        raise ValueError(f"x: {x.shape[1]} columns for A's {k}{' (x2: [gate | up])' if silu_mul else ''}")
    n = a.shape[1]
    tile = tile or tiles(t, k, n, elt=x.element_size(), smem=device_smem(x.device), silu_mul=silu_mul)
    k_per_split = triton.cdiv(triton.cdiv(k, tile.split_k), tile.block_k) * tile.block_k
    if y is None:
        y = shrink_buffer(x, a, tile)
    s = seg.slot.numel()
    grid = (work_items(t, s, tile.block_m), triton.cdiv(n, tile.shrink_n) * tile.split_k)
    inline = tile.split_k > 1 and INLINE_REDUCE_MIN_TOKENS <= t < REDUCE_MIN_TOKENS
    if inline:
        counters = split_counters(x.device) if counters is None else counters
        inline = grid[0] * triton.cdiv(n, tile.shrink_n) <= counters.numel()
    _shrink_kernel[grid](x, a, y, seg.order, seg.start, seg.length, seg.slot, counters if inline else y,
                         s, k, n, k_per_split, tile.split_k,
                         x.stride(0), a.stride(0), a.stride(1), y.stride(0), y.stride(1),
                         BLOCK_M=tile.block_m, BLOCK_N=tile.shrink_n, BLOCK_K=tile.block_k,
                         S_POW2=max(triton.next_power_of_2(s), 2), INLINE_SPLITS=tile.split_k if inline else 0,
                         SILU_MUL=silu_mul, **_dot_options(x), **tile.launch_options())
    if inline:
        return y[:1]
    if y.shape[0] > 1 and t >= REDUCE_MIN_TOKENS:
        y[0] += y[1:].sum(0)  # a fixed order: the same bits run to run
        y = y[:1]
    return y


def sgmv_expand(y: torch.Tensor, b: torch.Tensor, slice_offsets: torch.Tensor, widest: int, rank: int,
                out: torch.Tensor, seg: LoRASegments, tile: Tiles | None = None, accumulate: bool = True,
                per_slot: bool = False, pdl: bool = False, pdl_prologue: bool = False) -> None:
    """out[:, slice s] += y[:, s·R:(s+1)·R]·B[slot, slice s]ᵀ per segment, in place (`accumulate`
    False: out[rows of a segment] = the update, other rows untouched).
    `y`: [T, n·R], or the shrink's [split, T, n·R] partial sums; `per_slot`: y is [T, slots·n·R],
    every slot's rank columns side by side (x·Aᵀ of all slots at once: the stacked base GEMM's tail),
    each row reading its own slot's; `slice_offsets`: [n + 1] int32 on the device; `widest`: the
    widest slice (sizes the grid); `tile`: the shrink's (same row blocks); `pdl`: launched with programmatic
    dependent launch (kernels/gdc.py) where the device has it, for a launch right after its producer on one stream;
    `pdl_prologue`: with `pdl`, each program reads its segment and rows before the wait (inputs the producer does
    not write), only y and the output after it."""
    if y.dim() == 2:
        y = y.unsqueeze(0)
    t = y.shape[1]
    n_rank = (slice_offsets.numel() - 1) * rank if per_slot else y.shape[2]
    tile = tile or tiles(t, 0, n_rank, elt=b.element_size(), smem=device_smem(b.device))
    r_steps = triton.cdiv(rank, expand_block_r(rank))
    if tile.expand_steps > 1 and expand_loop_smem(tile.block_m, tile.expand_n, b.element_size(), r_steps) > device_smem(
            b.device):
        tile = replace(tile, expand_steps=1)  # the looped launch would not fit: one column block a program
    blocks = triton.cdiv(widest, tile.expand_n * tile.expand_steps)
    pieces = slice_offsets.numel() - 1
    s = seg.slot.numel()
    grid = (work_items(t, s, tile.block_m), pieces * blocks)
    _expand_kernel[grid](y, b, out, seg.order, seg.start, seg.length, seg.slot, slice_offsets,
                         s, rank, blocks, y.stride(0), y.stride(1), n_rank if per_slot else 0, b.stride(0),
                         b.stride(1), out.stride(0),
                         SPLIT_K=y.shape[0], BLOCK_M=tile.block_m, BLOCK_N=tile.expand_n, BLOCK_R=expand_block_r(rank),
                         S_POW2=max(triton.next_power_of_2(s), 2), ACCUMULATE=accumulate, **_dot_options(b),
                         R_STEPS=r_steps, N_STEPS=tile.expand_steps,
                         PDL_PROLOGUE=pdl_prologue, **tile.launch_options(), **launch_options(pdl, out.device))

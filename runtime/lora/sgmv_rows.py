"""The stacked path's expand by rows: each program reads its rows' own slots and every slot's B.

Under --lora-kernels stacked the base GEMM leaves x·Aᵀ of every slot in its output's tail, and one
expand per projection adds each row's update y[row, its slot's ranks]·B[slot]ᵀ into the output.
The segment expand (`sgmv_triton.sgmv_expand(per_slot=True)`) finds its work item from the segment
lengths, then loads its rows' indices, then y, B and the output: three dependent memory round trips
in each of ~2,500 tiny programs (gate_up, 64 rows of 8 adapters), which is most of its ~5.6 µs a
launch on the H200 at decode sizes (lora5: 128 of them a step, 0.72 ms of a step's 0.84 ms LoRA).

Here the grid is (row block in batch order, column block) and nothing is looked up first: a program
loads its rows' slots (`LoRASegments.row_slot`), every slot's y columns and B tile, and the output
tile in one round trip, and adds Σ_s [slot(row) = s]·y_s·B_sᵀ — `slots` small dots of rank width, the
rows of other slots masked to zero (exact: their terms add 0.0). Each row block reads every slot's B
(the segment kernel reads each used slot's once per 16-row block of its segment): the same bytes at
decode sizes with 8 adapters in the batch, more at a few hundred rows or with few adapters, so the
path is taken up to `projection.ROWS_EXPAND_MAX_TOKENS` rows. Rows of no slot (-1: the base model, or
graph padding) are not stored. Part boundaries come as arguments (no offset loads); a column block
never straddles two parts (the block width divides each part's width, `block_n`).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from radixlm.kernels.gdc import launch_options

MAX_PARTS = 3  # q, k, v
MAX_SLOTS = 8  # every slot's loads are unrolled in each program: compiled and register-checked for sm_90 at 8


# Tiles (the H200 sweep decides: benchmarks/lora_step.py variants engine_stacked_rows_nN_wW). Registers bound how many
# programs an SM holds (sm_90, rank 16, 8 slots; cuobjdump): 128 rows x 32 columns at 4 warps 168 registers a thread,
# 3 programs an SM (gate_up at 75 rows: 896 programs, ~2.3 waves); x 64 at 8 warps 174, one an SM (448, ~3.4 waves).
BLOCK_N = 32  # the widest column block (a smaller one where the parts' widths need it)
WARPS = 4


def block_n(widths: list[int], widest: int | None = None) -> int:
    """The widest power-of-two column block (<= `widest`, default BLOCK_N; >= 16) dividing every part's width; 0 if
    none."""
    n = widest or BLOCK_N
    while n >= 16:
        if all(w % n == 0 for w in widths):
            return n
        n //= 2
    return 0


def block_m(t: int) -> int:
    """Rows per program: the whole batch up to 128 rows (every slot's B read once), 128 above."""
    return min(max(16, triton.next_power_of_2(t)), 128)


def warps(bm: int) -> int:
    """Warps a program (WARPS; a 16- or 32-row block at most 4)."""
    return WARPS if bm >= 64 else min(WARPS, 4)


@triton.jit
def _rows_slots(slot_ptr, rm, m_mask, USE_PDL: tl.constexpr):
    """The rows' slots (-1 past T); with PDL read before the wait (the GEMM before this launch does not write them)."""
    slots = tl.load(slot_ptr + rm, mask=m_mask, other=-1)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    return slots


@triton.jit
def _add_update(acc, y_ptr, b_ptr, rm64, m_mask, slots, rn, part, R, stride_ym, stride_bs, stride_bn,
                Y_SLOT: tl.constexpr, SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
                DOT_PRECISION: tl.constexpr):
    """acc [rows, columns rn] + Σ_s [slot(row) = s]·y[row, s·Y_SLOT + part·R + r]·B[s, rn, r] (float32)."""
    rr = tl.arange(0, BLOCK_R)
    r_mask = rr < R
    n_all = rn >= 0  # (all true: the grid covers the columns exactly)
    for s in tl.static_range(SLOTS):  # unrolled: every slot's loads issued together, one round trip
        y_ptrs = y_ptr + rm64[:, None] * stride_ym + (s * Y_SLOT + part * R + rr)[None, :]
        yt = tl.load(y_ptrs, mask=(m_mask & (slots == s))[:, None] & r_mask[None, :], other=0.0)
        bt = tl.load(b_ptr + s * stride_bs + rn[:, None] * stride_bn + rr[None, :], mask=n_all[:, None] & r_mask[None, :],
                     other=0.0)
        if DOT_FP32:
            yt = yt.to(tl.float32)
            bt = bt.to(tl.float32)
        else:
            yt = yt.to(bt.dtype)
        acc = tl.dot(yt, tl.trans(bt), input_precision=DOT_PRECISION) + acc
    return acc


@triton.jit
def _expand_rows_kernel(y_ptr, b_ptr, out_ptr, slot_ptr, T, R, OFF1, OFF2, stride_ym, stride_bs, stride_bn,
                        stride_om, Y_SLOT: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr,
                        DOT_PRECISION: tl.constexpr, USE_PDL: tl.constexpr = False):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < T
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col0 = tl.program_id(1) * BLOCK_N
    part = (col0 >= OFF1).to(tl.int32) + (col0 >= OFF2).to(tl.int32)  # the block's part (never straddles two)
    rm64 = rm.to(tl.int64)
    slots = _rows_slots(slot_ptr, rm, m_mask, USE_PDL)
    o_ptrs = out_ptr + rm64[:, None] * stride_om + rn[None, :]
    o_mask = (m_mask & (slots >= 0))[:, None] & (rn >= 0)[None, :]
    acc = tl.load(o_ptrs, mask=o_mask, other=0.0).to(tl.float32)
    acc = _add_update(acc, y_ptr, b_ptr, rm64, m_mask, slots, rn, part, R, stride_ym, stride_bs, stride_bn,
                      Y_SLOT, SLOTS, BLOCK_R, DOT_FP32, DOT_PRECISION)
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=o_mask)


@triton.jit
def _expand_rows_silu_kernel(y_ptr, b_ptr, gu_ptr, act_ptr, slot_ptr, T, R, INTER, stride_ym, stride_bs, stride_bn,
                             stride_gm, stride_am, Y_SLOT: tl.constexpr, SLOTS: tl.constexpr, BLOCK_M: tl.constexpr,
                             BLOCK_N: tl.constexpr,
                             BLOCK_R: tl.constexpr, DOT_FP32: tl.constexpr, DOT_PRECISION: tl.constexpr,
                             USE_PDL: tl.constexpr = False):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    m_mask = rm < T
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # gate columns; up's are INTER further
    rm64 = rm.to(tl.int64)
    slots = _rows_slots(slot_ptr, rm, m_mask, USE_PDL)
    g_ptrs = gu_ptr + rm64[:, None] * stride_gm + rn[None, :]
    mask = m_mask[:, None] & (rn >= 0)[None, :]
    gate = tl.load(g_ptrs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(g_ptrs + INTER, mask=mask, other=0.0).to(tl.float32)
    gate = _add_update(gate, y_ptr, b_ptr, rm64, m_mask, slots, rn, 0, R, stride_ym, stride_bs, stride_bn,
                       Y_SLOT, SLOTS, BLOCK_R, DOT_FP32, DOT_PRECISION)
    up = _add_update(up, y_ptr, b_ptr, rm64, m_mask, slots, rn + INTER, 1, R, stride_ym, stride_bs, stride_bn,
                     Y_SLOT, SLOTS, BLOCK_R, DOT_FP32, DOT_PRECISION)
    # rounded as the expand's store rounds [gate | up], then as ops.silu_and_mul does: the same bits as the two kernels
    gate = gate.to(gu_ptr.dtype.element_ty).to(tl.float32)
    up = up.to(gu_ptr.dtype.element_ty).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(gu_ptr.dtype.element_ty).to(tl.float32)
    tl.store(act_ptr + rm64[:, None] * stride_am + rn[None, :], (act * up).to(act_ptr.dtype.element_ty), mask=mask)


def rows_expand_fits(offsets: list[int], rank: int, slots: int = MAX_SLOTS) -> bool:
    """Whether a projection's parts, rank and slots suit this kernel (up to 3 parts, widths a multiple of 16,
    rank <= 64, up to MAX_SLOTS slots)."""
    widths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    return len(widths) <= MAX_PARTS and block_n(widths) > 0 and rank <= 64 and slots <= MAX_SLOTS


def _y_slot(y: torch.Tensor, slots: int, parts: int, rank: int, own_slot: bool) -> int:
    """y's column stride between slots: every slot's n·R side by side (the stacked GEMM's tail), or 0 where y holds
    each row's own slot's ranks only ([T, n·R], the in-line shrink's); ValueError on another width."""
    if y.shape[1] != (1 if own_slot else slots) * parts * rank:
        raise ValueError(f"expand by rows: y {tuple(y.shape)} for {slots} slots x {parts} parts x rank {rank}"
                         f"{' (own slot)' if own_slot else ''}")
    return 0 if own_slot else parts * rank


def _dots(y: torch.Tensor, b: torch.Tensor) -> dict:
    return {"DOT_FP32": not y.is_cuda, "DOT_PRECISION": "ieee" if b.dtype == torch.float32 or not y.is_cuda else "tf32"}


def sgmv_expand_rows(y: torch.Tensor, b: torch.Tensor, offsets: list[int], rank: int, out: torch.Tensor,
                     row_slot: torch.Tensor, pdl: bool = False, own_slot: bool = False) -> None:
    """out[row, part p] += y[row, slot·n·R + p·R : +R]·B[slot, part p]ᵀ for each row whose slot
    (`row_slot`, int32 [>= T], -1: none) is set, in place. `y`: [T, slots·n·R], every slot's x·Aᵀ side by side
    (the stacked GEMM's tail, any row stride), or with `own_slot` [T, n·R], each row's own slot's (the in-line
    shrink's; the column index then has no slot term); `b`: the pool's [slots, out, R]; `offsets`: the parts' host
    offsets (`rows_expand_fits`); `pdl`: launched with programmatic dependent launch where the device has it,
    the rows' slots read before the wait."""
    t = y.shape[0]
    slots, n_out = b.shape[0], offsets[-1]
    parts = len(offsets) - 1
    widths = [hi - lo for lo, hi in zip(offsets, offsets[1:])]
    if not rows_expand_fits(offsets, rank, slots) or out.shape[1] != n_out:
        raise ValueError(f"expand by rows: parts {widths}, rank {rank}, out {tuple(out.shape)}")
    y_slot = _y_slot(y, slots, parts, rank, own_slot)
    bn = block_n(widths)
    bounds = offsets[1:-1] + [n_out] * (MAX_PARTS - parts)  # part p starts at bounds[p - 1]
    bm = block_m(t)
    _expand_rows_kernel[(triton.cdiv(t, bm), n_out // bn)](
        y, b, out, row_slot, t, rank, bounds[0], bounds[1], y.stride(0), b.stride(0), b.stride(1), out.stride(0),
        Y_SLOT=y_slot, SLOTS=slots, BLOCK_M=bm, BLOCK_N=bn, BLOCK_R=max(16, triton.next_power_of_2(rank)),
        **_dots(y, b), num_warps=warps(bm), **launch_options(pdl, out.device))


def silu_mul_fits(offsets: list[int], rank: int, slots: int = MAX_SLOTS) -> bool:
    """Whether a [gate | up] projection suits `sgmv_expand_rows_silu_mul` (two parts of one width)."""
    return len(offsets) == 3 and offsets[2] == 2 * offsets[1] and rows_expand_fits(offsets, rank, slots)


def sgmv_expand_rows_silu_mul(y: torch.Tensor, b: torch.Tensor, offsets: list[int], rank: int, gate_up: torch.Tensor,
                              row_slot: torch.Tensor, pdl: bool = False, own_slot: bool = False) -> torch.Tensor:
    """silu(gate) * up [T, inter] of `gate_up` (the base products, any row stride: the stacked GEMM's head, or the
    plain GEMM's output with `own_slot` y) plus each row's update (`sgmv_expand_rows`), in one launch: the expand's
    read-modify-write of [gate | up] and the separate SiLU-and-mul launch gone. The same bits as `sgmv_expand_rows`
    into gate_up, then ops.silu_and_mul."""
    t, inter = gate_up.shape[0], offsets[1]
    if not silu_mul_fits(offsets, rank, b.shape[0]) or gate_up.shape[1] != offsets[2]:
        raise ValueError(f"expand by rows + SiLU: parts {offsets}, rank {rank}, gate_up {tuple(gate_up.shape)}")
    y_slot = _y_slot(y, b.shape[0], 2, rank, own_slot)
    act = torch.empty(t, inter, dtype=gate_up.dtype, device=gate_up.device)
    bn, bm = block_n([inter]), block_m(t)
    _expand_rows_silu_kernel[(triton.cdiv(t, bm), inter // bn)](
        y, b, gate_up, act, row_slot, t, rank, inter, y.stride(0), b.stride(0), b.stride(1), gate_up.stride(0),
        act.stride(0), Y_SLOT=y_slot, SLOTS=b.shape[0], BLOCK_M=bm, BLOCK_N=bn,
        BLOCK_R=max(16, triton.next_power_of_2(rank)), **_dots(y, b), num_warps=warps(bm),
        **launch_options(pdl, gate_up.device))
    return act


def expand_rows_ref(y: torch.Tensor, b: torch.Tensor, offsets: list[int], rank: int, out: torch.Tensor,
                    row_slot: torch.Tensor) -> None:
    """The torch reference of `sgmv_expand_rows` (float32 products, rounded once into `out`)."""
    parts = len(offsets) - 1
    for row in range(y.shape[0]):
        s = int(row_slot[row])
        if s < 0:
            continue
        for p in range(parts):
            lo, hi = offsets[p], offsets[p + 1]
            ys = y[row, s * parts * rank + p * rank:s * parts * rank + (p + 1) * rank].float()
            out[row, lo:hi] = (out[row, lo:hi].float() + b[s, lo:hi].float() @ ys).to(out.dtype)

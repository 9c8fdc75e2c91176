"""One linear layer's LoRA update: `LoRAProjection`, the path a batch's rows take through the kernels.

The layer calls `begin(x)` before its base GEMM and `finish(pending, out)` after it; which kernels
run in between (side-stream shrink, delta buffer, the stacked GEMM's tail, the expand by rows, or the
torch reference) depends on --lora-kernels and the row count, bounded by the constants below (tests and
benchmarks/lora_step.py set them). The slot buffers it reads are pool.py's (`LoRAPool`).
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, shrink_ref

# --lora-kernels overlap, up to this many rows (decode sizes): a projection with no residual to take its
# update (qkv, gate_up) gets the whole update on the side stream, into a delta buffer, and the main
# stream only adds that after the base GEMM (one elementwise launch on the step's critical path
# instead of the expand). Larger batches expand on the main stream (a [T, out] buffer would cost more
# than the launch saves). H200, 2026-12-03 10:57 (lora_step.py, 32 layers' GEMMs in one graph): LoRA
# 0.433 vs 0.746 ms a step at T = 1, 1.453 vs 2.048 ms at T = 64 (8 adapters) against the expand after
# the GEMM; the side stream without it gained nothing over running the kernels in line.
DELTA_MAX_TOKENS = 256
# --lora-kernels stacked, up to this many rows (decode sizes): the shrink runs inside the base GEMM,
# whose weight has every slot's A stacked under it ([out + slots·n·R, in]); its output's tail is
# x·Aᵀ of every slot, and one expand reads each row's own slot's columns from it. No shrink launch,
# no side stream, ~3-9% more weight bytes (every slot's A). Larger batches (prefill) run shrink and
# expand in line after the plain GEMM over the same A (the stacked tail), where computing x·Aᵀ for
# every slot would cost real FLOPs.
# H200, 2026-12-03 14:47 (lora_step.py, 32 layers, 8 adapters): LoRA per step at 512 rows 2.40 ms stacked against
# 3.80 overlap (engine) and 3.07 serial; at 1,024 rows 4.52 / 5.40 / 4.80 (the every-slot x·Aᵀ columns cost ~2% more
# GEMM FLOPs, less than the shrink launch). Up to 1,024 rows: every decode graph of the default sizes.
STACKED_MAX_TOKENS = 1024
# ... and from this many rows: a batch-1 step took 0.431 ms of LoRA on the overlap path (delta, in-launch
# sum) against 0.558 stacked, while 64 rows took 0.910 against 0.844 and 256 rows 2.222 against 1.516
# (H200, lora_step.py, 2026-12-03 11:55). Between 1 and 64 rows unmeasured: 8 is a guess.
STACKED_MIN_TOKENS = 8
# ... and one row where the layer has an M = 1 GEMV (runtime/dense_gemv.py): the row's product over the stacked weight
# is that GEMV's config (for down_proj with silu(gate) * up in its loads), then the per-slot expand with PDL: no side
# stream, one LoRA launch per projection. The H200 (16:55, main fdfdef2) measured batch-1 decode with an adapter
# +27.6% (4.16 -> 5.30 ms) on the side-stream path beside those GEMVs; ~2.3% more weight bytes here (every slot's A).
STACKED_ONE_ROW = True
# ... and from this many rows (0: never) the per-slot expand after the stacked GEMM launches with PDL (as at one row,
# where --decode-pdl is on), reading its segment and rows before the wait, so they and its launch overlap the GEMM's
# drain. Off until the H200 measures it (lora9: benchmarks/lora_step.py variant engine_stacked_pdl).
STACKED_PDL_MIN_TOKENS = 0
# ... and from 2 rows up to this many (0: never) the expand after the stacked GEMM goes by rows (sgmv_rows.py: one
# memory round trip a program, not three; each row block of <= 128 rows reads every slot's B). With ROWS_SILU_MUL
# gate_up's also computes silu(gate) * up (`forward_silu_mul`: one launch a layer less); with PREFILL_SILU_MUL past the
# stacked range too, from the in-line shrink's y (the expand's read-modify-write of [gate | up], ~0.9 GB a layer at
# 8,192 rows, gone). All three unmeasured, off until the H200 says (RESULTS.md, lora10: lora_step.py's commands).
ROWS_EXPAND_MAX_TOKENS = 0
ROWS_SILU_MUL = False
PREFILL_SILU_MUL = False


class BatchAdapters:
    """The current forward's token -> adapter segments, shared by every LoRA projection
    (None: no row of this batch uses an adapter, the projections add nothing)."""

    segments: LoRASegments | None = None


@dataclass
class PendingLoRA:
    """A projection's LoRA work between `begin` (before the base GEMM) and `finish` (after it)."""

    x: torch.Tensor
    seg: LoRASegments
    y: torch.Tensor | None = None  # the shrink's partial sums, being written on the side stream
    out: torch.Tensor | None = None  # stacked: the base output, computed in `begin` (the layer skips its GEMM)
    into: torch.Tensor | None = None  # stacked: where `finish` adds the update instead of the output
    added: bool = False  # the whole update went into the caller's `into` tensor (finish adds nothing)
    delta: torch.Tensor | None = None  # the whole update [T, out], written on the side stream (finish adds it)


@dataclass
class LoRAProjection:
    """Attached to one linear layer (its `lora`): adds the batch's adapters' updates to its output.

    The layer calls `begin(x)` before its base GEMM and `finish(pending, out)` after it. With
    --lora-kernels overlap (Triton), `begin` launches the shrink on a side stream (it reads only x
    and A), so it runs while the base GEMM does, and only the expand waits for the GEMM: one launch
    on the step's critical path instead of two. A row-parallel layer whose output is next added to
    the residual stream (o_proj, down_proj) passes that residual as `into`: the expand then adds
    the update there, also on the side stream, and the critical path has no LoRA launch at all
    (residual + (out + Δ) becomes (residual + Δ) + out: the same sum). The side stream forks from
    and joins the current one, so CUDA graphs record both branches with those edges; y is
    allocated on the current stream (never freed before the join). Without a side stream (CPU,
    Triton interpreted) the same launches run in order."""

    a: torch.Tensor  # [slots, n·R, in]
    b: torch.Tensor  # [slots, out, R]
    offsets: list[int]  # output column where each part starts, + the total
    rank: int
    batch: BatchAdapters
    use_triton: bool
    kernels: str = "overlap"  # --lora-kernels
    side_stream: torch.cuda.Stream | None = None  # overlap on CUDA
    offsets_dev: torch.Tensor | None = None
    widest: int = 0
    counters: torch.Tensor | None = None  # this projection's own scratch of the shrink's in-launch sum
    stacked: torch.Tensor | None = None  # --lora-kernels stacked: [out + slots·n·R, in], base weight over `a`
    # the stacked weight's M = 1 GEMV (the layer's own config and PDL, `LoRAPool.attach_gemv`): one row's stacked
    # product, [gate | up] -> silu(gate) * up in its loads for down_proj; and whether the expand after it takes PDL
    gemv: Any = None
    pdl: bool = False
    layer: Any = None  # the linear layer this is attached to (`LoRAPool.attach_gemv` reads its GEMV)
    rows_fit: bool = False  # the parts and rank suit the stacked path's expand by rows (sgmv_rows.rows_expand_fits)

    def __post_init__(self) -> None:
        self.offsets_dev = torch.tensor(self.offsets, dtype=torch.int32, device=self.a.device)
        self.widest = max(hi - lo for lo, hi in zip(self.offsets, self.offsets[1:]))
        if self.use_triton:
            from radixlm.runtime.lora.sgmv_rows import rows_expand_fits
            from radixlm.runtime.lora.sgmv_triton import COUNTERS

            self.rows_fit = rows_expand_fits(self.offsets, self.rank, self.b.shape[0])
            self.counters = torch.zeros(COUNTERS, dtype=torch.int32, device=self.a.device)

    @property
    def active(self) -> bool:
        """Whether this forward has adapter rows (else `begin` returns None and the layer runs as without LoRA)."""
        return self.batch.segments is not None

    def reads_silu_mul(self, x: torch.Tensor) -> bool:
        """Whether `begin(x, silu_mul=True)` takes x = [gate | up] and shrinks silu(gate) * up in its loads
        (the side-stream shrink of decode sizes), so the layer's GEMV may take the activation in its own loads
        (batch 1: one SiLU-and-mul launch less on the step's path); or there is no LoRA work this forward."""
        if not self.active:
            return True
        if self._stacked_range(x):
            return self.gemv is not None and x.shape[0] == 1
        return (self.use_triton and self.kernels in ("overlap", "stacked") and x.dim() == 2
                and not self._stacked_range(x) and x.shape[0] <= STACKED_MAX_TOKENS)

    def _stacked_range(self, x: torch.Tensor) -> bool:
        if self.stacked is None or not self.use_triton or x.dim() != 2:
            return False
        if x.shape[0] == 1 and self.gemv is not None and STACKED_ONE_ROW:
            return True
        return STACKED_MIN_TOKENS <= x.shape[0] <= STACKED_MAX_TOKENS

    def _by_rows(self, t: int) -> bool:
        seg = self.batch.segments
        return seg is not None and seg.row_slot is not None and 1 < t <= ROWS_EXPAND_MAX_TOKENS and self.rows_fit

    def forward_silu_mul(self, x: torch.Tensor, product: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """silu(gate) * up of this [gate | up] projection's output with the update, from the launch that adds the
        update (`sgmv_rows.sgmv_expand_rows_silu_mul`), or None (the caller runs the projection, then the activation).
        Decode sizes (`ROWS_SILU_MUL`): after the stacked GEMM, from its tail; past the stacked range
        (`PREFILL_SILU_MUL`): after `product()` (the layer's base GEMM) and the in-line shrink (own-slot y)."""
        seg = self.batch.segments
        if (seg is None or seg.row_slot is None or not self.use_triton or x.dim() != 2 or not self.rows_fit
                or self.stacked is None):  # (stacked weights: plain, unsharded layers only)
            return None
        from radixlm.runtime.lora.sgmv_rows import sgmv_expand_rows_silu_mul, silu_mul_fits

        if not silu_mul_fits(self.offsets, self.rank, self.b.shape[0]):
            return None
        t = x.shape[0]
        if ROWS_SILU_MUL and self._stacked_range(x) and self._by_rows(t):
            pending = self.begin(x)
            assert pending is not None and pending.out is not None
            early = bool(STACKED_PDL_MIN_TOKENS) and t >= STACKED_PDL_MIN_TOKENS > 1
            return sgmv_expand_rows_silu_mul(pending.y, self.b, self.offsets, self.rank, pending.out, seg.row_slot,
                                             pdl=self.pdl and early)
        if PREFILL_SILU_MUL and self.kernels == "stacked" and t > STACKED_MAX_TOKENS:
            from radixlm.runtime.lora.sgmv_triton import sgmv_shrink

            x = x if x.stride(-1) == 1 else x.contiguous()
            out = product()
            y = sgmv_shrink(x, self.a, seg, counters=self.counters)
            return sgmv_expand_rows_silu_mul(y.sum(0) if y.shape[0] > 1 else y[0], self.b, self.offsets, self.rank,
                                             out, seg.row_slot, own_slot=True)
        return None

    def begin(self, x: torch.Tensor, into: torch.Tensor | None = None, silu_mul: bool = False) -> PendingLoRA | None:
        """`into`: a [T, out] tensor the caller adds to this layer's output before anything reads
        either (the residual stream); with overlap the update may go there instead of the output.
        `silu_mul`: x is [gate | up] and the input is silu(gate) * up (only where `reads_silu_mul(x)`)."""
        seg = self.batch.segments
        if seg is None:
            return None
        if silu_mul and not self.reads_silu_mul(x):
            raise ValueError("LoRA: silu_mul input on a path that reads the activation itself")
        if self._stacked_range(x):  # [T, out | every slot's n·R]
            one_row = self.gemv is not None and x.shape[0] == 1
            full = self.gemv(x, None, silu_mul=silu_mul) if one_row else torch.nn.functional.linear(x, self.stacked)
            n = self.offsets[-1]
            into = into.view(-1, into.shape[-1]) if into is not None and into.is_contiguous() else None
            return PendingLoRA(x, seg, y=full[:, n:], out=full[:, :n], into=into)
        x = x.reshape(-1, x.shape[-1])
        if self.use_triton and x.stride(-1) != 1:
            x = x.contiguous()  # rows may be strided, not columns
        pending = PendingLoRA(x, seg)
        if not (self.use_triton and self.kernels in ("overlap", "stacked")) or (
                self.kernels == "stacked" and x.shape[0] > STACKED_MAX_TOKENS):
            # past the stacked range (prefill) shrink and expand run in line after the GEMM: at 512 and 1,024
            # rows the side-stream shrink slowed the GEMM beside it more than it saved (same H200 run)
            return pending
        from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, shrink_buffer

        pending.y = shrink_buffer(x, self.a, silu_mul=silu_mul)  # on the current stream: never freed before the join
        into = into.view(-1, into.shape[-1]) if into is not None and into.is_contiguous() else None
        if into is None and x.shape[0] <= DELTA_MAX_TOKENS:
            pending.delta = torch.empty(x.shape[0], self.offsets[-1], dtype=x.dtype, device=x.device)
        if self.side_stream is not None:
            self.side_stream.wait_stream(torch.cuda.current_stream(x.device))
        with torch.cuda.stream(self.side_stream) if self.side_stream is not None else contextlib.nullcontext():
            pending.y = sgmv_shrink(x, self.a, seg, y=pending.y, counters=self.counters,  # (may come back added)
                                    silu_mul=silu_mul)
            if into is not None:
                sgmv_expand(pending.y, self.b, self.offsets_dev, self.widest, self.rank, into, seg)
                pending.added = True
            elif pending.delta is not None:
                if x.shape[0] > 1:  # rows of the base model (no segment) must add zero; a single row with
                    pending.delta.zero_()  # LoRA work is an adapter's (segments exist): the expand writes all of it
                sgmv_expand(pending.y, self.b, self.offsets_dev, self.widest, self.rank, pending.delta, seg,
                            accumulate=False)
        return pending

    def finish(self, pending: PendingLoRA | None, out: torch.Tensor) -> torch.Tensor:
        if pending is None:
            return out
        x, seg = pending.x, pending.seg
        if not self.use_triton:
            expand_ref(shrink_ref(x, self.a, seg), self.b, self.offsets, self.rank, out, seg)
            return out
        from radixlm.runtime.lora.sgmv_fused import fused_tile_for, sgmv_fused
        from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

        if pending.out is not None:  # stacked: y is every slot's x·Aᵀ, the GEMM output's tail
            target = out if pending.into is None else pending.into
            t = pending.x.shape[0]
            early = bool(STACKED_PDL_MIN_TOKENS) and t >= STACKED_PDL_MIN_TOKENS > 1
            if self._by_rows(t):
                from radixlm.runtime.lora.sgmv_rows import sgmv_expand_rows

                sgmv_expand_rows(pending.y, self.b, self.offsets, self.rank, target, seg.row_slot, pdl=self.pdl and early)
                return out
            sgmv_expand(pending.y, self.b, self.offsets_dev, self.widest, self.rank, target, seg, per_slot=True,
                        pdl=self.pdl and (t == 1 or early), pdl_prologue=early)
        elif pending.y is not None:
            if self.side_stream is not None:
                torch.cuda.current_stream(out.device).wait_stream(self.side_stream)
            if pending.delta is not None:
                out.add_(pending.delta)
            elif not pending.added:
                sgmv_expand(pending.y, self.b, self.offsets_dev, self.widest, self.rank, out, seg)
        elif self.kernels == "fused" and (tile := fused_tile_for(x, self.rank)) is not None:  # decode-sized: one launch
            sgmv_fused(x, self.a, self.b, self.offsets_dev, self.widest, self.rank, out, seg, tile)
        else:
            sgmv_expand(sgmv_shrink(x, self.a, seg, counters=self.counters), self.b, self.offsets_dev, self.widest,
                        self.rank, out, seg)
        return out

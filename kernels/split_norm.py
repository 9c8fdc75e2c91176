"""A decode row's residual add + RMSNorm split across the two M = 1 linears around it (no launch of its own).

    h = x + residual,   rms_norm(h) = h * g * rstd,   rstd = rsqrt(mean(h^2) + eps)

Only rstd needs the whole row; everything else is per element. So the producer (the linear whose output x
is) finishes each of its row tiles with h (the new residual), u = h * g (rounded to the activations' dtype)
and the tile's sum of h^2 (`finish_tile_add_norm`); the consumer (the next linear) takes u as its input,
sums the producers' tile sums in tile order (`rstd_of`: deterministic) and multiplies its products by rstd:
W (u rstd) = rstd (W u), exact algebra. The rounding differs from `ops.fused_add_rms_norm`'s (u is rounded
before the scale, the sum of squares is summed per tile), within the norm's bf16 tolerance. At batch 1 on
4-bit weights that is the two norm launches of a layer (before qkv, after o) gone from the decode graph.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl


@dataclass(frozen=True)
class AddNorm:
    """What a producer linear needs: the residual its output is added to, the norm's weight and eps."""

    residual: torch.Tensor  # [1, N]
    weight: torch.Tensor  # [N]
    eps: float


@dataclass(frozen=True)
class PendingNorm:
    """A producer's result: u = (x + residual) * g, and its tiles' sums of (x + residual)^2; the consumer
    multiplies its product by rsqrt(sum(sumsq) / in_features + eps)."""

    u: torch.Tensor  # [1, K], the activations' dtype
    sumsq: torch.Tensor  # [tiles] float32
    eps: float


def sum_block(tiles: int) -> int:
    """The consumer's load width for `tiles` tile sums (a power of two)."""
    return max(16, triton.next_power_of_2(tiles))


@triton.jit
def rstd_of(SumSq, n_tiles, K, eps, BLOCK_T: tl.constexpr):
    """rsqrt(mean(h^2) + eps) from the producer's tile sums, summed in tile order."""
    t = tl.arange(0, BLOCK_T)
    return tl.rsqrt(tl.sum(tl.load(SumSq + t, mask=t < n_tiles, other=0.0), 0) / K + eps)


@triton.jit
def _add_norm_store(y, Out, rn, n_mask, pid_n, Res, NormW, NewRes, SumSq):
    """y [BLOCK_N, 1] float32 (the tile's finished outputs): h = bf16(bf16(y) + r) to NewRes, bf16(h g) to Out,
    the tile's sum of h^2 to SumSq[pid_n] (rounded as ops.fused_add_rms_norm rounds: the output, then the sum)."""
    dtype = Out.dtype.element_ty
    r = tl.load(Res + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    h = (y.to(dtype).to(tl.float32) + r).to(dtype)
    tl.store(NewRes + rn[:, None], h, mask=n_mask[:, None])
    hf = h.to(tl.float32)
    g = tl.load(NormW + rn, mask=n_mask, other=0.0).to(tl.float32)[:, None]
    tl.store(Out + rn[:, None], (hf * g).to(dtype), mask=n_mask[:, None])
    tl.store(SumSq + pid_n, tl.sum(tl.sum(tl.where(n_mask[:, None], hf * hf, 0.0), 1), 0))


@triton.jit
def finish_tile_add_norm(acc, Out, Part, Tickets, rn, n_mask, pid_n, pid_k, N, split, Res, NormW, NewRes, SumSq,
                         PARTIAL: tl.constexpr):
    """`small_m.finish_tile` at M = 1 (acc [BLOCK_N, 1]) for a producer: the tile's last split (or its only one)
    writes `_add_norm_store`'s three results instead of the plain output."""
    if PARTIAL:
        tl.store(Part + pid_k.to(tl.int64) * N + rn[:, None], acc, mask=n_mask[:, None])
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:
            total = tl.zeros_like(acc)
            for s_ in range(split):
                total += tl.load(Part + s_ * N + rn[:, None], mask=n_mask[:, None], other=0.0, cache_modifier=".cg")
            _add_norm_store(total, Out, rn, n_mask, pid_n, Res, NormW, NewRes, SumSq)
            tl.atomic_xchg(Tickets + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _add_norm_store(acc, Out, rn, n_mask, pid_n, Res, NormW, NewRes, SumSq)


def norm_launch_args(x: torch.Tensor, n: int, tiles: int, add_norm: AddNorm | None, pending: PendingNorm | None,
                     ) -> tuple[dict, tuple[PendingNorm, torch.Tensor] | None]:
    """A kernel launch's split-norm keyword arguments, and (as a producer of `tiles` row tiles over N = n outputs)
    what the launch returns: (PendingNorm whose u is the launch's output buffer, the new residual)."""
    if add_norm is not None and pending is not None:
        raise ValueError("a linear is the producer or the consumer of a split norm, not both")
    if pending is not None:
        return {"SumSq": pending.sumsq, "n_sum": pending.sumsq.numel(), "eps": pending.eps, "NORM": 2,
                "BLOCK_T": sum_block(pending.sumsq.numel())}, None
    if add_norm is None:
        return {}, None
    r = add_norm.residual
    if r.shape != (1, n) or add_norm.weight.shape != (n,) or not r.is_contiguous() or r.dtype != x.dtype:
        raise ValueError(f"add_norm: a contiguous [1, {n}] residual of x's dtype and a [{n}] weight, not "
                         f"{tuple(r.shape)} {r.dtype} / {tuple(add_norm.weight.shape)}")
    u = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(u)
    sumsq = torch.empty(tiles, dtype=torch.float32, device=x.device)
    args = {"Res": r, "NormW": add_norm.weight, "NewRes": new_res, "SumSq": sumsq, "NORM": 1}
    return args, (PendingNorm(u, sumsq, add_norm.eps), new_res)

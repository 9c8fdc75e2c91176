"""Compile the LoRA kernels of eager (prefill-sized) forwards at start-up, not inside the first requests.

Decode graphs compile their kernels when they are captured. A prefill runs eagerly, and its LoRA launches
depend on its size class: the stacked product and one per-slot expand up to `projection.STACKED_MAX_TOKENS` rows,
shrink and expand after the GEMM above it, with row blocks of 16 or 32 and expand tiles of 128 or 256 columns
(`sgmv_triton.tiles`). So the first prefill of each class JIT-compiled a few Triton kernels (~1 s each on the
H200's host) inside a request: on the H200 (17:39) the first workload-(b) run of a fresh LoRA engine, 8 adapters,
took 13.1 s against 9.5 s for the base engine (0.73x) with the same forward steps. Here one scratch forward of
layer 0's projections per class (every layer has the same shapes, so the same kernels) runs at start-up, before
the KV pool is sized. The classes are those of --lora-kernels stacked (the default).
"""
from __future__ import annotations

import torch

from radixlm.runtime.lora import projection
from radixlm.runtime.lora.pool import LoRAPool
from radixlm.runtime.lora.sgmv import LoRASegments


def size_class(t: int, k: int, n_rank: int) -> tuple:
    """What decides an eager LoRA forward's kernels at t rows (after `tiles`' K split, which the kernels take
    as an argument above the in-launch sum's range): the stacked product or not, the row block, the expand tile."""
    from radixlm.runtime.lora.sgmv_triton import tiles

    tile = tiles(t, k, n_rank)
    return (projection.STACKED_MIN_TOKENS <= t <= projection.STACKED_MAX_TOKENS, tile.block_m, tile.expand_n)


def prefill_sizes(k: int, n_rank: int, max_rows: int) -> list[int]:
    """The smallest row count of each size class from STACKED_MIN_TOKENS to `max_rows` (prefill chunks). Each
    class is one run of row counts (its thresholds grow with t), so its end is found by doubling, then bisection."""
    sizes = []
    t = projection.STACKED_MIN_TOKENS
    while t <= max_rows:
        sizes.append(t)
        here = size_class(t, k, n_rank)
        lo, step = t, 1  # lo: in the class; find the last row count that is
        while lo + step <= max_rows and size_class(lo + step, k, n_rank) == here:
            lo, step = lo + step, step * 2
        hi = min(lo + step, max_rows + 1)  # first row count past the class (or past max_rows)
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if size_class(mid, k, n_rank) == here else (lo, mid)
        t = hi
    return sizes


def warm_up_prefill_kernels(pool: LoRAPool, max_rows: int) -> list[int]:
    """Run layer 0's LoRA projections once per size class up to `max_rows` on zero inputs, every row on slot 0
    (Triton only: the torch reference has nothing to compile; the engine calls this on CUDA); the sizes run.
    The batch's segments are left as they were (None between forwards)."""
    first = [p for (layer, _), p in pool.projections.items() if layer == 0]
    if not first or not first[0].use_triton:
        return []
    saved = pool.batch.segments
    ran: set[int] = set()
    try:
        for proj in first:
            k = proj.a.shape[2]
            for t in prefill_sizes(k, proj.a.shape[1], max_rows):
                pool.batch.segments = LoRASegments.build(torch.zeros(t, dtype=torch.int32), pool.slots, pool.device)
                x = torch.zeros(t, k, dtype=pool.dtype, device=pool.device)
                pending = proj.begin(x)
                out = pending.out if pending is not None and pending.out is not None else torch.zeros(
                    t, proj.offsets[-1], dtype=pool.dtype, device=pool.device)
                proj.finish(pending, out)
                ran.add(t)
        if pool.device.type == "cuda":
            torch.cuda.synchronize(pool.device)
    finally:
        pool.batch.segments = saved
    if pool.device.type == "cuda":
        torch.cuda.empty_cache()
    return sorted(ran)

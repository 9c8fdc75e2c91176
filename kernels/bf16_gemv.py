"""The bf16 / fp16 linear at M = 1 (batch-1 decode): y[n] = sum_k x[k] * W[n, k], weights streamed once.

cuBLAS at M = 1 reaches 76% / 64% of the bytes floor on the 8B layer's qkv (6144 x 4096) and o (4096 x 4096)
projections on the H200 (RESULTS.md, issue 22.2): too few weight bytes in flight per SM for 50 / 32 MB, and o
is a split-K GEMV plus a second reduce kernel. Here a program owns BLOCK_N weight rows and a slice of K, reads
[BLOCK_N, BLOCK_K] tiles as 16-byte vectors along the rows, multiplies them by x in float32 on CUDA cores into
a [BLOCK_N, BLOCK_K] accumulator (bf16 x bf16 products are exact in float32) and reduces along K once at the
end. Split-K finishes in the same launch (`small_m.finish_tile`: the last split of a row tile sums the float32
partials in split order): deterministic, no float atomics, one kernel.

Not bit-equal to cuBLAS (another summation order; both sum in float32 and round once to bf16: the same error
against a float64 product, 1.7e-3, and 0.2-0.3% of outputs one bf16 ulp apart), so the model takes it only for
the shapes whose `DEFAULTS` entry names a config measured faster on the H200; "cublas" (or no entry) keeps
torch's product. $RADIXLM_SMALL_M_TABLE (small_m.py) overrides the table for an A/B run.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gdc import launch_options
from .small_m import MIN_BLOCK_N, SmallMConfig, Table, check_tickets, finish_tile, lookup, plan, register_defaults, table_in_use

KIND = "bf16"  # this kernel's entry in the small-M tables (and in the sweep JSON)
CUBLAS = "cublas"  # a table value that keeps torch's (cuBLAS') product for the shape
# "fma": load a tile, then use it; "pf": the next tile is in flight while the current one is used, the first one
# loaded before the PDL wait; "fe": fma's loop (Triton pipelines its loads through shared memory, no second register
# tile) with the first tile loaded before the PDL wait, as "pf" (the same sums in the same order: all three kinds
# give the same bits)
KINDS = ("fma", "pf", "fe")

# (N, K) -> {1: config key or "cublas"}: M = 1 only, the Llama-3.1-8B shapes measured on the H200 by
# benchmarks/decode_lean.py (RESULTS.md, 2026-12-03 14:47, weights cold, µs per call, floor at 4.21 TB/s): qkv 14.47
# vs cuBLAS 15.48 (floor 11.96; the "pf" configs 15.8-17.0), o 11.29 vs 12.71 (floor 7.97), gate_up 56.54 vs 57.90
# (floor 55.82), down with SiLU-and-mul in its loads 31.50 vs the activation kernel + cuBLAS 32.93 (floor 27.91).
# Batch-1 decode (a) with this table 233.1 tok/s, with --decode-pdl on 236.3, main's (qkv / o only) 227.7.
DEFAULTS: Table = {
    (6144, 4096): {1: "fma-n8-k512-s1-w4-st3"},
    (4096, 4096): {1: "pf-n4-k512-s1-w2-st1"},
    (28672, 4096): {1: "fma-n16-k256-s1-w4-st3"},
    (4096, 14336): {1: "pf-n8-k512-s1-w4-st1"},
}
register_defaults(KIND, DEFAULTS)


def config_for(n: int, k: int) -> SmallMConfig | None:
    """The measured config of an [N, K] weight at M = 1, or None: cuBLAS (no entry, or the entry says so)."""
    entry = table_in_use(KIND).get((n, k), {}).get(1)
    if entry is None or entry == CUBLAS:
        return None
    return lookup({(n, k): {1: entry}}, 1, n, k)


def gemv_tickets(n: int, cfg: SmallMConfig, device: torch.device) -> torch.Tensor:
    """Zeroed split-K tickets for an N-row weight under `cfg` (one per row tile; row tiles may be narrower than
    small_m.MIN_BLOCK_N here, e.g. 4 rows)."""
    return torch.zeros(triton.cdiv(n, min(cfg.block_n, MIN_BLOCK_N)), dtype=torch.int32, device=device)


@triton.jit
def _load_x(X, cols, mask, MASKED: tl.constexpr):
    if MASKED:
        return tl.load(X + cols, mask=mask, other=0.0).to(tl.float32)
    return tl.load(X + cols).to(tl.float32)  # no mask: 16-byte vector loads


@triton.jit
def _activation(X, R, NW, rstd, cols, K, mask, MASKED: tl.constexpr, ACT: tl.constexpr, HAS_RES: tl.constexpr):
    """x[cols] as float32. ACT 1 (SiLU-and-mul): X = [gate | up] (2K wide) and x = silu(gate) * up, rounded as
    kernels/ops.py's SiLU-and-mul kernel rounds it (silu to X's dtype, then the product), so the bits are its.
    ACT 2 (RMSNorm): x = rms_norm(X [+ R]) with the row's `rstd`, rounded as ops.py's norm kernel rounds it (the sum
    to X's dtype first, then x * rstd * weight)."""
    if ACT == 1:
        gate = _load_x(X, cols, mask, MASKED)
        up = _load_x(X + K, cols, mask, MASKED)
        act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
        return (act * up).to(X.dtype.element_ty).to(tl.float32)
    if ACT == 2:
        xv = _load_x(X, cols, mask, MASKED)
        if HAS_RES:
            xv = (xv + _load_x(R, cols, mask, MASKED)).to(X.dtype.element_ty).to(tl.float32)
        return (xv * rstd * _load_x(NW, cols, mask, MASKED)).to(X.dtype.element_ty).to(tl.float32)
    return _load_x(X, cols, mask, MASKED)


@triton.jit
def _row_rstd(X, R, NewRes, K, eps, first, ACT: tl.constexpr, HAS_RES: tl.constexpr, BLOCK_FULL: tl.constexpr):
    """ACT 2: 1 / rms of the whole row X [+ R] (every program reads it from L2: 8 KB at the 8B shapes); the `first`
    program also writes the rounded sum X + R, the residual stream's next value."""
    if ACT == 2:
        full = tl.arange(0, BLOCK_FULL)
        fmask = full < K
        xs = tl.load(X + full, mask=fmask, other=0.0)
        if HAS_RES:
            xs = (xs.to(tl.float32) + tl.load(R + full, mask=fmask, other=0.0).to(tl.float32)).to(X.dtype.element_ty)
            if first:
                tl.store(NewRes + full, xs, mask=fmask)
        xf = xs.to(tl.float32)
        return tl.rsqrt(tl.sum(xf * xf, 0) / K + eps)
    return 1.0


@triton.jit
def _load_w(tile, k0, k_end, cols, n_mask, EVEN_K: tl.constexpr, EVICT: tl.constexpr):
    """The [BLOCK_N, BLOCK_K] weight tile at column k0 (16-byte vectors along the rows when EVEN_K)."""
    if EVEN_K:
        mask = n_mask[:, None]
    else:
        mask = n_mask[:, None] & ((k0 + cols) < k_end)[None, :]
    if EVICT:  # streamed once: leave L2 to the activations, the KV and the next kernel's data
        return tl.load(tile + k0, mask=mask, other=0.0, eviction_policy="evict_first")
    return tl.load(tile + k0, mask=mask, other=0.0)


@triton.jit
def _bf16_gemv_kernel(X, W, Out, Part, Tickets, R, NW, NewRes, eps, N, K, k_per_split, split, stride_wn,
                      EVEN_K: tl.constexpr, MASKED_K: tl.constexpr, PARTIAL: tl.constexpr, ACT: tl.constexpr,
                      HAS_RES: tl.constexpr, USE_PDL: tl.constexpr, PREFETCH: tl.constexpr, EARLY: tl.constexpr,
                      BLOCK_N: tl.constexpr,
                      BLOCK_K: tl.constexpr, BLOCK_FULL: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    cols = tl.arange(0, BLOCK_K)
    tile = W + rn[:, None].to(tl.int64) * stride_wn + cols[None, :]
    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    if PREFETCH:
        # kind "pf": the next tile is loaded before the current one is used (twice the bytes in flight), and the
        # first one before the PDL wait: weights are constants, so they may stream while the predecessor still runs.
        w = _load_w(tile, k_start, k_end, cols, n_mask, EVEN_K, True)
        if USE_PDL:
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rstd = _row_rstd(X, R, NewRes, K, eps, (pid_n == 0) & (pid_k == 0), ACT, HAS_RES, BLOCK_FULL)
        k_last = k_start
        for k0 in range(k_start + BLOCK_K, k_end, BLOCK_K):
            w_next = _load_w(tile, k0, k_end, cols, n_mask, EVEN_K, True)
            xk = _activation(X, R, NW, rstd, k0 - BLOCK_K + cols, K, (k0 - BLOCK_K + cols) < k_end, MASKED_K, ACT,
                             HAS_RES)
            acc += w.to(tl.float32) * xk[None, :]
            w = w_next
            k_last = k0
        xk = _activation(X, R, NW, rstd, k_last + cols, K, (k_last + cols) < k_end, MASKED_K, ACT, HAS_RES)
        acc += w.to(tl.float32) * xk[None, :]
    else:
        k_loop = k_start
        if EARLY:  # kind "fe": the first tile streams while the predecessor still runs (weights are constants)
            w0 = _load_w(tile, k_start, k_end, cols, n_mask, EVEN_K, False)
        if USE_PDL:  # launched beside its predecessor: wait for it before touching its outputs (kernels/gdc.py)
            tl.extra.cuda.gdc_wait()
            tl.extra.cuda.gdc_launch_dependents()
        rstd = _row_rstd(X, R, NewRes, K, eps, (pid_n == 0) & (pid_k == 0), ACT, HAS_RES, BLOCK_FULL)
        if EARLY:
            xk = _activation(X, R, NW, rstd, k_start + cols, K, (k_start + cols) < k_end, MASKED_K, ACT, HAS_RES)
            acc += w0.to(tl.float32) * xk[None, :]
            k_loop = k_start + BLOCK_K
        for k0 in range(k_loop, k_end, BLOCK_K):
            w = _load_w(tile, k0, k_end, cols, n_mask, EVEN_K, False)
            xk = _activation(X, R, NW, rstd, k0 + cols, K, (k0 + cols) < k_end, MASKED_K, ACT, HAS_RES)
            acc += w.to(tl.float32) * xk[None, :]
    one = tl.arange(0, 1)  # the single activation row, as finish_tile's [BLOCK_N, BLOCK_M] tile
    finish_tile(tl.sum(acc, 1)[:, None], Out, Out, Part, Tickets, one, rn, one < 1, n_mask, pid_n, pid_k, 1, N,
                split, N, PARTIAL, False)


def bf16_gemv(x: torch.Tensor, weight: torch.Tensor, cfg: SmallMConfig, tickets: torch.Tensor | None = None,
              bias: torch.Tensor | None = None, pdl: bool = False, silu_mul: bool = False) -> torch.Tensor:
    """x [1, K] @ weight [N, K]^T (+ bias) -> [1, N] in x's dtype, by `cfg` (kinds "fma" / "pf" / "fe"; split-K by its
    split count). `tickets`: the weight's `gemv_tickets(N, cfg)` (zero at rest; a fresh buffer when None).
    `silu_mul`: x is [gate | up], [1, 2K], and the product is of silu(gate) * up (the MLP's down projection
    with its activation computed in the loads: the bits of ops.silu_and_mul, then this GEMV)."""
    x_cols = (x.shape[-1] // 2 if x.shape[-1] % 2 == 0 else -1) if silu_mul else x.shape[-1]
    out, _ = _launch(x, x_cols, weight, cfg, tickets, pdl, 1 if silu_mul else 0)
    return out if bias is None else out + bias


def bf16_gemv_add_norm(x: torch.Tensor, residual: torch.Tensor | None, norm_weight: torch.Tensor, eps: float,
                       weight: torch.Tensor, cfg: SmallMConfig, tickets: torch.Tensor | None = None,
                       pdl: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(rms_norm(x [+ residual]) @ weight^T, x + residual) in one launch: the decoder's add + RMSNorm before qkv /
    gate_up taken into the GEMV's loads (every program computes the row's rstd; the first one writes the new
    residual). The normalized row is rounded as ops.fused_add_rms_norm rounds it; its rstd may differ from that
    kernel's in the last bit (another reduction tree), so a few normalized values may sit one ulp apart."""
    if norm_weight.shape != (x.shape[-1],) or norm_weight.dtype != x.dtype or norm_weight.stride(0) != 1:
        raise ValueError(f"bf16_gemv_add_norm: norm weight {tuple(norm_weight.shape)} does not fit x {tuple(x.shape)}")
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype):
        raise ValueError(f"bf16_gemv_add_norm: residual {tuple(residual.shape)} does not fit x {tuple(x.shape)}")
    return _launch(x, x.shape[-1], weight, cfg, tickets, pdl, 2, residual, norm_weight, eps)


def _launch(x: torch.Tensor, x_cols: int, weight: torch.Tensor, cfg: SmallMConfig, tickets: torch.Tensor | None,
            pdl: bool, act: int, residual: torch.Tensor | None = None, norm_weight: torch.Tensor | None = None,
            eps: float = 0.0) -> tuple[torch.Tensor, torch.Tensor | None]:
    n, k = weight.shape
    if x.dim() != 2 or x.shape[0] != 1 or x_cols != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"bf16_gemv: x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} {weight.dtype}")
    if x.dtype not in (torch.bfloat16, torch.float16) or cfg.kind not in KINDS:
        raise ValueError(f"bf16_gemv: takes bf16 / fp16 and {' / '.join(KINDS)} configs, not {x.dtype} / {cfg.kind!r}")
    x = x.contiguous()
    out = torch.empty(1, n, dtype=x.dtype, device=x.device)
    new_res = torch.empty_like(x) if residual is not None else None
    split, k_per_split = plan(k, cfg)
    if split > 1:
        part = torch.empty(split, 1, n, dtype=torch.float32, device=x.device)
        tickets = check_tickets(gemv_tickets(n, cfg, x.device) if tickets is None else tickets, n, cfg, x.device)
    else:
        part, tickets = out, out  # unused
    _bf16_gemv_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, weight, out, part, tickets, x if residual is None else residual.contiguous(),
        x if norm_weight is None else norm_weight, x if new_res is None else new_res, eps,
        n, k, k_per_split, split, weight.stride(0),
        EVEN_K=k % cfg.block_k == 0, MASKED_K=k % cfg.block_k != 0, PARTIAL=split > 1, ACT=act,
        HAS_RES=residual is not None, PREFETCH=cfg.kind == "pf", EARLY=cfg.kind == "fe", BLOCK_N=cfg.block_n,
        BLOCK_K=cfg.block_k,
        BLOCK_FULL=triton.next_power_of_2(k) if act == 2 else 16,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages, **launch_options(pdl, x.device),
    )
    return out, new_res

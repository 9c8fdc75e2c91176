"""The bf16 / fp16 linear at 2..16 rows (a speculative verify step at batch 1: the decode row and its drafts):
y[m, n] = sum_k x[m, k] * W[n, k], every weight tile read once for all rows.

At M = 1 decode takes the CUDA-core GEMV (bf16_gemv.py); a verify step's 2-9 rows fell back to cuBLAS, which at
these M reads the weight at well below the bytes floor, so a batch-1 verify step cost ~1.1x a decode step's
forward before any host work (RESULTS.md, issue 18). Here, as in fp8_small_m.py's "dot" family, a program owns
BLOCK_N weight rows and walks K in BLOCK_K steps: the [BLOCK_N, BLOCK_K] weight tile is the MMA's row operand and
the activations [16, BLOCK_K] (M padded to 16) its column operand; the MMA's waste at M < 16 costs nothing while
the weight loads are the bottleneck. Split-K finishes in the same launch (`small_m.finish_tile`: deterministic,
no float atomics; the tickets belong to the weight, so CUDA graphs replay them).

Kinds: "dot" enters the PDL wait first; "de" loads its first weight tile before the wait (weights are constants:
they may stream while the predecessor still runs), then the same sums in the same order (the same bits).
"fma" / "fe" (CUDA cores, up to FMA_MAX_M = 4 rows): each row's products in its own [BLOCK_N, BLOCK_K] float32
accumulator, summed along K at the end: the M = 1 GEMV's loop (bf16_gemv.py) once per row over one weight load, so
under the same config every row gets the bits the GEMV gives it alone (a verify row's linears compute what a
decode step's compute; attention and the LM head are other kernels).
`silu_mul`: x is the MLP's [gate | up] and each x tile is silu(gate) * up computed in the loads, rounded as
ops.silu_and_mul rounds it (the down projection without the activation kernel's launch and round trip).

The model takes it for the shapes and row counts whose `DEFAULTS` entry names a config measured faster than cuBLAS
on the H200 (benchmarks/small_m_gemm_sweep.py --kinds bf16m); "cublas" (or no entry) keeps torch's product;
$RADIXLM_SMALL_M_TABLE overrides the table (small_m.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .gdc import launch_options
from .small_m import MAX_M, SmallMConfig, Table, check_tickets, finish_tile, plan, register_defaults, table_in_use

KIND = "bf16m"  # this kernel's entry in the small-M tables (and in the sweep JSON)
CUBLAS = "cublas"
KINDS = ("dot", "de", "fma", "fe")
FMA_KINDS = ("fma", "fe")
FMA_MAX_M = 4  # rows the CUDA-core family takes (one [BLOCK_N, BLOCK_K] float32 accumulator a row)
MIN_M = 2  # one row is the M = 1 GEMV's (bf16_gemv.py)

# (N, K) -> {largest M covered: config key or "cublas"}: the Llama-3.1-8B shapes, measured on the H200 by
# benchmarks/small_m_gemm_sweep.py --kinds bf16m --ms 2,4,8 (2026-12-04 16:53 mid-session round, RESULTS.md; us per
# call, weights cold, cuBLAS -> this kernel without PDL): M = 2: qkv 16.6 -> 15.5, o 13.0 -> 11.8, gate_up 62.3 ->
# 59.9, down 31.2 -> 30.7 (the four 123.0 -> 117.9, 115.9 with PDL; the M = 1 GEMV's 113.8); M = 4 / 8: qkv, o, down
# 2-10% faster, gate_up cuBLAS (56.4 / 56.8, at the bytes floor). Rows 9..16: cuBLAS (not measured). The LM head
# (128256 x 4096, an untied head: a verify step's logits), final round 17:31: M = 2 / 4 / 8 cuBLAS 248.6 / 249.1 /
# 251.3 -> 236.5 / 237.9 / 240.6 us.
DEFAULTS: Table = {
    (128256, 4096): {2: "dot-n32-k256-s1-w2-st4", 4: "dot-n32-k256-s1-w2-st4", 8: "dot-n32-k256-s1-w2-st4"},
    (6144, 4096): {2: "dot-n32-k256-s1-w2-st4", 4: "dot-n32-k256-s1-w2-st4", 8: "dot-n32-k256-s1-w2-st4"},
    (4096, 4096): {2: "dot-n64-k128-s4-w4-st4", 4: "dot-n64-k256-s2-w4-st3", 8: "dot-n64-k256-s2-w4-st3"},
    (28672, 4096): {2: "dot-n32-k256-s1-w2-st4", 4: CUBLAS, 8: CUBLAS},
    (4096, 14336): {2: "dot-n64-k128-s4-w4-st4", 4: "dot-n64-k128-s4-w4-st4", 8: "dot-n64-k128-s4-w4-st4"},
}
register_defaults(KIND, DEFAULTS)


def config_for(m: int, n: int, k: int) -> SmallMConfig | None:
    """The measured config of an [N, K] weight at M rows, or None: cuBLAS (no entry, "cublas", or M outside 2..16)."""
    if not MIN_M <= m <= MAX_M:
        return None
    by_m = table_in_use(KIND).get((n, k), {})
    fits = [bound for bound in by_m if bound >= m]
    key = by_m[min(fits)] if fits else CUBLAS
    return None if key == CUBLAS else SmallMConfig.parse(key)


@triton.jit
def _x_tile(X, rm, cols, m_mask, k_mask, stride_xm, K, SILU: tl.constexpr, IEEE: tl.constexpr):
    """The activations' [BLOCK_M, BLOCK_K] tile at columns `cols`; SILU: silu(gate) * up of X = [gate | up] (2K
    wide), rounded to X's dtype as ops.silu_and_mul rounds it (silu first, then the product). IEEE: as float32."""
    ptrs = X + rm[:, None].to(tl.int64) * stride_xm + cols[None, :]
    mask = m_mask[:, None] & k_mask[None, :]
    x = tl.load(ptrs, mask=mask, other=0.0)
    if SILU:
        gate = x.to(tl.float32)
        up = tl.load(ptrs + K, mask=mask, other=0.0).to(tl.float32)
        act = (gate / (1.0 + tl.exp(-gate))).to(X.dtype.element_ty).to(tl.float32)
        x = (act * up).to(X.dtype.element_ty)
    if IEEE:
        return x.to(tl.float32)
    return x


@triton.jit
def _w_tile(W, rn, cols, n_mask, k_mask, stride_wn, EVEN_K: tl.constexpr, IEEE: tl.constexpr):
    ptrs = W + rn[:, None].to(tl.int64) * stride_wn + cols[None, :]
    if EVEN_K:  # no mask along K: 16-byte vector loads
        w = tl.load(ptrs, mask=n_mask[:, None], other=0.0)
    else:
        w = tl.load(ptrs, mask=n_mask[:, None] & k_mask[None, :], other=0.0)
    if IEEE:
        return w.to(tl.float32)
    return w


@triton.jit
def _mma(acc, w, x, IEEE: tl.constexpr):
    if IEEE:  # the CPU interpreter (its bf16 dot is wrong): exact float32 products
        return acc + tl.dot(w, tl.trans(x), input_precision="ieee")
    return acc + tl.dot(w, tl.trans(x))


@triton.jit
def _dot_rows(X, W, rm, rn, m_mask, n_mask, k_start, k_end, K, stride_xm, stride_wn, SILU: tl.constexpr,
              IEEE: tl.constexpr, EVEN_K: tl.constexpr, EARLY: tl.constexpr, USE_PDL: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kinds "dot" / "de" (tensor cores): the [BLOCK_N, BLOCK_M] float32 sums of this split's columns."""
    rk = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_N, BLOCK_M), dtype=tl.float32)
    k_loop = k_start
    if EARLY:  # kind "de": the first weight tile streams while the predecessor still runs
        w0 = _w_tile(W, rn, k_start + rk, n_mask, (k_start + rk) < k_end, stride_wn, EVEN_K, IEEE)
    if USE_PDL:  # launched beside its predecessor: wait for it before touching its outputs (kernels/gdc.py)
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if EARLY:
        x0 = _x_tile(X, rm, k_start + rk, m_mask, (k_start + rk) < k_end, stride_xm, K, SILU, IEEE)
        acc = _mma(acc, w0, x0, IEEE)
        k_loop = k_start + BLOCK_K
    for k0 in range(k_loop, k_end, BLOCK_K):
        cols = k0 + rk
        k_mask = cols < k_end
        w = _w_tile(W, rn, cols, n_mask, k_mask, stride_wn, EVEN_K, IEEE)
        x = _x_tile(X, rm, cols, m_mask, k_mask, stride_xm, K, SILU, IEEE)
        acc = _mma(acc, w, x, IEEE)
    return acc


@triton.jit
def _x_row(X, row, cols, k_mask, stride_xm, K, SILU: tl.constexpr, MASKED: tl.constexpr):
    """Activation row `row` at `cols` as float32, as the M = 1 GEMV reads it (bf16_gemv._activation: SiLU-and-mul
    rounded as ops.silu_and_mul rounds it)."""
    ptrs = X + row * stride_xm + cols
    if MASKED:
        x = tl.load(ptrs, mask=k_mask, other=0.0).to(tl.float32)
    else:
        x = tl.load(ptrs).to(tl.float32)
    if SILU:
        if MASKED:
            up = tl.load(ptrs + K, mask=k_mask, other=0.0).to(tl.float32)
        else:
            up = tl.load(ptrs + K).to(tl.float32)
        act = (x / (1.0 + tl.exp(-x))).to(X.dtype.element_ty).to(tl.float32)
        x = (act * up).to(X.dtype.element_ty).to(tl.float32)
    return x


@triton.jit
def _fma_step(acc0, acc1, acc2, acc3, w, X, cols, k_mask, stride_xm, K, SILU: tl.constexpr, MASKED: tl.constexpr,
              ROWS: tl.constexpr):
    """One weight tile (float32) times each of the ROWS activation rows, into that row's accumulator."""
    acc0 += w * _x_row(X, 0, cols, k_mask, stride_xm, K, SILU, MASKED)[None, :]
    if ROWS > 1:
        acc1 += w * _x_row(X, 1, cols, k_mask, stride_xm, K, SILU, MASKED)[None, :]
    if ROWS > 2:
        acc2 += w * _x_row(X, 2, cols, k_mask, stride_xm, K, SILU, MASKED)[None, :]
    if ROWS > 3:
        acc3 += w * _x_row(X, 3, cols, k_mask, stride_xm, K, SILU, MASKED)[None, :]
    return acc0, acc1, acc2, acc3


@triton.jit
def _fma_rows(X, W, rm, rn, n_mask, k_start, k_end, K, stride_xm, stride_wn, SILU: tl.constexpr,
              EVEN_K: tl.constexpr, EARLY: tl.constexpr, USE_PDL: tl.constexpr, ROWS: tl.constexpr,
              BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """Kinds "fma" / "fe" (M <= 4, CUDA cores): each row's products in its own [BLOCK_N, BLOCK_K] float32
    accumulator, summed along K once at the end: per row the M = 1 GEMV's loop (bf16_gemv.py, same config), so
    each row's output is the bits the GEMV gives that row alone (a verify row computes what decode computes)."""
    cols = tl.arange(0, BLOCK_K)
    acc0 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc1 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc2 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    acc3 = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)
    k_loop = k_start
    if EARLY:  # kind "fe": the first weight tile streams while the predecessor still runs
        w0 = _w_tile(W, rn, k_start + cols, n_mask, (k_start + cols) < k_end, stride_wn, EVEN_K, False)
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
    if EARLY:
        acc0, acc1, acc2, acc3 = _fma_step(acc0, acc1, acc2, acc3, w0.to(tl.float32), X, k_start + cols,
                                           (k_start + cols) < k_end, stride_xm, K, SILU, not EVEN_K, ROWS)
        k_loop = k_start + BLOCK_K
    for k0 in range(k_loop, k_end, BLOCK_K):
        k_mask = (k0 + cols) < k_end
        w = _w_tile(W, rn, k0 + cols, n_mask, k_mask, stride_wn, EVEN_K, False).to(tl.float32)
        acc0, acc1, acc2, acc3 = _fma_step(acc0, acc1, acc2, acc3, w, X, k0 + cols, k_mask, stride_xm, K, SILU,
                                           not EVEN_K, ROWS)
    s0 = tl.sum(acc0, 1)[:, None]
    s1 = tl.sum(acc1, 1)[:, None]
    s2 = tl.sum(acc2, 1)[:, None]
    s3 = tl.sum(acc3, 1)[:, None]
    pick = rm[None, :]
    return tl.where(pick == 0, s0, tl.where(pick == 1, s1, tl.where(pick == 2, s2, s3)))  # [BLOCK_N, BLOCK_M]


@triton.jit
def _bf16_small_m_kernel(X, W, Out, Part, Tickets, M, N, K, k_per_split, split, stride_xm, stride_wn, stride_om,
                         SILU: tl.constexpr, IEEE: tl.constexpr, EVEN_K: tl.constexpr, PARTIAL: tl.constexpr,
                         EARLY: tl.constexpr, USE_PDL: tl.constexpr, FMA_ROWS: tl.constexpr, BLOCK_M: tl.constexpr,
                         BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    rm = tl.arange(0, BLOCK_M)
    rn = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = rm < M
    n_mask = rn < N
    k_start = pid_k * k_per_split
    k_end = tl.minimum(k_start + k_per_split, K)
    if FMA_ROWS > 0:
        acc = _fma_rows(X, W, rm, rn, n_mask, k_start, k_end, K, stride_xm, stride_wn, SILU, EVEN_K, EARLY, USE_PDL,
                        FMA_ROWS, BLOCK_N, BLOCK_K)
    else:
        acc = _dot_rows(X, W, rm, rn, m_mask, n_mask, k_start, k_end, K, stride_xm, stride_wn, SILU, IEEE, EVEN_K,
                        EARLY, USE_PDL, BLOCK_M, BLOCK_N, BLOCK_K)
    finish_tile(acc, Out, Out, Part, Tickets, rm, rn, m_mask, n_mask, pid_n, pid_k, M, N, split, stride_om,
                PARTIAL, False)


def bf16_small_m(x: torch.Tensor, weight: torch.Tensor, cfg: SmallMConfig, tickets: torch.Tensor | None = None,
                 bias: torch.Tensor | None = None, pdl: bool = False, silu_mul: bool = False) -> torch.Tensor:
    """x [M, K] (2 <= M <= 16) @ weight [N, K]^T (+ bias) -> [M, N] in x's dtype, by `cfg` (kinds "dot" / "de";
    "fma" / "fe" up to FMA_MAX_M rows, each row the M = 1 GEMV's bits under the same config).
    `tickets`: the weight's `small_m.tickets_for(N)` (zero at rest; a fresh buffer when None).
    `silu_mul`: x is [gate | up], [M, 2K], and the product is of silu(gate) * up."""
    m = x.shape[0] if x.dim() == 2 else 0
    n, k = weight.shape
    x_cols = (x.shape[-1] // 2 if x.shape[-1] % 2 == 0 else -1) if silu_mul else x.shape[-1]
    if not MIN_M <= m <= MAX_M or x_cols != k or weight.stride(1) != 1 or weight.dtype != x.dtype:
        raise ValueError(f"bf16_small_m: x {tuple(x.shape)} {x.dtype} does not fit weight {tuple(weight.shape)} "
                         f"{weight.dtype} ({MIN_M}..{MAX_M} rows)")
    fma = cfg.kind in FMA_KINDS
    if (x.dtype not in (torch.bfloat16, torch.float16) or cfg.kind not in KINDS or (fma and m > FMA_MAX_M)
            or (not fma and cfg.block_n < 16)):
        raise ValueError(f"bf16_small_m: takes bf16 / fp16, {' / '.join(KINDS)} configs (dot / de: tiles of >= 16 "
                         f"rows; fma / fe: up to {FMA_MAX_M} rows), not {x.dtype} / {cfg.key()!r} at {m} rows")
    x = x if x.stride(-1) == 1 else x.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    split, k_per_split = plan(k, cfg)
    if split > 1:
        part = torch.empty(split, m, n, dtype=torch.float32, device=x.device)
        tickets = check_tickets(tickets, n, cfg, x.device)
    else:
        part, tickets = out, out  # unused
    _bf16_small_m_kernel[(triton.cdiv(n, cfg.block_n), split)](
        x, weight, out, part, tickets, m, n, k, k_per_split, split, x.stride(0), weight.stride(0), out.stride(0),
        SILU=silu_mul, IEEE=x.device.type == "cpu", EVEN_K=k % cfg.block_k == 0, PARTIAL=split > 1,
        EARLY=cfg.kind in ("de", "fe"), FMA_ROWS=m if fma else 0, BLOCK_M=triton.next_power_of_2(m) if fma else 16,
        BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, num_warps=cfg.num_warps,
        num_stages=cfg.num_stages, **launch_options(pdl, x.device),
    )
    return out if bias is None else out + bias

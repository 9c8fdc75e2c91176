"""Launch plans of the small-M (decode, M = 1..16) weight-streaming kernels: the FP8 W8A16 one
(`fp8_small_m.py`) and the 4-bit W4A16 one (`w4a16_small_m.py`).

At M <= 16 a linear layer is bound by its weight bytes, and what decides its speed is how many bytes
are in flight on every SM and what each launch costs besides. A config names the tile (rows x columns
per loop step, warps, pipeline stages) and a fixed split-K count; the best one per layer shape and M
comes from the H200 sweep (`benchmarks/small_m_gemm_sweep.py`) and lives in each kernel module's
`DEFAULTS` table, keyed by (N, K) then by the largest M it covers; other shapes take a rule of thumb.

Split-K finishes in the same launch: every split writes its float32 partial, takes a ticket (an atomic
counter per row tile), and the split that takes the last ticket sums the partials in split order and
writes the output, then resets the ticket to zero. Deterministic (a fixed summation order, no float
atomics), one launch instead of two, and the tickets (int32, zero at rest) belong to the weight, so
CUDA graphs replay them. Everything depends only on static shapes, so the launches capture.
"""
from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
import triton.language as tl

logger = logging.getLogger(__name__)
MAX_M = 16  # rows these kernels take (the activations' rows are one MMA tile, or FMAs per weight)
MIN_BLOCK_N = 8  # the narrowest row tile any config uses: tickets are sized for it


@dataclass(frozen=True)
class SmallMConfig:
    """One launch: `kind` "dot" (tensor cores; the weight tile is the MMA's row operand, the activations
    padded to 16 rows) or "fma" (CUDA cores, FP8 only, for M <= 2); BLOCK_N rows x BLOCK_K columns of
    weight per loop step; at most `split_k` splits along K (each a whole number of steps)."""

    kind: str = "dot"
    block_n: int = 16
    block_k: int = 512
    split_k: int = 1
    num_warps: int = 1
    num_stages: int = 3

    def key(self) -> str:
        return f"{self.kind}-n{self.block_n}-k{self.block_k}-s{self.split_k}-w{self.num_warps}-st{self.num_stages}"

    @classmethod
    def parse(cls, key: str) -> "SmallMConfig":
        """The inverse of `key` (the sweep's JSON and the DEFAULTS tables hold keys)."""
        kind, n, k, s, w, st = key.split("-")
        return cls(kind, int(n[1:]), int(k[1:]), int(s[1:]), int(w[1:]), int(st[2:]))


Table = dict[tuple[int, int], dict[int, str]]  # (N, K) -> {largest M covered: config key}


def lookup(table: Table, m: int, n: int, k: int) -> SmallMConfig | None:
    """The table's config for this shape at this M (the entry of the smallest M bound >= m), or None."""
    by_m = table.get((n, k))
    if not by_m:
        return None
    fits = [bound for bound in by_m if bound >= m]
    return SmallMConfig.parse(by_m[min(fits)]) if fits else None


def plan(k: int, cfg: SmallMConfig) -> tuple[int, int]:
    """(split count, columns per split): at most cfg.split_k splits, each a whole number of BLOCK_K steps."""
    steps = triton.cdiv(k, cfg.block_k)
    want = max(1, min(cfg.split_k, steps))
    per_split = triton.cdiv(steps, want) * cfg.block_k
    return triton.cdiv(k, per_split), per_split


def tickets_for(n: int, device: torch.device) -> torch.Tensor:
    """Zeroed split-K tickets for any row tile of at least MIN_BLOCK_N rows of an N-row weight."""
    return torch.zeros(triton.cdiv(n, MIN_BLOCK_N), dtype=torch.int32, device=device)


def check_tickets(tickets: torch.Tensor | None, n: int, cfg: SmallMConfig, device: torch.device) -> torch.Tensor:
    """The weight's tickets (a fresh zeroed buffer when None), refused when too few for this tile."""
    if tickets is None:
        return tickets_for(n, device)
    if tickets.numel() < triton.cdiv(n, cfg.block_n) or tickets.dtype != torch.int32:
        raise ValueError(f"split-K tickets: {tickets.numel()} {tickets.dtype} for {triton.cdiv(n, cfg.block_n)} tiles")
    return tickets


@triton.jit
def finish_tile(acc, S, Out, Part, Tickets, rm, rn, m_mask, n_mask, pid_n, pid_k, M, N, split, stride_om,
                PARTIAL: tl.constexpr, HAS_SCALE: tl.constexpr):
    """Write a [BLOCK_N, BLOCK_M] (transposed) tile: straight to Out (times the per-row scale S) with one
    split, else through the float32 partials and the last split's fixed-order sum (module docstring)."""
    mask = n_mask[:, None] & m_mask[None, :]
    out_ptrs = Out + rm[None, :].to(tl.int64) * stride_om + rn[:, None]
    if HAS_SCALE:
        scale = tl.load(S + rn, mask=n_mask, other=0.0)[:, None]
    else:
        scale = 1.0
    if not PARTIAL:
        tl.store(out_ptrs, (acc * scale).to(Out.dtype.element_ty), mask=mask)
    else:
        offs = rm[None, :] * N + rn[:, None]
        tl.store(Part + pid_k.to(tl.int64) * M * N + offs, acc, mask=mask)
        tl.debug_barrier()  # every thread's partial is written before the ticket is taken
        ticket = tl.atomic_add(Tickets + pid_n, 1, sem="acq_rel", scope="gpu")
        if ticket == split - 1:  # the last split of this tile: sum every split's partial in split order
            total = tl.zeros_like(acc)
            for s_ in range(split):
                total += tl.load(Part + s_ * M * N + offs, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptrs, (total * scale).to(Out.dtype.element_ty), mask=mask)
            tl.atomic_xchg(Tickets + pid_n, 0, sem="relaxed", scope="gpu")


@triton.jit
def paired_rows(pid_n, N, BLOCK_N: tl.constexpr, SILU: tl.constexpr):
    """A tile's weight rows: BLOCK_N consecutive ones, or (SILU, the MLP's [gate | up] weight) BLOCK_N / 2 gate
    rows and the matching up rows N / 2 further on, so one program holds both halves of its outputs."""
    r = tl.arange(0, BLOCK_N)
    if SILU:
        return pid_n * (BLOCK_N // 2) + r % (BLOCK_N // 2) + (r >= BLOCK_N // 2).to(tl.int32) * (N // 2)
    return pid_n * BLOCK_N + r


@triton.jit
def finish_tile_silu(acc, Out, Part, Tickets, rn, pid_n, pid_k, N, split, PARTIAL: tl.constexpr,
                     BLOCK_N: tl.constexpr, HALVES: tl.constexpr = False):
    """`finish_tile` for a `paired_rows` tile of the [gate | up] product at M = 1 (acc [BLOCK_N, 1]): writes
    silu(gate) * up for its BLOCK_N / 2 columns, rounded as kernels/ops.py's SiLU-and-mul rounds the gate_up
    output it reads (gate and up to Out's dtype, silu to it, then the product): that kernel's bits, one launch less.
    HALVES: the last split sums the gate and the up halves apart from the partials, with no register shuffle of the
    tile (the same bits; on sm_90 the tensor-core kernel's gate_up config as a split-norm consumer takes 79 registers
    this way against 128 with the shuffle; the GEMV keeps the shuffle, which costs its tiles fewer)."""
    if PARTIAL:
        tl.store(Part + pid_k.to(tl.int64) * N + rn[:, None], acc)
        tl.debug_barrier()
        ticket = tl.atomic_add(Tickets + pid_n, 1, sem="acq_rel", scope="gpu")
        if HALVES:
            if ticket == split - 1:  # each half summed in split order, as the tile below
                half = pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2)
                gate = tl.zeros((BLOCK_N // 2,), dtype=tl.float32)
                up = tl.zeros((BLOCK_N // 2,), dtype=tl.float32)
                for s_ in range(split):
                    gate += tl.load(Part + s_ * N + half, cache_modifier=".cg")
                    up += tl.load(Part + s_ * N + half + N // 2, cache_modifier=".cg")
                _silu_halves_store(gate, up, Out, half)
                tl.atomic_xchg(Tickets + pid_n, 0, sem="relaxed", scope="gpu")
        elif ticket == split - 1:
            total = tl.zeros_like(acc)
            for s_ in range(split):
                total += tl.load(Part + s_ * N + rn[:, None], cache_modifier=".cg")
            _silu_store(total, Out, pid_n, BLOCK_N)
            tl.atomic_xchg(Tickets + pid_n, 0, sem="relaxed", scope="gpu")
    else:
        _silu_store(acc, Out, pid_n, BLOCK_N)


@triton.jit
def _silu_halves_store(gate, up, Out, cols):
    """silu(gate) * up rounded as ops.silu_and_mul rounds (gate and up to Out's dtype, silu to it, the product)."""
    dtype = Out.dtype.element_ty
    g = gate.to(dtype).to(tl.float32)
    act = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    tl.store(Out + cols, (act * up.to(dtype).to(tl.float32)).to(dtype))


@triton.jit
def _silu_store(total, Out, pid_n, BLOCK_N: tl.constexpr):
    dtype = Out.dtype.element_ty
    y = tl.reshape(total, (2, BLOCK_N // 2)).to(dtype).to(tl.float32)  # row 0: gate, row 1: up (the output's rounding)
    gate, up = tl.split(tl.trans(y))
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)
    tl.store(Out + pid_n * (BLOCK_N // 2) + tl.arange(0, BLOCK_N // 2), (act * up).to(dtype))


TABLE_ENV = "RADIXLM_SMALL_M_TABLE"  # a sweep's JSON ("tables" of benchmarks/small_m_gemm_sweep.py), or "off"


_DEFAULT_TABLES: dict[str, Table] = {}  # each kernel module registers its DEFAULTS at import


def register_defaults(kind: str, table: Table) -> None:
    _DEFAULT_TABLES[kind] = table


@functools.cache
def _sweep_tables(path: str) -> dict[str, Table]:
    tables = json.loads(Path(path).read_text())["tables"]
    return {kind: {tuple(int(v) for v in shape.split("x")): {int(m): key for m, key in by_m.items()}
                   for shape, by_m in table.items()} for kind, table in tables.items()}


def table_in_use(kind: str) -> Table:
    """The config table of the `kind` ("fp8" / "w4" / "gemv") kernel: its module's DEFAULTS, or the "kind" entry of
    the sweep JSON named by $RADIXLM_SMALL_M_TABLE (so a benchmark can run the engine, whose scheduler is
    another process, on a freshly measured table; what it does not cover keeps the defaults)."""
    source = os.environ.get(TABLE_ENV, "")
    defaults = _DEFAULT_TABLES[kind]
    if source and source != "off":  # the sweep's entries over the defaults (a sweep of some M / kinds only)
        swept = _sweep_tables(source).get(kind, {})
        return {shape: {**defaults.get(shape, {}), **swept.get(shape, {})} for shape in {**defaults, **swept}}
    return defaults


def enabled() -> bool:
    """Whether the small-M kernels run ($RADIXLM_SMALL_M_TABLE=off: the older kernels, for an A/B arm)."""
    return os.environ.get(TABLE_ENV, "") != "off"


_failed: set[str] = set()  # kinds whose small-M kernel failed to compile in this process


def with_fallback(kind: str, new: Callable[[], torch.Tensor], old: Callable[[], torch.Tensor]) -> torch.Tensor:
    """new(); if it fails to compile here (a Triton / ptxas error), say so once and run old() from then on
    (the older kernel computes the same product)."""
    if kind in _failed:
        return old()
    try:
        return new()
    except Exception as exc:  # noqa: BLE001 - a compile failure of the new kernel: the older one is equal
        if not any(word in type(exc).__name__ for word in ("Compilation", "OutOfResources")) and "ptxas" not in str(exc):
            raise
        logger.warning("%s: the small-M kernel does not compile here (%s: %s); using the older kernel", kind,
                       type(exc).__name__, str(exc)[:200])
        _failed.add(kind)
        return old()

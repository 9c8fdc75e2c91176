"""4-bit weight-only linear layers (W4A16): AWQ, GPTQ and compressed-tensors pack-quantized weights,
kept packed on the device.

    W[n, k] = (c[n, k] - z[g, n]) * s[g, n]      c, z in [0, 15]; g = k's group (g_idx under act-order)

Every format is unpacked once at load (`w4_formats.py`) into codes, zero points, scales and g_idx,
then repacked into the one layout the kernels read (`kernels/w4a16_gemm.py`): still 4 bits a weight.
Act-order (GPTQ desc_act, a g_idx that is not k // group_size) sorts the columns by group, which
makes every group contiguous again; the kernels read the activations through that permutation.

On a GPU: M = 1 through the tensor-core kernel (`kernels/w4a16_mma_m1.py`) on the shapes of its measured table,
else the CUDA-core GEMV (`kernels/w4a16_gemv.py`) on the shapes where it measured faster,
up to 16 through the small-M MMA kernel (`kernels/w4a16_small_m.py`: narrow row tiles, split-K finished in
the same launch), up to `DEQUANT_MIN_M` through its tiled launch, above
that the weight dequantized to the activation dtype for the call and cuBLAS (prefill: compute-bound,
where cuBLAS beats a Triton mma with dequantization in its loop).
Elsewhere (the CPU, tests) x @ W^T in float32 with the same codes, scales and zeros: the same weight,
summed in another order.
"""
from __future__ import annotations

import importlib.util
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from radixlm.runtime.quantization.base import DequantizedRows, QuantizedWeight

if TYPE_CHECKING:
    from radixlm.kernels.l2_prefetch import L2Plan

# Set from the H200 small-M table of 2026-12-03 (benchmarks/quantized.py, RESULTS.md): dequantize +
# cuBLAS beat the tiled kernel at 256 rows on 3 of the 4 8B shapes (354 vs 427 us summed), lost at 64 on all.
DEQUANT_MIN_M = 256  # rows from which dequantize + cuBLAS replaces the tiled kernel
# The M = 1 CUDA-core GEMV (kernels/w4a16_gemv.py) serves the shapes of its measured table (where it beat the
# small-M kernel: benchmarks/small_m_gemm_sweep.py --kinds gemv), and every other shape when GEMV_UNLISTED.
GEMV_MAX_M = 1  # rows up to which the GEMV runs (0: off)
GEMV_UNLISTED = False
SMALL_M_MAX_M = 16  # rows up to which the small-M kernel runs (kernels/w4a16_small_m.py; its tiles: its DEFAULTS)
# --decode-split-norm auto: batch-1 decode with each residual add + RMSNorm split across the M = 1 linears around it
# (kernels/split_norm.py, runtime/models/split_norm_decode.py): two launches a layer fewer. On: the 8B shape's
# GPTQ 4-bit decode on the H200 (2026-12-04 19:49, one process) 2.299 vs 2.337 ms a step, its decode graph 2,057
# vs 2,145 µs (benchmarks/RESULTS.md).
SPLIT_NORM_AUTO = True
# --decode-silu-epilogue auto: gate_up's SiLU-and-mul in its kernel's last split (one launch a layer fewer).
SILU_EPILOGUE_AUTO = False
# At load on a GPU: the codes of each weight the tensor-core M = 1 kernel's table lists (N whole row tiles) stored blocked
# by its row tile (kernels/w4_blocked.py) as their only copy, every 4-bit kernel told (`W4Weight.blocked`). On since the
# H200 A/B of 2026-12-05 (RESULTS.md): the 8B GPTQ batch-1 decode step 2,035 -> 1,944 µs a replay, the Engine's (a)
# 445.1 -> 463.1 tok/s, the same bits, the same bytes. $RADIXLM_W4_BLOCKED_CODES 1 / 0 overrides it (an A/B arm's
# scheduler process inherits it: benchmarks/small_m_gemm_sweep.py --decode-arms w4a16-defaults-plain).
BLOCKED_CODES = True
BLOCKED_CODES_ENV = "RADIXLM_W4_BLOCKED_CODES"
_gemv_failed: list[bool] = []  # non-empty once the GEMV failed to compile in this process
_mma1_failed: list[bool] = []  # non-empty once the tensor-core M = 1 kernel failed to compile in this process
logger = logging.getLogger(__name__)


def triton_serves(codes: torch.Tensor) -> bool:
    """Whether the Triton kernels take a weight whose codes are `codes` (on a GPU, with triton installed)."""
    return codes.is_cuda and importlib.util.find_spec("triton") is not None


def blocked_codes_enabled() -> bool:
    """`BLOCKED_CODES`, or $RADIXLM_W4_BLOCKED_CODES where set (1: on, anything else: off)."""
    value = os.environ.get(BLOCKED_CODES_ENV, "")
    return BLOCKED_CODES if value == "" else value == "1"


def split_norm_enabled(mode: str) -> bool:
    """--decode-split-norm `mode` (auto / on / off) resolved."""
    return mode == "on" or (mode == "auto" and SPLIT_NORM_AUTO)


def silu_epilogue_enabled(mode: str) -> bool:
    """--decode-silu-epilogue `mode` (auto / on / off) resolved."""
    return mode == "on" or (mode == "auto" and SILU_EPILOGUE_AUTO)


def _compile_failure(exc: Exception) -> bool:
    """Whether `exc` is a kernel that does not compile here (Triton, ptxas), not an error of the call."""
    return any(key in type(exc).__name__ for key in ("Compilation", "OutOfResources")) or "ptxas" in str(exc)


@dataclass(frozen=True)
class W4Part:
    """One checkpoint tensor's worth of a (possibly fused) 4-bit layer, unpacked: the common form."""

    codes: torch.Tensor  # uint8 [rows, K], 0..15
    scales: torch.Tensor  # [G, rows], the checkpoint's float dtype
    zeros: torch.Tensor | None  # uint8 [G, rows], 0..15; None: symmetric (z = 8)
    g_idx: torch.Tensor | None  # int [K]: each column's group; None: k // group_size
    offsets: torch.Tensor | None = None  # float32 [G, rows] added to the group's weights (GGUF's affine blocks)


def act_order(g_idx: torch.Tensor | None, k: int, group_size: int) -> torch.Tensor | None:
    """The column permutation that makes groups contiguous (None when they already are). ValueError
    when a group does not get exactly group_size columns (no GPTQ export writes such a g_idx)."""
    if g_idx is None:
        return None
    g_idx = g_idx.to(torch.int64)
    natural = torch.arange(k, device=g_idx.device) // group_size
    if torch.equal(g_idx, natural):
        return None
    perm = torch.argsort(g_idx, stable=True)
    if not torch.equal(g_idx[perm], natural):
        raise ValueError(f"g_idx does not give every group {group_size} columns")
    return perm


class W4Weight(DequantizedRows, QuantizedWeight):
    """A [N, K] weight as 4-bit codes with per-group scales (and zero points unless symmetric)."""

    def __init__(self, parts: list[W4Part], group_size: int, source: str) -> None:
        k = int(parts[0].codes.shape[1])
        if any(p.codes.shape[1] != k for p in parts):
            raise ValueError("fused 4-bit parts have different in_features")
        perms = [act_order(p.g_idx, k, group_size) for p in parts]
        if any((a is None) != (b is None) or (a is not None and not torch.equal(a, b)) for a, b in zip(perms, perms[1:])):
            raise ValueError("fused 4-bit parts (q/k/v or gate/up) have different act-order g_idx")
        perm = perms[0]
        if len({p.offsets is None for p in parts}) > 1:
            raise ValueError("fused 4-bit parts mix affine offsets and none")
        symmetric = all(p.zeros is None for p in parts)
        codes = torch.cat([p.codes for p in parts]) if len(parts) > 1 else parts[0].codes
        self.out_features, self.in_features = int(codes.shape[0]), k
        groups = int(parts[0].scales.shape[0])
        # One group of every column (per channel) is stored as one group of the padded width.
        self.group_size = group_size if groups > 1 else -(-k // 128) * 128
        dtypes = {p.scales.dtype for p in parts}
        self.scales = torch.cat([p.scales if len(dtypes) == 1 else p.scales.float() for p in parts], dim=1).contiguous()
        self.zeros = None if symmetric else torch.cat(
            [p.zeros if p.zeros is not None else torch.full_like(p.scales, 8, dtype=torch.uint8) for p in parts], dim=1
        ).contiguous()
        self.offsets = None if parts[0].offsets is None else torch.cat(
            [p.offsets.float() for p in parts], dim=1).contiguous()
        self.perm = None if perm is None else perm.to(torch.int32).contiguous()
        from radixlm.kernels.w4a16_gemm import pack_codes  # torch only at load: no Triton launch

        self.codes = pack_codes(codes if perm is None else codes[:, perm])
        self.source = source
        self.use_triton = triton_serves(self.codes)
        self.blocked = 0  # the codes' rows a block (kernels/w4_blocked.py; 0: the plain layout)
        if blocked_codes_enabled():
            self.set_blocked(True)
        self.tickets: torch.Tensor | None = None  # the GEMV's split-K tickets (int32, zero at rest)
        if self.use_triton:
            from radixlm.kernels.small_m import tickets_for

            self.tickets = tickets_for(self.out_features, self.codes.device)
        self._float_weight: torch.Tensor | None = None  # the CPU reference's weight, made on first use
        # the next linear's first bytes its M = 1 kernel hints into L2 (runtime/models/w4_l2_prefetch.py sets it)
        self.l2_next: L2Plan | None = None
        self.codes_m1: torch.Tensor | None = None  # `use_blocked_m1`'s copy of the codes, blocked by m1_blocked rows
        self.m1_blocked = 0

    @property
    def format(self) -> str:
        kind = f"g{self.group_size}" if self.scales.shape[0] > 1 else "per-channel"
        kind += " sym" if self.zeros is None else " asym"
        kind += " affine" if self.offsets is not None else ""
        kind += " act-order" if self.perm is not None else ""
        kind += f" blocked-{self.blocked}" if self.blocked else ""
        path = "triton GEMV / split-K / tiled, dequant + cuBLAS" if self.use_triton else "reference"
        return f"w4a16[{self.source} {kind}, {path}]"

    @property
    def nbytes(self) -> int:
        tensors = [t for t in (self.codes, self.scales, self.zeros, self.offsets, self.perm, self.tickets, self._float_weight,
                               self.codes_m1)
                   if t is not None]
        return sum(t.numel() * t.element_size() for t in tensors)

    def linear(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features)
        if not self.use_triton:
            out = (x2.float() @ self.float_weight().t()).to(x.dtype)
        elif x2.shape[0] >= DEQUANT_MIN_M:
            from radixlm.kernels.w4a16_gemm import w4_dequantize

            w = w4_dequantize(self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size, x.dtype,
                              self.offsets, self.blocked)
            out = torch.matmul(x2, w.t())
        elif x2.shape[0] <= GEMV_MAX_M and not _mma1_failed and self._mma1_serves():
            out = self._mma1(x2)
        elif x2.shape[0] <= GEMV_MAX_M and not _gemv_failed and self._gemv_serves():
            out = self._gemv(x2)
        elif x2.shape[0] <= SMALL_M_MAX_M:
            out = self._small_m(x2)
        else:
            from radixlm.kernels.w4a16_gemm import w4a16_matmul

            out = w4a16_matmul(x2, self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                               offsets=self.offsets, blocked=self.blocked)
        return out.reshape(*lead, self.out_features)

    def linear_silu_mul(self, x: torch.Tensor) -> torch.Tensor | None:
        """One decode row through the M = 1 kernel that serves this shape, SiLU-and-mul in its last split
        (`small_m.finish_tile_silu`); None elsewhere (more rows, the CPU, a row tile that N / 2 does not fill, or
        a kernel that does not compile here: the caller's two launches compute the same bits)."""
        x2 = x.reshape(-1, self.in_features)
        if not self.silu_epilogue or not self.use_triton or x2.shape[0] != 1 or x2.shape[0] > GEMV_MAX_M:
            return None
        kernel = self._m1_kernel()
        if kernel is None or not self._silu_halves_fit(kernel[1]):
            return None
        try:
            out = kernel[0](x2, self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                            self.offsets, self.tickets, pdl=self.pdl, silu_mul=True, blocked=self.blocked)
        except Exception as exc:  # noqa: BLE001 - a compile failure: the unfused launches compute the same
            if not _compile_failure(exc):
                raise
            return None
        return out.reshape(*x.shape[:-1], self.out_features // 2)

    def split_norm_serves(self) -> bool:
        """Whether `linear_split_norm` takes this weight's decode row: --decode-split-norm (`split_norm`), the GPU
        kernels, and an M = 1 kernel (tensor-core or GEMV) whose table lists this shape."""
        return (self.split_norm and self.use_triton and not _mma1_failed and not _gemv_failed
                and (self._mma1_serves() or self._gemv_serves()))

    def linear_split_norm(self, x: torch.Tensor | None, add_norm=None, pending=None, silu_mul: bool = False):
        """One decode row through this shape's M = 1 kernel as the split norm's producer (`add_norm`: x's product
        then (PendingNorm, new residual)) or consumer (`pending`: its u is the input; the product, or with
        `silu_mul` the MLP's silu(gate) * up as `linear_silu_mul`); None where `split_norm_serves` says no (or, with
        silu_mul, N / 2 is not whole row tiles) or the kernel does not compile here (the caller's launches do the same)."""
        kernel = self._m1_kernel() if self.split_norm_serves() else None
        if kernel is None or (silu_mul and not self._silu_halves_fit(kernel[1])):
            return None
        from radixlm.kernels.w4a16_mma_m1 import w4a16_mma_m1  # (Triton: only once a GPU kernel serves the weight)

        run = kernel[0]
        x2 = pending.u if pending is not None else x.reshape(-1, self.in_features)
        codes, blocked = self._m1_codes() if run is w4a16_mma_m1 and not silu_mul else (self.codes, self.blocked)
        try:
            return run(x2, codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                       self.offsets, self.tickets, pdl=self.pdl, add_norm=add_norm, pending=pending, silu_mul=silu_mul,
                       l2=self.l2_next, blocked=blocked)
        except Exception as exc:  # noqa: BLE001 - a compile failure: the unfused launches compute the same
            if not _compile_failure(exc):
                raise
            return None

    def _small_m(self, x2: torch.Tensor) -> torch.Tensor:
        """Decode sizes: the small-M kernel (kernels/w4a16_small_m.py), or the older split-K MMA kernel where
        it is switched off or does not compile."""
        from radixlm.kernels import small_m
        from radixlm.kernels.w4a16_gemm import w4a16_matmul
        from radixlm.kernels.w4a16_small_m import w4a16_small_m_matmul

        args = (x2, self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size)
        if not small_m.enabled():
            return w4a16_matmul(*args, offsets=self.offsets, blocked=self.blocked)
        return small_m.with_fallback("w4", lambda: w4a16_small_m_matmul(*args, self.offsets, self.tickets,
                                                                        blocked=self.blocked),
                                     lambda: w4a16_matmul(*args, offsets=self.offsets, blocked=self.blocked))

    def _gemv_serves(self) -> bool:
        """Whether the GEMV takes this weight's M = 1 calls: its table lists the shape (or GEMV_UNLISTED), and
        the small-M kernels are not switched off ($RADIXLM_SMALL_M_TABLE=off: the older kernels, an A/B arm)."""
        from radixlm.kernels import small_m
        from radixlm.kernels.w4a16_gemv import gemv_table_config

        if not small_m.enabled():
            return False
        return GEMV_UNLISTED or gemv_table_config(self.out_features, self.in_features) is not None

    def _m1_kernel(self) -> tuple[Callable[..., torch.Tensor], int] | None:
        """The M = 1 kernel that serves this shape (tensor-core first, then the GEMV, each unless it failed to
        compile here) and its row tile; None: neither."""
        if not _mma1_failed and self._mma1_serves():
            from radixlm.kernels.w4a16_mma_m1 import mma1_table_config, w4a16_mma_m1

            return w4a16_mma_m1, mma1_table_config(self.out_features, self.in_features).block_n
        if not _gemv_failed and self._gemv_serves():
            from radixlm.kernels.w4a16_gemv import gemv_default_config, w4a16_gemv

            return w4a16_gemv, gemv_default_config(self.out_features, self.in_features).block_n
        return None

    def _silu_halves_fit(self, block_n: int) -> bool:
        """Whether a row tile of `block_n` (gate rows and their up rows) divides the MLP's [gate | up] weight."""
        return self.out_features % 2 == 0 and (self.out_features // 2) % (block_n // 2) == 0

    def _mma1_serves(self) -> bool:
        """Whether the tensor-core M = 1 kernel (kernels/w4a16_mma_m1.py) takes this weight's M = 1 calls: its
        table lists the shape (it comes before the GEMV there), and the small-M kernels are not switched off."""
        from radixlm.kernels import small_m
        from radixlm.kernels.w4a16_mma_m1 import mma1_table_config

        return small_m.enabled() and mma1_table_config(self.out_features, self.in_features) is not None

    def _m1_tile(self) -> int:
        """The tensor-core M = 1 kernel's row tile for this shape where N is whole tiles of it (0: no table entry)."""
        if not self.use_triton:  # (no Triton import off a GPU)
            return 0
        from radixlm.kernels.w4a16_mma_m1 import mma1_table_config

        cfg = mma1_table_config(self.out_features, self.in_features)
        return cfg.block_n if cfg is not None and self.out_features % cfg.block_n == 0 else 0

    def set_blocked(self, on: bool) -> bool:
        """Store the codes blocked by the tensor-core M = 1 kernel's row tile (`BLOCKED_CODES` at load; where its table
        lists the shape) or plain again: one copy either way, read so by every kernel. Returns whether blocked."""
        from radixlm.kernels.w4_blocked import block_codes, unblock_codes

        want = self._m1_tile() if on else 0
        if want != self.blocked:
            plain = unblock_codes(self.codes, self.blocked)
            self.codes = block_codes(plain, want) if want else plain
            self.blocked = want
        return self.blocked > 0

    def use_blocked_m1(self, on: bool) -> bool:
        """Give the tensor-core M = 1 kernel a copy of the codes in `w4_blocked.block_codes`' layout for its table's row
        tile (an experiment: twice this weight's code bytes; benchmarks/w4_decode_step.py's blk variants), or drop it;
        none where the codes themselves are blocked (`set_blocked`). Returns whether the kernel reads blocked codes."""
        from radixlm.kernels.w4_blocked import block_codes

        tile = self._m1_tile() if on and not self.blocked else 0
        self.codes_m1 = block_codes(self.codes, tile) if tile else None
        self.m1_blocked = tile
        return tile > 0 or (on and self.blocked > 0)

    def _m1_codes(self) -> tuple[torch.Tensor, int]:
        """The tensor-core kernel's codes and their row blocking (0: the plain layout): the weight's own, or the blocked
        copy while the table's row tile is still the one it was made for."""
        from radixlm.kernels.w4a16_mma_m1 import mma1_table_config

        cfg = mma1_table_config(self.out_features, self.in_features)
        if self.codes_m1 is not None and cfg is not None and cfg.block_n == self.m1_blocked:
            return self.codes_m1, self.m1_blocked
        return self.codes, self.blocked

    def _mma1(self, x2: torch.Tensor) -> torch.Tensor:
        """The tensor-core M = 1 kernel; if it fails to compile here, say so once and use the GEMV path from then on."""
        from radixlm.kernels.w4a16_mma_m1 import w4a16_mma_m1

        codes, blocked = self._m1_codes()
        try:
            return w4a16_mma_m1(x2, codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                                self.offsets, self.tickets, pdl=self.pdl, l2=self.l2_next, blocked=blocked)
        except Exception as exc:  # noqa: BLE001 - a compile failure of the new kernel: the GEMV computes the same
            if not _compile_failure(exc):
                raise
            logger.warning("w4a16: the tensor-core M = 1 kernel does not compile here (%s: %s); using the GEMV",
                           type(exc).__name__, str(exc)[:200])
            _mma1_failed.append(True)
            return self._gemv(x2) if self._gemv_serves() else self._small_m(x2)

    def _gemv(self, x2: torch.Tensor) -> torch.Tensor:
        """The decode GEMV; if it fails to compile here, say so once and use the MMA kernel from then on."""
        from radixlm.kernels.w4a16_gemm import w4a16_matmul
        from radixlm.kernels.w4a16_gemv import w4a16_gemv

        try:
            return w4a16_gemv(x2, self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                              self.offsets, self.tickets, pdl=self.pdl, l2=self.l2_next, blocked=self.blocked)
        except Exception as exc:  # noqa: BLE001 - a compile failure of the new kernel: the MMA kernel computes the same
            if not _compile_failure(exc):
                raise
            logger.warning("w4a16: the decode GEMV does not compile here (%s: %s); using the MMA kernel",
                           type(exc).__name__, str(exc)[:200])
            _gemv_failed.append(True)
            return w4a16_matmul(x2, self.codes, self.scales, self.zeros, self.perm, self.in_features, self.group_size,
                                offsets=self.offsets, blocked=self.blocked)

    def _dequantize(self, rows: torch.Tensor | slice) -> torch.Tensor:
        """Rows `rows` of W as float32: (c - z) * s (+ o), columns back in the checkpoint's order."""
        from radixlm.kernels.w4_blocked import code_rows
        from radixlm.kernels.w4a16_gemm import unpack_codes

        codes = unpack_codes(code_rows(self.codes, rows, self.blocked), self.in_features).float()  # columns in stored (group-sorted) order
        g = torch.arange(self.in_features, device=codes.device) // self.group_size
        z = 8.0 if self.zeros is None else self.zeros[:, rows].float().t()[:, g]
        w = (codes - z) * self.scales[:, rows].float().t()[:, g]
        if self.offsets is not None:
            w = w + self.offsets[:, rows].t()[:, g]
        if self.perm is None:
            return w
        out = torch.empty_like(w)
        out[:, self.perm.long()] = w
        return out

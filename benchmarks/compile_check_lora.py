"""Compile the LoRA kernels (runtime/lora/sgmv_triton.py, sgmv_fused.py) for sm_90 on a machine without a GPU,
at the tiles their rules pick for the H200's shared memory, and compare what Triton allocates with the
rules' upper bounds (runtime/lora/smem.py). Exit status 1 when a launch would need more than the bound or
the device's limit.

The H200 crash this guards against: the one-launch kernel in float32 at rank 16 with K steps of 1,024
needed 263,168 B of 232,448 (`--crashed` compiles that tile too, to show the figure). Needs `triton`
with its CUDA backend at the device's version: `pip install --target DIR "triton==3.6.*"`, then
`PYTHONPATH=DIR python benchmarks/compile_check_lora.py`. Cases: bf16 and float32, ranks 16 / 64 / 128
(the expand in rank steps of 64), decode and prefill row blocks.
"""
from __future__ import annotations

import argparse
import inspect
import sys
import time

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixlm.runtime.lora import sgmv_fused, sgmv_rows, sgmv_triton
from radixlm.runtime.lora.sgmv_fused import FusedTiles, block_r, fused_smem, fused_tiles
from radixlm.runtime.lora.sgmv_triton import expand_block_r, expand_loop_smem, expand_smem, shrink_smem, tiles

H200 = 232448
_INT = ("order_ptr", "start_ptr", "len_ptr", "slot_ptr", "off_ptr", "count_ptr")
ROWS_BOUND = 64 << 10  # the expand by rows keeps no pipelined tiles: a layout change of its output tile at most


def _compile(fn, dtype: str, y_fp32: bool, constexprs: dict, warps: int = 4) -> int:
    sig, attrs = {}, {}
    # constexpr parameters a case leaves out take their defaults (else they would be compiled as i32 arguments)
    constexprs = {**{q.name: q.default for q in fn.params if q.is_constexpr and q.name not in constexprs
                     and q.default is not inspect.Parameter.empty}, **constexprs}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = "*i32" if name in _INT else "*fp32" if (name == "y_ptr" and y_fp32) else f"*{dtype}"
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": warps}).metadata.shared


def cases(crashed: bool):
    for dtype, elt in (("bf16", 2), ("fp32", 4)):
        prec = "ieee" if dtype == "fp32" else "tf32"
        dots = {"DOT_FP32": False, "DOT_PRECISION": prec}
        for rank in (16, 32, 64):  # the one-launch kernel (<= FUSED_MAX_RANK) at decode sizes
            tile = fused_tiles(1, rank=rank, elt=elt, smem=H200)
            yield (f"fused {dtype} r{rank} {tile}", fused_smem(tile, rank, elt), sgmv_fused._fused_kernel, dtype, False,
                   dict(BLOCK_M=tile.block_m, BLOCK_K=tile.block_k, BLOCK_R=block_r(rank), BLOCK_N=tile.block_n,
                        SPAN=tile.span, S_POW2=8, **dots))
        if crashed and dtype == "fp32":
            tile = FusedTiles(16, 1024, 512, 512)
            yield (f"fused {dtype} r16 {tile} (the H200's crash)", fused_smem(tile, 16, elt), sgmv_fused._fused_kernel,
                   dtype, False, dict(BLOCK_M=16, BLOCK_K=1024, BLOCK_R=16, BLOCK_N=512, SPAN=512, S_POW2=8, **dots))
        for t, rank, pieces in ((1, 16, 3), (64, 128, 3), (8192, 16, 2)):
            tile = tiles(t, 4096, pieces * rank, elt=elt, smem=H200)
            yield (f"shrink {dtype} T{t} n·R {pieces * rank} {tile}", shrink_smem(tile.block_m, tile.shrink_n, tile.block_k,
                   elt, tile.stages), sgmv_triton._shrink_kernel, dtype, True,
                   dict(BLOCK_M=tile.block_m, BLOCK_N=tile.shrink_n, BLOCK_K=tile.block_k, S_POW2=8, INLINE_SPLITS=0,
                        **dots))
            if t == 1:  # batch 1's down projection: silu(gate) * up in the loads, the split sums added in the launch
                down = tiles(1, 14336, rank, elt=elt, smem=H200, silu_mul=True)
                yield (f"shrink {dtype} T1 down silu_mul inline {down}", shrink_smem(
                       down.block_m, down.shrink_n, down.block_k, elt, down.stages, True), sgmv_triton._shrink_kernel, dtype,
                       True, dict(BLOCK_M=down.block_m, BLOCK_N=down.shrink_n, BLOCK_K=down.block_k, S_POW2=8,
                                  INLINE_SPLITS=down.split_k, SILU_MUL=True, **dots))
            if t == 1:  # the stacked decode expand's form at rank 16: PDL prologue, 4 column blocks a program
                yield (f"expand {dtype} T64 r{rank} pdl prologue, 4 column steps", expand_loop_smem(
                       16, 128, elt, 1), sgmv_triton._expand_kernel, dtype, False,
                       dict(SPLIT_K=1, BLOCK_M=16, BLOCK_N=128, BLOCK_R=expand_block_r(rank), R_STEPS=1, S_POW2=8,
                            ACCUMULATE=True, USE_PDL=True, PDL_PROLOGUE=True, N_STEPS=4, **dots))
            if t == 1:  # batch 1's per-slot expand after the stacked GEMV, launched with PDL
                yield (f"expand {dtype} T1 r{rank} pdl", expand_smem(tile.block_m, tile.expand_n, elt),
                       sgmv_triton._expand_kernel, dtype, True,
                       dict(SPLIT_K=1, BLOCK_M=tile.block_m, BLOCK_N=tile.expand_n, BLOCK_R=expand_block_r(rank),
                            R_STEPS=1, S_POW2=8, ACCUMULATE=True, USE_PDL=True, **dots))
            if t == 64:  # the stacked decode expand with PDL, its prologue before the wait, 4 column blocks a program
                yield (f"expand {dtype} T64 r{rank} pdl prologue, 4 column steps", expand_loop_smem(
                       tile.block_m, tile.expand_n, elt, triton.cdiv(rank, expand_block_r(rank))), sgmv_triton._expand_kernel,
                       dtype, True,
                       dict(SPLIT_K=1, BLOCK_M=tile.block_m, BLOCK_N=tile.expand_n, BLOCK_R=expand_block_r(rank),
                            R_STEPS=triton.cdiv(rank, expand_block_r(rank)), S_POW2=8, ACCUMULATE=True, USE_PDL=True,
                            PDL_PROLOGUE=True, N_STEPS=4, **dots))
            yield (f"expand {dtype} T{t} r{rank}", expand_smem(tile.block_m, tile.expand_n, elt), sgmv_triton._expand_kernel,
                   dtype, True, dict(SPLIT_K=tile.split_k, BLOCK_M=tile.block_m, BLOCK_N=tile.expand_n,
                                     BLOCK_R=expand_block_r(rank), R_STEPS=triton.cdiv(rank, expand_block_r(rank)),
                                     S_POW2=8, ACCUMULATE=True, **dots))
        for t, rank in ((75, 16), (256, 64)):  # the stacked decode path's expand by rows (sgmv_rows.py), 8 slots
            for parts, n_out in ((3, 6144), (2, 28672), (1, 4096)):
                yield (f"rows {dtype} T{t} r{rank} parts {parts}", ROWS_BOUND, sgmv_rows._expand_rows_kernel, dtype, False,
                       dict(N_RANK=parts * rank, SLOTS=8, BLOCK_M=sgmv_rows.block_m(t),
                            BLOCK_N=sgmv_rows.block_n([n_out // parts]), BLOCK_R=expand_block_r(rank), USE_PDL=t == 75,
                            **dots))
            yield (f"rows silu {dtype} T{t} r{rank}", ROWS_BOUND, sgmv_rows._expand_rows_silu_kernel, dtype, False,
                   dict(SLOTS=8, BLOCK_M=sgmv_rows.block_m(t), BLOCK_N=sgmv_rows.block_n([14336]),
                        BLOCK_R=expand_block_r(rank), USE_PDL=t == 75, **dots))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--crashed", action="store_true", help="also compile the tile that crashed on the H200")
    ap.add_argument("--only", default="", help="only the cases whose label starts with this (e.g. 'fused fp32')")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, sm_90, limit {H200} B")
    bad = 0
    for label, bound, fn, dtype, y_fp32, constexprs in cases(args.crashed):
        if args.only and not label.startswith(args.only):
            continue
        t = time.perf_counter()
        used = _compile(fn, dtype, y_fp32, constexprs,
                        sgmv_rows.warps(constexprs["BLOCK_M"]) if fn in (sgmv_rows._expand_rows_kernel, sgmv_rows._expand_rows_silu_kernel) else 4)
        ok = used <= min(bound, H200) or "crash" in label
        bad += not ok
        print(f"{'ok ' if ok else 'BAD'} {used:>7} B (bound {bound:>7}) {label}  [{time.perf_counter() - t:.0f} s]", flush=True)
    sys.exit(1 if bad else 0)


if __name__ == "__main__":
    main()

"""Compile every config of the small-M kernels (kernels/fp8_small_m.py, kernels/w4a16_small_m.py, the M = 1
4-bit GEMV kernels/w4a16_gemv.py, the bf16 2..16-row kernels/bf16_small_m.py) for sm_90
(and the M = 1 tensor-core kernel kernels/w4a16_mma_m1.py; the M = 1 kernels also with their L2 hints,
kernels/l2_prefetch.py; `-k blk`: every 4-bit kernel on codes blocked by row tile, kernels/w4_blocked.py) on a
machine without a GPU, and look at
what the compiler made of the weight loads.

The Triton interpreter runs kernel bodies as Python and misses code-generation errors; this runs the real
front end and NVIDIA backend (TTIR -> TTGIR -> LLVM -> PTX -> cubin with the bundled ptxas) for
GPUTarget("cuda", 90, 32) on each config of the sweep (benchmarks/small_m_gemm_sweep.py) and the default
tables, with the integer arguments specialized as the JIT specializes them at the 8B shapes (divisible by
16). Per config it prints registers, spills, shared memory and whether the PTX has 16-byte global loads.
Needs `triton` with its CUDA backend at the device's version: `pip install --target DIR "triton==3.6.*"`,
then `PYTHONPATH=DIR python benchmarks/compile_check_small_m.py`. Exit status 1 when any config fails.
"""
from __future__ import annotations

import argparse
import itertools
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixlm.kernels import bf16_small_m, fp8_small_m, w4a16_gemm, w4a16_gemv, w4a16_mma_m1, w4a16_small_m
from radixlm.kernels.small_m import SmallMConfig
from radixlm.kernels.w4_blocked import chunk_stride

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from small_m_gemm_sweep import BF16M_CONFIGS, FP8_CONFIGS, GEMV_CONFIGS, MMA1_CONFIGS, W4_CONFIGS  # noqa: E402

_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "e4m3": "*fp8e4nv", "i16": "*i16", "i32": "*i32",
        "u8": "*u8"}


def _compile(fn, pointers: dict[str, str], constexprs: dict, cfg: SmallMConfig, target: GPUTarget):
    # a constexpr the case leaves out takes its default, as a launch that leaves it out (BLOCKED 0: the plain layout)
    constexprs = {**{p.name: p.default for p in fn.params if p.is_constexpr and p.has_default}, **constexprs}
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = _PTR[pointers[name]]
            attrs[(i,)] = [["tt.divisibility", 16]]
        elif name == "eps":
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
            if name not in ("M", "split", "G", "n_sum"):  # shapes, strides and split lengths: multiples of 16 at the 8B shapes
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=target, options={"num_warps": cfg.num_warps, "num_stages": cfg.num_stages})


def _resources(cubin: bytes) -> str:
    """Registers / stack (spills) per thread from the cubin, by Triton's bundled cuobjdump."""
    tool = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    if not tool.exists():
        return "regs ?"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([str(tool), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return f"regs {m.group(1)} stack {m.group(2)}" if m else "regs ?"


def _report(kernel) -> str:
    """Resources, and the weight loads: 16-byte vectors (ld.global.v4 / cp.async 16) vs single bytes."""
    ptx = kernel.asm["ptx"]
    v4 = len(re.findall(r"ld\.global[^\n]*\.v4", ptx)) + len(re.findall(r"cp\.async\.cg\.shared\.global[^\n]*(?:0x10|, 16)", ptx))
    narrow = len(re.findall(r"ld\.global(?:\.[a-z]+)*\.(?:u8|b8|s8)\b", ptx))
    return f"{_resources(kernel.asm['cubin'])} smem {kernel.metadata.shared} 16B-loads {v4} byte-loads {narrow}"


def fp8_cases():
    defaults = [key for by_m in fp8_small_m.DEFAULTS.values() for key in by_m.values()]
    for cfg in {SmallMConfig.parse(key) for key in FP8_CONFIGS + defaults}:
        for act, even, partial in [("bf16", True, False), ("bf16", True, True), ("fp16", False, True), ("fp32", True, True)]:
            for block_m in ([1, 2] if cfg.kind == "fma" else [16]):  # fma: BLOCK_M = M <= 2
                yield (f"fp8 {cfg.key()} {act} even={even} split={partial} M<={block_m}", fp8_small_m._fp8_small_m_kernel,
                       {"X": act, "W": "e4m3", "S": "fp32", "Out": act, "Part": "fp32" if partial else act,
                        "Tickets": "i32" if partial else "fp32"},
                       {"FMA": cfg.kind == "fma", "IEEE": act == "fp32", "EVEN_K": even, "PARTIAL": partial,
                        "USE_PDL": partial and act == "bf16", "BLOCK_M": block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}, cfg)


def w4_cases():
    forms = [  # zeros, offsets, perm, slices per group (4: group >= 128, the prefetched-scales path), activations
        (False, False, False, 4, "bf16"), (True, False, True, 4, "bf16"), (True, False, True, 1, "bf16"),
        (False, True, False, 1, "fp16"), (True, False, False, 4, "fp32")]
    defaults = [key for by_m in w4a16_small_m.DEFAULTS.values() for key in by_m.values()]
    for cfg in {SmallMConfig.parse(key) for key in W4_CONFIGS + defaults}:
        for i, (zeros, offsets, perm, spg, act) in enumerate(forms):
            for partial, asm in ([(False, True), (True, True), (True, False), (False, False)] if i == 0 else
                                 [(True, act != "fp32")]):
                yield (f"w4 {cfg.key()} {act} zeros={zeros} offsets={offsets} perm={perm} spg={spg} split={partial} "
                       f"asm={asm}", w4a16_small_m._w4_small_m_kernel,
                       {"X": act, "Codes": "i16", "Scales": "fp16", "Zeros": "u8" if zeros else "fp16",
                        "Offsets": "fp32" if offsets else "fp16", "Perm": "i32" if perm else "i16", "Out": act,
                        "Part": "fp32" if partial else act, "Tickets": "i32" if partial else "i16"},
                       {"HAS_ZEROS": zeros, "HAS_OFFSETS": offsets, "HAS_PERM": perm, "PARTIAL": partial,
                        "MAGIC": {"fp32": 0, "bf16": 1, "fp16": 2}[act], "IEEE": act == "fp32", "ASM": asm,
                        "SLICES_PER_GROUP": spg, "BLOCK_M": 16, "BLOCK_N": cfg.block_n,
                        "CHUNKS": cfg.block_k // 128}, cfg)


def gemv_cases():
    forms = [  # zeros, offsets, perm, slices per group, activations (xmode 1: bf16 pairs, 2: fp16 pairs, 0: each)
        (False, False, False, 4, "bf16"), (True, False, False, 4, "fp16"), (True, False, True, 4, "bf16"),
        (False, True, False, 1, "fp16"), (True, False, False, 2, "fp32")]
    defaults = [key for by_m in w4a16_gemv.DEFAULTS.values() for key in by_m.values()]
    for cfg in {w4a16_gemv.GemvConfig.parse(key) for key in GEMV_CONFIGS + defaults}:
        launch = SmallMConfig("dot", cfg.block_n, cfg.chunks * 128, 1, cfg.num_warps, 1)
        for i, (zeros, offsets, perm, spg, act) in enumerate(forms):
            for partial, pdl, silu in ([(True, False, False), (False, False, False), (True, True, False), (True, True, True)]
                                       if i == 0 else [(True, False, False)]):  # silu: the gate_up SiLU-and-mul epilogue
                yield (f"gemv {cfg.key()} {act} zeros={zeros} offsets={offsets} perm={perm} spg={spg} split={partial} "
                       f"pdl={pdl} silu={silu}", w4a16_gemv._gemv_kernel,
                       {"X": act, "Words": "i32", "Scales": "fp16", "Zeros": "u8" if zeros else "fp16",
                        "Offsets": "fp32" if offsets else "fp16", "Perm": "i32" if perm else "i16", "Out": act,
                        "Part": "fp32" if partial else act, "Tickets": "i32" if partial else "i16"},
                       {"HAS_ZEROS": zeros, "HAS_OFFSETS": offsets, "HAS_PERM": perm, "PARTIAL": partial,
                        "XMODE": {"fp32": 0, "bf16": 1, "fp16": 2}[act], "PRECISE": act == "fp32", "EVEN_K": i != 3,
                        "SLICES_PER_GROUP": spg, "PREFETCH": cfg.prefetch, "USE_PDL": pdl,
                        "GROUP_SHIFT": 0 if spg == 4 else -1, "SILU": silu, "BLOCK_N": cfg.block_n,
                        "CHUNKS": cfg.chunks, **NO_NORM}, launch)
    for key in defaults:  # the split norm (kernels/split_norm.py) on the default tables: producer and consumer
        cfg = w4a16_gemv.GemvConfig.parse(key)
        launch = SmallMConfig("dot", cfg.block_n, cfg.chunks * 128, 1, cfg.num_warps, 1)
        for partial, norm, silu in NORM_FORMS:
            yield (f"gemv {cfg.key()} bf16 split={partial} pdl=True norm={norm} silu={silu}", w4a16_gemv._gemv_kernel,
                   {"X": "bf16", "Words": "i32", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16",
                    "Out": "bf16", "Part": "fp32" if partial else "bf16", "Tickets": "i32" if partial else "i16",
                    **norm_pointers(norm)},
                   {"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "PARTIAL": partial, "XMODE": 1,
                    "PRECISE": False, "EVEN_K": True, "SLICES_PER_GROUP": 4, "PREFETCH": cfg.prefetch, "USE_PDL": True,
                    "GROUP_SHIFT": 0, "SILU": silu, "BLOCK_N": cfg.block_n, "CHUNKS": cfg.chunks,
                    **norm_constexprs(norm)}, launch)
        for norm, pf in PF_FORMS:  # the L2 hints of the next linear's bytes (kernels/l2_prefetch.py)
            yield (f"gemv {cfg.key()} bf16 split=True pdl=True norm={norm} hints={pf}", w4a16_gemv._gemv_kernel,
                   {"X": "bf16", "Words": "i32", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16",
                    "Out": "bf16", "Part": "fp32", "Tickets": "i32", **norm_pointers(norm), **PF_POINTERS},
                   with_pf({"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "PARTIAL": True, "XMODE": 1,
                            "PRECISE": False, "EVEN_K": True, "SLICES_PER_GROUP": 4, "PREFETCH": cfg.prefetch,
                            "USE_PDL": True, "GROUP_SHIFT": 0, "SILU": False, "BLOCK_N": cfg.block_n,
                            "CHUNKS": cfg.chunks, **norm_constexprs(norm)}, pf, cfg.num_warps), launch)


def mma1_cases():
    forms = [  # zeros, offsets, perm, slice shift (2: group 128; -1: any group size), activations
        (False, False, False, 2, "bf16"), (True, False, True, 2, "fp16"), (False, True, False, 0, "bf16"),
        (True, False, False, -1, "fp32")]
    defaults = [key for by_m in w4a16_mma_m1.DEFAULTS.values() for key in by_m.values()]
    for cfg in {w4a16_mma_m1.Mma1Config.parse(key) for key in MMA1_CONFIGS + defaults}:
        launch = SmallMConfig("dot", cfg.block_n, cfg.chunks * 128, 1, cfg.num_warps, cfg.num_stages)
        for i, (zeros, offsets, perm, shift, act) in enumerate(forms):
            for partial, pdl, silu in ([(True, False, False), (False, False, False), (True, True, False), (True, True, True)]
                                       if i == 0 else [(True, False, False)]):  # silu: the gate_up SiLU-and-mul epilogue
                yield (f"mma1 {cfg.key()} {act} zeros={zeros} offsets={offsets} perm={perm} shift={shift} "
                       f"split={partial} pdl={pdl} silu={silu}", w4a16_mma_m1._mma1_kernel,
                       {"X": act, "Codes": "i16", "Scales": "fp16", "Zeros": "u8" if zeros else "fp16",
                        "Offsets": "fp32" if offsets else "fp16", "Perm": "i32" if perm else "i16", "Out": act,
                        "Part": "fp32" if partial else act, "Tickets": "i32" if partial else "i16"},
                       {"HAS_ZEROS": zeros, "HAS_OFFSETS": offsets, "HAS_PERM": perm, "PARTIAL": partial,
                        "MAGIC": {"fp32": 0, "bf16": 1, "fp16": 2}[act], "IEEE": act == "fp32", "ASM": act != "fp32",
                        "SLICE_SHIFT": shift, "USE_PDL": pdl, "SUM_CHUNKS": 16 if cfg.sums else 0,
                        "EVEN": i == 0, "WIN": cfg.window, "SILU": silu, "BLOCK_N": cfg.block_n, "CHUNKS": cfg.chunks,
                        "SPLIT_MAJOR": cfg.split_major, **NO_NORM}, launch)
    for key in defaults:  # the split norm on the default tables, as the GEMV's
        cfg = w4a16_mma_m1.Mma1Config.parse(key)
        launch = SmallMConfig("dot", cfg.block_n, cfg.chunks * 128, 1, cfg.num_warps, cfg.num_stages)
        for partial, norm, silu in NORM_FORMS:
            yield (f"mma1 {cfg.key()} bf16 split={partial} pdl=True norm={norm} silu={silu}", w4a16_mma_m1._mma1_kernel,
                   {"X": "bf16", "Codes": "i16", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16",
                    "Out": "bf16", "Part": "fp32" if partial else "bf16", "Tickets": "i32" if partial else "i16",
                    **norm_pointers(norm)},
                   {"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "PARTIAL": partial, "MAGIC": 1,
                    "IEEE": False, "ASM": True, "SLICE_SHIFT": 2, "USE_PDL": True, "SUM_CHUNKS": 16 if cfg.sums else 0,
                    "EVEN": True, "WIN": cfg.window, "SILU": silu, "BLOCK_N": cfg.block_n, "CHUNKS": cfg.chunks,
                    "SPLIT_MAJOR": cfg.split_major, **norm_constexprs(norm)}, launch)
        for (norm, pf), blocked in itertools.product(PF_FORMS, (0, cfg.block_n)):  # L2 hints; codes by row tile
            yield (f"mma1 {cfg.key()} bf16 split=True pdl=True norm={norm} hints={pf} blocked={blocked}",
                   w4a16_mma_m1._mma1_kernel,
                   {"X": "bf16", "Codes": "i16", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16",
                    "Out": "bf16", "Part": "fp32", "Tickets": "i32", **norm_pointers(norm), **PF_POINTERS},
                   with_pf({"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "PARTIAL": True, "MAGIC": 1,
                            "IEEE": False, "ASM": True, "SLICE_SHIFT": 2, "USE_PDL": True,
                            "SUM_CHUNKS": 16 if cfg.sums else 0, "EVEN": True, "WIN": cfg.window, "SILU": False,
                            "BLOCK_N": cfg.block_n, "CHUNKS": cfg.chunks, "SPLIT_MAJOR": cfg.split_major,
                            "BLOCKED": blocked, "CHUNK_STRIDE": chunk_stride(blocked), **norm_constexprs(norm)}, pf,
                           cfg.num_warps), launch)


# (split-K, NORM, SILU): producer / consumer with and without split-K; a consumer with the SiLU epilogue
NORM_FORMS = ((True, 1, False), (False, 1, False), (True, 2, False), (False, 2, False), (True, 2, True))
# the L2 hints (kernels/l2_prefetch.py) off: their launch arguments as a kernel call without them leaves them
NO_PF = {"PF": 0, "PF_THREADS": 32, "PF_LANES": 1, "PfA": None, "PfB": None}
PF_FORMS = ((2, 1), (1, 2))  # (NORM, PF): a consumer hinting before its loop, a producer after it
PF_POINTERS = {"PfA": "i16", "PfB": "fp16"}  # the next linear's codes and scales


def with_pf(constexprs: dict, pf: int, num_warps: int) -> dict:
    """`constexprs` with the hints on (PfA / PfB then pointers, not None)."""
    out = {k: v for k, v in constexprs.items() if k not in PF_POINTERS}
    return {**out, "PF": pf, "PF_THREADS": 32 * num_warps, "PF_LANES": min(4, 32 * num_warps)}
NO_NORM = {"NORM": 0, "BLOCK_T": 16, "Res": None, "NormW": None, "NewRes": None, "SumSq": None, **NO_PF}


def norm_pointers(norm: int) -> dict[str, str]:
    """The split norm's tensors: a producer's (NORM 1) residual, weight and outputs, or a consumer's tile sums."""
    return {"Res": "bf16", "NormW": "bf16", "NewRes": "bf16", "SumSq": "fp32"} if norm == 1 else {"SumSq": "fp32"}


def norm_constexprs(norm: int) -> dict:
    unused = {"Res": None, "NormW": None, "NewRes": None} if norm == 2 else {}
    return {"NORM": norm, "BLOCK_T": 256, **unused, **NO_PF}


def blocked_cases():
    """Each kernel that reads a weight the tensor-core M = 1 table lists, on its codes blocked by that table's row tile
    (kernels/w4_blocked.py, w4a16.BLOCKED_CODES): the tensor-core kernel (its own tile: whole runs; the SiLU
    epilogue's paired rows: the general addressing), the GEMV, the small-M kernel, the tiled one, the dequantization;
    each also on the plain layout (blocked=0) to compare registers and loads."""
    for ((n, k), by_m), plain in itertools.product(w4a16_mma_m1.DEFAULTS.items(), (False, True)):
        cfg = w4a16_mma_m1.Mma1Config.parse(by_m[1])
        bn = cfg.block_n
        b = 0 if plain else bn
        base = {"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "PARTIAL": True}
        ptrs = {"X": "bf16", "Codes": "i16", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16",
                "Out": "bf16", "Part": "fp32", "Tickets": "i32"}
        launch = SmallMConfig("dot", bn, cfg.chunks * 128, 1, cfg.num_warps, cfg.num_stages)
        for norm, silu in ((2, False), (1, False), (0, True), (2, True)):
            yield (f"blk mma1 {n}x{k} {cfg.key()} norm={norm} silu={silu} blocked={b}", w4a16_mma_m1._mma1_kernel,
                   {**ptrs, **(norm_pointers(norm) if norm else {})},
                   {**base, "MAGIC": 1, "IEEE": False, "ASM": True, "SLICE_SHIFT": 2, "USE_PDL": True,
                    "SUM_CHUNKS": 16 if cfg.sums else 0, "EVEN": True, "WIN": cfg.window, "SILU": silu, "BLOCK_N": bn,
                    "CHUNKS": cfg.chunks, "SPLIT_MAJOR": cfg.split_major, "BLOCKED": b, "CHUNK_STRIDE": chunk_stride(b),
                    **(norm_constexprs(norm) if norm else NO_NORM)}, launch)
        gemv = w4a16_gemv.gemv_default_config(n, k)
        yield (f"blk gemv {n}x{k} {gemv.key()} norm=2 blocked={b}", w4a16_gemv._gemv_kernel,
               {**ptrs, "Words": "i32", **norm_pointers(2)},
               {**base, "XMODE": 1, "PRECISE": False, "EVEN_K": True, "SLICES_PER_GROUP": 4, "PREFETCH": gemv.prefetch,
                "USE_PDL": True, "GROUP_SHIFT": 0, "SILU": False, "BLOCK_N": gemv.block_n, "CHUNKS": gemv.chunks,
                "BLOCKED": b, "CSTRIDE": chunk_stride(b, 16), **norm_constexprs(2)},
               SmallMConfig("dot", gemv.block_n, gemv.chunks * 128, 1, gemv.num_warps, 1))
        small = w4a16_small_m.config_for(16, n, k, None)
        yield (f"blk w4 {n}x{k} {small.key()} blocked={b}", w4a16_small_m._w4_small_m_kernel, ptrs,
               {**base, "MAGIC": 1, "IEEE": False, "ASM": True, "SLICES_PER_GROUP": 4, "BLOCK_M": 16,
                "BLOCK_N": small.block_n, "CHUNKS": small.block_k // 128, "BLOCKED": b, "CSTRIDE": chunk_stride(b)},
               small)
        for m in (64, 255):
            tiled = w4a16_gemm.default_config(m)
            yield (f"blk tiled {n}x{k} m={m} blocked={b}", w4a16_gemm._w4a16_kernel,
                   {key: ptrs[key] for key in ("X", "Codes", "Scales", "Zeros", "Offsets", "Perm", "Out", "Part")},
                   {**base, "MAGIC": 1, "IEEE": False, "ASM": True, "SLICES_PER_GROUP": 4, "SWAP": tiled.swap,
                    "BLOCK_M": tiled.block_m, "BLOCK_N": tiled.block_n, "BLOCKED": b, "CSTRIDE": chunk_stride(b)},
                   tiled)
        yield (f"blk dequantize {n}x{k} blocked={b}", w4a16_gemm._dequantize_kernel,
               {"Codes": "i16", "Scales": "fp16", "Zeros": "u8", "Offsets": "fp16", "Perm": "i16", "Out": "bf16"},
               {"HAS_ZEROS": True, "HAS_OFFSETS": False, "HAS_PERM": False, "BLOCK_N": 32, "BLOCKED": b,
                "CSTRIDE": chunk_stride(b)}, SmallMConfig("dot", 32, 128, 1, 4, 3))


def bf16m_cases():
    defaults = [key for by_m in bf16_small_m.DEFAULTS.values() for key in by_m.values() if key != bf16_small_m.CUBLAS]
    for cfg in {SmallMConfig.parse(key) for key in BF16M_CONFIGS + defaults}:
        fma = cfg.kind in bf16_small_m.FMA_KINDS
        for act, even, partial, pdl, silu in [("bf16", True, False, True, False), ("bf16", True, True, True, False),
                                              ("bf16", True, True, True, True), ("fp16", False, True, False, False)]:
            for rows in ((2, 3, 4) if fma else (16,)):
                yield (f"bf16m {cfg.key()} {act} even={even} split={partial} pdl={pdl} silu={silu} rows={rows}",
                       bf16_small_m._bf16_small_m_kernel,
                       {"X": act, "W": act, "Out": act, "Part": "fp32" if partial else act,
                        "Tickets": "i32" if partial else act},
                       {"SILU": silu, "IEEE": False, "EVEN_K": even, "PARTIAL": partial,
                        "EARLY": cfg.kind in ("de", "fe"), "USE_PDL": pdl, "FMA_ROWS": rows if fma else 0,
                        "BLOCK_M": triton.next_power_of_2(rows), "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k}, cfg)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("-k", dest="only", choices=["fp8", "w4", "gemv", "mma1", "bf16m", "blk"], action="append")
    parser.add_argument("--first", type=int, default=0, help="only the first N cases of each kernel (quick look)")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    total = failed = 0
    for name, cases in (("fp8", fp8_cases), ("w4", w4_cases), ("gemv", gemv_cases), ("mma1", mma1_cases),
                        ("bf16m", bf16m_cases), ("blk", blocked_cases)):
        if args.only and name not in args.only:
            continue
        t0 = time.perf_counter()
        for i, (label, fn, pointers, constexprs, cfg) in enumerate(cases()):
            if args.first and i >= args.first:
                break
            total += 1
            try:
                print(f"ok   {label}: {_report(_compile(fn, pointers, constexprs, cfg, target))}", flush=True)
            except Exception as exc:  # noqa: BLE001 - report every failing combination, not just the first
                failed += 1
                head = "\n    ".join(str(exc).strip().splitlines()[-6:])
                print(f"FAIL {label}\n    {type(exc).__name__}: {head}", flush=True)
        print(f"{name}: {time.perf_counter() - t0:.0f} s", flush=True)
    print(f"compile_check_small_m: {total - failed}/{total} ok (triton {triton.__version__}, sm_{args.arch})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

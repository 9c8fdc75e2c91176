"""Compile the FP8-emitting norm / SiLU kernels (kernels/fp8_act_quant.py) and the separate quantization
(kernels/fp8_gemm.py) for sm_90 on a machine without a GPU, at the 8B shape's widths and each launch the benchmark
sweeps (benchmarks/fp8_act_fusion.py), and print their registers and spills per thread and what that leaves of an SM
(resident warps out of 64), and whether the PTX converts with the hardware's `cvt.rn.satfinite` e4m3 instruction and
has the PDL wait; and that the norm kernel sums its squares exactly as `ops`' add + RMSNorm kernel does (the same
register layout and instructions up to rsqrt: the same normalized values, the same codes). The interpreter runs
kernel bodies as Python and misses code-generation errors and register pressure; this runs Triton's real NVIDIA
backend (PTX -> cubin with the bundled ptxas).

    pip install --target DIR "triton==3.6.*"   # the device's version
    PYTHONPATH=DIR python benchmarks/compile_check_fp8_act.py

Exit status 1 when a kernel fails to compile, spills, or lacks the instructions.
"""
from __future__ import annotations

import re
import sys

import triton

from radixlm.kernels import fp8_act_quant, fp8_gemm, ops

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from compile_check_decode_overlap import compile_kernel  # noqa: E402
from compile_check_small_m import _resources  # noqa: E402
from fp8_act_fusion import HIDDEN, INTER, O_QUANT_WARPS, SILU_VARIANTS  # noqa: E402


def cases():
    bf16, f32, e4m3 = "*bf16", "*fp32", "*fp8e4nv"
    common = {"STATIC": False, "HW_ROUND": True, "USE_PDL": True}
    norm_block = triton.next_power_of_2(HIDDEN)
    yield ("add_rms_norm_fp8", fp8_act_quant._add_rms_norm_fp8_kernel,
           {"X": bf16, "R": bf16, "W": bf16, "Codes": e4m3, "Scales": f32, "NewRes": bf16, "Static": f32},
           {**common, "HAS_RES": True, "BLOCK": norm_block}, max(1, min(8, norm_block // 512)))
    for block, warps in SILU_VARIANTS:
        block = min(block, triton.next_power_of_2(INTER))
        yield (f"silu_and_mul_fp8 block {block} warps {warps}", fp8_act_quant._silu_and_mul_fp8_kernel,
               {"X": bf16, "Codes": e4m3, "Scales": f32, "Static": f32},
               {**common, "BLOCK": block, "ONE_PASS": block >= INTER}, warps)
    # o's input at the swept warps (8: the default), and down's when the fusion does not apply
    for width, warps in [(HIDDEN, w) for w in O_QUANT_WARPS] + [(INTER, None)]:
        block = triton.next_power_of_2(width)
        warps = warps or max(1, min(32, block // 512))
        yield (f"quantize_rows_fp8 width {width} warps {warps}", fp8_gemm._quantize_rows_kernel,
               {"X": bf16, "Codes": e4m3, "Scales": f32, "Static": f32},
               {"STATIC": False, "HW_ROUND": True, "BLOCK": block, "USE_PDL": True}, warps)


def _rstd_arithmetic(ptx: str) -> list[str]:
    """The float arithmetic and shuffles of a norm kernel up to its rsqrt, registers renamed: the sum of squares' order."""
    lines = [line.strip() for line in ptx.splitlines()]
    end = next(i for i, line in enumerate(lines) if line.startswith("rsqrt."))
    return [re.sub(r"%[a-z]+\d+", "R", line) for line in lines[: end + 1]
            if re.match(r"(fma|add|mul|sub|shfl|rsqrt|div)\.", line)]


def same_rstd_as_ops() -> bool:
    """add_rms_norm_fp8 sums the squares as ops' add + RMSNorm kernel does (one layout, the same instructions up to
    rsqrt), so its normalized values, and so its codes, are those of the separate kernels bit for bit."""
    bf16, f32, e4m3 = "*bf16", "*fp32", "*fp8e4nv"
    block = triton.next_power_of_2(HIDDEN)
    warps = max(1, min(8, block // 512))
    ours = compile_kernel(fp8_act_quant._add_rms_norm_fp8_kernel,
                          {"X": bf16, "R": bf16, "W": bf16, "Codes": e4m3, "Scales": f32, "NewRes": bf16, "Static": f32},
                          {"HAS_RES": True, "STATIC": False, "HW_ROUND": True, "BLOCK": block, "USE_PDL": True}, warps,
                          ints_by_16=True)
    theirs = compile_kernel(ops._rms_norm_kernel, {"X": bf16, "R": bf16, "W": bf16, "Out": bf16, "NewRes": bf16},
                            {"HAS_RES": True, "BLOCK": block, "USE_PDL": True}, warps, ints_by_16=True)
    layouts = [sorted(set(re.findall(r"#ttg\.blocked<\{[^}]*\}>", k.asm["ttgir"]))) for k in (ours, theirs)]
    same = layouts[0] == layouts[1] and _rstd_arithmetic(ours.asm["ptx"]) == _rstd_arithmetic(theirs.asm["ptx"])
    print(f"{'ok  ' if same else 'FAIL'} add_rms_norm_fp8 sums its squares as ops' kernel: layouts {layouts[0]}"
          + ("" if same else f" vs {layouts[1]}, or other instructions before rsqrt"))
    return same


def main() -> int:
    print(f"triton {triton.__version__}, target sm_90")
    failed = 0 if same_rstd_as_ops() else 1
    for name, fn, pointers, constexprs, warps in cases():
        try:
            kernel = compile_kernel(fn, pointers, constexprs, warps, ints_by_16=True)
        except Exception as exc:  # noqa: BLE001 - report every kernel
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
            failed += 1
            continue
        ptx = kernel.asm["ptx"]
        res = _resources(kernel.asm["cubin"])
        m = re.search(r"regs (\d+) stack (\d+)", res)
        regs, stack = (int(m.group(1)), int(m.group(2))) if m else (0, -1)
        # an SM: 65,536 registers (allocated per warp in units of 256), 64 warps, 32 programs
        per_warp = -(-regs * 32 // 256) * 256
        programs = min(65536 // max(per_warp * warps, 1), 64 // warps, 32)
        missing = [what for what, pat in (("cvt e4m3", r"cvt\.rn\.satfinite\.e4m3x2\.f32"),
                                          ("pdl wait", r"griddepcontrol\.wait")) if not re.search(pat, ptx)]
        if "USE_PDL" not in constexprs:
            missing = [w for w in missing if w != "pdl wait"]
        bad = bool(missing) or stack != 0
        failed += bad
        print(f"{'FAIL' if bad else 'ok  '} {name}: {res}, {programs} programs = {programs * warps} warps an SM"
              + (f" missing {missing}" if missing else ""))
    print("all compiled" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

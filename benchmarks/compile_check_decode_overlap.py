"""Compile the decode-overlap kernels for sm_90 on a machine without a GPU: the decoder's small kernels
with programmatic dependent launch (kernels/gdc.py: USE_PDL=True) and the two-stage argmax
(kernels/argmax.py), through Triton's real NVIDIA backend (TTIR -> PTX -> cubin with the bundled ptxas),
and check that the PTX holds what the switch is for: `griddepcontrol.wait` and
`griddepcontrol.launch_dependents` before the first global load. The CPU interpreter cannot run the PDL
instructions, so this is the check that they assemble.

    pip install --target DIR "triton==3.6.*"   # the device's version
    PYTHONPATH=DIR python benchmarks/compile_check_decode_overlap.py

Exit status 1 when any kernel fails to compile or lacks its instructions.
"""
from __future__ import annotations

import re
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixlm.kernels import argmax, cascade_attention, decode_attention, ops

FLOATS = {"eps", "k_inv_scale", "v_inv_scale", "qk_scale", "v_scale", "min_scale"}


def compile_kernel(fn, pointers: dict[str, str], constexprs: dict, num_warps: int = 4, ints_by_16: bool = False):
    """`ints_by_16`: the integer arguments specialized as multiples of 16, as the JIT specializes them when they are
    (widths and strides at the 8B shape)."""
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "fp32" if name in FLOATS else "i32"
            if ints_by_16 and name not in FLOATS:
                attrs[(i,)] = [["tt.divisibility", 16]]
    src = ASTSource(fn=fn, signature=sig, constexprs=constexprs, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})


def cases():
    bf16, f32, i64, i32 = "*bf16", "*fp32", "*i64", "*i32"
    yield ("rms_norm + add", ops._rms_norm_kernel, {"X": bf16, "R": bf16, "W": bf16, "Out": bf16, "NewRes": bf16},
           {"HAS_RES": True, "BLOCK": 4096}, ["pdl"])
    yield ("silu_and_mul", ops._silu_and_mul_kernel, {"X": bf16, "Out": bf16}, {"BLOCK": 2048}, ["pdl"])
    yield ("rotary + KV store", ops._rotary_kernel,
           {"Q": bf16, "K": bf16, "QOut": bf16, "KOut": bf16, "Pos": i64, "Cache": f32, "V": bf16, "Slots": i64,
            "VOut": bf16}, {"HALF": 64, "BLOCK_HQ": 32, "BLOCK_HK": 8, "BLOCK_HALF": 64, "BLOCK_D": 128, "STORE": True},
           ["pdl"])
    yield ("store_kv", ops._store_kv_kernel, {"KBuf": bf16, "VBuf": bf16, "Slots": i64, "K": bf16, "V": bf16},
           {"HEAD_DIM": 128, "BLOCK_H": 8, "BLOCK_D": 128, "FP8_MAX": 0.0, "MANT_BITS": 3, "MIN_EXP": -6}, ["pdl"])
    yield ("decode stage 1", decode_attention._decode_stage1,
           {"Q": bf16, "K": bf16, "V": bf16, "ReqToToken": i32, "ReqIdx": i64, "SeqLens": i32, "KvStart": i32,
            "MidO": f32, "MidLse": f32},
           {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_H": 16, "BLOCK_D": 128, "BLOCK_N": 128, "DOT_PRECISION": "tf32",
            "DOT_FP32": False, "FINAL": False, "HAS_START": False, "ROPE": False, "KNew": None, "VNew": None,
            "Pos": None, "Cache": None, "Slots": None}, ["pdl"])
    yield ("decode stage 1 + rotary + KV store", decode_attention._decode_stage1,
           {"Q": bf16, "K": bf16, "V": bf16, "ReqToToken": i32, "ReqIdx": i64, "SeqLens": i32, "KvStart": i32,
            "MidO": f32, "MidLse": f32, "KNew": bf16, "VNew": bf16, "Pos": i64, "Cache": f32, "Slots": i64},
           {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_H": 16, "BLOCK_D": 128, "BLOCK_N": 128, "DOT_PRECISION": "tf32",
            "DOT_FP32": False, "FINAL": False, "HAS_START": False, "ROPE": True}, ["pdl"])
    yield ("decode stage 2", decode_attention._decode_stage2,
           {"MidO": f32, "MidLse": f32, "SeqLens": i32, "KvStart": i32, "PrefixSplits": i32, "Out": bf16},
           {"HEAD_DIM": 128, "BLOCK_S": 32, "BLOCK_D": 128, "BLOCK_N": 128, "NUM_PREFIX": 0}, ["pdl"])
    yield ("cascade prefix stage", cascade_attention._prefix_stage,
           {"Q": bf16, "K": bf16, "V": bf16, "ReqToToken": i32, "Tasks": i64, "Rows": i64, "MidO": f32, "MidLse": f32},
           {"GROUP": 4, "ROWS": 16, "HEAD_DIM": 128, "BLOCK_M": 64, "BLOCK_D": 128, "BLOCK_N": 64,
            "DOT_PRECISION": "tf32", "DOT_FP32": False}, [])
    yield ("cascade suffix + merge", cascade_attention._suffix_merge_stage,
           {"Q": bf16, "K": bf16, "V": bf16, "ReqToToken": i32, "ReqIdx": i64, "SeqLens": i32, "KvStart": i64,
            "PrefixSplits": i64, "MidO": f32, "MidLse": f32, "Out": bf16},
           {"GROUP": 4, "HEAD_DIM": 128, "BLOCK_H": 16, "BLOCK_D": 128, "BLOCK_N": 128, "NUM_PREFIX": 8,
            "DOT_PRECISION": "tf32", "DOT_FP32": False}, ["pdl"])
    yield ("argmax stage 1", argmax._argmax_stage1, {"X": f32, "BestVal": f32, "BestIdx": i32}, {"BLOCK": 2048}, [])
    yield ("argmax stage 2", argmax._argmax_stage2, {"BestVal": f32, "BestIdx": i32, "Out": i64}, {"BLOCK_B": 64}, [])


CHECKS = {
    "pdl": [r"griddepcontrol\.wait", r"griddepcontrol\.launch_dependents"],
}


def main() -> int:
    print(f"triton {triton.__version__}, target sm_90")
    failed = 0
    for name, fn, pointers, constexprs, wants in cases():
        if "pdl" in wants:
            constexprs = {**constexprs, "USE_PDL": True}
        try:
            kernel = compile_kernel(fn, pointers, constexprs)
        except Exception as exc:  # noqa: BLE001 - report every kernel
            print(f"FAIL {name}: {type(exc).__name__}: {str(exc)[:300]}")
            failed += 1
            continue
        ptx = kernel.asm["ptx"]
        missing = [pat for want in wants for pat in CHECKS[want] if not re.search(pat, ptx)]
        order = ""
        if "pdl" in wants:  # the wait comes before any global memory access
            wait = ptx.find("griddepcontrol.wait")
            first = min((i for i in (ptx.find("ld.global"), ptx.find("st.global")) if i >= 0), default=len(ptx))
            if wait < 0 or wait > first:
                missing.append("wait before the first global access")
            order = " wait-first" if not missing else ""
        status = "ok  " if not missing else "FAIL"
        failed += bool(missing)
        print(f"{status} {name}: shared {kernel.metadata.shared}{order}" + (f" missing {missing}" if missing else ""))
    print("all compiled" if not failed else f"{failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

"""Compile the fused decode-layer kernels for sm_90 (H200) on a machine without a GPU.

The Triton interpreter runs kernel bodies as Python and misses code-generation errors (a variable
given different shapes in the branches of a runtime `if` compiled fine there and failed on the
H200). This script runs Triton's real front end and the NVIDIA backend (TTIR -> TTGIR -> LLVM ->
PTX -> cubin, with the bundled ptxas) for GPUTarget("cuda", 90, 32) on every constexpr combination
the launch wrappers use, at Llama-3.1-8B and Qwen shapes. Needs `triton` with its CUDA backend
(pip wheel; use the device's version, 3.6, e.g. `pip install --target DIR "triton==3.6.*"` and
PYTHONPATH=DIR); no driver, no GPU.  Takes minutes (each combination is a full compile), so it is a
dev script, not a test.  Usage:  python benchmarks/compile_check_sm90.py [--arch 90] [-k NAME]
Exit status 1 when any combination fails (the first lines of each error are printed).
"""
from __future__ import annotations

import argparse
import itertools
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from radixlm.kernels import decode_attention as da
from radixlm.kernels import decode_attention_qkv as daq
from radixlm.kernels import ops, rope_store

# torch dtype name -> Triton signature name
_PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "e4m3": "*fp8e4nv", "e5m2": "*fp8e5",
        "i32": "*i32", "i64": "*i64"}
_FP8 = {"e4m3": (448.0, 3, -6), "e5m2": (57344.0, 2, -14)}  # (finfo.max, mantissa bits, min normal exp)


@dataclass(frozen=True)
class Case:
    """One compilation: a kernel, its pointer types, float scalars and constexpr values."""

    name: str
    fn: object
    pointers: dict[str, str]
    constexprs: dict[str, object]
    floats: frozenset[str] = field(default_factory=frozenset)
    num_warps: int = 4
    num_stages: int = 1

    def signature(self) -> dict[str, str]:
        sig = {}
        for name in self.fn.arg_names:
            if name in self.constexprs:
                sig[name] = "constexpr"
            elif name in self.pointers:
                sig[name] = _PTR[self.pointers[name]]
            else:
                sig[name] = "fp32" if name in self.floats else "i32"
        return sig


def _pool(kv: str) -> dict[str, object]:
    fp8_max, mant, min_exp = _FP8.get(kv, (0.0, 2, -14))
    return {"FP8_MAX": fp8_max, "MANT_BITS": mant, "MIN_EXP": min_exp}


# (Hq, Hkv, head_dim): Llama-3.1-8B, Qwen3-style q/k-norm shape, the small default model (SmolLM2-135M)
_SHAPES = [(32, 8, 128), (16, 8, 128), (9, 3, 64)]
_ACTS = ["bf16", "fp16", "fp32"]


def rope_store_cases() -> Iterator[Case]:
    for (hq, hkv, d), act, kv, qk_norm in itertools.product(_SHAPES, _ACTS, ["same", "e4m3", "e5m2"], [False, True]):
        pool = act if kv == "same" else kv
        half = d // 2
        block_hq, block_half = triton.next_power_of_2(hq), triton.next_power_of_2(half)
        yield Case(
            f"rope_store Hq={hq} Hkv={hkv} D={d} {act} pool={pool} qk_norm={qk_norm}", rope_store._rope_store_kernel,
            {"QKV": act, "QOut": act, "KBuf": pool, "VBuf": pool, "Pos": "i64", "Cache": act, "Slots": "i64",
             "QNormW": act, "KNormW": act},
            {"HEAD_DIM": d, "HALF": half, "BLOCK_HQ": block_hq, "BLOCK_HK": triton.next_power_of_2(hkv),
             "BLOCK_HALF": block_half, "QK_NORM": qk_norm, **_pool(kv)},
            floats=frozenset({"eps", "k_inv_scale", "v_inv_scale"}),
            num_warps=max(1, min(8, block_hq * block_half // 256)),
        )


def _split_counts() -> list[int]:
    return [1, 8, 64]  # BLOCK_S: the split count (1..64) rounded up to a power of two (1: no merge)


def decode_qkv_cases() -> Iterator[Case]:
    cfg = da.GPU_CONFIG
    for (hq, hkv, d), act, kv, splits in itertools.product(_SHAPES, _ACTS, ["same", "e4m3"], _split_counts()):
        pool = act if kv == "same" else kv
        group = hq // hkv
        yield Case(
            f"decode_attention_qkv Hq={hq} Hkv={hkv} D={d} {act} pool={pool} splits={splits}", daq._decode_qkv_kernel,
            {"QKV": act, "Pos": "i64", "Cache": act, "Slots": "i64", "K": pool, "V": pool, "ReqToToken": "i32",
             "ReqIdx": "i64", "SeqLens": "i32", "MidO": "fp32", "MidLse": "fp32" if splits > 1 else act,
             "Out": act, "Locks": "i32"},
            {"GROUP": group, "HEAD_DIM": d, "HALF": d // 2, "BLOCK_H": max(16, triton.next_power_of_2(group)),
             "BLOCK_D": triton.next_power_of_2(d), "BLOCK_N": cfg["block_n"], "BLOCK_S": splits,
             "DOT_PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_FP32": False, **_pool(kv)},
            floats=frozenset({"qk_scale", "v_scale", "k_inv_scale", "v_inv_scale"}),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def decode_stage1_cases() -> Iterator[Case]:
    """The decode kernel's one-launch mode (MERGE) at every shape and dtype; its older modes (one split
    = FINAL, two-stage, cascade suffix), which ran on the H200 before, at the Llama shape in bf16."""
    cfg = da.GPU_CONFIG
    merge = [(shape, act, kv, (False, False, True), s)
             for shape, act, kv, s in itertools.product(_SHAPES, _ACTS, ["same", "e4m3"], [2, 8, 64])]
    older = [(_SHAPES[0], "bf16", "same", mode, s) for mode, s in
             [((True, False, False), 1), ((False, False, False), 8), ((False, True, False), 8)]]
    for (hq, hkv, d), act, kv, (final, has_start, merge_mode), splits in merge + older:
        pool = act if kv == "same" else kv
        group = hq // hkv
        yield Case(
            f"decode_stage1 Hq={hq} Hkv={hkv} D={d} {act} pool={pool} final={final} cascade={has_start} "
            f"merge={merge_mode} splits={splits}", da._decode_stage1,
            {"Q": act, "K": pool, "V": pool, "ReqToToken": "i32", "ReqIdx": "i64", "SeqLens": "i32",
             "KvStart": "i32", "MidO": act if final else "fp32", "MidLse": act if final else "fp32",
             "Out": act, "Locks": "i32"},
            {"GROUP": group, "HEAD_DIM": d, "BLOCK_H": max(16, triton.next_power_of_2(group)),
             "BLOCK_D": triton.next_power_of_2(d), "BLOCK_N": cfg["block_n"],
             "DOT_PRECISION": "ieee" if act == "fp32" else "tf32", "DOT_FP32": False,
             "FINAL": final, "HAS_START": has_start, "MERGE": merge_mode, "BLOCK_S": splits},
            floats=frozenset({"qk_scale", "v_scale"}),
            num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
        )


def rms_norm_cases() -> Iterator[Case]:
    """rms_norm, fused_add_rms_norm and add_rms_norm_rows (the decoder's tail) share one kernel."""
    modes = [(False, False, False), (True, True, False), (True, False, True)]  # HAS_RES, STORE_RES, HAS_ROWS
    for hidden, act, (has_res, store_res, has_rows) in itertools.product([4096, 576, 128], _ACTS, modes):
        block = triton.next_power_of_2(hidden)
        yield Case(
            f"rms_norm hidden={hidden} {act} res={has_res} store_res={store_res} rows={has_rows}",
            ops._rms_norm_kernel,
            {"X": act, "R": act, "W": act, "Out": act, "NewRes": act, "Rows": "i64" if has_rows else act},
            {"HAS_RES": has_res, "STORE_RES": store_res, "HAS_ROWS": has_rows, "BLOCK": block},
            floats=frozenset({"eps"}), num_warps=ops._warps(block),
        )


GROUPS = {
    "rope_store": rope_store_cases,
    "decode_attention_qkv": decode_qkv_cases,
    "decode_stage1": decode_stage1_cases,
    "rms_norm": rms_norm_cases,
}


def compile_case(case: Case, target: GPUTarget) -> None:
    src = ASTSource(fn=case.fn, signature=case.signature(), constexprs=dict(case.constexprs))
    triton.compile(src, target=target, options={"num_warps": case.num_warps, "num_stages": case.num_stages})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability (90: H100/H200)")
    parser.add_argument("-k", dest="only", action="append", choices=sorted(GROUPS), help="only these kernels")
    args = parser.parse_args()
    target = GPUTarget("cuda", args.arch, 32)
    failed = total = 0
    for group in args.only or list(GROUPS):
        t0, n, bad = time.perf_counter(), 0, 0
        for case in GROUPS[group]():
            n += 1
            try:
                compile_case(case, target)
            except Exception as exc:  # report every failing combination, not just the first
                bad += 1
                head = "\n    ".join(str(exc).strip().splitlines()[-6:])
                print(f"FAIL {case.name}\n    {type(exc).__name__}: {head}")
        total, failed = total + n, failed + bad
        print(f"{group}: {n - bad}/{n} compiled for sm_{args.arch} in {time.perf_counter() - t0:.1f} s", flush=True)
    print(f"compile_check_sm90: {total - failed}/{total} ok (triton {triton.__version__})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

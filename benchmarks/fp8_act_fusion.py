"""Issue 19 on the H200: the FP8 linear's activation quantization fused into the norm / SiLU kernel (section `actfuse`
of quantized.py, or alone) at workload (b)'s sizes, M = 256, 1,024, 8,192 rows (decode batches, a prefill chunk):

  norm   add + RMSNorm (hidden 4,096) then `quantize_rows_fp8`, against `add_rms_norm_fp8` (one launch, no bf16 normed
         tensor): µs, and each against its bytes floor (11 / 7 bytes an element at the measured copy bandwidth)
  silu   SiLU-and-mul (intermediate 14,336) then `quantize_rows_fp8`, against `silu_and_mul_fp8` in each of
         SILU_VARIANTS (9 / 5 bytes an output element: the chunked variants' second read of the row counted as L2)
  o      o's separate quantization (`quantize_rows_fp8`, 4,096 columns) at 8 / 16 warps (3 bytes an element)
  chain  what a decoder layer runs for qkv, gate_up and down: bf16 (norm or SiLU, then cuBLAS), FP8 with the separate
         quantization (norm or SiLU, `Fp8Weight.linear`), FP8 fused (the emitting kernel, `Fp8Weight.linear_codes`)
  equal  the fused kernels' codes and scales against the separate kernels' on the GPU, bit for bit

    python benchmarks/fp8_act_fusion.py --out $OUT/actfuse.json       (about 30 s, most of it compiling)
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

HIDDEN, INTER, QKV = 4096, 14336, 6144
ROWS = (256, 1024, 8192)
# silu_and_mul_fp8 (block, warps): the whole 14,336-column row in one pass, or chunks read twice (max, then codes)
SILU_VARIANTS = ((16384, 32), (2048, 8), (4096, 16))
O_QUANT_WARPS = (8, 16)  # quantize_rows_fp8 on o's 4,096-column input (8: the default, 16 values a thread)


def _equal(a: tuple[torch.Tensor, torch.Tensor], b: tuple[torch.Tensor, torch.Tensor]) -> bool:
    return torch.equal(a[0].view(torch.uint8), b[0].view(torch.uint8)) and torch.equal(a[1], b[1])


def act_fusion_table(ceil: dict, graph_time: Callable[..., float], device: str = "cuda") -> list[dict]:
    """The rows above; `device` "cpu" runs it under the Triton interpreter (with smaller module sizes: a dry run)."""
    from radixlm.kernels import ops
    from radixlm.kernels.fp8_act_quant import add_rms_norm_fp8, silu_and_mul_fp8
    from radixlm.kernels.fp8_gemm import quantize_rows_fp8
    from radixlm.runtime.quantization.fp8 import _MIN_SCALE, Fp8Weight

    g = torch.Generator(device=device).manual_seed(0)
    bf = torch.bfloat16

    def rand(*shape: int, scale: float = 1.0) -> torch.Tensor:
        return (torch.randn(*shape, generator=g, device=device) * scale).to(bf)

    weights = {name: rand(n, k, scale=k**-0.5) for name, (k, n) in
               {"qkv": (HIDDEN, QKV), "gate_up": (HIDDEN, 2 * INTER), "down": (INTER, HIDDEN)}.items()}
    fp8 = {name: Fp8Weight.from_float(w) for name, w in weights.items()}
    norm_w = rand(HIDDEN, scale=0.1) + 1
    bw = ceil["copy_bytes_per_s"]
    rows = []
    for m in ROWS:
        x, res = rand(m, HIDDEN), rand(m, HIDDEN)
        gu = rand(m, 2 * INTER, scale=2.0)
        inner = 4 if m >= 8192 else 20

        def norm_sep() -> tuple[torch.Tensor, torch.Tensor]:
            return quantize_rows_fp8(ops.fused_add_rms_norm(x, res, norm_w, 1e-5)[0], _MIN_SCALE)

        def silu_sep() -> tuple[torch.Tensor, torch.Tensor]:
            return quantize_rows_fp8(ops.silu_and_mul(gu), _MIN_SCALE)

        fused, sep = add_rms_norm_fp8(x, res, norm_w, 1e-5, _MIN_SCALE)[:2], norm_sep()
        row: dict = {"M": m, "norm_codes_equal": _equal(fused, sep),
                     "norm_codes_differing": int((fused[0].view(torch.uint8) != sep[0].view(torch.uint8)).sum()),
                     "norm_scales_differing": int((fused[1] != sep[1]).sum()),
                     "silu_codes_equal": all(_equal(silu_and_mul_fp8(gu, _MIN_SCALE, block=b, num_warps=w), silu_sep())
                                             for b, w in SILU_VARIANTS)}
        t = {"norm_sep": graph_time(norm_sep, inner),
             "norm_fused": graph_time(lambda: add_rms_norm_fp8(x, res, norm_w, 1e-5, _MIN_SCALE), inner)}
        t["silu_sep"] = graph_time(silu_sep, inner)
        o_in = rand(m, HIDDEN)
        row["o_quant_codes_equal"] = all(_equal(quantize_rows_fp8(o_in, _MIN_SCALE, num_warps=w),
                                                quantize_rows_fp8(o_in, _MIN_SCALE)) for w in O_QUANT_WARPS)
        for w in O_QUANT_WARPS:
            t[f"o_quant_w{w}"] = graph_time(lambda w=w: quantize_rows_fp8(o_in, _MIN_SCALE, num_warps=w), inner)
        for b, w in SILU_VARIANTS:
            t[f"silu_fused_b{b}w{w}"] = graph_time(lambda b=b, w=w: silu_and_mul_fp8(gu, _MIN_SCALE, block=b, num_warps=w),
                                                   inner)
        floors = {"norm_sep": 11 * m * HIDDEN / bw, "norm_fused": 7 * m * HIDDEN / bw, "o_quant": 3 * m * HIDDEN / bw,
                  "silu_sep": 9 * m * INTER / bw, "silu_fused": 5 * m * INTER / bw}
        for name in ("qkv", "gate_up"):
            w8, w16 = fp8[name], weights[name]
            t[f"{name}_bf16"] = graph_time(lambda w16=w16: ops.fused_add_rms_norm(x, res, norm_w, 1e-5)[0] @ w16.t(), inner)
            t[f"{name}_fp8_sep"] = graph_time(lambda w8=w8: w8.linear(ops.fused_add_rms_norm(x, res, norm_w, 1e-5)[0]), inner)
            t[f"{name}_fp8_fused"] = graph_time(
                lambda w8=w8: w8.linear_codes(*add_rms_norm_fp8(x, res, norm_w, 1e-5, _MIN_SCALE)[:2], bf), inner)
        t["down_bf16"] = graph_time(lambda: ops.silu_and_mul(gu) @ weights["down"].t(), inner)
        t["down_fp8_sep"] = graph_time(lambda: fp8["down"].linear(ops.silu_and_mul(gu)), inner)
        t["down_fp8_fused"] = graph_time(lambda: fp8["down"].linear_codes(*silu_and_mul_fp8(gu, _MIN_SCALE), bf), inner)
        row.update({f"{k}_us": v * 1e6 for k, v in t.items()})
        row.update({f"{k}_floor_us": v * 1e6 for k, v in floors.items()})
        for name in ("qkv", "gate_up", "down"):
            row[f"{name}_fused_vs_bf16"] = t[f"{name}_bf16"] / t[f"{name}_fp8_fused"]
            row[f"{name}_sep_vs_bf16"] = t[f"{name}_bf16"] / t[f"{name}_fp8_sep"]
        rows.append(row)
        silu_best = min(t[f"silu_fused_b{b}w{w}"] for b, w in SILU_VARIANTS)
        silu_each = " / ".join(f"{t[f'silu_fused_b{b}w{w}'] * 1e6:.1f}" for b, w in SILU_VARIANTS)
        print(f"M {m:>5}  norm+quant {t['norm_sep'] * 1e6:7.1f} -> fused {t['norm_fused'] * 1e6:7.1f} us (floors "
              f"{floors['norm_sep'] * 1e6:.1f} / {floors['norm_fused'] * 1e6:.1f})  silu+quant {t['silu_sep'] * 1e6:7.1f} -> "
              f"fused (block, warps) {SILU_VARIANTS}: {silu_each} us (best "
              f"{silu_best / floors['silu_fused']:.0%} of floor {floors['silu_fused'] * 1e6:.1f})  codes equal: norm "
              f"{row['norm_codes_equal']} ({row['norm_codes_differing']} codes, {row['norm_scales_differing']} scales differ), "
              f"silu {row['silu_codes_equal']}", flush=True)
        print("         o's quantization " + " / ".join(f"w{w} {t[f'o_quant_w{w}'] * 1e6:.1f}" for w in O_QUANT_WARPS)
              + f" us (floor {floors['o_quant'] * 1e6:.1f}), codes equal {row['o_quant_codes_equal']}", flush=True)
        print("         chain us bf16 / fp8 sep / fp8 fused: " + "   ".join(
            f"{n} {t[f'{n}_bf16'] * 1e6:.1f} / {t[f'{n}_fp8_sep'] * 1e6:.1f} / {t[f'{n}_fp8_fused'] * 1e6:.1f} "
            f"({row[f'{n}_fused_vs_bf16']:.2f}x)" for n in ("qkv", "gate_up", "down")), flush=True)
    if device == "cuda":
        torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="actfuse.json")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_suite import measure_ceilings
    from quantized import _graph_time

    ceil = measure_ceilings()
    report = {"device": torch.cuda.get_device_name(), "ceilings": ceil, "actfuse": act_fusion_table(ceil, _graph_time)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

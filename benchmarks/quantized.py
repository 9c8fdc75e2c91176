"""Issue 19 on the H200: bf16 vs FP8 W8A8 (+ FP8 KV) vs 4-bit weight-only (W4A16), side by side in one run.

  check  on cuda, a small random Llama: FP8 linear (torch._scaled_mm) against its float32 reference
         of the same codes and scales, and the FP8 engines' input logprobs / greedy tokens vs bf16;
         the W4A16 kernels (bf16 / fp16 code conversion, split-K, tiled, act-order, dequantize) against
         the float32 reference of the same codes, and a GPTQ checkpoint's engine against a bf16 engine
         on its own dequantized weights (the only difference: those weights rounded to bf16)
  w4gemm the W4A16 linear on the 8B layer shapes at M = 1, 16, 64, 256, 1024, 4096: as dispatched, the
         Triton kernel at its default tiles and the best of a tile sweep, dequantize + cuBLAS, vs bf16,
         against the 4-bit bytes floor and the bf16 FLOP floor (decides DEQUANT_MIN_M and the tiles)
  w4small  the 4-bit linear at M = 1, 2, 4, 8, 16, 64, 256: the decode GEMV (kernels/w4a16_gemv.py, default
         tile and a sweep, checked against the float32 reference) beside the old MMA kernel, bf16 and
         dequantize + cuBLAS, against the 4-bit bytes floor (decides GEMV_MAX_M and DEQUANT_MIN_M)
  kquants  GGUF Q4_K / Q6_K / Q8_0 on CUDA: dequantization equal to the gguf package's, every linear path
         against it; int8gemm: the int8 group-scaled GEMM on the 8B shapes at M = 1, 16
  gemm   on the 8B layer shapes at M = 1, 16, 64, 256: the FP8 linear as dispatched (W8A16 Triton at
         M <= 16, fused activation quantization + _scaled_mm above), the Triton W8A16 kernel at every M
         (its default tiles, and the best of a small tile sweep), _scaled_mm alone, the fused and the
         eager activation quantization, vs bf16 matmul; against the bytes floor (weights read at the
         measured copy bandwidth) and FLOP floor (the measured bf16 / FP8 8192^3 matmul rate)
  gemmlarge  the same at (b)'s sizes, M = 256, 1024, 8192 (large decode batches, a prefill chunk): bf16 matmul,
         the FP8 linear as dispatched, _scaled_mm with row-wise scales (what it runs) and with per-tensor scales
         (cuBLASLt's plain FP8 path), the fused quantization (and whether its codes and scales equal the eager
         reference's on the GPU, bit for bit); TFLOP/s of each: where FP8 (b) stands
  actfuse  the activation quantization fused into the norm / SiLU kernel against the separate kernels at (b)'s
         sizes, alone and with the GEMM after them, codes equal on the GPU (benchmarks/fp8_act_fusion.py)
  (a)    batch-1 decode tok/s of the Llama-3.1-8B shape (random weights, --load-format dummy)
  (b)    offline throughput, gpu_suite's workload (b): 1,000 requests, input U[128,1024], output U[64,512]
  (c)    TTFT of one 1,024-token prompt
  kv     the KV pool size in tokens at the same --mem-fraction-static

The 4-bit engine is the same 8B shape with a GPTQ quantization_config (4-bit, group 128, symmetric) and
--load-format dummy: its random bf16 weights are quantized at load in that scheme (RTN).

    python benchmarks/quantized.py --out $OUT/quantized.json      (about 7 minutes)

The small-M kernels' config sweep with (a) for bf16 / fp8 / w4a16 on its table, in one call:

    python benchmarks/small_m_gemm_sweep.py --decode --ab --out $OUT/small_m.json

The decode-size 4-bit / K-quant run (GEMV vs the old kernel, K-quant checks, batch-1 decode only):

    python benchmarks/quantized.py --skip check,w4check,gemm,w4gemm,fp8+fp8kv --decode-only --out $OUT/w4small.json
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fp8_act_fusion import act_fusion_table  # noqa: E402
from gpu_suite import LLAMA_8B, build_small_llama, gen, measure_ceilings, model_dir_for, rand_ids  # noqa: E402
from gpu_throughput import params_for, workload_b  # noqa: E402
from quantized_w4 import (  # noqa: E402
    GPTQ_CONFIG,
    SHAPES,
    check_kquants_on_cuda,
    check_w4_on_cuda,
    int8_gemm_table,
    print_small_table,
    w4_gemm_table,
    w4_small_table,
)

CONFIGS = {  # label -> engine options ("w4a16": the GPTQ-config model folder, see the docstring)
    "bf16": {},
    "fp8": {"quantization": "fp8"},
    "fp8+fp8kv": {"quantization": "fp8", "kv_cache_dtype": "fp8_e4m3"},
    "w4a16": {},
}


def _graph_time(fn, inner: int = 20, reps: int = 15) -> float:
    """Seconds per call: `inner` calls captured in one CUDA graph (no launch gaps), median of replays."""
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(inner):
            fn()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(reps):
        ev[0].record()
        graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3 / inner)
    return statistics.median(times)


def fp8_matmul_flops() -> float:
    from radixlm.runtime.quantization.fp8 import FP8

    a = torch.randn(8192, 8192, device="cuda").to(FP8)
    b = torch.randn(8192, 8192, device="cuda").to(FP8)
    one = torch.ones(1, device="cuda")
    t = _graph_time(lambda: torch._scaled_mm(a, b.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16), inner=5, reps=5)
    return 2 * 8192**3 / t


SWEEP = [(16, 32, 256, 4, 4), (16, 64, 256, 4, 4), (16, 64, 512, 4, 3), (16, 128, 128, 4, 4),
         (16, 128, 256, 8, 3), (64, 128, 128, 8, 3), (64, 64, 256, 4, 3)]  # block m, n, k, warps, stages


def gemm_table(ceil: dict) -> list[dict]:
    from radixlm.kernels.fp8_gemm import W8A16Config, quantize_rows_fp8, w8a16_matmul
    from radixlm.runtime.quantization.fp8 import _MIN_SCALE, Fp8Weight, quantize_rows

    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        fp8 = Fp8Weight.from_float(w)
        assert fp8.use_scaled_mm and fp8.use_triton, fp8.format
        s_w = fp8.scales.reshape(-1)
        for m in (1, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, sx = quantize_rows(x)
            t_bf16 = _graph_time(lambda: torch.matmul(x, w.t()))
            t_fp8 = _graph_time(lambda: fp8.linear(x))
            t_mm = _graph_time(lambda: torch._scaled_mm(xq, fp8.codes.t(), scale_a=sx, scale_b=fp8.scales,
                                                        out_dtype=torch.bfloat16))
            t_qf = _graph_time(lambda: quantize_rows_fp8(x, _MIN_SCALE))
            t_qe = _graph_time(lambda: quantize_rows(x))
            t_w16 = _graph_time(lambda: w8a16_matmul(x, fp8.codes, s_w))
            sweep = {}
            for bm, bn, bk, warps, stages in SWEEP:
                if (bm == 16) != (m <= 16):
                    continue
                cfg = W8A16Config(bm, bn, bk, warps, stages)
                try:
                    sweep[f"{bm}x{bn}x{bk}w{warps}s{stages}"] = _graph_time(lambda cfg=cfg: w8a16_matmul(x, fp8.codes, s_w, cfg)) * 1e6
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
                    sweep[f"{bm}x{bn}x{bk}w{warps}s{stages}"] = f"{type(exc).__name__}"
            timed = {key: v for key, v in sweep.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            flops = 2 * m * n * k
            floor_bf16 = max((2 * n * k + 2 * m * (k + n)) / ceil["copy_bytes_per_s"], flops / ceil["bf16_matmul_flops"])
            floor_fp8 = max((n * k + m * k + 2 * m * n) / ceil["copy_bytes_per_s"], flops / ceil["fp8_matmul_flops"])
            floor_w16 = max((n * k + 2 * m * k + 2 * m * n) / ceil["copy_bytes_per_s"], flops / ceil["bf16_matmul_flops"])
            rows.append({"layer": name, "M": m, "K": k, "N": n, "bf16_us": t_bf16 * 1e6, "fp8_linear_us": t_fp8 * 1e6,
                         "scaled_mm_us": t_mm * 1e6, "quant_fused_us": t_qf * 1e6, "quant_eager_us": t_qe * 1e6,
                         "w8a16_us": t_w16 * 1e6, "w8a16_best_us": timed.get(best), "w8a16_best_tile": best,
                         "w8a16_sweep_us": sweep, "bf16_floor_us": floor_bf16 * 1e6, "fp8_floor_us": floor_fp8 * 1e6,
                         "w8a16_floor_us": floor_w16 * 1e6, "fp8_speedup": t_bf16 / t_fp8,
                         "scaled_mm_of_floor": floor_fp8 / t_mm, "w8a16_of_floor": floor_w16 / t_w16})
    torch.cuda.empty_cache()
    return rows


def check_on_cuda(root: Path) -> dict:
    """FP8 numerics on the GPU path, and FP8 engines against bf16 on a small random Llama."""
    import radixlm
    from radixlm.runtime.quantization.fp8 import Fp8Weight, quantize_rows

    out: dict = {}
    g = torch.Generator(device="cuda").manual_seed(0)
    w = torch.randn(768, 512, device="cuda", generator=g, dtype=torch.bfloat16)
    x = torch.randn(37, 512, device="cuda", generator=g, dtype=torch.bfloat16) * 3
    fp8 = Fp8Weight.from_float(w)
    ref = fp8.reference_matmul(*quantize_rows(x))
    got = fp8.linear(x).float()
    out["scaled_mm_used"] = fp8.use_scaled_mm
    out["scaled_mm_vs_reference_max_rel"] = ((got - ref).abs().max() / ref.abs().max()).item()  # bf16 output rounding
    from radixlm.kernels.fp8_gemm import quantize_rows_fp8, w8a16_matmul
    from radixlm.runtime.quantization.fp8 import _MIN_SCALE

    codes, scales = quantize_rows_fp8(x, _MIN_SCALE)
    ref_codes, ref_scales = quantize_rows(x)
    out["fused_quant_codes_equal"] = bool(torch.equal(codes.view(torch.uint8), ref_codes.view(torch.uint8)))
    out["fused_quant_scales_equal"] = bool(torch.equal(scales, ref_scales))
    for m in (1, 5, 16):
        ref16 = fp8.reference_w8a16(x[:m])
        got16 = w8a16_matmul(x[:m], fp8.codes, fp8.scales.reshape(-1)).float()
        out[f"w8a16_m{m}_vs_reference_max_rel"] = ((got16 - ref16).abs().max() / ref16.abs().max()).item()
    d, hf = build_small_llama(root)
    del hf
    rng = random.Random(0)
    prompts = [rand_ids(rng.randint(16, 400), 4096, rng) for _ in range(16)]
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    runs = {}
    for label, opts in CONFIGS.items():
        if label == "w4a16":
            continue  # check_w4_on_cuda compares it with bf16 on its own dequantized weights
        with radixlm.Engine(str(d), dtype="bfloat16", skip_tokenizer_init=True, mem_fraction_static=0.3, **opts) as eng:
            res = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
            runs[label] = ([r["output_ids"] for r in res],
                           [torch.tensor([lp for lp, _tok, *_ in r["meta_info"]["input_token_logprobs"][1:]]) for r in res])
    base_ids, base_lp = runs["bf16"]
    for label in ("fp8", "fp8+fp8kv"):
        ids, lp = runs[label]
        same = sum(a == b for x, y in zip(ids, base_ids) for a, b in zip(x, y))
        out[f"{label}_greedy_tokens_equal_to_bf16"] = same / sum(map(len, base_ids))
        out[f"{label}_input_logprob_mean_abs_diff"] = float(torch.cat([(a - b).abs() for a, b in zip(lp, base_lp)]).mean())
    return out


def engine_items(model_dir: Path, vocab: int, opts: dict, decode_only: bool = False, b_only: bool = False) -> dict:
    """(a), (c), (b) and the memory figures of one engine; `decode_only`: (a) and memory, graphs up to batch 8;
    `b_only`: (b) and memory, with gpu_suite's (b) engine (`gpu_throughput.item_b`: graphs up to the engine's default
    batch, not 256), so its bf16 (b) figure of the same lease compares too."""
    import radixlm

    rng = random.Random(1)
    res: dict = {}
    t = time.perf_counter()
    with radixlm.Engine(str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.85, context_length=4096,
                        cuda_graph_max_bs=8 if decode_only else None if b_only else 256,
                        **opts) as eng:
        res["startup_s"] = time.perf_counter() - t
        info = eng.tokenizer_manager.info
        res.update(kv_pool_tokens=info.max_total_tokens, kv_pool_gb=info.kv_bytes / 1e9, weights_gb=info.weights_bytes / 1e9,
                   quantization=info.quantization, kv_cache_dtype=info.kv_cache_dtype)
        gen(eng, rand_ids(64, vocab, rng), 8)  # warm-up
        if not b_only:
            t1 = statistics.median(gen(eng, rand_ids(128, vocab, rng), 1) for _ in range(3))
            tn = statistics.median(gen(eng, rand_ids(128, vocab, rng), 257) for _ in range(2))
            res["a_decode_tok_s"] = 256 / (tn - t1)
        if decode_only:
            return res
        if not b_only:
            ttft = [gen(eng, rand_ids(1024, vocab, rng), 1) for _ in range(5)]
            res["c_ttft_ms_p50"] = statistics.median(ttft) * 1000
        prompts, outs = workload_b(1000, vocab)
        eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8))
        t = time.perf_counter()
        done = eng.generate(input_ids=prompts, sampling_params=params_for(outs))
        dt = time.perf_counter() - t
        assert sum(r["meta_info"]["completion_tokens"] for r in done) == sum(outs)
        res["b_total_tok_s"] = (sum(map(len, prompts)) + sum(outs)) / dt
        res["b_output_tok_s"] = sum(outs) / dt
        res["b_retractions"] = eng.get_server_info().get("retractions", 0)
    gc.collect()
    torch.cuda.empty_cache()
    return res


def gemm_large_table(ceil: dict) -> list[dict]:
    """FP8 against bf16 at (b)'s GEMM sizes: µs and TFLOP/s (see the module docstring, "gemmlarge")."""
    from radixlm.kernels.fp8_gemm import quantize_rows_fp8
    from radixlm.runtime.quantization.fp8 import _MIN_SCALE, Fp8Weight, quantize_rows

    rows = []
    one = torch.ones(1, device="cuda")
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        fp8 = Fp8Weight.from_float(w)
        for m in (256, 1024, 8192):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            xq, sx = quantize_rows_fp8(x, _MIN_SCALE)
            ref_q, ref_s = quantize_rows(x)  # the eager reference on the GPU: the fused kernel's codes bit for bit?
            same = torch.equal(xq.view(torch.uint8), ref_q.view(torch.uint8)) and torch.equal(sx, ref_s)
            del ref_q, ref_s
            inner = 4 if m >= 8192 else 20
            times = {
                "bf16": _graph_time(lambda: torch.matmul(x, w.t()), inner),
                "fp8_linear": _graph_time(lambda: fp8.linear(x), inner),
                "scaled_mm_rowwise": _graph_time(lambda: torch._scaled_mm(xq, fp8.codes.t(), scale_a=sx, scale_b=fp8.scales,
                                                                          out_dtype=torch.bfloat16), inner),
                "scaled_mm_tensorwise": _graph_time(lambda: torch._scaled_mm(xq, fp8.codes.t(), scale_a=one, scale_b=one,
                                                                             out_dtype=torch.bfloat16), inner),
                "quant_fused": _graph_time(lambda: quantize_rows_fp8(x, _MIN_SCALE), inner),
            }
            flops = 2 * m * n * k
            row = {"layer": name, "M": m, "K": k, "N": n, "quant_codes_equal": same,
                   **{f"{key}_us": t * 1e6 for key, t in times.items()},
                   **{f"{key}_tflops": flops / t / 1e12 for key, t in times.items() if key != "quant_fused"},
                   "fp8_speedup": times["bf16"] / times["fp8_linear"],
                   "bf16_of_peak": flops / times["bf16"] / ceil["bf16_matmul_flops"],
                   "rowwise_of_fp8_peak": flops / times["scaled_mm_rowwise"] / ceil["fp8_matmul_flops"]}
            rows.append(row)
            print(f"{name:<8}{m:>6}  bf16 {row['bf16_us']:8.1f}  fp8 {row['fp8_linear_us']:8.1f} ({row['fp8_speedup']:.2f}x)  "
                  f"rowwise {row['scaled_mm_rowwise_us']:8.1f} ({row['scaled_mm_rowwise_tflops']:.0f} TF)  tensorwise "
                  f"{row['scaled_mm_tensorwise_us']:8.1f} ({row['scaled_mm_tensorwise_tflops']:.0f} TF)  quant {row['quant_fused_us']:6.1f}"
                  f"{'' if same else '  QUANT CODES DIFFER FROM THE EAGER REFERENCE'}",
                  flush=True)
    torch.cuda.empty_cache()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="quantized.json")
    ap.add_argument("--decode-only", action="store_true", help="engines: (a) batch-1 decode and memory only")
    ap.add_argument("--b-only", action="store_true", help="engines: (b) and memory only")
    ap.add_argument("--skip", default="", help="comma list of: check, gemm, gemmlarge, actfuse, w4check, w4kernels, w4gemm, w4small, kquants, "
                    f"int8gemm, and engine labels ({', '.join(CONFIGS)}); default skips fp8+fp8kv (measured before, "
                    "see RESULTS.md) and w4kernels (w4check's first half)")
    args = ap.parse_args()
    skip = set(filter(None, (args.skip or "fp8+fp8kv,w4kernels").split(",")))
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    ceil = measure_ceilings()
    ceil["fp8_matmul_flops"] = fp8_matmul_flops()
    report["ceilings"] = ceil
    print(f"ceilings: copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, bf16 {ceil['bf16_matmul_flops'] / 1e12:.0f} "
          f"TFLOP/s, fp8 {ceil['fp8_matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)

    def section(name: str, job) -> None:
        if name in skip or name.removeprefix("engine_") in skip:
            return
        t = time.perf_counter()
        try:
            report[name] = job()
        except Exception as exc:  # noqa: BLE001 - record it and go on: one run, every figure it can give
            report[name] = {"error": f"{type(exc).__name__}: {exc}"}
        print(f"[{name}] {time.perf_counter() - t:.0f} s: {json.dumps(report[name])[:1500]}", flush=True)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))  # after every section: a timeout keeps the rest

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        section("check", lambda: check_on_cuda(root))
        section("w4check", lambda: check_w4_on_cuda(root))
        section("w4kernels", lambda: check_w4_on_cuda(root, engines=False))  # w4check without its engines
        section("gemm", lambda: gemm_table(ceil))
        section("gemmlarge", lambda: gemm_large_table(ceil))
        section("actfuse", lambda: act_fusion_table(ceil, _graph_time))
        section("w4gemm", lambda: w4_gemm_table(ceil, _graph_time))
        section("w4small", lambda: w4_small_table(ceil, _graph_time))
        section("kquants", check_kquants_on_cuda)
        section("int8gemm", lambda: int8_gemm_table(ceil, _graph_time))
        d = model_dir_for(LLAMA_8B, root, "llama8b")
        d4 = model_dir_for({**LLAMA_8B, "quantization_config": GPTQ_CONFIG}, root, "llama8b-gptq")
        for label, opts in CONFIGS.items():
            if label not in skip:
                folder = d4 if label == "w4a16" else d
                section(f"engine_{label}", lambda opts=opts, folder=folder: engine_items(folder, LLAMA_8B["vocab_size"], opts,
                                                                                           args.decode_only, args.b_only))
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    _print_tables(report)


def _print_tables(report: dict) -> None:
    if isinstance(report.get("gemm"), list):
        print(f"\n{'layer':<8}{'M':>4}{'bf16':>7}{'fp8 lin':>8}{'w8a16':>7}{'best':>7}{'w16/fl':>7}{'mm':>7}{'mm/fl':>6}"
              f"{'q fuse':>7}{'q eager':>8}{'floor8':>7}{'speedup':>8}  (us; best tile)")
        for r in report["gemm"]:
            best = r["w8a16_best_us"] if isinstance(r["w8a16_best_us"], float) else float("nan")
            print(f"{r['layer']:<8}{r['M']:>4}{r['bf16_us']:>7.1f}{r['fp8_linear_us']:>8.1f}{r['w8a16_us']:>7.1f}{best:>7.1f}"
                  f"{r['w8a16_of_floor']:>7.0%}{r['scaled_mm_us']:>7.1f}{r['scaled_mm_of_floor']:>6.0%}{r['quant_fused_us']:>7.1f}"
                  f"{r['quant_eager_us']:>8.1f}{r['fp8_floor_us']:>7.1f}{r['fp8_speedup']:>7.2f}x  {r['w8a16_best_tile']}")
    if isinstance(report.get("w4small"), list):
        print_small_table(report["w4small"])
    if isinstance(report.get("kquants"), dict) and "error" not in report["kquants"]:
        kq = report["kquants"]
        print("\nK-quants on CUDA: dequantize == gguf: " + ", ".join(f"{k.removesuffix('_dequantize_equals_gguf')} {v}"
                                                             for k, v in kq.items() if k.endswith("equals_gguf")))
        for form in sorted({k.rsplit("_", 3)[0] for k in kq if k.endswith("_max_rel")}):
            errs = {k.removeprefix(form + "_"): v for k, v in kq.items() if k.startswith(form + "_") and k.endswith("_max_rel")}
            worst = max(errs, key=errs.get)
            print(f"  {form}: worst max rel err {errs[worst]:.2e} ({worst})")
    if isinstance(report.get("int8gemm"), list):
        print(f"\n{'layer':<8}{'M':>4}{'bf16':>8}{'int8':>8}{'floor8':>8}{'i8/fl':>7}{'vs bf16':>8}  (us)")
        for r in report["int8gemm"]:
            print(f"{r['layer']:<8}{r['M']:>4}{r['bf16_us']:>8.1f}{r['int8_us']:>8.1f}{r['int8_floor_us']:>8.1f}"
                  f"{r['int8_of_floor']:>7.0%}{r['int8_speedup']:>7.2f}x")
    if isinstance(report.get("w4gemm"), list):
        print(f"\n{'layer':<8}{'M':>5}{'bf16':>8}{'w4 lin':>8}{'kernel':>8}{'best':>8}{'deq+mm':>8}{'floor4':>8}"
              f"{'k/fl':>6}{'speedup':>8}  (us; best tile)")
        for r in report["w4gemm"]:
            best = r["kernel_best_us"] if isinstance(r["kernel_best_us"], float) else float("nan")
            print(f"{r['layer']:<8}{r['M']:>5}{r['bf16_us']:>8.1f}{r['w4_linear_us']:>8.1f}{r['kernel_us']:>8.1f}"
                  f"{best:>8.1f}{r['dequant_mm_us']:>8.1f}{r['w4_floor_us']:>8.1f}{r['kernel_of_floor']:>6.0%}"
                  f"{r['w4_speedup']:>7.2f}x  {r['kernel_best_tile']}")
    keys = [("a_decode_tok_s", "(a) batch-1 decode tok/s"), ("b_total_tok_s", "(b) offline total tok/s"),
            ("b_output_tok_s", "(b) offline output tok/s"), ("c_ttft_ms_p50", "(c) TTFT 1,024 ms"),
            ("kv_pool_tokens", "KV pool tokens"), ("weights_gb", "weights GB")]
    labels = [lbl for lbl in CONFIGS if isinstance(report.get(f"engine_{lbl}"), dict)]
    print(f"\n{'item':<28}" + "".join(f"{lbl:>14}" for lbl in labels))
    for key, title in keys:
        vals = [report[f"engine_{lbl}"].get(key) for lbl in labels]
        print(f"{title:<28}" + "".join(f"{v:>14.1f}" if isinstance(v, (int, float)) else f"{'-':>14}" for v in vals))
    print(f"\ncheck: {json.dumps(report.get('check'))}\nw4check: {json.dumps(report.get('w4check'))}"
          f"\nwall {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

"""The 4-bit weight-only (W4A16) parts of benchmarks/quantized.py: the GPU check and the GEMM table.

check_w4_on_cuda: the Triton kernels against the float32 reference of the same codes (every path the
linear dispatches to, bf16 and fp16 activations, symmetric / asymmetric / act-order / per-channel),
and a small GPTQ checkpoint served in bf16 against the same model with its dequantized weights as a
plain checkpoint (bf16 and float32 engines: the 4-bit engine should be as close to the float32 one
as the bf16 engine is).
w4_gemm_table: per 8B layer shape and M, the linear as dispatched, the Triton kernel (default tiles and
a sweep), dequantize + cuBLAS, against bf16 and the 4-bit bytes floor.
"""
from __future__ import annotations

import random
from pathlib import Path

import torch

SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
GPTQ_CONFIG = {"quant_method": "gptq", "bits": 4, "group_size": 128, "desc_act": False, "sym": True,
               "checkpoint_format": "gptq"}
SMALL_TILES = [(16, 64, 4, 5, None, True), (16, 64, 4, 4, None, True), (16, 64, 4, 5, None, False),
               (16, 128, 4, 4, None, True), (16, 64, 4, 8, None, True), (16, 32, 2, 5, None, False),
               (16, 16, 2, 6, 1, False), (16, 64, 4, 6, 1, True), (16, 256, 8, 3, None, True)]  # block m, n,
# warps, stages, split (None: plan), swap
LARGE_TILES = [(64, 128, 4, 3, None, True), (64, 128, 4, 3, None, False), (128, 128, 8, 3, None, True),
               (128, 128, 8, 3, None, False), (64, 64, 4, 4, None, True), (128, 256, 8, 3, None, True)]


def _weight(n: int, k: int, group: int, symmetric: bool, act_order: bool, seed: int):
    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Part, W4Weight

    g = torch.Generator(device="cuda").manual_seed(seed)
    w = torch.randn(n, k, device="cuda", generator=g)
    size = group if group > 0 else k
    part = quantize_rtn(w, size, symmetric)
    if act_order:
        g_idx = (torch.arange(k, device="cuda") // size)[torch.randperm(k, device="cuda", generator=g)]
        part = W4Part(part.codes, part.scales, part.zeros, g_idx)
    return W4Weight([part], size, "check")


def check_w4_on_cuda(root: Path, engines: bool = True) -> dict:
    from radixlm.kernels.w4a16_gemm import w4_dequantize

    out: dict = {}
    worst_triton = 0.0
    for name, (n, k, group, sym, act) in {"g128_sym": (768, 512, 128, True, False),
                                          "g32_asym_act": (640, 768, 32, False, True),
                                          "channel_sym": (512, 384, -1, True, False)}.items():
        w = _weight(n, k, group, sym, act, len(name))
        ref_w = w.dequantize()
        deq = w4_dequantize(w.codes, w.scales, w.zeros, w.perm, k, w.group_size, torch.float32)
        out[f"{name}_dequantize_kernel_exact"] = bool(torch.equal(deq, ref_w))
        for dtype in (torch.bfloat16, torch.float16):
            for m in (1, 3, 5, 16, 37, 200, 600):  # GEMV, split-K, tiled, and (600) dequantize + cuBLAS
                x = torch.randn(m, k, device="cuda", dtype=dtype)
                ref = x.float() @ ref_w.t()
                rel = ((w.linear(x).float() - ref).abs().max() / ref.abs().max()).item()
                out[f"{name}_{str(dtype).removeprefix('torch.')}_m{m}_max_rel"] = rel
                if m < 600:
                    worst_triton = max(worst_triton, rel)
    out["triton_worst_max_rel"] = worst_triton  # bf16 output rounding: about 4e-3
    from radixlm.kernels.w4a16_gemm import asm_conversion_works

    out["inline_ptx_conversion"] = asm_conversion_works()  # False: it failed to compile, plain Triton ran
    if engines:
        out.update(_engines_vs_dequantized(root))
    return out


def _engines_vs_dequantized(root: Path) -> dict:
    """Input logprobs and greedy tokens: GPTQ engine (bf16) and its dequantized weights (bf16, float32)."""
    from gpu_suite import build_small_llama, rand_ids

    import radixlm
    from radixlm.runtime.quantization.w4a16 import W4Weight
    from radixlm.tests.fixtures.w4_checkpoints import build_gptq, quantize_parts, write_checkpoint

    base, hf = build_small_llama(root / "w4")
    del hf
    gptq = build_gptq(base, root / "w4" / "gptq")
    parts = quantize_parts(base, 128, True, False)  # the same quantization build_gptq wrote
    plain = write_checkpoint(base, root / "w4" / "dequantized", parts,
                             lambda p: {"weight": W4Weight([p], 128, "check").dequantize()}, None)
    rng = random.Random(0)
    prompts = [rand_ids(rng.randint(16, 400), 4096, rng) for _ in range(16)]
    params = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    runs = {}
    for label, folder, dtype in (("w4", gptq, "bfloat16"), ("deq_bf16", plain, "bfloat16"), ("deq_fp32", plain, "float32")):
        with radixlm.Engine(str(folder), dtype=dtype, skip_tokenizer_init=True, mem_fraction_static=0.3) as eng:
            res = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True, logprob_start_len=0)
            runs[label] = ([r["output_ids"] for r in res],
                           [torch.tensor([lp for lp, _tok, *_ in r["meta_info"]["input_token_logprobs"][1:]]) for r in res])
            if label == "w4":
                runs["w4_quantization"] = eng.tokenizer_manager.info.quantization
    out = {"w4_engine_quantization": runs.pop("w4_quantization")}
    ref_ids, ref_lp = runs["deq_fp32"]
    for label in ("w4", "deq_bf16"):
        ids, lp = runs[label]
        same = sum(a == b for x, y in zip(ids, ref_ids) for a, b in zip(x, y))
        out[f"{label}_greedy_tokens_equal_to_deq_fp32"] = same / sum(map(len, ref_ids))
        out[f"{label}_input_logprob_mean_abs_diff_vs_deq_fp32"] = float(torch.cat([(a - b).abs() for a, b in zip(lp, ref_lp)]).mean())
    return out


def w4_gemm_table(ceil: dict, graph_time) -> list[dict]:
    from radixlm.kernels.w4a16_gemm import W4Config, w4_dequantize, w4a16_matmul
    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Weight

    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        q = W4Weight([quantize_rtn(w, 128, True)], 128, "bench")
        q.set_blocked(False)  # (the kernels below are called on the plain layout, w4a16.BLOCKED_CODES or not)
        assert q.use_triton, q.format
        args = (q.codes, q.scales, None, None, k, 128)
        for m in (1, 16, 64, 256, 1024, 4096):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            reps = {"inner": 20, "reps": 15} if m <= 256 else {"inner": 4, "reps": 5}
            t_bf16 = graph_time(lambda: torch.matmul(x, w.t()), **reps)
            t_lin = graph_time(lambda: q.linear(x), **reps)
            t_kernel = graph_time(lambda: w4a16_matmul(x, *args), **reps)
            t_deq = graph_time(lambda: torch.matmul(x, w4_dequantize(q.codes, q.scales, None, None, k, 128, x.dtype).t()), **reps)
            sweep = {}
            for bm, bn, warps, stages, split, swap in (SMALL_TILES if m <= 16 else LARGE_TILES):
                cfg = W4Config(bm, bn, warps, stages, split, swap)
                key = f"{bm}x{bn}w{warps}s{stages}" + ("" if split is None else f"k{split}") + ("" if swap else "ns")
                try:
                    sweep[key] = graph_time(lambda cfg=cfg: w4a16_matmul(x, *args, cfg=cfg), **reps) * 1e6
                except Exception as exc:  # noqa: BLE001 - a tile that does not fit (shared memory) is skipped
                    sweep[key] = type(exc).__name__
            timed = {key: v for key, v in sweep.items() if isinstance(v, float)}
            best = min(timed, key=timed.get) if timed else None
            weight_bytes = n * k // 2 + n * (k // 128) * 2
            floor = max((weight_bytes + 2 * m * (k + n)) / ceil["copy_bytes_per_s"], 2 * m * n * k / ceil["bf16_matmul_flops"])
            rows.append({"layer": name, "M": m, "K": k, "N": n, "bf16_us": t_bf16 * 1e6, "w4_linear_us": t_lin * 1e6,
                         "kernel_us": t_kernel * 1e6, "kernel_best_us": timed.get(best), "kernel_best_tile": best,
                         "kernel_sweep_us": sweep, "dequant_mm_us": t_deq * 1e6, "w4_floor_us": floor * 1e6,
                         "kernel_of_floor": floor / t_kernel, "w4_speedup": t_bf16 / t_lin})
    torch.cuda.empty_cache()
    return rows


GEMV_SWEEP = {1: [(32, 4, 8), (32, 4, 4), (64, 4, 8), (32, 8, 8), (16, 4, 4)],  # M: block n, chunks, warps
              2: [(32, 4, 8), (32, 2, 4)], 4: [(32, 2, 8), (16, 4, 4)], 8: [(16, 2, 8)], 16: [(16, 2, 8)]}


def w4_small_table(ceil: dict, graph_time) -> list[dict]:
    """M = 1, 2, 4, 8, 16, 64, 256 on the 8B shapes: the old MMA kernel (split-K / tiled) and the new GEMV side by
    side with bf16 and dequantize + cuBLAS, against the 4-bit bytes floor; each GEMV result checked against
    the float32 reference of the same codes (and its split-K tickets back at zero after graph replays)."""
    from radixlm.kernels.w4a16_gemm import w4_dequantize, w4a16_matmul
    from radixlm.kernels.w4a16_gemv import MAX_M, GemvConfig, w4a16_gemv
    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Weight

    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        q = W4Weight([quantize_rtn(w, 128, True)], 128, "bench")
        q.set_blocked(False)  # (the kernels below are called on the plain layout, w4a16.BLOCKED_CODES or not)
        ref_w = q.dequantize()
        args = (q.codes, q.scales, None, None, k, 128)
        for m in (1, 2, 4, 8, 16, 64, 256):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            t_bf16 = graph_time(lambda: torch.matmul(x, w.t()))
            t_old = graph_time(lambda: w4a16_matmul(x, *args))
            t_lin = graph_time(lambda: q.linear(x))
            t_deq = graph_time(lambda: torch.matmul(x, w4_dequantize(q.codes, q.scales, None, None, k, 128, x.dtype).t()),
                               inner=4 if m > 16 else 20, reps=5 if m > 16 else 15)
            weight_bytes = n * k // 2 + n * (k // 128) * 2
            floor = max((weight_bytes + 2 * m * (k + n)) / ceil["copy_bytes_per_s"], 2 * m * n * k / ceil["bf16_matmul_flops"])
            row = {"layer": name, "M": m, "K": k, "N": n, "bf16_us": t_bf16 * 1e6, "old_kernel_us": t_old * 1e6,
                   "w4_linear_us": t_lin * 1e6, "dequant_mm_us": t_deq * 1e6, "w4_floor_us": floor * 1e6,
                   "old_of_floor": floor / t_old, "linear_of_floor": floor / t_lin, "w4_speedup": t_bf16 / t_lin}
            if m <= MAX_M and m in GEMV_SWEEP:
                sweep, worst = {}, 0.0
                for bn, chunks, warps in GEMV_SWEEP[m]:
                    cfg = GemvConfig(block_n=bn, chunks=chunks, num_warps=warps)
                    key = f"{bn}x{chunks}w{warps}"
                    try:
                        got = w4a16_gemv(x, *args, tickets=q.tickets, cfg=cfg).float()
                        worst = max(worst, ((got - ref).abs().max() / ref.abs().max()).item())
                        sweep[key] = graph_time(lambda cfg=cfg: w4a16_gemv(x, *args, tickets=q.tickets, cfg=cfg)) * 1e6
                        again = w4a16_gemv(x, *args, tickets=q.tickets, cfg=cfg).float()  # after 300+ replays
                        worst = max(worst, ((again - ref).abs().max() / ref.abs().max()).item())
                    except Exception as exc:  # noqa: BLE001 - a tile that does not compile is recorded and skipped
                        sweep[key] = f"{type(exc).__name__}: {str(exc)[:120]}"
                try:
                    t_new = graph_time(lambda: w4a16_gemv(x, *args, tickets=q.tickets))
                except Exception as exc:  # noqa: BLE001 - recorded: the table's other columns still come back
                    row["gemv_error"], t_new = f"{type(exc).__name__}: {str(exc)[:300]}", float("nan")
                timed = {key: v for key, v in sweep.items() if isinstance(v, float)}
                best = min(timed, key=timed.get) if timed else None
                row.update(gemv_us=t_new * 1e6, gemv_of_floor=floor / t_new if t_new == t_new else float("nan"), gemv_best_us=timed.get(best),
                           gemv_best_tile=best, gemv_sweep_us=sweep, gemv_max_rel_err=worst,
                           gemv_tickets_zero=not bool(q.tickets.any()))
            rows.append(row)
    torch.cuda.empty_cache()
    return rows


def print_small_table(rows: list[dict]) -> None:
    print(f"\n{'layer':<8}{'M':>4}{'bf16':>8}{'old':>8}{'old/fl':>7}{'gemv':>8}{'gemv/fl':>8}{'best':>8}{'linear':>8}"
          f"{'deq+mm':>8}{'floor4':>8}{'vs bf16':>8}  (us; best GEMV tile, max rel err)")
    for r in rows:
        gemv = r.get("gemv_us", float("nan"))
        best = r.get("gemv_best_us") if isinstance(r.get("gemv_best_us"), float) else float("nan")
        print(f"{r['layer']:<8}{r['M']:>4}{r['bf16_us']:>8.1f}{r['old_kernel_us']:>8.1f}{r['old_of_floor']:>7.0%}"
              f"{gemv:>8.1f}{r.get('gemv_of_floor', float('nan')):>8.0%}{best:>8.1f}{r['w4_linear_us']:>8.1f}"
              f"{r['dequant_mm_us']:>8.1f}{r['w4_floor_us']:>8.1f}{r['w4_speedup']:>7.2f}x  "
              f"{r.get('gemv_best_tile', '')} {r.get('gemv_max_rel_err', '')}")
    for m in sorted({r["M"] for r in rows}):
        at = [r for r in rows if r["M"] == m]
        gemv_wins = sum(r.get("gemv_us", float("inf")) < r["old_kernel_us"] for r in at)
        deq_wins = sum(r["dequant_mm_us"] < r["old_kernel_us"] for r in at)
        print(f"M = {m}: GEMV faster than the old kernel on {gemv_wins}/{len(at)} shapes, "
              f"dequantize + cuBLAS on {deq_wins}/{len(at)}")


def check_kquants_on_cuda() -> dict:
    """GGUF K-quants / Q8_0 on the GPU: the int8 group-scaled kernel (groups 16 / 32, offsets, bf16 / fp16 /
    fp32, every M path) and Q4_K as a W4Weight (GEMV, MMA kernel, dequantize) against the float32 weight,
    which must equal the gguf package's dequantization bit for bit; then the int8 kernel's time on the 8B
    shapes at M = 1 and 16 against bf16 and its bytes floor."""
    from gguf import GGMLQuantizationType as QType

    from radixlm.runtime.quantization.gguf_kquants import group_codes
    from radixlm.runtime.quantization.int8_weight import Int8Weight
    from radixlm.runtime.quantization.select import GGUFTensor
    from radixlm.runtime.quantization.w4_gguf import w4_from_gguf
    from radixlm.tests.fixtures.gguf_blocks import gguf_blocks, gguf_reference

    out: dict = {}
    dev = torch.device("cuda")
    for qtype in (QType.Q6_K, QType.Q8_0, QType.Q4_K):
        raw = gguf_blocks(qtype, 320, 1024, 1)
        ref = torch.from_numpy(gguf_reference(qtype, raw, 320, 1024)).cuda()
        weights = {"int8": Int8Weight([group_codes(qtype, raw, 320)], qtype.name, dev)}
        if qtype == QType.Q4_K:
            weights["w4"] = w4_from_gguf([GGUFTensor(qtype, raw, (320, 1024))], dev)
        for form, w in weights.items():
            out[f"{qtype.name}_{form}_dequantize_equals_gguf"] = bool(torch.equal(w.dequantize(), ref))
            for dtype in (torch.bfloat16, torch.float16, torch.float32):
                for m in (1, 4, 16, 37, 600):
                    x = torch.randn(m, 1024, device="cuda", dtype=dtype)
                    want = x.float() @ ref.t()
                    err = ((w.linear(x).float() - want).abs().max() / want.abs().max()).item()
                    out[f"{qtype.name}_{form}_{str(dtype).removeprefix('torch.')}_m{m}_max_rel"] = err
    return out


def int8_gemm_table(ceil: dict, graph_time) -> list[dict]:
    from radixlm.runtime.quantization.gguf_kquants import GroupCodes
    from radixlm.runtime.quantization.int8_weight import Int8Weight

    rows = []
    for name, (k, n) in SHAPES.items():
        w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
        g = torch.Generator().manual_seed(0)
        codes = GroupCodes(torch.randint(-32, 32, (n, k), generator=g, dtype=torch.int8).numpy(),
                           torch.rand(n, k // 16, generator=g).numpy() * 0.01, None, 16)
        q = Int8Weight([codes], "bench Q6_K-like", torch.device("cuda"))
        for m in (1, 16):
            x = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
            t_bf16, t_q = graph_time(lambda: torch.matmul(x, w.t())), graph_time(lambda: q.linear(x))
            floor = (n * k + n * (k // 16) * 4 + 2 * m * (k + n)) / ceil["copy_bytes_per_s"]
            rows.append({"layer": name, "M": m, "bf16_us": t_bf16 * 1e6, "int8_us": t_q * 1e6, "int8_floor_us": floor * 1e6,
                         "int8_of_floor": floor / t_q, "int8_speedup": t_bf16 / t_q})
    torch.cuda.empty_cache()
    return rows

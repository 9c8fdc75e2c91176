"""Issue 22.3 (b): where a large decode step and a prefill chunk spend their time, against their floors, on the H200.

    python benchmarks/throughput_probe.py --items extend,dlayer,gemms,b --out $OUT/probe.json

  dlayer  the decode layer x 32 distinct layers in one CUDA graph at (b)'s batch sizes (rows with contexts
          U[128, 1536], one KV pool): the whole layer with --decode-pdl off / on (interleaved; same bits?), then its
          parts alone — the four GEMMs (cuBLAS, against the matmul ceiling), decode attention (against the KV bytes
          floor), the small kernels (norms, rotary + KV store, SiLU-and-mul)
  extend  one 8,192-token prefill chunk of workload (b)'s first prompts (no prefix): the Triton extend kernel
          (kernels/extend_attention.py, through the KV pool) against torch's flash attention on the same q / k / v
          (varlen, GQA), TFLOP/s of the causal products and the largest difference
  gemms   each layer GEMM and the LM head alone at decode batch sizes against its floor, torch's default BLAS and cuBLASLt
  kvlayout decode attention alone over the engine's KV layout late in (b) (a row's decode tokens one batch apart)
          against the same contexts in consecutive slots, at 1,000 / 320 / 140 rows
  b       workload (b) in-process (benchmarks/profile_steps.py's item b): device and wall time by kind of step
Llama-3.1-8B shapes, random bf16 weights. Prints a compact summary and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_lean import HIDDEN, HKV, HQ, INTER, LAYERS, SHAPES, D, graph_us  # noqa: E402
from gpu_suite import LLAMA_8B, measure_ceilings  # noqa: E402
from gpu_throughput import workload_b  # noqa: E402

T0 = time.perf_counter()


def item_dlayer(batches: list[int], bw: float, matmul: float) -> dict:
    import torch.nn.functional as F

    from radixlm.kernels import ops
    from radixlm.kernels.decode_attention import decode_attention

    torch.manual_seed(0)
    weights = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for name, (n, k) in SHAPES.items()}
               for _ in range(LAYERS)]
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    cache = torch.cat(((torch.arange(4096, device="cuda")[:, None] * inv).cos(),
                       (torch.arange(4096, device="cuda")[:, None] * inv).sin()), -1)
    rng = random.Random(5)
    top = max(batches)
    ctx = torch.tensor([rng.randint(128, 1536) for _ in range(top)], dtype=torch.int32)
    starts = torch.cumsum(ctx, 0) - ctx
    pool = int(ctx.sum()) + 1
    kbuf = torch.randn(pool, HKV, D, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.randn_like(kbuf)
    r2t = torch.zeros(top, 1536, dtype=torch.int32)
    for i in range(top):
        r2t[i, : ctx[i]] = torch.arange(int(starts[i]), int(starts[i] + ctx[i]), dtype=torch.int32)
    r2t = r2t.cuda()
    w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    out: dict = {}
    for bs in batches:
        lens = ctx[:bs].cuda()
        rows = torch.arange(bs, device="cuda")
        pos = (lens - 1).long()
        slot = (starts[:bs].cuda() + lens - 1).long()
        x0 = torch.randn(bs, HIDDEN, device="cuda", dtype=torch.bfloat16)
        gu0 = torch.randn(bs, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        q0 = torch.randn(bs, HQ, D, device="cuda", dtype=torch.bfloat16)
        act0 = torch.randn(bs, INTER, device="cuda", dtype=torch.bfloat16)

        def layer(parts: set[str], pdl: bool) -> torch.Tensor:
            h, res = x0, None
            for lw in weights:
                if "small" in parts or "all" in parts:
                    if res is None:
                        res, normed = h, ops.rms_norm(h, w, 1e-5, pdl=pdl)
                    else:
                        normed, res = ops.fused_add_rms_norm(h, res, w, 1e-5, pdl=pdl)
                else:
                    normed = h
                qkv = F.linear(normed, lw["qkv"]) if "gemm" in parts or "all" in parts else None
                if "all" in parts:
                    q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
                    q = ops.rotary_store_kv(q.view(bs, HQ, D), k.view(bs, HKV, D), v.view(bs, HKV, D), pos, cache, kbuf,
                                            vbuf, slot, pdl=pdl)
                elif "small" in parts:
                    q = ops.rotary_store_kv(q0, q0[:, :HKV], q0[:, :HKV], pos, cache, kbuf, vbuf, slot, pdl=pdl)
                else:
                    q = q0
                attn = decode_attention(q, kbuf, vbuf, r2t, rows, lens, D**-0.5, pdl=pdl) if (
                    "attn" in parts or "all" in parts) else q
                o = F.linear(attn.view(bs, HIDDEN), lw["o"]) if "gemm" in parts or "all" in parts else x0
                if "small" in parts or "all" in parts:
                    normed, res = ops.fused_add_rms_norm(o, res, w, 1e-5, pdl=pdl)
                gate_up = F.linear(normed, lw["gate_up"]) if "gemm" in parts or "all" in parts else gu0
                act = ops.silu_and_mul(gate_up, pdl=pdl) if "small" in parts or "all" in parts else act0
                h = F.linear(act, lw["down"]) if "gemm" in parts or "all" in parts else x0
            return h

        arms: dict[str, Callable[[], Any]] = {"all_pdl_off": lambda: layer({"all"}, False),
                                              "all_pdl_on": lambda: layer({"all"}, True)}
        row: dict = {}
        for _ in range(2):  # interleaved twice
            for arm, fn in arms.items():
                row.setdefault(arm, []).append(graph_us(fn, iters=5) / LAYERS)
        for arm, parts in (("gemm", {"gemm"}), ("attn", {"attn"}), ("small", {"small"})):
            row[arm] = graph_us(lambda: layer(parts, True), iters=5) / LAYERS
        row["pdl_same_bits"] = bool(torch.equal(layer({"all"}, True), layer({"all"}, False)))
        flops = 2 * bs * sum(n * k for n, k in SHAPES.values())
        kv_bytes = int(lens.sum()) * HKV * D * 2 * 2
        row["gemm_floor_us"] = flops / matmul * 1e6
        row["attn_floor_us"] = kv_bytes / bw * 1e6
        row["mean_ctx"] = float(lens.float().mean())
        out[str(bs)] = row
        print(f"dlayer bs {bs} (ctx mean {row['mean_ctx']:.0f}), µs/layer: all PDL off {min(row['all_pdl_off']):.1f} / on "
              f"{min(row['all_pdl_on']):.1f} (same bits {row['pdl_same_bits']}); gemm {row['gemm']:.1f} (floor "
              f"{row['gemm_floor_us']:.1f}), attn {row['attn']:.1f} (floor {row['attn_floor_us']:.1f}), small {row['small']:.1f}",
              flush=True)
    weights.clear()
    return out


def item_kvlayout(shapes: list[tuple[int, int]], bw: float) -> dict:
    """Decode attention alone (32 calls in a graph) over (b)'s KV as the engine lays it out: each row's prompt in
    consecutive slots, then its decode tokens one slot per step out of one allocation per step for the whole
    batch (a row's tokens `rows` slots apart), against the same contexts all in consecutive slots."""
    from radixlm.kernels.decode_attention import decode_attention

    out: dict = {}
    for rows, steps in shapes:
        rng = random.Random(5)
        prompts = [rng.randint(128, 1024) for _ in range(rows)]
        lens = torch.tensor([p + steps for p in prompts], dtype=torch.int32)
        pool = int(lens.sum()) + 1
        kbuf = torch.randn(pool, HKV, D, device="cuda", dtype=torch.bfloat16)
        vbuf = torch.randn_like(kbuf)
        width = int(lens.max())
        tables = {"contiguous": torch.zeros(rows, width, dtype=torch.int32), "engine": torch.zeros(rows, width, dtype=torch.int32)}
        start, prompt_start, decode_base = 1, 1, 1 + sum(prompts)
        for i, p in enumerate(prompts):  # engine: the prompts side by side, then step t's tokens at decode_base + t * rows + i
            tables["contiguous"][i, : p + steps] = torch.arange(start, start + p + steps, dtype=torch.int32)
            tables["engine"][i, :p] = torch.arange(prompt_start, prompt_start + p, dtype=torch.int32)
            tables["engine"][i, p: p + steps] = decode_base + torch.arange(steps, dtype=torch.int32) * rows + i
            start += p + steps
            prompt_start += p
        q = torch.randn(rows, HQ, D, device="cuda", dtype=torch.bfloat16)
        idx, dev_lens = torch.arange(rows, device="cuda"), lens.cuda()
        row: dict = {"floor_us": int(lens.sum()) * HKV * D * 2 * 2 / bw * 1e6, "mean_ctx": float(lens.float().mean())}
        for name, table in tables.items():
            r2t = table.cuda()
            row[name] = graph_us(lambda: [decode_attention(q, kbuf, vbuf, r2t, idx, dev_lens, D**-0.5, pdl=True)
                                          for _ in range(LAYERS)], iters=5) / LAYERS
        out[f"{rows}x{steps}"] = row
        print(f"kvlayout {rows} rows after {steps} decode steps (ctx mean {row['mean_ctx']:.0f}): µs per layer contiguous "
              f"{row['contiguous']:.1f}, engine's layout {row['engine']:.1f} (KV floor {row['floor_us']:.1f})", flush=True)
    return out


def item_gemms(batches: list[int], bw: float, matmul: float) -> dict:
    """Each 8B layer GEMM alone at decode batch sizes (cuBLAS through F.linear, weights cycled over copies so L2
    holds none), against max(compute, weight bytes) floors; torch's default BLAS and cuBLASLt (preferred_blas_library)."""
    import torch.nn.functional as F

    out: dict = {}
    default_lib = torch.backends.cuda.preferred_blas_library()
    shapes = {**SHAPES, "lm_head": (LLAMA_8B["vocab_size"], HIDDEN)}  # the LM head runs at every step's row count too
    weights = {name: [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
                      for _ in range(max(2, -(-128 * 2**20 // (n * k * 2))))] for name, (n, k) in shapes.items()}
    for lib in ("default", "cublaslt"):
        torch.backends.cuda.preferred_blas_library(default_lib if lib == "default" else "cublaslt")
        for bs in batches:
            row: dict = {}
            for name, (n, k) in shapes.items():
                x = torch.randn(bs, k, device="cuda", dtype=torch.bfloat16)
                ws = weights[name]
                us = graph_us(lambda: [F.linear(x, w) for w in ws], iters=10) / len(ws)
                floor = max(2 * bs * n * k / matmul, n * k * 2 / bw) * 1e6
                row[name] = {"us": us, "floor_us": floor}
            out[f"{lib} {bs}"] = row
            print(f"gemm [{lib}] M={bs}: " + ", ".join(f"{nm} {v['us']:.1f} ({100 * v['floor_us'] / v['us']:.0f}% of floor "
                                                      f"{v['floor_us']:.1f})" for nm, v in row.items()), flush=True)
    torch.backends.cuda.preferred_blas_library(default_lib)
    weights.clear()
    return out


def item_extend(vocab: int, chunk: int, matmul: float) -> dict:
    from radixlm.kernels.extend_attention import extend_attention

    prompts, _ = workload_b(1000, vocab)
    lens: list[int] = []
    for p in prompts:
        take = min(len(p), chunk - sum(lens))
        if take <= 0:
            break
        lens.append(take)
    t = sum(lens)
    torch.manual_seed(1)
    q = torch.randn(t, HQ, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(t, HKV, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    n = len(lens)
    lens_t = torch.tensor(lens, dtype=torch.int32, device="cuda")
    cu = torch.zeros(n + 1, dtype=torch.int32, device="cuda")
    cu[1:] = torch.cumsum(lens_t, 0)
    r2t = torch.zeros(n, max(lens), dtype=torch.int32, device="cuda")
    for i, ln in enumerate(lens):
        r2t[i, :ln] = torch.arange(int(cu[i]), int(cu[i]) + ln, dtype=torch.int32, device="cuda")
    rows = torch.arange(n, device="cuda")
    scale = D**-0.5
    flops = sum(4 * HQ * D * ln * (ln + 1) / 2 for ln in lens)
    res: dict = {"requests": n, "tokens": t, "causal_gflop": flops / 1e9}

    def triton_ext() -> torch.Tensor:
        return extend_attention(q, k, v, r2t, rows, lens_t, lens_t, cu[:-1].long(), scale, max_extend_len=max(lens))

    def flash() -> torch.Tensor:
        return torch.ops.aten._flash_attention_forward(q, k, v, cu, cu, max(lens), max(lens), 0.0, True, False,
                                                       scale=scale)[0]

    kx, vx = k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1)

    def flash_mha() -> torch.Tensor:  # K / V already repeated per q head (outside the timing): flash's own rate
        return torch.ops.aten._flash_attention_forward(q, kx, vx, cu, cu, max(lens), max(lens), 0.0, True, False,
                                                       scale=scale)[0]

    ref = triton_ext()
    for name, fn in (("triton", triton_ext), ("flash", flash), ("flash_mha", flash_mha)):
        try:
            us = graph_us(lambda: [fn() for _ in range(4)], iters=10) / 4
            got = fn()
            res[name] = {"us": us, "tflops": flops / us / 1e6,
                         "max_diff_vs_triton": (got.float() - ref.float()).abs().max().item()}
        except Exception as exc:  # noqa: BLE001 - torch's flash path may refuse the shape: recorded
            res[name] = {"error": repr(exc)[:200]}
    tr, fl = res["triton"], res.get("flash", {})
    print(f"extend chunk {t} tokens, {n} requests: triton {tr.get('us', float('nan')):.0f} µs/layer "
          f"({tr.get('tflops', 0):.0f} TFLOP/s), flash {fl.get('us', float('nan')):.0f} ({fl.get('tflops', 0):.0f} TFLOP/s, max "
          f"diff {fl.get('max_diff_vs_triton', float('nan')):.1e}){' ' + fl['error'] if 'error' in fl else ''}, "
          f"flash on repeated K/V {res['flash_mha'].get('us', float('nan')):.0f}; x32 layers: "
          f"{32 * tr.get('us', 0) / 1e3:.1f} vs {32 * fl.get('us', 0) / 1e3:.1f} ms a chunk", flush=True)
    return res


def item_b(n: int) -> dict:
    import tempfile

    import profile_steps
    from gpu_suite import model_dir_for

    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-probe-")), "llama8b")
    return profile_steps.item_b(d, LLAMA_8B["vocab_size"], n, None, False)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="dlayer,extend,b")
    ap.add_argument("--batches", default="256,768")
    ap.add_argument("--gemm-batches", default="256,512,768,1024")
    ap.add_argument("--chunk", type=int, default=8192)
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "probe.json"))
    args = ap.parse_args()
    ceil = measure_ceilings()
    bw, matmul = ceil["copy_bytes_per_s"], ceil["bf16_matmul_flops"]
    report: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M"), "ceilings": ceil}
    print(f"copy {bw / 1e12:.2f} TB/s, matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for item in args.items.split(","):
        t = time.perf_counter()
        try:
            if item == "dlayer":
                report["dlayer"] = item_dlayer([int(b) for b in args.batches.split(",")], bw, matmul)
            elif item == "kvlayout":
                report["kvlayout"] = item_kvlayout([(1000, 40), (320, 300), (140, 420)], bw)
            elif item == "gemms":
                report["gemms"] = item_gemms([int(b) for b in args.gemm_batches.split(",")], bw, matmul)
            elif item == "extend":
                report["extend"] = item_extend(LLAMA_8B["vocab_size"], args.chunk, matmul)
            elif item == "b":
                report["b"] = item_b(args.num_requests)
        except Exception as exc:  # noqa: BLE001 - keep the other items
            import traceback

            traceback.print_exc()
            report[item] = {"error": repr(exc)}
        print(f"[{item}: {time.perf_counter() - t:.0f} s]", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        report["elapsed_s"] = time.perf_counter() - T0
        out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

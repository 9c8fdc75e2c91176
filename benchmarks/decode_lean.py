"""Issue 22.2 (a): the batch-1 bf16 GEMMs cuBLAS leaves short of their bytes floor, on the H200.

    python benchmarks/decode_lean.py --out $OUT/lean4.json                  # sweep, layer, (a)
    python benchmarks/decode_lean.py --items layer,a --out $OUT/lean4.json  # with kernels/bf16_gemv.py DEFAULTS

  gemv   per 8B layer shape at M = 1, weights cold (distinct copies cycled, > 4x L2): cuBLAS vs the configs
         of kernels/bf16_gemv.py (µs per call in a CUDA graph, against the bytes floor); exactness per shape:
         outputs equal to cuBLAS', relative error of each against a float64 product; down also with SiLU-and-mul
         in its loads. Writes the best config per shape (where >= 3% faster) as a small-M sweep JSON
         ("tables": {"bf16": ...}) for the arms below.
  layer  the whole layer (norm, qkv, rotary, KV store, attention, o, add+norm, gate_up, SiLU-and-mul, down)
         x 32 distinct layers in one graph: main's kernels vs rotary + KV store in one launch (rs), the GEMV on
         qkv / o or on every shape of the table, PDL on every Triton kernel; final hidden state against main's
  a      (a) as benchmarks/gpu_suite.py measures it (Engine, 257 vs 1 new tokens), arms "base" (table entries
         "cublas") and "lean" (the table), interleaved; each arm's greedy tokens for two prompts (compared)
(The decode attention's merge fused into stage 1 by tickets was measured here and lost: RESULTS.md 2026-12-03.)
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, gen, measure_ceilings, model_dir_for, rand_ids  # noqa: E402

HQ, HKV, D, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
LAYERS = LLAMA_8B["num_hidden_layers"]
SHAPES = {"qkv": ((HQ + 2 * HKV) * D, HIDDEN), "o": (HIDDEN, HQ * D), "gate_up": (2 * INTER, HIDDEN),
          "down": (HIDDEN, INTER)}
CONFIGS = {  # fma configs tried per shape (kernels/small_m.SmallMConfig keys)
    "qkv": ["fma-n8-k512-s1-w4-st3", "fma-n8-k512-s1-w4-st1", "fma-n8-k512-s2-w4-st3", "fma-n4-k512-s2-w2-st3",
            "fma-n16-k256-s1-w4-st3", "fma-n8-k1024-s1-w4-st2", "fma-n8-k256-s2-w2-st3", "fma-n4-k1024-s1-w4-st2",
            "fma-n4-k256-s2-w1-st3"],
    "o": ["fma-n8-k512-s1-w4-st3", "fma-n8-k512-s2-w4-st3", "fma-n8-k512-s4-w4-st3", "fma-n4-k512-s2-w2-st3",
          "fma-n4-k512-s4-w2-st3", "fma-n8-k256-s4-w2-st3", "fma-n16-k512-s2-w4-st3", "fma-n8-k1024-s2-w4-st2",
          "fma-n4-k256-s4-w1-st3"],
    "gate_up": ["fma-n8-k512-s1-w4-st3", "fma-n16-k256-s1-w4-st3", "fma-n16-k512-s1-w4-st3", "fma-n8-k1024-s1-w4-st2"],
    "down": ["fma-n8-k512-s4-w4-st3", "fma-n8-k1024-s2-w4-st2", "fma-n8-k512-s7-w4-st3", "fma-n4-k512-s4-w2-st3"],
}
T0 = time.perf_counter()


def graph_us(fn: Callable[[], Any], iters: int = 20) -> float:
    """µs per replay of `fn` captured once in a CUDA graph (median of `iters` replays)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(iters):
        ev[0].record()
        graph.replay()
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) * 1e3)
    del graph
    return statistics.median(times)


def item_gemv(bw: float, table_path: Path) -> dict:
    import torch.nn.functional as F

    from radixlm.kernels.bf16_gemv import bf16_gemv
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.kernels.small_m import SmallMConfig, tickets_for

    out: dict = {}
    best: dict[str, dict[str, str]] = {}
    for name, (n, k) in SHAPES.items():
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        wts = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        tickets = [tickets_for(n, x.device) for _ in range(copies)]
        reps = 2 * copies

        def cycle(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
            for i in range(reps):
                fn(wts[i % copies], i % copies)

        row: dict = {"floor_us": n * k * 2 / bw * 1e6,
                     "cublas_us": graph_us(lambda: cycle(lambda w, i: F.linear(x, w))) / reps}
        ref64 = (x.double() @ wts[0].double().T)
        cub = F.linear(x, wts[0])
        row["cublas_rel_err"] = ((cub.double() - ref64).norm() / ref64.norm()).item()
        configs = {}
        for key in CONFIGS[name]:
            cfg = SmallMConfig.parse(key)
            try:
                us = graph_us(lambda: cycle(lambda w, i: bf16_gemv(x, w, cfg, tickets[i]))) / reps
                got = bf16_gemv(x, wts[0], cfg, tickets[0])
                configs[key] = {"us": us, "rel_err": ((got.double() - ref64).norm() / ref64.norm()).item(),
                                "equal_cublas": (got == cub).float().mean().item(),
                                "repeat_equal": bool(torch.equal(got, bf16_gemv(x, wts[0], cfg, tickets[0]))),
                                "tickets_zero": not bool(tickets[0].any())}
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: recorded, the others run
                configs[key] = {"error": repr(exc)[:200]}
        row["configs"] = configs
        ok = {kk: v for kk, v in configs.items() if "us" in v and v["repeat_equal"] and v["tickets_zero"]}
        field, base = "us", row["cublas_us"]
        if name == "down":  # the GEMV takes SiLU-and-mul into its loads: against the activation kernel + cuBLAS
            gu = torch.randn(1, 2 * k, device="cuda", dtype=torch.bfloat16)
            row["cublas_silu_us"] = base = graph_us(lambda: cycle(lambda w, i: F.linear(silu_and_mul(gu), w))) / reps
            field = "silu_us"
            for key in ok:
                cfg = SmallMConfig.parse(key)
                ok[key]["silu_us"] = graph_us(
                    lambda: cycle(lambda w, i: bf16_gemv(gu, w, cfg, tickets[i], silu_mul=True))) / reps
        win = min(ok, key=lambda kk: ok[kk][field]) if ok else None
        row["best"] = win
        best[f"{n}x{k}"] = {"1": win if win and ok[win][field] < base * 0.97 else "cublas"}
        out[name] = row
        wts.clear()
        gc.collect()
        torch.cuda.empty_cache()
        b = configs.get(win, {}) if win else {}
        print(f"gemv {name} {n}x{k}: floor {row['floor_us']:.2f} µs, cuBLAS {row['cublas_us']:.2f}, best {win} "
              f"{b.get('us', float('nan')):.2f} (rel err {b.get('rel_err', float('nan')):.1e} vs cuBLAS's "
              f"{row['cublas_rel_err']:.1e}; {100 * b.get('equal_cublas', 0):.1f}% equal to cuBLAS) -> "
              f"{best[f'{n}x{k}']['1']}", flush=True)
        print("    " + ", ".join(f"{kk.removeprefix('fma-')} {v['us']:.2f}" if "us" in v else f"{kk} ERR"
                                 for kk, v in configs.items()), flush=True)
        if name == "down":
            print(f"    with SiLU-and-mul: activation kernel + cuBLAS {row['cublas_silu_us']:.2f}; in the GEMV's loads: "
                  + ", ".join(f"{kk.removeprefix('fma-')} {v['silu_us']:.2f}" for kk, v in ok.items()), flush=True)
    table_path.write_text(json.dumps({"tables": {"bf16": best}}))
    out["table"] = best
    return out


def item_layer(table: dict[str, dict[str, str]]) -> dict:
    import torch.nn.functional as F

    from radixlm.kernels import ops
    from radixlm.kernels.bf16_gemv import bf16_gemv
    from radixlm.kernels.decode_attention import decode_attention
    from radixlm.kernels.small_m import SmallMConfig, tickets_for

    torch.manual_seed(0)
    weights = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
                for name, (n, k) in SHAPES.items()} for _ in range(LAYERS)]
    cfgs = {name: table.get(f"{n}x{k}", {}).get("1", "cublas") for name, (n, k) in SHAPES.items()}
    tickets = {name: tickets_for(n, torch.device("cuda")) for name, (n, k) in SHAPES.items()}
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    ang = torch.arange(4096, device="cuda")[:, None] * inv
    cache = torch.cat((ang.cos(), ang.sin()), -1)
    ctx = 260
    kbuf = torch.randn(LAYERS, 4096, HKV, D, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.randn_like(kbuf)
    r2t = torch.arange(1, ctx + 1, device="cuda", dtype=torch.int32)[None]
    rows, lens = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), ctx, device="cuda", dtype=torch.int32)
    pos, slot = torch.full((1,), ctx - 1, device="cuda"), torch.full((1,), ctx, device="cuda")
    x0 = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)

    def step(use: set[str]) -> torch.Tensor:
        pdl = "pdl" in use  # every Triton kernel launched with programmatic dependent launch (kernels/gdc.py)

        def mm(x: torch.Tensor, lw: dict, name: str) -> torch.Tensor:
            if name in use and cfgs[name] != "cublas":
                return bf16_gemv(x, lw[name], SmallMConfig.parse(cfgs[name]), tickets[name], pdl=pdl)
            return F.linear(x, lw[name])

        h, res = x0, None
        for i, lw in enumerate(weights):
            if res is None:
                res, normed = h, ops.rms_norm(h, w, 1e-5, pdl=pdl)
            else:
                normed, res = ops.fused_add_rms_norm(h, res, w, 1e-5, pdl=pdl)
            q, k, v = mm(normed, lw, "qkv").split([HQ * D, HKV * D, HKV * D], -1)
            if "rs" in use:
                q = ops.rotary_store_kv(q.view(1, HQ, D), k.view(1, HKV, D), v.view(1, HKV, D), pos, cache, kbuf[i],
                                        vbuf[i], slot, pdl=pdl)
            else:
                q, k = ops.rotary(q.view(1, HQ, D), k.view(1, HKV, D), pos, cache)
                ops.store_kv(kbuf[i], vbuf[i], slot, k, v.view(1, HKV, D))
            attn = decode_attention(q, kbuf[i], vbuf[i], r2t, rows, lens, D**-0.5, pdl=pdl)
            normed, res = ops.fused_add_rms_norm(mm(attn.view(1, HIDDEN), lw, "o"), res, w, 1e-5, pdl=pdl)
            gate_up = mm(normed, lw, "gate_up")
            if "down" in use and cfgs["down"] != "cublas":  # SiLU-and-mul in the down GEMV's loads
                h = bf16_gemv(gate_up, lw["down"], SmallMConfig.parse(cfgs["down"]), tickets["down"], pdl=pdl,
                              silu_mul=True)
            else:
                h = mm(ops.silu_and_mul(gate_up, pdl=pdl), lw, "down")
        return h

    # rs: rotary and the KV store in one launch; shape names: the GEMV there (where the table has it); pdl: PDL
    arms = {"main": set(), "rs": {"rs"}, "gemv_qkv_o": {"qkv", "o"}, "gemv_all+rs": set(SHAPES) | {"rs"},
            "gemv_all+rs+pdl": set(SHAPES) | {"rs", "pdl"}}
    out: dict = {"configs": cfgs}
    run = step

    for _ in range(2):  # interleaved twice
        for arm, use in arms.items():
            out.setdefault(arm, []).append(graph_us(lambda: run(use), iters=10) / LAYERS)
    ref = run(set()).float()
    for arm, use in arms.items():
        if use:
            got = run(use)
            out[f"{arm}_rel_err"] = ((got.float() - ref).norm() / ref.norm()).item()
            out[f"{arm}_bits_equal"] = bool(torch.equal(got.float(), ref))
    out["pdl_same_bits"] = bool(torch.equal(run(arms["gemv_all+rs+pdl"]), run(arms["gemv_all+rs"])))
    print("layer x 32 in one graph (µs/layer, min of 2): " + ", ".join(
        f"{arm} {min(out[arm]):.2f}" for arm in arms), flush=True)
    print("    final hidden vs main: " + ", ".join(
        f"{arm} {out[f'{arm}_rel_err']:.1e}{' (same bits)' if out[f'{arm}_bits_equal'] else ''}"
        for arm in arms if arms[arm]) + f"; PDL on = off: {out['pdl_same_bits']}", flush=True)
    weights.clear()
    return out


def item_a(d: Path, arm: str, table_json: str, pdl: bool) -> dict:
    import radixlm

    os.environ["RADIXLM_SMALL_M_TABLE"] = table_json  # the scheduler process inherits it
    rng = random.Random(1)
    with radixlm.Engine(str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.55, context_length=8192, cuda_graph_max_bs=1,
                        decode_pdl="on" if pdl else "off", log_level="warning") as eng:
        gen(eng, rand_ids(64, VOCAB, rng), 8)
        t1 = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 1) for _ in range(3))
        tn = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 257) for _ in range(2))
        tokens = [eng.generate(input_ids=rand_ids(100, VOCAB, random.Random(50 + i)),
                               sampling_params={"temperature": 0, "max_new_tokens": 64, "ignore_eos": True})["output_ids"]
                  for i in range(2)]
    res = {"arm": arm, "a_decode_tok_s": 256 / (tn - t1), "a_decode_ms_per_step": (tn - t1) / 256 * 1e3, "tokens": tokens}
    print(f"(a) [{arm}] {res['a_decode_tok_s']:.1f} tok/s ({res['a_decode_ms_per_step']:.3f} ms/step)", flush=True)
    return res


def guarded(fn: Callable[[], dict]) -> dict:
    try:
        return fn()
    except Exception as exc:  # noqa: BLE001 - keep the other items
        import traceback

        traceback.print_exc()
        return {"error": repr(exc)}
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="gemv,layer,a")  # (run in this order)
    ap.add_argument("--a-arms", default="base,lean,base,lean", help="base: cuBLAS everywhere; lean: the GEMV "
                    "where its table has it; lean_pdl: lean with --decode-pdl on")
    ap.add_argument("--budget-s", type=float, default=140.0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lean4.json"))
    args = ap.parse_args()
    items = set(args.items.split(","))
    report: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - T0
        out.write_text(json.dumps(report, indent=1, default=str))

    tmp = Path(tempfile.mkdtemp())
    table_path = tmp / "bf16_table.json"
    bw = measure_ceilings()["copy_bytes_per_s"]
    report["copy_bytes_per_s"] = bw
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)
    table: dict = {}
    if "gemv" in items:
        report["gemv"] = guarded(lambda: item_gemv(bw, table_path))
        table = report["gemv"].get("table", {})
        save()
    else:  # the kernel's measured defaults (kernels/bf16_gemv.py DEFAULTS), e.g. to re-run layer / a alone
        from radixlm.kernels.bf16_gemv import DEFAULTS

        table = {f"{n}x{k}": {"1": by_m[1]} for (n, k), by_m in DEFAULTS.items() if 1 in by_m}
        table_path.write_text(json.dumps({"tables": {"bf16": table}}))
        report["table"] = table
    if "layer" in items and table:
        report["layer"] = guarded(lambda: item_layer(table))
        save()
    if "a" in items and table:
        d = model_dir_for(LLAMA_8B, tmp, "llama8b")
        off_path = tmp / "cublas.json"
        off_path.write_text(json.dumps({"tables": {"bf16": {s: {"1": "cublas"} for s in table}}}))
        report["a"] = []
        for arm in args.a_arms.split(","):
            if time.perf_counter() - T0 > args.budget_s - 25:
                print(f"(a) [{arm}] skipped: budget", flush=True)
                break
            lean = arm.startswith("lean")
            report["a"].append(guarded(lambda: item_a(d, arm, str(table_path if lean else off_path), arm == "lean_pdl")))
            save()
        toks = {r["arm"]: r.get("tokens") for r in report["a"] if "tokens" in r}
        if "base" in toks and "lean" in toks:
            a, b = toks["base"], toks["lean"]
            same = [x == y for x, y in zip(a, b)]
            first = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(a, b)]
            report["a_tokens_equal"] = same
            print(f"(a) greedy tokens base vs lean: equal {same}, first difference at {first}", flush=True)
    save()
    print(f"done in {time.perf_counter() - T0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

"""Issue 22.2 (a): the batch-1 bf16 GEMVs against their bytes floor, and (a) with the configs chosen here, on the H200.

    python benchmarks/decode_lean.py --out $OUT/lean5.json                  # gemv, chain, small, a
    python benchmarks/decode_lean.py --items layer,a --out $OUT/lean5.json  # with kernels/bf16_gemv.py DEFAULTS

  gemv   per 8B layer shape (--gemv-shapes; "lm_head" too) at M = 1, weights cold (distinct copies cycled, > 4x L2): cuBLAS vs the configs
         of kernels/bf16_gemv.py, kinds "fma" and "pf" (µs per call in a CUDA graph, against the bytes floor);
         exactness per shape: outputs equal to cuBLAS', relative error of each against a float64 product; down
         with SiLU-and-mul in its loads (against the activation kernel + cuBLAS). Writes two small-M tables
         ("tables": {"bf16": ...}): "fast" (the GEMV where >= 1% faster than cuBLAS) and "all" (the best GEMV
         on every shape: cuBLAS breaks a PDL chain).
  chain  each shape's best config after the kernel that writes its input (an RMSNorm; SiLU-and-mul in the GEMV
         for down), both with and without PDL, and cuBLAS after it: what the prefetch before the PDL wait buys;
         for qkv / gate_up also the add + norm in the GEMV's loads (bf16_gemv_add_norm) instead of the norm kernel
  small  host and device µs of rms_norm / fused_add_rms_norm / silu_and_mul at T = 1 and 32
  layer  the whole layer (norm, qkv, rotary, KV store, attention, o, add+norm, gate_up, SiLU-and-mul, down)
         x 32 distinct layers in one graph: main's kernels vs rotary + KV store in one launch (rs), the GEMV on
         qkv / o or on every shape of the table, PDL on every Triton kernel; final hidden state against main's
  a      (a) as benchmarks/gpu_suite.py measures it (Engine, 257 vs 1 new tokens), arms (--a-arms): "base"
         (kernels/bf16_gemv.py DEFAULTS), "main" (main 404b049's table), "fast" / "all" (the tables above), "chain"
         (chain --chain-extra's fastest config per shape with PDL),
         "..._pdl" (with --decode-pdl on), "..._norm" (--decode-gemv-norm on: the add + RMSNorm in the qkv /
         gate_up GEMVs' loads), "..._auto" (both flags auto; otherwise off);
         each arm's greedy tokens for two prompts (compared with base's)
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
_SMALL = ["fma-n8-k512-s1-w4-st3", "pf-n8-k512-s1-w4-st1", "pf-n4-k512-s1-w2-st1", "pf-n8-k256-s1-w2-st1",
          "pf-n16-k512-s1-w8-st1", "pf-n8-k1024-s1-w8-st1", "pf-n16-k256-s1-w4-st1"]
CONFIGS = {  # configs tried per shape (kernels/small_m.SmallMConfig keys; the first: the table's before this sweep)
    "qkv": _SMALL,
    "o": _SMALL + ["pf-n8-k512-s2-w4-st1", "pf-n4-k512-s2-w2-st1"],
    "gate_up": ["fma-n16-k256-s1-w4-st3", "pf-n8-k512-s1-w4-st1", "pf-n16-k256-s1-w4-st1", "pf-n16-k512-s1-w8-st1",
                "pf-n4-k512-s1-w2-st1"],
    "down": ["fma-n8-k1024-s2-w4-st2", "pf-n8-k512-s1-w4-st1", "pf-n8-k512-s2-w4-st1", "pf-n4-k512-s2-w2-st1",
             "pf-n8-k1024-s2-w8-st1", "pf-n16-k512-s2-w8-st1", "pf-n8-k512-s4-w4-st1"],
}
# The LM head (the step's largest weight, outside the decode graph): gemv --gemv-shapes lm_head
LM_HEAD = {"lm_head": (VOCAB, HIDDEN)}
CONFIGS["lm_head"] = ["fma-n16-k256-s1-w4-st3", "fe-n16-k256-s1-w4-st3", "pf-n16-k256-s1-w4-st1", "pf-n8-k512-s1-w4-st1",
                      "fma-n8-k512-s1-w4-st3", "pf-n16-k512-s1-w8-st1"]
# chain candidates besides the table's config (kind "fe": the first weight tile before the PDL wait, then fma's loop)
CHAIN_EXTRA = {"qkv": ["fe-n8-k512-s1-w4-st3", "fe-n8-k512-s1-w4-st2", "fe-n4-k512-s1-w2-st3"],
               "o": ["fe-n4-k512-s1-w2-st3", "fe-n8-k512-s1-w4-st3"],
               "gate_up": ["fe-n16-k256-s1-w4-st3", "fe-n8-k512-s1-w4-st3"],
               "down": ["fe-n8-k512-s1-w4-st3"]}
# kernels/bf16_gemv.py's table on main 404b049 (before this branch): the "main" arm of (a)
MAIN_404B049 = {"6144x4096": {"1": "fma-n8-k512-s1-w4-st3"}, "4096x4096": {"1": "fma-n8-k512-s1-w4-st3"},
                "28672x4096": {"1": "cublas"}, "4096x14336": {"1": "cublas"}}
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


def item_gemv(bw: float, tmp: Path, names: list[str] | None = None) -> dict:
    """`names`: the shapes to sweep (default: the four layer projections; "lm_head" too)."""
    import torch.nn.functional as F

    from radixlm.kernels.bf16_gemv import bf16_gemv, gemv_tickets
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.kernels.small_m import SmallMConfig

    out: dict = {}
    tables: dict[str, dict[str, dict[str, str]]] = {"fast": {}, "all": {}}
    for name in names or list(SHAPES):
        n, k = {**SHAPES, **LM_HEAD}[name]
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        wts = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        silu = name == "down"  # the engine's down projection takes SiLU-and-mul in the GEMV's loads
        x = torch.randn(1, 2 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        xa = silu_and_mul(x) if silu else x
        reps = 2 * copies

        def cycle(fn: Callable[[torch.Tensor, int], torch.Tensor]) -> None:
            for i in range(reps):
                fn(wts[i % copies], i % copies)

        row: dict = {"floor_us": n * k * 2 / bw * 1e6, "silu_mul": silu,
                     "cublas_us": graph_us(lambda: cycle(lambda w, i: F.linear(silu_and_mul(x) if silu else x, w))) / reps}
        ref64 = (xa.double() @ wts[0].double().T)
        cub = F.linear(xa, wts[0])
        row["cublas_rel_err"] = ((cub.double() - ref64).norm() / ref64.norm()).item()
        configs = {}
        for key in CONFIGS[name]:
            cfg = SmallMConfig.parse(key)
            try:
                tickets = [gemv_tickets(n, cfg, x.device) for _ in range(copies)]
                us = graph_us(lambda: cycle(lambda w, i: bf16_gemv(x, w, cfg, tickets[i], silu_mul=silu))) / reps
                got = bf16_gemv(x, wts[0], cfg, tickets[0], silu_mul=silu)
                configs[key] = {"us": us, "rel_err": ((got.double() - ref64).norm() / ref64.norm()).item(),
                                "equal_cublas": (got == cub).float().mean().item(),
                                "repeat_equal": bool(torch.equal(got, bf16_gemv(x, wts[0], cfg, tickets[0], silu_mul=silu))),
                                "tickets_zero": not bool(tickets[0].any())}
            except Exception as exc:  # noqa: BLE001 - a config that does not compile: recorded, the others run
                configs[key] = {"error": repr(exc)[:200]}
        row["configs"] = configs
        ok = {kk: v for kk, v in configs.items()  # exact enough (cuBLAS' error, x2), repeatable, tickets back at zero
              if "us" in v and v["repeat_equal"] and v["tickets_zero"] and v["rel_err"] < 2 * row["cublas_rel_err"] + 1e-4}
        win = min(ok, key=lambda kk: ok[kk]["us"]) if ok else None
        row["best"] = win
        shape = f"{n}x{k}"
        tables["fast"][shape] = {"1": win if win and ok[win]["us"] < row["cublas_us"] * 0.99 else "cublas"}
        tables["all"][shape] = {"1": win or "cublas"}
        out[name] = row
        wts.clear()
        gc.collect()
        torch.cuda.empty_cache()
        b = configs.get(win, {}) if win else {}
        print(f"gemv {name} {shape}{' (SiLU-and-mul in the loads; cuBLAS + activation kernel)' if silu else ''}: floor "
              f"{row['floor_us']:.2f} µs, cuBLAS {row['cublas_us']:.2f}, best {win} {b.get('us', float('nan')):.2f} "
              f"(rel err {b.get('rel_err', float('nan')):.1e} vs cuBLAS's {row['cublas_rel_err']:.1e}; "
              f"{100 * b.get('equal_cublas', 0):.1f}% equal) -> fast: {tables['fast'][shape]['1']}", flush=True)
        print("    " + ", ".join(f"{kk} {v['us']:.2f}" if "us" in v else f"{kk} ERR" for kk, v in configs.items()),
              flush=True)
    for kind, table in tables.items():
        (tmp / f"bf16_{kind}.json").write_text(json.dumps({"tables": {"bf16": table}}))
    out["tables"] = tables
    return out


def item_chain(tables: dict, bw: float, with_extra: bool = False) -> dict:
    """Each shape's best config after a kernel that writes its input, PDL off / on, and cuBLAS there; `with_extra`:
    also CHAIN_EXTRA's configs with PDL, the fastest of each shape going to table "chain"."""
    import torch.nn.functional as F

    from radixlm.kernels import ops
    from radixlm.kernels.bf16_gemv import bf16_gemv, bf16_gemv_add_norm, gemv_tickets
    from radixlm.kernels.small_m import SmallMConfig

    out: dict = {}
    chosen: dict[str, dict[str, str]] = dict(tables["all"])
    out["tables"] = {"chain": chosen}
    for name, (n, k) in SHAPES.items():
        key = tables["all"].get(f"{n}x{k}", {}).get("1", "cublas")
        if key == "cublas":
            continue
        cfg = SmallMConfig.parse(key)
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        wts = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5 for _ in range(copies)]
        tickets = [gemv_tickets(n, cfg, torch.device("cuda")) for _ in range(copies)]
        silu = name == "down"  # its input [gate | up] (2K) comes from SiLU-and-mul over a 4K row here, else an RMSNorm
        x = torch.randn(1, 4 * k if silu else k, device="cuda", dtype=torch.bfloat16)
        nw = torch.ones(k, device="cuda", dtype=torch.bfloat16)
        reps = 2 * copies

        def produce(pdl: bool) -> torch.Tensor:
            return ops.silu_and_mul(x, pdl=pdl) if silu else ops.rms_norm(x, nw, 1e-5, pdl=pdl)

        res = torch.randn_like(x)

        def run(pdl: bool, cublas: bool = False, fused: bool = False) -> None:
            for i in range(reps):
                if fused:  # the norm (with a residual add) inside the GEMV's loads
                    bf16_gemv_add_norm(x, res, nw, 1e-5, wts[i % copies], cfg, tickets[i % copies], pdl=pdl)
                    continue
                h = produce(pdl)
                if cublas:
                    F.linear(ops.silu_and_mul(h) if silu else h, wts[i % copies])
                else:
                    bf16_gemv(h, wts[i % copies], cfg, tickets[i % copies], pdl=pdl, silu_mul=silu)

        norm_us = graph_us(lambda: [produce(False) for _ in range(reps)]) / reps
        row = {"config": key, "producer_us": norm_us}
        extra = [SmallMConfig.parse(e) for e in CHAIN_EXTRA.get(name, []) if e != key] if with_extra else []
        for _ in range(2):  # interleaved
            for arm, fn in (("off", lambda: run(False)), ("pdl", lambda: run(True)), ("cublas", lambda: run(False, True)),
                            ("fused", lambda: run(False, fused=True)), ("fused_pdl", lambda: run(True, fused=True))):
                if arm.startswith("fused") and (silu or with_extra):  # (with_extra: measured by lean5, time for others)
                    continue
                row.setdefault(arm, []).append(graph_us(fn) / reps)
            for ecfg in extra:  # the same chain with PDL, another config (its own tickets)
                cfg = ecfg
                tickets = [gemv_tickets(n, cfg, torch.device("cuda")) for _ in range(copies)]
                row.setdefault("pdl_by_config", {}).setdefault(ecfg.key(), []).append(graph_us(lambda: run(True)) / reps)
            cfg = SmallMConfig.parse(key)
            tickets = [gemv_tickets(n, cfg, torch.device("cuda")) for _ in range(copies)]
        by_cfg = {key: min(row["pdl"]), **{kk: min(v) for kk, v in row.get("pdl_by_config", {}).items()}}
        row["best_pdl"] = min(by_cfg, key=by_cfg.get)
        chosen[f"{n}x{k}"] = {"1": row["best_pdl"]}
        if len(by_cfg) > 1:
            print(f"chain {name} with PDL by config: " + ", ".join(f"{kk} {v:.2f}" for kk, v in by_cfg.items()), flush=True)
        out[name] = row
        print(f"chain {name}: {'silu' if silu else 'norm'} + {key}: {min(row['off']):.2f} µs, with PDL "
              f"{min(row['pdl']):.2f}; with cuBLAS {min(row['cublas']):.2f} (producer alone {norm_us:.2f}; GEMV floor "
              f"{n * k * 2 / bw * 1e6:.2f})" + ("" if silu or "fused" not in row else f"; add+norm in the GEMV {min(row['fused']):.2f}, with "
                                              f"PDL {min(row['fused_pdl']):.2f}"), flush=True)
        wts.clear()
        gc.collect()
        torch.cuda.empty_cache()
    return out


def item_small() -> dict:
    """Host µs per call (launch path, no sync) and device µs per call (graph of 20 calls) of the layer's small
    kernels at T = 1 and 32: whether fused_add_rms_norm's do_bench figure (23.7 µs at T = 32) is its own."""
    from radixlm.kernels import ops

    out: dict = {}
    for t in (1, 32):
        x = torch.randn(t, HIDDEN, device="cuda", dtype=torch.bfloat16)
        res = torch.randn_like(x)
        w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
        gu = torch.randn(t, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        cases = {"rms_norm": lambda: ops.rms_norm(x, w, 1e-5),
                 "fused_add_rms_norm": lambda: ops.fused_add_rms_norm(x, res, w, 1e-5),
                 "silu_and_mul": lambda: ops.silu_and_mul(gu)}
        for name, fn in cases.items():
            for _ in range(3):
                fn()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(200):
                fn()
            host = (time.perf_counter() - t0) / 200 * 1e6
            torch.cuda.synchronize()
            dev = graph_us(lambda: [fn() for _ in range(20)]) / 20
            out[f"{name} T={t}"] = {"host_us": host, "device_us": dev}
    print("small kernels (host µs per launch / device µs per call in a graph): " + ", ".join(
        f"{k} {v['host_us']:.1f}/{v['device_us']:.2f}" for k, v in out.items()), flush=True)
    return out


def item_layer(table: dict[str, dict[str, str]]) -> dict:
    import torch.nn.functional as F

    from radixlm.kernels import ops
    from radixlm.kernels.bf16_gemv import bf16_gemv, gemv_tickets
    from radixlm.kernels.decode_attention import decode_attention
    from radixlm.kernels.small_m import SmallMConfig

    torch.manual_seed(0)
    weights = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k**-0.5
                for name, (n, k) in SHAPES.items()} for _ in range(LAYERS)]
    cfgs = {name: table.get(f"{n}x{k}", {}).get("1", "cublas") for name, (n, k) in SHAPES.items()}
    tickets = {name: gemv_tickets(n, SmallMConfig(block_n=4), torch.device("cuda")) for name, (n, k) in SHAPES.items()}
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


def item_a(d: Path, arm: str, table_json: str, pdl: str, norm: str) -> dict:
    import radixlm

    os.environ["RADIXLM_SMALL_M_TABLE"] = table_json  # the scheduler process inherits it
    rng = random.Random(1)
    with radixlm.Engine(str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.55, context_length=8192, cuda_graph_max_bs=1,
                        decode_pdl=pdl, decode_gemv_norm=norm,
                        log_level="warning") as eng:
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
    ap.add_argument("--items", default="gemv,chain,small,a")  # (run in this order)
    ap.add_argument("--a-arms", default="base,all_pdl,all_pdl_norm,fast,all_norm",
                    help="base: kernels/bf16_gemv.py DEFAULTS; main: main 404b049's table; fast / all: the sweep's "
                    "tables (the defaults' where no sweep ran); _pdl: with --decode-pdl on; _norm: with "
                    "--decode-gemv-norm on; _auto: both flags auto (else off)")
    ap.add_argument("--chain-extra", action="store_true", help="chain: also CHAIN_EXTRA's configs with PDL (table 'chain')")
    ap.add_argument("--gemv-shapes", default=",".join(SHAPES),
                    help=f"gemv: the shapes to sweep, of {', '.join([*SHAPES, *LM_HEAD])} (the tables keep DEFAULTS for the others)")
    ap.add_argument("--budget-s", type=float, default=140.0)
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "lean5.json"))
    args = ap.parse_args()
    items = set(args.items.split(","))
    report: dict = {"device": torch.cuda.get_device_name(0), "date": time.strftime("%Y-%m-%d %H:%M")}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["elapsed_s"] = time.perf_counter() - T0
        out.write_text(json.dumps(report, indent=1, default=str))

    from radixlm.kernels.bf16_gemv import DEFAULTS

    tmp = Path(tempfile.mkdtemp())
    defaults = {f"{n}x{k}": {"1": by_m[1]} for (n, k), by_m in DEFAULTS.items() if 1 in by_m}
    tables = {"base": defaults, "fast": defaults, "all": defaults, "main": MAIN_404B049, "chain": defaults}
    bw = measure_ceilings()["copy_bytes_per_s"]
    report["copy_bytes_per_s"] = bw
    print(f"copy {bw / 1e12:.2f} TB/s", flush=True)
    if "gemv" in items:
        report["gemv"] = guarded(lambda: item_gemv(bw, tmp, args.gemv_shapes.split(",")))
        for kind, swept in report["gemv"].get("tables", {}).items():  # shapes not swept keep the defaults' entries
            tables[kind] = {**defaults, **swept}
        save()
    for kind, table in tables.items():
        (tmp / f"bf16_{kind}.json").write_text(json.dumps({"tables": {"bf16": table}}))
    report["tables"] = tables
    if "chain" in items:
        report["chain"] = guarded(lambda: item_chain(tables, bw, args.chain_extra))
        tables.update(report["chain"].get("tables", {}))
        for kind, table in tables.items():
            (tmp / f"bf16_{kind}.json").write_text(json.dumps({"tables": {"bf16": table}}))
        report["tables"] = tables
        save()
    if "small" in items:
        report["small"] = guarded(item_small)
        save()
    if "layer" in items:
        report["layer"] = guarded(lambda: item_layer(tables["fast"]))
        save()
    if "a" in items:
        d = model_dir_for(LLAMA_8B, tmp, "llama8b")
        report["a"] = []
        for arm in args.a_arms.split(","):
            if time.perf_counter() - T0 > args.budget_s - 18:
                print(f"(a) [{arm}] skipped: budget", flush=True)
                continue
            table, *flags = arm.split("_")
            pdl, norm = ("auto", "auto") if "auto" in flags else ("on" if "pdl" in flags else "off",
                                                                  "on" if "norm" in flags else "off")
            report["a"].append(guarded(lambda: item_a(d, arm, str(tmp / f"bf16_{table}.json"), pdl, norm)))
            save()
        toks = {r["arm"]: r.get("tokens") for r in report["a"] if "tokens" in r}
        for arm, got in toks.items():
            if arm != "base" and "base" in toks:
                first = [next((j for j, (u, v) in enumerate(zip(x, y)) if u != v), None) for x, y in zip(toks["base"], got)]
                report.setdefault("a_first_difference", {})[arm] = first
        print(f"(a) greedy tokens, first step differing from base's: {report.get('a_first_difference')}", flush=True)
    save()
    print(f"done in {time.perf_counter() - T0:.0f} s", flush=True)


if __name__ == "__main__":
    main()

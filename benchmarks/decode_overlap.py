"""Issue 22.2: where the batch-1 bf16 decode step loses to its bytes floor, and the exact switch that
overlaps the small kernels' launches: programmatic dependent launch (--decode-pdl, kernels/gdc.py).
(An L2 prefetch of the next GEMM's weights and a GEMV candidate were measured here too and dropped:
benchmarks/RESULTS.md; their code is in commit 31b5dd3 on branch lean3.)

    python benchmarks/decode_overlap.py --out $OUT/lean3.json

  gemm   cuBLAS at M = 1 on the four layer shapes against their bytes floor, weights cold vs hot in L2
  tail   the LM head and greedy argmax at 1..16 rows, torch's vs kernels/argmax.py (and equality)
  chain  the layer's small kernels alone (add+norm, rotary, KV store, decode attention, add+norm,
         SiLU-and-mul), 32 layers in one CUDA graph, PDL off / on: µs per layer
  arms   per arm (PDL off / on), an in-process scheduler at batch 1 (Llama-3.1-8B shape,
         random bf16 weights, 32 layers and 1 layer): the decode graph's replay time (CUDA events) against
         the sum of its kernels (torch.profiler: the gaps), per-kernel µs per layer, the step's kernels
         outside the graph (LM head, argmax, copies), wall ms per step, and the greedy tokens (every arm
         must produce the same ones: the switch changes no arithmetic)
  a      (a) as benchmarks/gpu_suite.py measures it (Engine, 257 vs 1 new tokens) for --a-arms
Arms: base (PDL off), pdl; "@N" runs an arm at decode batch N (N requests; default 1). The JSON is rewritten
after every item and arm; --budget-s skips what would not fit.
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
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, gen, measure_ceilings, model_dir_for, rand_ids  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402

HQ, HKV, D, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
LAYERS = LLAMA_8B["num_hidden_layers"]
T0 = time.perf_counter()


def arm_settings(arm: str) -> tuple[str, int]:
    """'pdl@8' -> (decode_pdl, batch size)."""
    name, _, bs = arm.partition("@")
    if name not in ("base", "pdl"):
        raise ValueError(f"unknown arm {arm!r}")
    return "on" if name == "pdl" else "off", int(bs or 1)


def graph_us(fn: Callable[[], Any], iters: int = 20) -> float:
    """µs per replay of `fn` captured once in a CUDA graph (median)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return replay_us(graph, iters)


def replay_us(graph: torch.cuda.CUDAGraph, iters: int = 30) -> float:
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
    return statistics.median(times)


def item_chain() -> dict:
    from radixlm.kernels import ops
    from radixlm.kernels.decode_attention import decode_attention

    torch.manual_seed(0)
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    cache = torch.cat(((torch.arange(4096, device="cuda")[:, None] * inv).cos(),
                       (torch.arange(4096, device="cuda")[:, None] * inv).sin()), -1)
    ctx = 260
    kbuf = torch.randn(LAYERS, 4096, HKV, D, device="cuda", dtype=torch.bfloat16)
    vbuf = torch.randn_like(kbuf)
    r2t = torch.arange(1, ctx + 1, device="cuda", dtype=torch.int32)[None]
    rows, lens = torch.zeros(1, dtype=torch.int64, device="cuda"), torch.full((1,), ctx, device="cuda", dtype=torch.int32)
    pos = torch.full((1,), ctx - 1, device="cuda")
    slot = torch.full((1,), ctx, device="cuda")
    x = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    qkv = torch.randn(1, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
    gu = torch.randn(1, 2 * INTER, device="cuda", dtype=torch.bfloat16)
    w = torch.ones(HIDDEN, device="cuda", dtype=torch.bfloat16)
    out: dict = {}

    def layers(pdl: bool) -> torch.Tensor:
        res = x
        h = x
        for i in range(LAYERS):
            normed, res = ops.fused_add_rms_norm(h, res, w, 1e-5, pdl=pdl)
            q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
            q, k = ops.rotary(q.view(1, HQ, D), k.view(1, HKV, D), pos, cache, pdl=pdl)
            ops.store_kv(kbuf[i], vbuf[i], slot, k, v.view(1, HKV, D), pdl=pdl)
            attn = decode_attention(q, kbuf[i], vbuf[i], r2t, rows, lens, D**-0.5, pdl=pdl)
            normed, res = ops.fused_add_rms_norm(attn.view(1, HIDDEN), res, w, 1e-5, pdl=pdl)
            h = ops.silu_and_mul(gu, pdl=pdl)[:, :HIDDEN] + normed
        return h

    results = {}
    for pdl in (False, True, False, True):  # twice each, interleaved
        out.setdefault(f"pdl_{pdl}", []).append(graph_us(lambda: layers(pdl)) / LAYERS)
        results[pdl] = layers(pdl)
    torch.cuda.synchronize()
    out["same_bits"] = torch.equal(results[False], results[True])
    off, on = min(out["pdl_False"]), min(out["pdl_True"])
    print(f"chain (small kernels only, 7 launches + 1 add a layer, ctx {ctx}): PDL off {off:.2f} µs/layer, "
          f"on {on:.2f} ({off - on:+.2f}); same bits {out['same_bits']}", flush=True)
    return out


def item_gemm(bw: float) -> dict:
    """cuBLAS M = 1 at the layer shapes, weights cold (distinct copies cycled, > 4x L2) and hot in L2 (one
    weight called again and again): what faster weight delivery could win per GEMM at most."""
    import torch.nn.functional as F

    out: dict = {}
    for name, n, k in (("qkv", (HQ + 2 * HKV) * D, HIDDEN), ("o", HIDDEN, HQ * D), ("gate_up", 2 * INTER, HIDDEN),
                       ("down", HIDDEN, INTER)):
        copies = max(2, -(-256 * 2**20 // (n * k * 2)))
        wts = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) for _ in range(copies)]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def cycle(ws: list[torch.Tensor], xin: torch.Tensor, reps: int) -> None:
            for i in range(reps):
                F.linear(xin, ws[i % len(ws)])

        reps = 4 * copies
        cold = graph_us(lambda: cycle(wts, x, reps)) / reps
        hot = graph_us(lambda: cycle(wts[:1], x, reps)) / reps
        out[name] = {"cold_us": cold, "hot_us": hot, "floor_us": n * k * 2 / bw * 1e6, "mb": n * k * 2 / 2**20}
        wts.clear()
    print("GEMM M=1 (cuBLAS, µs per call in a graph): " + ", ".join(
        f"{k} {v['cold_us']:.1f} cold / {v['hot_us']:.1f} hot-in-L2 (floor {v['floor_us']:.1f}, {v['mb']:.0f} MB)"
        for k, v in out.items()), flush=True)
    return out


def item_tail() -> dict:
    """The step's tail outside the graph: LM head, its float cast, greedy argmax (torch vs kernels/argmax.py)."""
    import torch.nn.functional as F

    from radixlm.kernels.argmax import argmax_two_stage

    head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.02
    h = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    out = {"lm_head_us": graph_us(lambda: F.linear(h, head)),
           "lm_head_float_us": graph_us(lambda: F.linear(h, head).float())}
    for rows in (1, 2, 4, 8, 16):
        logits = F.linear(torch.randn(rows, HIDDEN, device="cuda", dtype=torch.bfloat16), head).float()
        out[f"argmax_torch_us_{rows}"] = graph_us(lambda: logits.argmax(-1))
        out[f"argmax_two_stage_us_{rows}"] = graph_us(lambda: argmax_two_stage(logits))
        out[f"argmax_equal_{rows}"] = torch.equal(argmax_two_stage(logits), logits.argmax(-1))
    ties = torch.zeros(3, VOCAB, device="cuda")
    ties[1, 7::9000] = 1.0
    ties[2, 100] = float("nan")
    out["argmax_equal_ties_nan"] = torch.equal(argmax_two_stage(ties), ties.argmax(-1))
    print(f"tail: LM head {out['lm_head_us']:.1f} µs (+ float {out['lm_head_float_us'] - out['lm_head_us']:.1f}); argmax "
          "torch / two-stage µs: " + ", ".join(f"{r} rows {out[f'argmax_torch_us_{r}']:.1f} / "
                                               f"{out[f'argmax_two_stage_us_{r}']:.1f}" for r in (1, 2, 4, 8, 16))
          + f"; equal {all(v for k, v in out.items() if k.startswith('argmax_equal'))}", flush=True)
    return out


def kernel_kind(name: str) -> str:
    for key, kind in (("_rotary_kernel", "rotary"), ("_store_kv_kernel", "KV store"), ("_decode_stage1", "decode attention"),
                      ("_decode_stage2", "decode attention merge"), ("_rms_norm_kernel", "RMSNorm (+ add)"),
                      ("_silu_and_mul_kernel", "SiLU-and-mul")):
        if key in name:
            return kind
    low = name.lower()
    if any(s in low for s in ("gemm", "gemv", "mma1", "cutlass", "nvjet", "sm90", "xmma", "splitk", "cublas")):
        return "GEMM"
    if any(s in low for s in ("argmax", "reduce")):
        return "argmax / reduce"
    if any(s in low for s in ("index", "embedding", "gather")):
        return "gather / embedding"
    if any(s in low for s in ("copy", "elementwise", "memcpy", "memset", "cast", "fill")):
        return "copies / casts / fills"
    return "other: " + name[:40]


def profiled(fn: Callable[[], None], reps: int, gemms: list[str]) -> tuple[dict[str, float], dict[str, float]]:
    """(µs per rep by kernel kind, launches per rep by kind) under torch.profiler. The GEMMs of a rep are
    named in order from `gemms` (runs of consecutive GEMM kernels are one GEMM, e.g. a split-K reduce)."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    events = sorted((e for e in prof.events() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA),
                    key=lambda e: e.time_range.start)
    us: dict[str, float] = defaultdict(float)
    count: dict[str, float] = defaultdict(float)
    group, previous = -1, ""
    for e in events:
        kind = kernel_kind(e.name)
        if kind == "GEMM":
            group += previous != "GEMM"
            kind = f"GEMM {gemms[group % len(gemms)]}"
        previous = kind.split(" ")[0]
        us[kind] += e.time_range.elapsed_us() / reps
        count[kind] += 1 / reps
    return dict(us), dict(count)


def measure_arm(d: Path, arm: str, layers: int, decode_steps: int = 160) -> dict:
    pdl, bs = arm_settings(arm)
    sched = make_scheduler(d, cuda_graph_max_bs=bs, mem_fraction_static=0.5, decode_pdl=pdl)
    runner = sched.runner
    res: dict = {"arm": arm, "layers": layers, "bs": bs, "ops": runner.model.ops.name}
    tokens: dict[int, list[int]] = {i: [] for i in range(bs)}
    forwards: list[str] = []
    inner = runner.forward
    runner.forward = lambda fb: (forwards.append(fb.mode.value), inner(fb))[1]
    for i in range(bs):
        sched.handle(TokenizedGenerateReq(rid=f"{i}", input_ids=rand_ids(128, VOCAB, random.Random(3 + i)),
                                          params=SamplingParams(temperature=0, max_new_tokens=decode_steps + 1,
                                                                ignore_eos=True)))

    def steps(n: int) -> None:
        goal = len(forwards) + n
        while len(forwards) < goal and not sched.idle:
            sched.step()
            for out in sched.pop_outputs():
                tokens[int(out.rid)].extend(out.output_ids)

    steps(1 + 40)  # prefill, warm decode steps
    graph = runner.graph_runner.graphs[bs, False, False]
    res["replay_us"] = replay_us(graph)
    gemms = ["qkv", "o", "gate_up", "down"] * layers
    res["graph_us"], res["graph_launches"] = profiled(graph.replay, 10, gemms)
    res["graph_kernel_sum_us"] = sum(res["graph_us"].values())
    res["gap_us"] = res["replay_us"] - res["graph_kernel_sum_us"]
    torch.cuda.synchronize()
    t = time.perf_counter()
    steps(80)
    torch.cuda.synchronize()
    res["wall_ms_per_step"] = (time.perf_counter() - t) / 80 * 1e3
    res["step_us"], _ = profiled(lambda: steps(1), 12, gemms + ["LM head"])
    res["tail_us"] = {k: v - res["graph_us"].get(k, 0.0) for k, v in res["step_us"].items()
                      if v - res["graph_us"].get(k, 0.0) > 0.5}
    steps(10**6)
    res["tokens"] = [tokens[i] for i in range(bs)]
    sched = runner = graph = inner = None  # free the weights and pools before the next arm
    gc.collect()
    torch.cuda.empty_cache()
    per_layer = {k: v / layers for k, v in sorted(res["graph_us"].items(), key=lambda kv: -kv[1])}
    res["per_layer_us"] = per_layer
    print(f"[{arm}] {layers} layer(s), ops {res['ops']}: replay {res['replay_us']:.1f} µs, "
          f"kernels {res['graph_kernel_sum_us']:.1f} (gap {res['gap_us']:+.1f}; "
          f"{res['replay_us'] / layers:.2f} µs/layer); step {res['wall_ms_per_step']:.3f} ms = "
          f"{bs * 1e3 / res['wall_ms_per_step']:.1f} tok/s", flush=True)
    print("    per layer: " + ", ".join(f"{k} {v:.2f}" for k, v in per_layer.items()), flush=True)
    print("    outside graph per step: " + ", ".join(f"{k} {v:.1f}" for k, v in res["tail_us"].items()), flush=True)
    return res


def item_a(d: Path, arm: str, max_bs: int) -> dict:
    import radixlm

    pdl, _ = arm_settings(arm)
    rng = random.Random(1)
    with radixlm.Engine(str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.55, context_length=8192, cuda_graph_max_bs=max_bs,
                        decode_pdl=pdl, log_level="warning") as eng:
        gen(eng, rand_ids(64, VOCAB, rng), 8)
        t1 = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 1) for _ in range(3))
        tn = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 257) for _ in range(2))
    res = {"arm": arm, "a_decode_tok_s": 256 / (tn - t1), "a_decode_ms_per_step": (tn - t1) / 256 * 1e3}
    print(f"(a) [{arm}] {res['a_decode_tok_s']:.1f} tok/s ({res['a_decode_ms_per_step']:.3f} ms/step)", flush=True)
    return res


def guarded(fn: Callable[[], dict]) -> dict:
    """fn(), or {"error": ...} so that the other items still run; GPU memory freed after either."""
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
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", default="chain,gemm,tail,arms,a")
    ap.add_argument("--arms", default="base,pdl,base@8,pdl@8")
    ap.add_argument("--one-layer-arms", default="base,pdl", help="arms also run on a 1-layer model")
    ap.add_argument("--a-arms", default="base,pdl")
    ap.add_argument("--a-max-bs", type=int, default=256, help="cuda_graph_max_bs of the (a) engines (gpu_suite: 256)")
    ap.add_argument("--budget-s", type=float, default=135)
    ap.add_argument("--out", default="benchmarks/results/decode_overlap.json")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="radixlm-overlap-"))
    d32 = model_dir_for(LLAMA_8B, root, "llama8b")
    d1 = model_dir_for({**LLAMA_8B, "num_hidden_layers": 1}, root, "llama8b-1layer")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M")}
    report["ceilings"] = measure_ceilings()
    bw = report["ceilings"]["copy_bytes_per_s"]
    layer_bytes = 2 * (HIDDEN * (HQ + 2 * HKV) * D + HQ * D * HIDDEN + 3 * HIDDEN * INTER)
    report["layer_floor_us"] = layer_bytes / bw * 1e6
    print(f"copy {bw / 1e12:.2f} TB/s: layer weights floor {report['layer_floor_us']:.1f} µs, LM head "
          f"{2 * VOCAB * HIDDEN / bw * 1e6:.1f} µs", flush=True)

    def save() -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))

    def time_left(need: float) -> bool:
        left = args.budget_s - (time.perf_counter() - T0)
        if left < need:
            print(f"skipped: {left:.0f} s left, ~{need:.0f} s needed", flush=True)
        return left >= need

    items = args.items.split(",")
    for key, need, fn in (("chain", 10, item_chain), ("gemm", 8, lambda: item_gemm(bw)), ("tail", 8, item_tail)):
        if key in items and time_left(need):
            report[key] = guarded(fn)
            save()
    if "arms" in items:
        report["arms"] = []
        arms32 = [(a, 32) for a in args.arms.split(",")]
        jobs = arms32[:2] + [(a, 1) for a in args.one_layer_arms.split(",") if a] + arms32[2:]  # by importance
        for arm, layers in jobs:
            if not time_left(12 if layers == 32 else 6):
                break
            d = d32 if layers == 32 else d1
            report["arms"].append({"arm": arm, "layers": layers, **guarded(lambda: measure_arm(d, arm, layers))})
            save()
        done = [r for r in report["arms"] if "tokens" in r]
        for key in sorted({(r["layers"], r["bs"]) for r in done}, reverse=True):
            group = [r for r in done if (r["layers"], r["bs"]) == key]
            same = {r["arm"]: r["tokens"] == group[0]["tokens"] for r in group}
            print(f"greedy tokens identical to {group[0]['arm']} ({key[0]} layer(s), batch {key[1]}, "
                  f"{sum(map(len, group[0]['tokens']))} tokens): {same}")
            report[f"tokens_identical_{key[0]}_bs{key[1]}"] = same
    if "a" in items:
        report["a"] = []
        for arm in args.a_arms.split(","):
            if not time_left(20):
                break
            report["a"].append({"arm": arm, **guarded(lambda: item_a(d32, arm, args.a_max_bs))})
            save()
    report["elapsed_s"] = time.perf_counter() - T0
    save()
    print(f"done in {report['elapsed_s']:.0f} s")

if __name__ == "__main__":
    main()

"""Issue 22.2: the batch-1 decode layer's kernel budget and (a), with the decode fusions on and off, in one run.

    python benchmarks/decode_layer_budget.py --out $OUT/decode_layer_budget.json

  check    the fused kernels against their references at the Llama-3.1-8B shapes on the GPU: rotary +
           KV store (bf16 and FP8 pools, with and without q/k norm), one-launch decode attention vs the
           two-launch kernel and the torch reference, rotary + KV store + attention in one launch vs the
           composed references, the tail's add + gather + norm
  kernels  the old and the new kernel sequences, each captured 32 times in one CUDA graph (so launch
           gaps count as they do in a decode graph): µs per layer's worth, plus the layer's GEMMs and
           the LM-head tail at batch 1 for scale
  budget   torch.profiler over CUDA-graph decode steps at batch 1 (context ~260), fused and unfused, in
           this process (a Scheduler, no IPC): µs per layer by kernel, their sum against the layer's
           bytes floor, the step's device time and wall time per step
  a        (a) as benchmarks/gpu_suite.py measures it (Engine, 257 vs 1 new tokens), fused and unfused
Llama-3.1-8B shape, random bf16 weights. The JSON is rewritten after every item.
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
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, gen, measure_ceilings, model_dir_for, rand_ids  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.kernels import ops_ref  # noqa: E402
from radixlm.kernels.attention_ref import decode_attention_ref  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402

HQ, HKV, D, HIDDEN, INTER, VOCAB = 32, 8, 128, 4096, 14336, 128256
LAYERS = LLAMA_8B["num_hidden_layers"]


def rope_cache(max_pos: int = 8192) -> torch.Tensor:
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, dtype=torch.float32, device="cuda") / D))
    ang = torch.arange(max_pos, dtype=torch.float32, device="cuda")[:, None] * inv[None, :]
    return torch.cat((ang.cos(), ang.sin()), dim=-1)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def paged(batch: int, ctx: int, dtype: torch.dtype = torch.bfloat16):
    """A KV pool holding `batch` requests of `ctx` tokens at scattered slots: (k, v, req_to_token, rows, lens)."""
    slots = torch.randperm(batch * ctx, device="cuda") + 1
    k = torch.randn(batch * ctx + 1, HKV, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    r2t = slots.view(batch, ctx).to(torch.int32).contiguous()
    return k, v, r2t, torch.arange(batch, device="cuda"), torch.full((batch,), ctx, device="cuda")


def item_check() -> dict:
    from radixlm.kernels.decode_attention import decode_attention
    from radixlm.kernels.decode_attention_qkv import decode_attention_qkv
    from radixlm.kernels.ops import add_rms_norm_rows, rms_norm
    from radixlm.kernels.rope_store import rotary_store_kv

    torch.manual_seed(0)
    cache, out = rope_cache(), {"rope_store": [], "attention": []}
    for tokens in (1, 8, 333):
        for pool_dtype, scales in ((torch.bfloat16, (1.0, 1.0)), (torch.float8_e4m3fn, (0.5, 2.0))):
            for qk_norm in (False, True):
                qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16) * 2
                pos = torch.randint(0, 8192, (tokens,), device="cuda")
                slots = torch.randperm(4096, device="cuda")[:tokens] + 1
                norms = ((torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5,
                          torch.rand(D, device="cuda", dtype=torch.bfloat16) + 0.5, 1e-6) if qk_norm else (None, None, 0.0))
                bufs = [torch.randn(4097, HKV, D, device="cuda").to(pool_dtype) for _ in range(2)]
                refs = [b.clone() for b in bufs]
                q = rotary_store_kv(qkv, HQ, HKV, pos, cache, *bufs, slots, *scales, *norms)
                q_ref = ops_ref.rotary_store_kv_ref(qkv, HQ, HKV, pos, cache, *refs, slots, *scales, *norms)
                out["rope_store"].append({
                    "tokens": tokens, "pool": str(pool_dtype), "qk_norm": qk_norm, "q_equal": torch.equal(q, q_ref),
                    "q_rel_err": rel_err(q, q_ref),
                    "k_codes_equal_frac": (bufs[0][slots].view(torch.uint8) == refs[0][slots].view(torch.uint8))
                    .float().mean().item(),
                    "v_equal": torch.equal(bufs[1].view(torch.uint8), refs[1].view(torch.uint8))})
    for batch in (1, 8):
        for ctx in (128, 385, 2048, 8192):
            k, v, r2t, rows, lens = paged(batch, ctx)
            q = torch.randn(batch, HQ, D, device="cuda", dtype=torch.bfloat16)
            args = (q, k, v, r2t, rows, lens, D**-0.5)
            one = decode_attention(*args)
            two = decode_attention(*args, single_launch=False)
            out["attention"].append({"batch": batch, "ctx": ctx, "equal_to_two_launch": torch.equal(one, two),
                                     "rel_err_vs_two_launch": rel_err(one, two),
                                     "rel_err_vs_ref": rel_err(one, decode_attention_ref(*args))})
    out["attention_qkv"] = []
    for batch in (1, 8):
        for ctx in (1, 129, 385, 4096):
            for pool_dtype, scales in ((torch.bfloat16, (1.0, 1.0)), (torch.float8_e4m3fn, (0.5, 2.0))):
                k, v, r2t, rows, lens = paged(batch, ctx)
                k, v = k.to(pool_dtype), v.to(pool_dtype)
                qkv = torch.randn(batch, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
                pos = torch.randint(0, 8192, (batch,), device="cuda")
                slots = r2t[rows, lens - 1].long()
                k_ref, v_ref = k.clone(), v.clone()
                q_ref = ops_ref.rotary_store_kv_ref(qkv, HQ, HKV, pos, cache, k_ref, v_ref, slots, *scales)
                ref = decode_attention_ref(q_ref, k_ref, v_ref, r2t, rows, lens, D**-0.5, k_scale=scales[0],
                                           v_scale=scales[1])
                got = decode_attention_qkv(qkv, HQ, HKV, pos, cache, k, v, slots, r2t, rows, lens, D**-0.5,
                                           k_scale=scales[0], v_scale=scales[1])
                out["attention_qkv"].append({
                    "batch": batch, "ctx": ctx, "pool": str(pool_dtype), "rel_err_vs_ref": rel_err(got, ref),
                    "k_codes_equal_frac": (k[slots].view(torch.uint8) == k_ref[slots].view(torch.uint8))
                    .float().mean().item(),
                    "v_equal": torch.equal(v.view(torch.uint8), v_ref.view(torch.uint8))})
    x, res = (torch.randn(8, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    w = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16) + 0.5
    idx = torch.tensor([7, 0, 3], device="cuda")
    tail = add_rms_norm_rows(x, res, w, 1e-5, idx)
    out["tail_equal_to_unfused"] = torch.equal(tail, rms_norm((x + res)[idx], w, 1e-5))
    out["tail_rel_err_vs_ref"] = rel_err(tail, ops_ref.add_rms_norm_rows_ref(x, res, w, 1e-5, idx))
    rs, at, aq = out["rope_store"], out["attention"], out["attention_qkv"]
    # bits may differ from torch's where the GPU contracts a * b - c * d into an FMA: tolerances, equality reported
    out["ok"] = (all(r["q_rel_err"] < 1e-2 and r["v_equal"] and r["k_codes_equal_frac"] > 0.99 for r in rs)
                 and all(a["rel_err_vs_two_launch"] < 1e-3 and a["rel_err_vs_ref"] < 2e-2 for a in at)
                 and all(a["rel_err_vs_ref"] < 2e-2 and a["v_equal"] and a["k_codes_equal_frac"] > 0.99 for a in aq)
                 and out["tail_equal_to_unfused"] and out["tail_rel_err_vs_ref"] < 1e-2)
    print(f"check: {'ok' if out['ok'] else 'FAILED'}; rotary+store q bit-equal {sum(r['q_equal'] for r in rs)}/"
          f"{len(rs)} (max rel err {max(r['q_rel_err'] for r in rs):.1e}), K codes equal >= "
          f"{min(r['k_codes_equal_frac'] for r in rs):.4f}; attention one launch == two launches "
          f"{sum(a['equal_to_two_launch'] for a in at)}/{len(at)}, max rel err vs ref "
          f"{max(a['rel_err_vs_ref'] for a in at):.1e}; rotary+store+attention in one: max rel err "
          f"{max(a['rel_err_vs_ref'] for a in aq):.1e}, K codes equal >= {min(a['k_codes_equal_frac'] for a in aq):.4f}, "
          f"V equal {sum(a['v_equal'] for a in aq)}/{len(aq)}; tail == unfused {out['tail_equal_to_unfused']}")
    return out


def graph_us(fn: Callable[[], Any], reps: int = 32, iters: int = 15) -> float:
    """µs per call of `fn` captured `reps` times back to back in one CUDA graph (median of replays)."""
    for _ in range(2):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
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
        times.append(ev[0].elapsed_time(ev[1]) * 1e3 / reps)
    del graph
    return statistics.median(times)


def item_kernels(bw: float) -> dict:
    from radixlm.kernels import get_kernel_ops
    from radixlm.kernels.decode_attention import decode_attention
    from radixlm.kernels.decode_attention_qkv import decode_attention_qkv
    from radixlm.kernels.rope_store import rotary_store_kv

    ops, rows = get_kernel_ops(True), []
    cache = rope_cache()

    def row(name: str, old: float | None, new: float | None, floor_bytes: int = 0) -> None:
        rows.append({"name": name, "old_us": old, "new_us": new, "floor_us": floor_bytes / bw * 1e6})
        old_s, new_s = ("" if t is None else f"{t:8.2f}" for t in (old, new))
        print(f"  {name:<44}{old_s:>9}{new_s:>9}{floor_bytes / bw * 1e6:>9.2f}")

    print(f"\nkernels (µs per call in a CUDA graph of 32; floor = bytes / {bw / 1e12:.2f} TB/s)\n"
          f"  {'':<44}{'old':>9}{'new':>9}{'floor':>9}")
    for bs in (1, 8):
        qkv = torch.randn(bs, (HQ + 2 * HKV) * D, device="cuda", dtype=torch.bfloat16)
        pos = torch.randint(0, 8000, (bs,), device="cuda")
        slots = torch.arange(1, bs + 1, device="cuda")
        kb, vb = (torch.zeros(4096, HKV, D, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        q, k, v = qkv.split([HQ * D, HKV * D, HKV * D], -1)
        q, k, v = q.view(bs, HQ, D), k.view(bs, HKV, D), v.view(bs, HKV, D)

        def old_epi() -> None:
            qr, kr = ops.rotary(q, k, pos, cache)
            ops.store_kv(kb, vb, slots, kr, v)

        row(f"rotary + KV store, bs {bs}", graph_us(old_epi),
            graph_us(lambda: rotary_store_kv(qkv, HQ, HKV, pos, cache, kb, vb, slots)), 2 * qkv.numel() * 2)
        for ctx in (256, 1024, 4096):
            kk, vv, r2t, idx, lens = paged(bs, ctx)
            qa = torch.randn(bs, HQ, D, device="cuda", dtype=torch.bfloat16)
            args = (qa, kk, vv, r2t, idx, lens, D**-0.5)
            new_slots = r2t[idx, lens - 1].long()
            kv_bytes = 2 * bs * ctx * HKV * D * 2
            row(f"decode attention bs {bs} ctx {ctx}", graph_us(lambda: decode_attention(*args, single_launch=False)),
                graph_us(lambda: decode_attention(*args)), kv_bytes)

            def unfused_block() -> None:
                qr, kr = ops.rotary(q, k, pos, cache)
                ops.store_kv(kk, vv, new_slots, kr, v)
                decode_attention(qr, kk, vv, r2t, idx, lens, D**-0.5, single_launch=False)

            def two_launch_block() -> None:
                decode_attention(rotary_store_kv(qkv, HQ, HKV, pos, cache, kk, vv, new_slots), kk, vv, r2t, idx, lens,
                                 D**-0.5)

            block = graph_us(lambda: decode_attention_qkv(qkv, HQ, HKV, pos, cache, kk, vv, new_slots, r2t, idx, lens,
                                                          D**-0.5))
            row("  block: rotary+store+attn (4 launches -> 1)", graph_us(unfused_block), block, kv_bytes)
            row("  block: rope_store + 1-launch attn (2 launches)", None, graph_us(two_launch_block), kv_bytes)
            if bs == 1 and ctx <= 1024:  # fewer, longer splits: no merge below the split length (tuning data)
                for n in (1, 2, 4, 8):
                    row(f"  block, {n} KV splits", None, graph_us(lambda: decode_attention_qkv(
                        qkv, HQ, HKV, pos, cache, kk, vv, new_slots, r2t, idx, lens, D**-0.5, num_kv_splits=n)),
                        kv_bytes)
        x, res = (torch.randn(bs, HIDDEN, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        w = torch.rand(HIDDEN, device="cuda", dtype=torch.bfloat16)
        ids = torch.arange(bs, device="cuda")
        row(f"tail add + gather + norm, bs {bs}", graph_us(lambda: ops.rms_norm((x + res)[ids], w, 1e-5)),
            graph_us(lambda: ops.add_rms_norm_rows(x, res, w, 1e-5, ids)), 3 * x.numel() * 2)
        row(f"fused add + RMSNorm (2 a layer), bs {bs}", None, graph_us(lambda: ops.fused_add_rms_norm(x, res, w, 1e-5)),
            4 * x.numel() * 2)
        gu = torch.randn(bs, 2 * INTER, device="cuda", dtype=torch.bfloat16)
        row(f"SiLU-and-mul, bs {bs}", None, graph_us(lambda: ops.silu_and_mul(gu)), 3 * bs * INTER * 2)
    h = torch.randn(1, HIDDEN, device="cuda", dtype=torch.bfloat16)
    for name, n, k_dim in (("qkv", (HQ + 2 * HKV) * D, HIDDEN), ("o", HIDDEN, HQ * D), ("gate_up", 2 * INTER, HIDDEN),
                           ("down", HIDDEN, INTER)):
        # distinct weights, cycled, > 4x the L2: a decode step never finds a layer's weight in L2
        copies = max(2, -(-256 * 2**20 // (n * k_dim * 2)))
        wts = [torch.randn(n, k_dim, device="cuda", dtype=torch.bfloat16) * 0.01 for _ in range(copies)]
        xin = torch.randn(1, k_dim, device="cuda", dtype=torch.bfloat16)
        turn = iter(range(1 << 30))
        row(f"GEMM {name} bs 1 (cuBLAS)", None,
            graph_us(lambda: F.linear(xin, wts[next(turn) % copies]), reps=2 * copies), n * k_dim * 2)
    head = torch.randn(VOCAB, HIDDEN, device="cuda", dtype=torch.bfloat16) * 0.01
    lin = graph_us(lambda: F.linear(h, head), reps=4)
    row("LM head GEMM bs 1", None, lin, head.numel() * 2)
    row("  + .float() of the logits", None, graph_us(lambda: F.linear(h, head).float(), reps=4) - lin)
    logits = F.linear(h, head).float()
    row("  greedy argmax over 128k float32", None, graph_us(lambda: logits.argmax(-1)))
    return {"rows": rows}


def kernel_kind(name: str) -> str:
    for key, kind in (("_decode_qkv_kernel", "rotary + KV store + decode attention (fused)"),
                      ("_rope_store_kernel", "rotary + KV store (fused)"), ("_rotary_kernel", "rotary"),
                      ("_store_kv_kernel", "KV store"), ("_decode_stage1", "decode attention"),
                      ("_decode_stage2", "decode attention merge (stage 2)"), ("_rms_norm_kernel", "RMSNorm (+ add)"),
                      ("_silu_and_mul_kernel", "SiLU-and-mul")):
        if key in name:
            return kind
    low = name.lower()
    if any(s in low for s in ("gemm", "gemv", "cutlass", "nvjet", "sm90", "xmma", "splitk")):
        return "GEMM"
    if any(s in low for s in ("argmax", "reduce")):
        return "argmax / reduce"
    if any(s in low for s in ("index", "embedding", "gather")):
        return "gather / embedding"
    if any(s in low for s in ("copy", "elementwise", "memcpy", "memset", "cast", "fill")):
        return "copies / casts / fills"
    return "other: " + name[:50]


def profile_budget(d: Path, fused: bool, bw: float, prompt: int = 128, warm_steps: int = 120, prof_steps: int = 24,
                   timed_steps: int = 128) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sched = make_scheduler(d, cuda_graph_max_bs=1, disable_decode_fusion=not fused, mem_fraction_static=0.5)
    runner, forwards = sched.runner, []
    inner = runner.forward
    runner.forward = lambda fb: (forwards.append(fb.mode.value), inner(fb))[1]
    rng = random.Random(3)
    total = 1 + warm_steps + prof_steps + timed_steps + 8
    sched.handle(TokenizedGenerateReq(rid=f"budget-{fused}", input_ids=rand_ids(prompt, VOCAB, rng),
                                      params=SamplingParams(temperature=0, max_new_tokens=total, ignore_eos=True)))

    def steps(n: int) -> None:
        goal = len(forwards) + n
        while len(forwards) < goal:
            sched.step()
            sched.pop_outputs()

    steps(1 + warm_steps)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        steps(prof_steps)
        torch.cuda.synchronize()
    t = time.perf_counter()
    steps(timed_steps)
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - t) / timed_steps * 1e3
    while not sched.idle:
        sched.step()
        sched.pop_outputs()
    layer_bytes = sum(p.numel() * p.element_size() for p in runner.model.layers[0].parameters())
    embed = runner.model.embed_tokens.weight  # a step reads one row of it
    weight_bytes = sum(p.numel() * p.element_size() for p in runner.model.parameters()) - embed.numel() * embed.element_size()
    # per kernel: the calls of one step; a name called 32k + r times a step gives its r longest calls to the tail
    calls: dict[str, list[float]] = defaultdict(list)
    for e in prof.events():
        if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA:
            calls[e.name].append(e.time_range.elapsed_us())
    layer: dict[str, float] = defaultdict(float)
    tail: dict[str, float] = defaultdict(float)
    layer_launches = tail_launches = 0.0
    for name, times in calls.items():
        per_step = round(len(times) / prof_steps)
        extra = per_step % LAYERS
        times = sorted(times)
        cut = len(times) - extra * prof_steps
        layer[kernel_kind(name)] += sum(times[:cut]) / prof_steps / LAYERS
        tail[kernel_kind(name)] += sum(times[cut:]) / prof_steps
        layer_launches += cut / prof_steps / LAYERS
        tail_launches += extra
    if layer_launches < 4:
        print("WARNING: the profiler saw few kernels per layer: are kernels inside CUDA graphs traced here?")
    ctx = prompt + warm_steps + prof_steps // 2
    floor_us = (layer_bytes + 2 * ctx * HKV * D * 2) / bw * 1e6
    res = {"fused": fused, "layer_us": dict(layer), "tail_us": dict(tail), "layer_sum_us": sum(layer.values()),
           "layer_launches": layer_launches, "tail_launches": tail_launches, "layer_floor_us": floor_us,
           "kernel_sum_ms_per_step": (sum(layer.values()) * LAYERS + sum(tail.values())) / 1e3,
           "wall_ms_per_step": wall_ms, "inproc_tok_s": 1e3 / wall_ms, "step_floor_ms": weight_bytes / bw * 1e3}
    label = "fused" if fused else "unfused"
    print(f"\nbudget, batch-1 decode, ctx ~{ctx}, {label}: per layer (µs; {layer_launches:.1f} launches)")
    for kind, us in sorted(layer.items(), key=lambda kv: -kv[1]):
        print(f"  {us:8.2f}  {kind}")
    print(f"  {res['layer_sum_us']:8.2f}  sum = {floor_us / res['layer_sum_us']:.0%} of the layer's bytes floor "
          f"{floor_us:.1f} µs")
    print(f"  tail per step (µs; {tail_launches} launches): " + ", ".join(f"{k} {v:.1f}" for k, v in tail.items()))
    print(f"  kernels {res['kernel_sum_ms_per_step']:.3f} ms/step, wall {wall_ms:.3f} ms/step = "
          f"{res['inproc_tok_s']:.1f} tok/s in-process (floor {res['step_floor_ms']:.3f} ms)")
    return res


def item_a(d: Path, fused: bool) -> dict:
    import radixlm

    rng = random.Random(1)
    with radixlm.Engine(str(d), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.5, context_length=4096, cuda_graph_max_bs=1,
                        disable_decode_fusion=not fused) as eng:
        gen(eng, rand_ids(64, VOCAB, rng), 8)
        t1 = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 1) for _ in range(3))
        tn = statistics.median(gen(eng, rand_ids(128, VOCAB, rng), 257) for _ in range(3))
    res = {"fused": fused, "a_decode_tok_s": 256 / (tn - t1), "a_decode_ms_per_step": (tn - t1) / 256 * 1e3}
    print(f"(a) {'fused' if fused else 'unfused'}: {res['a_decode_tok_s']:.1f} tok/s ({res['a_decode_ms_per_step']:.3f} ms/step)")
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", default="check,kernels,budget,a")
    ap.add_argument("--out", default="benchmarks/results/decode_layer_budget.json")
    args = ap.parse_args()
    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-budget-")), "llama8b")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    report["ceilings"] = measure_ceilings()
    bw = report["ceilings"]["copy_bytes_per_s"]
    print(f"ceilings: {report['ceilings']}")
    for item in args.items.split(","):
        t = time.perf_counter()
        try:
            if item == "check":
                report["check"] = item_check()
            elif item == "kernels":
                report["kernels"] = item_kernels(bw)
            elif item == "budget":  # unfused first, then fused
                report["budget"] = []
                for fused in (False, True):
                    report["budget"].append(profile_budget(d, fused, bw))
                    gc.collect()
                    torch.cuda.empty_cache()
            elif item == "a":
                report["a"] = [item_a(d, fused) for fused in (False, True)]
                old, new = (r["a_decode_tok_s"] for r in report["a"])
                print(f"(a) fused / unfused = {new / old:.3f}x (goal 240 tok/s)")
                if isinstance(report.get("budget"), list):
                    for b in report["budget"]:
                        print(f"  in-process {'fused' if b['fused'] else 'unfused'}: {b['inproc_tok_s']:.1f} tok/s, "
                              f"layer {b['layer_sum_us']:.1f} µs vs floor {b['layer_floor_us']:.1f} µs")
        except Exception as exc:  # noqa: BLE001 - keep the other items
            import traceback

            traceback.print_exc()
            report[item] = {"error": repr(exc)}
        print(f"[{item} took {time.perf_counter() - t:.0f} s]", flush=True)
        gc.collect()
        torch.cuda.empty_cache()
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

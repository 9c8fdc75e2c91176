#!/usr/bin/env python3
"""Cascade (shared-prefix) decode attention vs plain decode attention on the GPU (issue 22.1).

For each batch (B rows in groups of g sharing a P-token prefix, each row with its own S-token
suffix; Llama-3.1-8B heads, bf16) it checks the cascade result against plain decode attention and
times both as CUDA-graph replays with a cold L2, against the KV-bytes floor (bytes / copy bandwidth).
It prints what the planner's cost rule decides for that batch (runtime/cascade.py, built from a
radix tree of the same shape) and whether that was right, then fits the rule's constants:

    t_cascade - t_plain = fixed_s + (bytes_cascade - bytes_plain) / kv_bytes_per_s

so `CascadeCostRule(kv_bytes_per_s=..., fixed_s=...)` can be set from the "fit" line. A sweep of the
prefix stage's launch parameters (GPU_CONFIG in kernels/cascade_layout.py) follows.

    python benchmarks/cascade_attention.py --out $OUT/cascade_attention.json      # ~1-2 minutes
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import tempfile
import time
from pathlib import Path

import torch

from radixlm.kernels import cascade_layout as CL
from radixlm.kernels.cascade_layout import CascadeGroup, CascadeShape, build_cascade_layout
from radixlm.kernels.decode_attention import decode_attention
from radixlm.runtime.cascade import CascadePlanner

DEV = "cuda"
HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B
_FLUSH: list[torch.Tensor] = []


def bench_graph(fn, reps: int = 30) -> float:
    """Median ms of one CUDA-graph replay of `fn` with L2 flushed before each (the kernels' own time)."""
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device=DEV))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        _FLUSH[0].zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(s.elapsed_time(e) for s, e in events)
    return times[len(times) // 2]


def copy_bandwidth() -> float:
    """Bytes/s of a 1 GiB device copy, read + write counted (as check_kernels_gpu and gpu_suite)."""
    src = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)
    ms = bench_graph(lambda: dst.copy_(src), reps=10)
    return 2 * (1 << 30) / (ms * 1e-3)


class _Node:  # a radix-tree node as the planner sees it
    def __init__(self, parent: _Node | None, length: int) -> None:
        self.parent, self.key = parent, [0] * length


class Batch:
    """B rows in groups of g: a group's rows share their first P slots; every row has S more of its own."""

    def __init__(self, bsz: int, g: int, prefix: int, suffix: int, dtype: torch.dtype, seed: int = 0,
                 shuffle: bool = False) -> None:
        """`shuffle`: a group's rows spread over the batch, as in the engine (requests arrive mixed)."""
        rng = random.Random(seed)
        self.bsz, self.g, self.prefix, self.suffix = bsz, g, prefix, suffix
        order = list(range(bsz))
        if shuffle:
            random.Random(seed + 1).shuffle(order)
        groups = [order[i: i + g] for i in range(0, bsz, g)]
        self.seq_lens = [prefix + max(1, suffix + rng.randint(-suffix // 4, suffix // 4)) for _ in range(bsz)]
        total = len(groups) * prefix + sum(n - prefix for n in self.seq_lens)
        self.k = torch.randn(total + 1, HKV, D, dtype=dtype, device=DEV)
        self.v = torch.randn(total + 1, HKV, D, dtype=dtype, device=DEV)
        perm = (torch.randperm(total, device=DEV) + 1).to(torch.int32)  # fragmented paging, as check_kernels_gpu
        self.r2t = torch.zeros(bsz + 1, max(self.seq_lens) + 16, dtype=torch.int32, device=DEV)
        self.rows = list(range(1, bsz + 1))
        root = _Node(None, 0)
        self.nodes: list[_Node] = [root] * bsz
        at = 0
        for grp in groups:
            shared = perm[at: at + prefix]
            at += prefix
            node = _Node(root, prefix) if len(grp) > 1 else None
            for b in grp:
                own = self.seq_lens[b] - prefix
                self.r2t[self.rows[b], :prefix] = shared
                self.r2t[self.rows[b], prefix: prefix + own] = perm[at: at + own]
                at += own
                # each request's prompt node: below the shared prefix node (its question), or alone
                self.nodes[b] = _Node(node, own - 1) if node is not None else _Node(root, prefix + own - 1)
        self.groups = [CascadeGroup(tuple(grp), prefix) for grp in groups if len(grp) > 1]
        self.q = torch.randn(bsz, HQ, D, dtype=dtype, device=DEV)
        self.idx = torch.tensor(self.rows, dtype=torch.int64, device=DEV)
        self.lens = torch.tensor(self.seq_lens, dtype=torch.int64, device=DEV)
        self.scale = D**-0.5
        self.kv_token = 2 * HKV * D * self.k.element_size()

    def plain(self, out: torch.Tensor) -> torch.Tensor:
        return decode_attention(self.q, self.k, self.v, self.r2t, self.idx, self.lens, self.scale, out=out)

    def cascade(self, layout, out: torch.Tensor) -> torch.Tensor:
        return decode_attention(self.q, self.k, self.v, self.r2t, self.idx, self.lens, self.scale, out=out,
                                cascade=layout)

    def layout(self, shape: CascadeShape, min_split: int = CL.MIN_SPLIT_TOKENS):
        return build_cascade_layout(self.groups, self.rows, shape, min_split=min_split).to(DEV)

    def bytes_plain(self) -> int:
        return sum(self.seq_lens) * self.kv_token

    def bytes_cascade(self, layout, row_bytes: int) -> int:
        tasks = layout.tasks.tolist()
        prefix_reads = sum(t[3] - t[2] for t in tasks if t[1] > 0)  # each task reads its range once
        grouped = {r for g in layout.groups for r in g.rows}
        own = sum(n - (self.prefix if b in grouped else 0) for b, n in enumerate(self.seq_lens))
        return (prefix_reads + own) * self.kv_token + self.bsz * row_bytes


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def run_config(bsz: int, g: int, prefix: int, suffix: int, planner: CascadePlanner, bw: float) -> dict:
    batch = Batch(bsz, g, prefix, suffix, torch.bfloat16)
    out_p, out_c = torch.empty_like(batch.q), torch.empty_like(batch.q)
    layout = batch.layout(planner.shape)
    t_plain = bench_graph(lambda: batch.plain(out_p))
    t_cas = bench_graph(lambda: batch.cascade(layout, out_c))
    batch.plain(out_p)
    batch.cascade(layout, out_c)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    decided = planner.plan(batch.nodes, batch.rows, batch.seq_lens)
    plan_ms = (time.perf_counter() - t0) * 1e3
    bp, bc = batch.bytes_plain(), batch.bytes_cascade(layout, planner.row_bytes)
    use = decided is not None
    return {"B": bsz, "g": g, "P": prefix, "S": suffix, "plain_ms": t_plain, "cascade_ms": t_cas,
            "speedup": t_plain / t_cas, "bytes_plain": bp, "bytes_cascade": bc,
            "plain_floor_ms": bp / bw * 1e3, "cascade_floor_ms": bc / bw * 1e3,
            "plain_pct_floor": bp / bw * 1e3 / t_plain, "cascade_pct_floor": bc / bw * 1e3 / t_cas,
            "rel_err_vs_plain": rel_err(out_c, out_p), "tasks": int((layout.tasks[:, 1] > 0).sum()),
            "rule_uses_cascade": use, "plan_host_ms": plan_ms,
            "rule_right": (use and t_cas <= t_plain) or (not use and t_cas >= 0.95 * t_plain)}


def fit(rows: list[dict]) -> dict:
    """Least squares of t_cascade - t_plain (s) on bytes_cascade - bytes_plain over the grouped configs."""
    pts = [((r["bytes_cascade"] - r["bytes_plain"]), (r["cascade_ms"] - r["plain_ms"]) * 1e-3) for r in rows if r["g"] > 1]
    n = len(pts)
    if n < 2:
        return {"fixed_s": float("nan"), "kv_bytes_per_s": float("nan"), "points": n}
    mx, my = sum(x for x, _ in pts) / n, sum(y for _, y in pts) / n
    sxx = sum((x - mx) ** 2 for x, _ in pts)
    slope = sum((x - mx) * (y - my) for x, y in pts) / sxx if sxx else 0.0
    return {"fixed_s": my - slope * mx, "kv_bytes_per_s": 1 / slope if slope > 0 else float("nan"), "points": n}


def check_fp32(planner: CascadePlanner) -> dict:
    """float32 at a real shape: cascade vs plain (both ieee dots) must agree to float32 rounding."""
    batch = Batch(32, 8, 512, 64, torch.float32, seed=1)
    out_p, out_c = torch.empty_like(batch.q), torch.empty_like(batch.q)
    batch.plain(out_p)
    batch.cascade(batch.layout(planner.shape), out_c)
    return {"rel_err_vs_plain": rel_err(out_c, out_p), "max_abs": (out_c - out_p).abs().max().item()}


def engine_check(root: Path) -> dict:
    """The scheduler in-process on the GPU (Triton kernels, CUDA graphs with the cascade variant,
    overlap scheduling) on a tiny float32 random Llama: groups of requests sharing 300-600-token
    prompts, greedy. With cascade forced on every batch that shares anything, outputs must equal
    cascade off (float32 differences are ~1e-7: a flip would need a near-exact tie)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    from radixlm.runtime.cascade import ALWAYS
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.server_args import ServerArgs

    cfg = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # sharper distributions, fewer near-ties
    model.save_pretrained(str(root / "tiny"))
    rng = random.Random(2)
    prompts = []
    for _ in range(6):
        prefix = [rng.randrange(10, 4000) for _ in range(rng.randint(300, 600))]
        prompts += [prefix + [rng.randrange(10, 4000) for _ in range(rng.randint(5, 40))] for _ in range(8)]
    prompts.append([rng.randrange(10, 4000) for _ in range(100)])

    def run(mode: str) -> tuple[dict[str, list[int]], int, bool]:
        args = ServerArgs(model_path=str(root / "tiny"), device=DEV, dtype="float32", skip_tokenizer_init=True,
                          max_total_tokens=65536, cuda_graph_max_bs=64, cascade_attention=mode).resolve()
        sched = Scheduler(args, root / "tiny", None)
        if sched.runner.cascade is not None:
            sched.runner.cascade.rule = ALWAYS
        for i, p in enumerate(prompts):
            sched.handle(TokenizedGenerateReq(rid=str(i), input_ids=p, params=SamplingParams(
                temperature=0.0, max_new_tokens=16, ignore_eos=True)))
        outs: dict[str, list[int]] = {}
        while not sched.idle:
            sched.step()
            for o in sched.pop_outputs():
                outs.setdefault(o.rid, []).extend(o.output_ids)
        for o in sched.pop_outputs():
            outs.setdefault(o.rid, []).extend(o.output_ids)
        graphs = sched.runner.graph_runner is not None and any(k[2] for k in sched.runner.graph_runner.graphs)
        steps = sched.stats["cascade_decode_steps"]
        del sched
        torch.cuda.empty_cache()
        return outs, steps, graphs

    plain, _, _ = run("off")
    cascade, steps, graphs = run("on")
    same = sum(plain[k] == cascade.get(k) for k in plain)
    return {"requests": len(plain), "identical": same, "cascade_decode_steps": steps, "cascade_graphs": graphs,
            "pass": same == len(plain) and steps > 0 and graphs}


def sweep(planner: CascadePlanner, configs: list[tuple[int, int, int, int]]) -> list[dict]:
    """Prefix-stage launch parameters (the layout's rows per task follow block_m)."""
    saved = dict(CL.GPU_CONFIG)
    results = []
    for bsz, g, prefix, suffix in configs:
        batch = Batch(bsz, g, prefix, suffix, torch.bfloat16)
        out = torch.empty_like(batch.q)
        for block_m in (32, 64, 128):
            for block_n in (32, 64):
                for warps in (4, 8):
                    for min_split in (128, 256):
                        CL.GPU_CONFIG.update(block_m=block_m, block_n=block_n, num_warps=warps)
                        shape = CascadeShape.for_device(HQ, HKV, torch.device(DEV))
                        layout = batch.layout(shape, min_split)
                        try:
                            ms = bench_graph(lambda: batch.cascade(layout, out), reps=15)
                        except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record it
                            ms = float("nan")
                            print(f"  sweep {block_m}/{block_n}/{warps}: {exc!r}"[:200])
                        results.append({"B": bsz, "g": g, "P": prefix, "S": suffix, "block_m": block_m,
                                        "block_n": block_n, "num_warps": warps, "min_split": min_split, "ms": ms})
        CL.GPU_CONFIG.clear()
        CL.GPU_CONFIG.update(saved)
        mine = [r for r in results if (r["B"], r["g"], r["P"], r["S"]) == (bsz, g, prefix, suffix)]
        best = min(mine, key=lambda r: r["ms"] if r["ms"] == r["ms"] else float("inf"))
        default = next(r for r in mine if r["block_m"] == saved["block_m"] and r["block_n"] == saved["block_n"]
                       and r["num_warps"] == saved["num_warps"] and r["min_split"] == CL.MIN_SPLIT_TOKENS)
        print(f"sweep B={bsz} g={g} P={prefix} S={suffix}: best block_m={best['block_m']} block_n={best['block_n']} "
              f"warps={best['num_warps']} min_split={best['min_split']} {best['ms']:.4f} ms; default {default['ms']:.4f} ms",
              flush=True)
    return results


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cascade_attention.json")
    ap.add_argument("--no-sweep", action="store_true")
    args = ap.parse_args()
    torch.manual_seed(0)
    bw = copy_bandwidth()
    planner = CascadePlanner.for_model(HQ, HKV, D, 2, torch.device(DEV))
    print(f"copy bandwidth {bw / 1e12:.2f} TB/s; rule {planner.rule}; shape {planner.shape}", flush=True)
    configs = [(64, g, p, s) for g in (32, 8, 2, 1) for p in (1024, 512, 128) for s in (64, 256, 512)]
    configs += [(512, 32, 1024, 96), (256, 32, 1024, 96), (64, 64, 512, 128), (16, 8, 1024, 64), (8, 2, 512, 64),
                (128, 2, 1024, 64), (256, 4, 256, 128)]
    rows = []
    print(f"{'B':>4} {'g':>3} {'P':>5} {'S':>4} {'plain ms':>9} {'casc ms':>8} {'x':>5} {'plain %fl':>9} {'casc %fl':>8} "
          f"{'err':>8} {'tasks':>5} {'rule':>5} {'right':>5} {'plan ms':>7}")
    for cfg in configs:
        try:
            r = run_config(*cfg, planner, bw)
        except Exception as exc:  # noqa: BLE001 - print it and go on: the other rows are still worth having
            print(f"B={cfg[0]} g={cfg[1]} P={cfg[2]} S={cfg[3]}: FAILED {exc!r}"[:400], flush=True)
            continue
        rows.append(r)
        print(f"{r['B']:>4} {r['g']:>3} {r['P']:>5} {r['S']:>4} {r['plain_ms']:>9.4f} {r['cascade_ms']:>8.4f} "
              f"{r['speedup']:>5.2f} {r['plain_pct_floor']:>9.0%} {r['cascade_pct_floor']:>8.0%} {r['rel_err_vs_plain']:>8.1e} "
              f"{r['tasks']:>5} {'casc' if r['rule_uses_cascade'] else 'plain':>5} {'yes' if r['rule_right'] else 'NO':>5} "
              f"{r['plan_host_ms']:>7.2f}", flush=True)
    if not rows:
        raise SystemExit("every configuration failed")
    f = fit(rows)
    wrong = [(r["B"], r["g"], r["P"], r["S"]) for r in rows if not r["rule_right"]]
    losses = [r for r in rows if r["rule_uses_cascade"] and r["speedup"] < 1.0]
    print(f"fit: CascadeCostRule(kv_bytes_per_s={f['kv_bytes_per_s']:.3g}, fixed_s={f['fixed_s']:.3g}) over {f['points']} "
          f"grouped configs; rule wrong on {len(wrong)}: {wrong}; chosen-and-slower {len(losses)} "
          f"(worst {min((r['speedup'] for r in losses), default=1.0):.2f}x)", flush=True)
    worst_err = max(r["rel_err_vs_plain"] for r in rows)
    fp32 = check_fp32(planner)
    print(f"correctness: bf16 worst rel err vs plain {worst_err:.2e} (pass < 1e-2); float32 {fp32['rel_err_vs_plain']:.2e} "
          f"(pass < 1e-5)", flush=True)
    report = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
              "copy_bytes_per_s": bw, "gpu_config": CL.GPU_CONFIG, "rule": planner.rule.__dict__,
              "rows": rows, "fit": f, "rule_wrong": wrong, "bf16_worst_rel_err": worst_err, "fp32": fp32,
              "pass": worst_err < 1e-2 and fp32["rel_err_vs_plain"] < 1e-5,
              "median_speedup_grouped": statistics.median(r["speedup"] for r in rows if r["g"] > 1)}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            report["engine_check"] = engine_check(Path(tmp))
    except Exception as exc:  # noqa: BLE001 - record it; the sweep still runs
        import traceback

        traceback.print_exc()
        report["engine_check"] = {"error": repr(exc), "pass": False}
    print(f"engine check (scheduler on the GPU, float32, CUDA graphs, cascade forced vs off): {report['engine_check']}",
          flush=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    if not args.no_sweep:
        report["sweep"] = sweep(planner, [(512, 32, 1024, 96), (64, 64, 512, 128), (64, 8, 512, 64)])
        Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

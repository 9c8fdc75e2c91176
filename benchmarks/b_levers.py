"""Issue 22.3 (b): (b)'s prefill phase — GEMM row blocks, chunk sizes, synchronous vs overlapped chunks — A/B in
one process on the H200.

    python benchmarks/b_levers.py --items prefill,evict,gemm --row-blocks 1024,2048 --arms 0,1024,2048,1024::all \
        --chunks 4 --out $OUT/b_levers.json

One scheduler (Llama-3.1-8B shape, random bf16 weights; CUDA graphs only with item evict).
  evict    (b)'s first --evict-requests requests whole in a --pool-tokens pool that finished requests' cached KV fills
           part-way through the decode phase (as (b)'s does from its ~290th decode step): decode steps ahead of the
           commit while free slots alone hold them (the default) vs free + evictable slots (step_order.AHEAD_WITH_EVICTION)
  b        workload (b) whole as the suite runs it (warm-up, then 1,000 requests; the engine's default pool), once per
           --b-arms entry (row blocks, AHEAD_WITH_EVICTION), ~30 s an arm; not with evict in the same call
  gemm     each projection of the model's 32 layers in a row (its real weights, one [--gemm-rows, K] input), as one
           product and in row blocks of each --row-blocks count (runtime/dense_row_blocks.py): ms for the 32, TFLOP/s
  prefill  runs of ~--chunks 8,192-token chunks of fresh (b)-like prompts (one new token each, so the run is prefill
           steps only, as (b)'s first ~13 s are), one arm per --arms entry ROWS[:CHUNK[:all]] (the engine's
           --gemm-row-block: the products over weights larger than twice the L2 — with "all" every weight — in blocks
           of ROWS rows, 0: one product; CHUNK: the chunk size, default the engine's 8,192), with the default prefill overlap; with --sync-arms also
           synchronous chunks and synchronous chunks of twice the size. Arms interleaved --rounds times after one
           unrecorded warm-up run (the chunk kernels' compilation on a fresh machine).
Runs of decode steps on two CUDA streams (each half's decode attention beside the other half's GEMMs) were measured
here too and lost (RESULTS.md, thru8; the code: branch thru8 at e7d32f0, the mid round's commit); overlapped chunks
won 5.0-6.5% over synchronous ones (thru8).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, measure_ceilings, model_dir_for  # noqa: E402
from gpu_throughput import warmup_b, workload_b  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402


@torch.inference_mode()  # (the model's weights are parameters: out= products refuse them under autograd)
def item_gemm(sched, rows: int, blocks: list[int], matmul: float) -> dict:
    """The model's own projections, 32 layers in a row at `rows` rows: one product vs row blocks (ms per 32)."""
    from radixlm.runtime.dense_row_blocks import RowBlocks

    layers = sched.runner.model.layers
    kinds = {"qkv": [lyr.self_attn.qkv_proj.weight for lyr in layers], "o": [lyr.self_attn.o_proj.weight for lyr in layers],
             "gate_up": [lyr.mlp.gate_up_proj.weight for lyr in layers], "down": [lyr.mlp.down_proj.weight for lyr in layers]}
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    out: dict = {}
    for kind, weights in kinds.items():
        n, k = weights[0].shape
        act = torch.randn(rows, k, device="cuda", dtype=weights[0].dtype)
        row: dict = {}
        for _ in range(2):  # arms interleaved twice, 3 timed passes each
            for block in [0, *blocks]:
                products = [RowBlocks(w, block if block else rows) for w in weights]  # (one block: one product)
                for product in products[:2]:
                    product(act, None)
                times = []
                for _ in range(3):
                    ev[0].record()
                    for product in products:
                        product(act, None)
                    ev[1].record()
                    torch.cuda.synchronize()
                    times.append(ev[0].elapsed_time(ev[1]))
                row.setdefault(str(block), []).append(min(times))
        flops = 2 * rows * n * k * len(weights)
        res = {b: {"ms": min(v), "tflops": flops / (min(v) / 1e3) / 1e12} for b, v in row.items()}
        out[kind] = {"n": n, "k": k, "rows": rows, "ms_runs": row, **res}
        print(f"gemm {kind} [{rows} x {k}] x [{k} x {n}] x {len(weights)} layers: " + ", ".join(
            f"{'one product' if b == '0' else f'blocks of {b}'} {r['ms']:.2f} ms ({r['tflops']:.0f} TF)"
            for b, r in res.items()) + f" (ceiling {matmul / 1e12:.0f} TF)", flush=True)
        del act
        torch.cuda.empty_cache()
    return out


def item_prefill(sched, vocab: int, chunks: int, arms_spec: list[tuple[int, int, bool]], rounds: int,
                 sync_arms: bool) -> dict:
    """`arms_spec`: (row block, chunk tokens, every weight) per overlapped arm (row block 0: one product; every
    weight: qkv / o in blocks too, not only the weights larger than twice the L2)."""
    import radixlm.runtime.step_order as step_order
    from radixlm.runtime.dense_row_blocks import attach_row_blocks

    default = step_order.OVERLAP_PREFILL_MIN_REQUESTS
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    out: dict = {"default_min_requests": default, "l2_bytes": l2}
    seed = 100
    chunk, budget = sched.chunk_size, sched.max_prefill_tokens
    arms = [(f"overlap_rows{b}" + ("" if size == chunk else f"_chunk{size}") + ("_all" if every else ""), default, size, b,
             every) for b, size, every in arms_spec]
    if sync_arms:
        arms += [("sync_rows0", 1 << 30, chunk, 0, False), ("sync_2x_chunk_rows0", 1 << 30, 2 * chunk, 0, False)]
    runs = [("warmup", default, chunk, arms_spec[-1][0], False)] + arms * rounds
    for arm, min_requests, size, block, every in runs:
        prompts: list[list[int]] = []
        while sum(map(len, prompts)) < chunks * chunk:  # (the same tokens for every arm's chunk size)
            prompts.append(workload_b(1, vocab, seed=seed)[0][0])
            seed += 1
        step_order.OVERLAP_PREFILL_MIN_REQUESTS = min_requests
        sched.chunk_size, sched.max_prefill_tokens = size, max(budget, size)
        attach_row_blocks(sched.runner.model, block, 0 if every else l2)  # (an L2 of 0: every weight is "larger")
        for i, p in enumerate(prompts):
            sched.handle(TokenizedGenerateReq(rid=f"p{seed}-{i}", input_ids=p, params=SamplingParams(
                temperature=0, max_new_tokens=1, ignore_eos=True)))
        torch.cuda.synchronize()
        t, started = time.perf_counter(), time.time()
        while not sched.idle:
            sched.step()
            sched.pop_outputs()
        torch.cuda.synchronize()
        dt = time.perf_counter() - t
        if arm != "warmup":  # (unix times: to line a run up with a clock log taken beside it)
            out.setdefault(arm, []).append({"seconds": dt, "tokens": sum(map(len, prompts)),
                                            "tok_s": sum(map(len, prompts)) / dt, "unix": [started, time.time()]})
        print(f"prefill {arm}: {sum(map(len, prompts))} tokens in {dt * 1e3:.0f} ms "
              f"({sum(map(len, prompts)) / dt:.0f} tok/s)", flush=True)
        sched.cache.flush()
    step_order.OVERLAP_PREFILL_MIN_REQUESTS = default
    sched.chunk_size, sched.max_prefill_tokens = chunk, budget
    attach_row_blocks(sched.runner.model, 0, l2)
    base = [r["tok_s"] for r in out.get("overlap_rows0", [])]
    for arm, *_ in arms:
        mine = [r["tok_s"] for r in out[arm]]
        if base:
            out[f"{arm}_vs_rows0"] = sum(mine) / sum(base)
        print(f"prefill {arm}: best {max(mine):.0f} tok/s" + (f", {sum(mine) / sum(base):.3f}x one product" if base else ""),
              flush=True)
    return out


def run_whole(sched, prompts: list[list[int]], outs: list[int], label: str) -> tuple[dict, list[list[int]]]:
    """Requests whole, prefill then decode until idle: wall seconds, those of the decode phase (from the first decode
    step launched), unix times (to line the run up with a clock log beside it), decode steps scheduled ahead of / after
    the commit of the step in flight; and each request's output tokens."""
    check = sched._can_schedule_before_commit
    decided: list[bool] = []

    def counted() -> bool:
        decided.append(check())
        return decided[-1]

    sched._can_schedule_before_commit = counted
    for i, (p, o) in enumerate(zip(prompts, outs)):
        sched.handle(TokenizedGenerateReq(rid=f"{label}-{i}", input_ids=p, params=SamplingParams(
            temperature=0, max_new_tokens=o, ignore_eos=True)))
    got: dict[str, list[int]] = {}
    torch.cuda.synchronize()
    t, started = time.perf_counter(), time.time()
    decode_from = None
    while not sched.idle:
        decode_steps = sched.stats["decode_steps"]
        sched.step()
        if decode_from is None and sched.stats["decode_steps"] > decode_steps:
            decode_from = time.perf_counter()
        for res in sched.pop_outputs():
            got.setdefault(res.rid.split("-", 1)[1], []).extend(res.output_ids)
    torch.cuda.synchronize()
    end = time.perf_counter()
    del sched._can_schedule_before_commit
    row = {"seconds": end - t, "decode_phase_s": end - (decode_from or t), "ahead": sum(decided),
           "after_commit": len(decided) - sum(decided), "retractions": sched.stats["retractions"],
           "unix": [started, started + (decode_from or t) - t, started + end - t]}
    return row, [got[str(i)] for i in range(len(prompts))]


def item_evict(sched, vocab: int, n: int, rounds: int, progress=None) -> dict:
    """(b)'s first `n` requests whole (prefill, then decode down to 0 rows) in a pool sized so that finished
    requests' cached KV fills it part-way through the decode phase, as in (b): a decode step goes ahead of the
    commit only while free slots hold it (step_order.AHEAD_WITH_EVICTION off, the default) vs while free + evictable
    slots do (on). `progress(out)` after each run (the caller writes what is measured so far)."""
    import radixlm.runtime.step_order as step_order

    prompts, outs = workload_b(n, vocab)
    default = step_order.AHEAD_WITH_EVICTION
    out: dict = {"requests": n, "pool_tokens": sched.kv_pool.size}
    outputs: dict[str, list[list[int]]] = {}
    for r in range(rounds):
        for arm, with_eviction in (("free_and_evictable", True), ("free_only", False)):  # (on first: a first run's costs)
            step_order.AHEAD_WITH_EVICTION = with_eviction
            sched.cache.flush()
            sched.reserve.ratio = sched.reserve.init_ratio  # admission as on a fresh scheduler in every run
            row, tokens = run_whole(sched, prompts, outs, f"{arm}{r}")
            out.setdefault(arm, []).append(row)
            outputs.setdefault(arm, tokens)
            if progress is not None:
                progress(out)
            print(f"evict {arm}: {row['seconds']:.2f} s (decode phase {row['decode_phase_s']:.2f} s), decode steps ahead of "
                  f"the commit {row['ahead']}, after it {row['after_commit']}", flush=True)
    step_order.AHEAD_WITH_EVICTION = default
    out["same_tokens"] = outputs["free_only"] == outputs["free_and_evictable"]
    a, b = (sum(x["decode_phase_s"] for x in out[k]) for k in ("free_only", "free_and_evictable"))
    out["decode_phase_new_over_old"] = b / a
    print(f"evict: decode phase {b / a:.3f}x with AHEAD_WITH_EVICTION; same tokens {out['same_tokens']}", flush=True)
    sched.cache.flush()
    return out


def item_b(sched, vocab: int, arms: list[tuple[int, bool]], progress=None) -> dict:
    """Workload (b) whole, as the suite runs it (its warm-up prompts first, their KV left cached; then the 1,000
    requests), once per arm (row block of --gemm-row-block, 0: off; step_order.AHEAD_WITH_EVICTION), in one process:
    total tok/s and the decode phase per arm."""
    import radixlm.runtime.step_order as step_order
    from radixlm.runtime.dense_row_blocks import attach_row_blocks

    prompts, outs = workload_b(1000, vocab)
    warm = warmup_b(vocab)
    l2 = torch.cuda.get_device_properties(0).L2_cache_size
    default = step_order.AHEAD_WITH_EVICTION
    total = sum(map(len, prompts)) + sum(outs)
    out: dict = {"pool_tokens": sched.kv_pool.size}
    for rows, with_eviction in arms:
        arm = f"rows{rows}_eviction_{'on' if with_eviction else 'off'}"
        attach_row_blocks(sched.runner.model, rows, l2)
        step_order.AHEAD_WITH_EVICTION = with_eviction
        sched.cache.flush()
        sched.reserve.ratio = sched.reserve.init_ratio
        run_whole(sched, warm, [8] * len(warm), f"warm{arm}")
        row, _ = run_whole(sched, prompts, outs, arm)
        row["total_tok_s"] = total / row["seconds"]
        out[arm] = row
        if progress is not None:
            progress(out)
        print(f"b {arm}: {row['total_tok_s']:.0f} total tok/s in {row['seconds']:.2f} s (decode phase "
              f"{row['decode_phase_s']:.2f} s), decode steps ahead of the commit {row['ahead']}, after it "
              f"{row['after_commit']}, {row['retractions']} retractions so far", flush=True)
    attach_row_blocks(sched.runner.model, 0, l2)
    step_order.AHEAD_WITH_EVICTION = default
    sched.cache.flush()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="prefill,gemm")
    ap.add_argument("--row-blocks", default="0,1024,2048", help="gemm: row counts (0: one product)")
    ap.add_argument("--arms", default="0,1024,2048",
                    help="prefill: ROWS[:CHUNK[:all]] per overlapped arm (row block, 0: one product; chunk tokens, default "
                    "8192; all: qkv / o in blocks too)")
    ap.add_argument("--gemm-rows", type=int, default=8192)
    ap.add_argument("--chunks", type=int, default=4, help="8,192-token chunks per prefill run")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--sync-arms", action="store_true", help="prefill: also synchronous chunks, and of twice the size")
    ap.add_argument("--evict-requests", type=int, default=350)
    ap.add_argument("--evict-rounds", type=int, default=1)
    ap.add_argument("--pool-tokens", type=int, default=250000,
                    help="the KV pool (evict: 350 requests' cached KV fills 250k tokens from their ~134th decode step, "
                    "304 rows; 379 of 511 steps, 156 rows on average, where (b) has ~220 steps of 218)")
    ap.add_argument("--b-arms", default="1024:on,0:off",
                    help="b: ROWS:on|off per arm (--gemm-row-block rows, 0: off; step_order.AHEAD_WITH_EVICTION)")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "b_levers.json"))
    args = ap.parse_args()
    items = set(args.items.split(","))
    blocks = [int(b) for b in args.row_blocks.split(",")]
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-levers-")), "llama8b")
    t0 = time.perf_counter()
    # No cascade planner (these prompts share no prefix), --gemm-row-block off (the arms set it), CUDA graphs only with
    # the item that decodes (up to its rows), the KV pool of its run.
    evict, whole_b = "evict" in items, "b" in items
    if evict and whole_b:
        raise SystemExit("items evict and b want different pools: run them in two calls")
    if whole_b:  # the suite's engine: the default pool and decode reserve, graphs up to (b)'s 1,000 rows
        sched = make_scheduler(d, cascade_attention="off", gemm_row_block=0, cuda_graph_max_bs=1024)
    else:  # half the default decode reserve: evict's requests all admitted at once in a pool their cached KV fills early
        sched = make_scheduler(d, cascade_attention="off", gemm_row_block=0, disable_cuda_graph=not evict,
                               cuda_graph_max_bs=-(-args.evict_requests // 32) * 32, max_total_tokens=args.pool_tokens,
                               schedule_conservativeness=0.5)
    report: dict = {"ceilings": ceil, "startup_s": time.perf_counter() - t0}
    print(f"scheduler ready in {report['startup_s']:.1f} s", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if "prefill" in items:  # (first: the engine's figure; a cut run keeps it)
        arms = []
        for a in args.arms.split(","):
            parts = a.split(":")
            size = int(parts[1]) if len(parts) > 1 and parts[1] else sched.chunk_size
            arms.append((int(parts[0]), size, parts[-1] == "all"))
        report["prefill"] = item_prefill(sched, LLAMA_8B["vocab_size"], args.chunks, arms, args.rounds, args.sync_arms)
        out.write_text(json.dumps(report, indent=1, default=str))
    if evict:
        report["evict"] = item_evict(sched, LLAMA_8B["vocab_size"], args.evict_requests, args.evict_rounds,
                                     lambda part: out.write_text(json.dumps({**report, "evict": part}, indent=1, default=str)))
        out.write_text(json.dumps(report, indent=1, default=str))
    if whole_b:
        arms = [(int(a.split(":")[0]), a.split(":")[1] == "on") for a in args.b_arms.split(",")]
        report["b"] = item_b(sched, LLAMA_8B["vocab_size"], arms,
                             lambda part: out.write_text(json.dumps({**report, "b": part}, indent=1, default=str)))
        out.write_text(json.dumps(report, indent=1, default=str))
    if "gemm" in items:
        report["gemm"] = item_gemm(sched, args.gemm_rows, [b for b in blocks if b], ceil["bf16_matmul_flops"])
    out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

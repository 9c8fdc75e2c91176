"""Issue 22.3 (b): two levers on workload (b)'s time, each A/B in one process on the H200.

    python benchmarks/b_levers.py --items steps,prefill --batches 1024,768,512 --out $OUT/b_levers.json

One scheduler (Llama-3.1-8B shape, random bf16 weights) with --decode-two-streams on, so its graph runner holds
both kinds of decode graph for the buckets of >= 512 rows (runtime/two_stream_decode.py).
  steps    per batch size: rows with contexts U[192, 1280] of random KV (prompt + generated, as in (b)'s first few
           hundred decode steps); the runner's whole decode step (graph replay, LM head, greedy argmax) timed with
           CUDA events, one stream vs two interleaved (`CudaGraphRunner.use_two_streams`; --high-priority: also the
           attention stream at high priority; --carveouts: also cuBLAS leaving N SMs to the attention stream, torch's
           experimental SM carve-out, recaptured per bucket), against the step's no-overlap floor (GEMM FLOPs at the measured
           matmul rate + KV bytes at the measured copy rate); tokens and logits of the two compared
  prefill  (b)'s prefill phase: ~6 chunks of (b)-like prompts (fresh ones each run, one new token each) with the
           prefill steps synchronous (the default for (b)'s ~16-request chunks) vs overlapped (the next chunk
           scheduled and launched while one runs: scheduler.OVERLAP_PREFILL_MIN_REQUESTS) vs synchronous chunks of
           twice the size (half the steps), interleaved twice
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, measure_ceilings, model_dir_for  # noqa: E402
from gpu_throughput import workload_b  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampler import greedy_argmax  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402


def decode_batch(runner, bs: int, rng: random.Random) -> tuple[ForwardBatch, list[int], torch.Tensor]:
    """`bs` request rows holding contexts U[192, 1280] of pool slots; the batch of their next tokens."""
    table, pool, dev = runner.req_to_token_pool, runner.kv_pool, runner.device
    ctx = [rng.randint(192, 1280) for _ in range(bs)]
    rows = [table.alloc() for _ in range(bs)]
    slots = pool.alloc(sum(ctx))
    at = 0
    for row, n in zip(rows, ctx):
        table.write(row, 0, slots[at: at + n])
        at += n
    last = torch.tensor([int(slots[sum(ctx[: i + 1]) - 1]) for i in range(bs)], dtype=torch.int64)

    def t(values: list[int], dtype: torch.dtype = torch.int64) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=dev)

    batch = ForwardBatch(
        mode=ForwardMode.DECODE, input_ids=t([rng.randrange(runner.vocab_size) for _ in range(bs)]),
        positions=t([n - 1 for n in ctx]), out_cache_loc=last.to(dev), req_pool_indices=t(rows),
        seq_lens=t(ctx, torch.int32), req_pool_indices_cpu=rows, seq_lens_cpu=ctx, extend_seq_lens_cpu=[1] * bs,
        extend_seq_lens=t([1] * bs, torch.int32), extend_start_loc=t(list(range(bs)), torch.int32),
        logits_indices=t(list(range(bs))))
    return batch, rows, slots


def item_steps(sched, batches: list[int], steps: int, high_priority: bool, carveouts: list[int], arms_min_bs: int,
               bw: float, matmul: float, save: Callable[[dict], None]) -> dict:
    """`save`: called with the results so far after each batch size (a cut run keeps them)."""
    runner = sched.runner
    gr = runner.graph_runner
    out: dict = {}
    for buf in (*runner.kv_pool.k_buffer, *runner.kv_pool.v_buffer):
        buf.normal_()
    rng = random.Random(7)
    cfg = LLAMA_8B
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    params = layers * hidden * (hidden + 2 * kv + hidden + 3 * inter) + hidden * cfg["vocab_size"]
    for bs in batches:
        batch, rows, slots = decode_batch(runner, bs, rng)

        def step(two: bool) -> tuple[torch.Tensor, torch.Tensor]:
            gr.use_two_streams = two
            logits = runner.forward(batch)
            return logits, greedy_argmax(logits)

        def timed(two: bool) -> float:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            torch.cuda.synchronize()
            ev[0].record()
            for _ in range(steps):
                step(two)
            ev[1].record()
            torch.cuda.synchronize()
            return ev[0].elapsed_time(ev[1]) / steps

        row: dict = {}
        (l1, t1), (l2, t2) = step(False), step(True)
        row["tokens_equal"] = float((t1 == t2).float().mean())
        row["max_logit_diff"] = float((l1 - l2).abs().max())
        del l1, l2
        for _ in range(3):
            for two in (False, True):
                row.setdefault("two" if two else "one", []).append(timed(two))
        padded = min(b for b in gr.buckets if b >= bs)
        if high_priority and bs >= arms_min_bs:  # the attention stream at high priority (recaptured, then back)
            gr._capture_two_streams(priority=-1, only=[padded])
            row["two_high"] = [timed(True) for _ in range(2)]
            gr._capture_two_streams(priority=0, only=[padded])
        for sms in carveouts if bs >= arms_min_bs else ():
            # the two-stream graph's GEMMs leaving `sms` SMs to the attention stream's kernels (recaptured, then back)
            try:
                gr._capture_two_streams(only=[padded], sm_carveout=sms)
                row[f"two_carveout{sms}"] = [timed(True) for _ in range(2)]
            except Exception as exc:  # noqa: BLE001 - an experimental torch switch: recorded
                row[f"two_carveout{sms}"] = repr(exc)[:200]
            finally:
                gr._capture_two_streams(only=[padded])
        floor_ms = (2 * bs * params / matmul + sum(batch.seq_lens_cpu) * layers * kv * 2 * 2 / bw) * 1e3
        row.update(floor_ms=floor_ms, mean_ctx=statistics.mean(batch.seq_lens_cpu),
                   one_ms=min(row["one"]), two_ms=min(row["two"]))
        out[str(bs)] = row
        print(f"bs {bs} (ctx mean {row['mean_ctx']:.0f}): ms a step one stream {row['one_ms']:.2f}, two streams "
              f"{row['two_ms']:.2f} ({row['one_ms'] / row['two_ms']:.3f}x; no-overlap floor {floor_ms:.2f})"
              + (f", high priority {min(row['two_high']):.2f}" if "two_high" in row else "")
              + "".join(f", {k.removeprefix('two_')} {min(v):.2f}" if isinstance(v, list) else f", {k}: {v}"
                        for k, v in row.items() if k.startswith("two_carveout")) + "; tokens equal "
              f"{row['tokens_equal']:.3f}, max logit diff {row['max_logit_diff']:.3g}", flush=True)
        for r in rows:
            runner.req_to_token_pool.free(r)
        runner.kv_pool.free(slots)
        save(out)
    gr.use_two_streams = True
    return out


def item_prefill(sched, vocab: int, chunks: int) -> dict:
    import radixlm.runtime.scheduler as scheduler_module

    default = scheduler_module.OVERLAP_PREFILL_MIN_REQUESTS
    out: dict = {"default_min_requests": default}
    seed = 100
    chunk, budget = sched.chunk_size, sched.max_prefill_tokens
    for _ in range(2):
        for arm, min_requests, size in (("sync", 1 << 30, chunk), ("overlap", 1, chunk), ("sync_2x_chunk", 1 << 30, 2 * chunk)):
            prompts: list[list[int]] = []
            while sum(map(len, prompts)) < chunks * chunk:
                prompts.append(workload_b(1, vocab, seed=seed)[0][0])
                seed += 1
            scheduler_module.OVERLAP_PREFILL_MIN_REQUESTS = min_requests
            sched.chunk_size, sched.max_prefill_tokens = size, max(budget, size)
            for i, p in enumerate(prompts):
                sched.handle(TokenizedGenerateReq(rid=f"p{seed}-{i}", input_ids=p, params=SamplingParams(
                    temperature=0, max_new_tokens=1, ignore_eos=True)))
            torch.cuda.synchronize()
            t = time.perf_counter()
            while not sched.idle:
                sched.step()
                sched.pop_outputs()
            torch.cuda.synchronize()
            dt = time.perf_counter() - t
            out.setdefault(arm, []).append({"seconds": dt, "tokens": sum(map(len, prompts)),
                                            "tok_s": sum(map(len, prompts)) / dt})
            print(f"prefill {arm}: {sum(map(len, prompts))} tokens in {dt * 1e3:.0f} ms "
                  f"({sum(map(len, prompts)) / dt:.0f} tok/s)", flush=True)
            sched.cache.flush()
    scheduler_module.OVERLAP_PREFILL_MIN_REQUESTS = default
    sched.chunk_size, sched.max_prefill_tokens = chunk, budget
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--items", default="steps,prefill")
    ap.add_argument("--batches", default="1024,768,512")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed run (3 runs per arm, interleaved)")
    ap.add_argument("--high-priority", action="store_true", help="also the attention stream at high priority")
    ap.add_argument("--carveouts", default="", help="also two streams with cuBLAS leaving these many SMs free (comma list)")
    ap.add_argument("--arms-min-bs", type=int, default=768, help="the high-priority and carve-out arms at batches from this size")
    ap.add_argument("--chunks", type=int, default=6, help="prefill: 8,192-token chunks per run")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "b_levers.json"))
    args = ap.parse_args()
    ceil = measure_ceilings()
    bw, matmul = ceil["copy_bytes_per_s"], ceil["bf16_matmul_flops"]
    print(f"copy {bw / 1e12:.2f} TB/s, matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-levers-")), "llama8b")
    t0 = time.perf_counter()
    # (no cascade graphs: rows here share no prefix, and their capture is seconds of start-up)
    sched = make_scheduler(d, decode_two_streams="on", cuda_graph_max_bs=1024, cascade_attention="off")
    gr = sched.runner.graph_runner
    report: dict = {"ceilings": ceil, "startup_s": time.perf_counter() - t0, "capture_s": dict(gr.capture_s),
                    "two_stream_buckets": sorted(gr.two_stream_graphs)}
    print(f"start-up {report['startup_s']:.1f} s, capture {report['capture_s']}, two-stream buckets "
          f"{report['two_stream_buckets']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))

    def save(part: str, value: dict) -> None:
        report[part] = value
        out.write_text(json.dumps(report, indent=1, default=str))

    for item in args.items.split(","):
        if item == "steps":
            report["steps"] = item_steps(sched, [int(b) for b in args.batches.split(",")], args.steps, args.high_priority,
                                         [int(c) for c in args.carveouts.split(",") if c], args.arms_min_bs, bw, matmul,
                                         lambda partial: save("steps", partial))
        elif item == "prefill":
            report["prefill"] = item_prefill(sched, LLAMA_8B["vocab_size"], args.chunks)
        out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

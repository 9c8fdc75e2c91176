"""Issue 22.3 (b): the engine's decode step at (b)'s large batch sizes, one stream vs two (--decode-two-streams),
in one process on the H200.

    python benchmarks/two_stream_ab.py --batches 1024,768,512 --out $OUT/two_stream.json

One scheduler (Llama-3.1-8B shape, random bf16 weights, random KV) with --decode-two-streams on, so its graph
runner holds both kinds of decode graph for the buckets of >= 512 rows (runtime/two_stream_decode.py). Per batch
size: rows with contexts U[192, 1280] (prompt + generated, as in (b)'s first few hundred decode steps), the
runner's whole decode step (graph replay, LM head, greedy argmax) timed with CUDA events, the two kinds interleaved
(`CudaGraphRunner.use_two_streams`), against the step's floors (GEMM FLOPs at the measured matmul rate plus KV bytes
at the measured copy rate); tokens and logits of the two compared.
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

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, measure_ceilings, model_dir_for  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode  # noqa: E402
from radixlm.runtime.sampler import greedy_argmax  # noqa: E402


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
        mode=ForwardMode.DECODE, input_ids=t([rng.randrange(1000, 100000) for _ in range(bs)]),
        positions=t([n - 1 for n in ctx]), out_cache_loc=last.to(dev), req_pool_indices=t(rows),
        seq_lens=t(ctx, torch.int32), req_pool_indices_cpu=rows, seq_lens_cpu=ctx, extend_seq_lens_cpu=[1] * bs,
        extend_seq_lens=t([1] * bs, torch.int32), extend_start_loc=t(list(range(bs)), torch.int32),
        logits_indices=t(list(range(bs))))
    return batch, rows, slots


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--batches", default="1024,768,512")
    ap.add_argument("--steps", type=int, default=8, help="steps per timed run (3 runs per arm, interleaved)")
    ap.add_argument("--high-priority", action="store_true", help="also the attention stream at high priority")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "two_stream.json"))
    args = ap.parse_args()
    ceil = measure_ceilings()
    bw, matmul = ceil["copy_bytes_per_s"], ceil["bf16_matmul_flops"]
    print(f"copy {bw / 1e12:.2f} TB/s, matmul {matmul / 1e12:.0f} TFLOP/s", flush=True)
    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-2s-")), "llama8b")
    t0 = time.perf_counter()
    sched = make_scheduler(d, decode_two_streams="on", cuda_graph_max_bs=1024)
    runner = sched.runner
    gr = runner.graph_runner
    report: dict = {"ceilings": ceil, "startup_s": time.perf_counter() - t0, "capture_s": dict(gr.capture_s),
                    "two_stream_buckets": sorted(gr.two_stream_graphs)}
    print(f"start-up {report['startup_s']:.1f} s, capture {report['capture_s']}, two-stream buckets "
          f"{report['two_stream_buckets']}", flush=True)
    for buf in (*runner.kv_pool.k_buffer, *runner.kv_pool.v_buffer):
        buf.normal_()
    rng = random.Random(7)
    cfg = LLAMA_8B
    hidden, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    kv = cfg["num_key_value_heads"] * (hidden // cfg["num_attention_heads"])
    params = layers * hidden * (hidden + 2 * kv + hidden + 3 * inter) + hidden * cfg["vocab_size"]
    for bs in [int(b) for b in args.batches.split(",")]:
        batch, rows, slots = decode_batch(runner, bs, rng)

        def step(two: bool) -> tuple[torch.Tensor, torch.Tensor]:
            gr.use_two_streams = two
            logits = runner.forward(batch)
            return logits, greedy_argmax(logits)

        row: dict = {}
        (l1, t1), (l2, t2) = step(False), step(True)
        row["tokens_equal"] = float((t1 == t2).float().mean())
        row["max_logit_diff"] = float((l1 - l2).abs().max())
        del l1, l2
        def timed(two: bool) -> float:
            ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
            torch.cuda.synchronize()
            ev[0].record()
            for _ in range(args.steps):
                step(two)
            ev[1].record()
            torch.cuda.synchronize()
            return ev[0].elapsed_time(ev[1]) / args.steps

        for _ in range(3):
            for two in (False, True):
                row.setdefault("two" if two else "one", []).append(timed(two))
        if args.high_priority:  # the attention stream at high priority (recaptured for this bucket, then back)
            padded = min(b for b in gr.buckets if b >= bs)
            gr._capture_two_streams(priority=-1, only=[padded])
            row["two_high"] = [timed(True) for _ in range(2)]
            gr._capture_two_streams(priority=0, only=[padded])
        floor_ms = (2 * bs * params / matmul + sum(batch.seq_lens_cpu) * layers * kv * 2 * 2 / bw) * 1e3
        row.update(floor_ms=floor_ms, mean_ctx=statistics.mean(batch.seq_lens_cpu),
                   one_ms=min(row["one"]), two_ms=min(row["two"]))
        report[str(bs)] = row
        print(f"bs {bs} (ctx mean {row['mean_ctx']:.0f}): ms a step one stream {row['one_ms']:.2f}, two streams "
              f"{row['two_ms']:.2f} ({row['one_ms'] / row['two_ms']:.3f}x; no-overlap floor {floor_ms:.2f})"
              + (f", high priority {min(row['two_high']):.2f}" if "two_high" in row else "") + "; tokens equal "
              f"{row['tokens_equal']:.3f}, max logit diff {row['max_logit_diff']:.3g}", flush=True)
        for r in rows:
            runner.req_to_token_pool.free(r)
        runner.kv_pool.free(slots)
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

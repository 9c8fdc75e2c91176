"""Issue 22.3 (b): (b)'s prefill phase, synchronous vs overlapped chunks, A/B in one process on the H200.

    python benchmarks/b_levers.py --chunks 4 --out $OUT/b_levers.json

One scheduler (Llama-3.1-8B shape, random bf16 weights). Each run prefills ~--chunks chunks of fresh (b)-like prompts
(one new token each, so the run is prefill steps only, as (b)'s first ~13 s are): the prefill steps synchronous (the
host commits a chunk's first tokens, then schedules and launches the next), overlapped (the next chunk scheduled and
launched while one runs; scheduler.OVERLAP_PREFILL_MIN_REQUESTS set to 1 / to never), and synchronous chunks of twice
the size (half the steps); the three interleaved twice (the first run also pays the chunk kernels' compilation on a
fresh machine). Runs of decode steps on two CUDA streams (each half's decode attention beside the other half's
GEMMs) were measured here too and lost (RESULTS.md, thru8; the code: branch thru8 at e7d32f0, the mid round's commit).
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
from gpu_throughput import workload_b  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402


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
    ap.add_argument("--chunks", type=int, default=4, help="8,192-token chunks per run")
    ap.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "b_levers.json"))
    args = ap.parse_args()
    ceil = measure_ceilings()
    print(f"copy {ceil['copy_bytes_per_s'] / 1e12:.2f} TB/s, matmul {ceil['bf16_matmul_flops'] / 1e12:.0f} TFLOP/s", flush=True)
    d = model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-levers-")), "llama8b")
    t0 = time.perf_counter()
    # (no cascade graphs: seconds of start-up, and these prompts share no prefix)
    sched = make_scheduler(d, cascade_attention="off")
    report: dict = {"ceilings": ceil, "startup_s": time.perf_counter() - t0,
                    "prefill": item_prefill(sched, LLAMA_8B["vocab_size"], args.chunks)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1, default=str))


if __name__ == "__main__":
    main()

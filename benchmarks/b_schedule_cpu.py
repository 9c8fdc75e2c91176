"""Issue 22.3 (b): workload (b)'s schedule replayed on the CPU — which decode steps wait for the commit of the step in
flight, and how much host work such a step puts between two forward passes.

    OMP_NUM_THREADS=1 python benchmarks/b_schedule_cpu.py --out benchmarks/results/b_schedule_cpu.json

A 1-layer model (hidden 64, vocabulary 4,096: (b)'s prompts mapped into it by id mod 4,096, the same lengths and
outputs) in the 8B engine's 832,017-token pool on the H200, (b)'s warm-up prompts run first (their KV cached, as in
the suite), chunks of 8,192 tokens, up to 1,024 running requests, overlap scheduling on. The scheduler's decisions
depend on its queues and the pool's occupancy only, so the sequence of steps is (b)'s on the H200. Per decode step:
whether it went ahead of the commit or waited for it, its rows, and the host time of the work that a waiting step
puts between two forward passes on a GPU (the commit of the step in flight, the decode schedule with its eviction,
the batch's tensors, the sampling launch; not the CPU model's forward). Once with step_order.AHEAD_WITH_EVICTION off
(the default: free slots alone let a step go ahead), once on (free + evictable slots).
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import warmup_b, workload_b  # noqa: E402
from profile_steps import make_scheduler, time_calls  # noqa: E402

import radixlm.runtime.step_order as step_order  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.schedule_batch import ScheduledBatch  # noqa: E402

TINY = {**LLAMA_8B, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 1, "num_attention_heads": 4,
        "num_key_value_heads": 2, "vocab_size": 4096, "torch_dtype": "float32"}
POOL_TOKENS = 832017  # the 8B engine's KV pool in (b) on the H200 (suite log of 2026-12-04 20:17)
HOST_PARTS = ("commit", "schedule decode", "batch tensors", "sample launch")


def run(model_dir: Path, requests: int, with_eviction: bool) -> dict:
    step_order.AHEAD_WITH_EVICTION = with_eviction
    sched = make_scheduler(model_dir, dtype="float32", max_total_tokens=POOL_TOKENS, chunked_prefill_size=8192,
                           max_running_requests=1024, enable_overlap_schedule_on_cpu=True, cascade_attention="off")
    vocab = TINY["vocab_size"]
    step: dict[str, Any] = {}

    def timed(owner: Any, name: str, part: str) -> None:  # this step's seconds in owner.name, into step[part]
        def add(seconds: float) -> None:
            step[part] = step.get(part, 0.0) + seconds
        time_calls(owner, name, add)

    check = sched._can_schedule_before_commit

    def decided() -> bool:
        step["ahead"] = check()
        return step["ahead"]

    sched._can_schedule_before_commit = decided
    timed(sched, "_commit_step", "commit")
    timed(sched, "_schedule_decode", "schedule decode")
    timed(sched.results, "sample", "sample launch")
    to_forward = ScheduledBatch.to_forward_batch

    def batch_tensors(self: ScheduledBatch, *a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        result = to_forward(self, *a, **k)
        step["batch tensors"] = step.get("batch tensors", 0.0) + time.perf_counter() - t
        step["rows"] = len(self.reqs)
        return result

    ScheduledBatch.to_forward_batch = batch_tensors  # type: ignore[method-assign]
    try:
        warm = warmup_b(LLAMA_8B["vocab_size"])
        prompts, outs = workload_b(requests, LLAMA_8B["vocab_size"])
        tokens: dict[str, list[int]] = {}
        for label, batch, news in (("w", warm, [8] * len(warm)), ("b", prompts, outs)):
            for i, (p, o) in enumerate(zip(batch, news)):
                sched.handle(TokenizedGenerateReq(rid=f"{label}{i}", input_ids=[t % vocab for t in p], params=SamplingParams(
                    temperature=0, max_new_tokens=o, ignore_eos=True)))
            steps: list[dict] = []
            t0 = time.perf_counter()
            while not sched.idle:
                step.clear()
                decode_steps = sched.stats["decode_steps"]
                sched.step()
                if sched.stats["decode_steps"] > decode_steps:
                    steps.append(dict(step))
                for out in sched.pop_outputs():
                    tokens.setdefault(out.rid, []).extend(out.output_ids)
            wall = time.perf_counter() - t0
    finally:
        ScheduledBatch.to_forward_batch = to_forward  # type: ignore[method-assign]
    waited = [s for s in steps if s.get("ahead") is False]
    res: dict = {"ahead_with_eviction": with_eviction, "requests": requests, "wall_s": wall, "decode_steps": len(steps),
                 "ahead": sum(s.get("ahead") is True for s in steps), "waited": len(waited),
                 "first_waited_step": next((i for i, s in enumerate(steps) if s.get("ahead") is False), None),
                 "waited_rows_mean": statistics.fmean(s.get("rows", 0) for s in waited) if waited else 0.0,
                 "retractions": sched.stats["retractions"], "tokens": {k: v for k, v in tokens.items() if k.startswith("b")}}
    buckets: dict[str, list[dict]] = {}
    for s in waited:
        lo = 1 << (max(1, s.get("rows", 1)).bit_length() - 1)
        buckets.setdefault(f"{lo}-{2 * lo - 1}", []).append(s)
    res["waited_host_ms"] = {k: {"steps": len(v), **{p: 1e3 * statistics.fmean(s.get(p, 0.0) for s in v) for p in HOST_PARTS},
                                 "sum": 1e3 * statistics.fmean(sum(s.get(p, 0.0) for p in HOST_PARTS) for s in v)}
                             for k, v in sorted(buckets.items(), key=lambda kv: -int(kv[0].split("-")[0]))}
    res["waited_host_s_total"] = sum(sum(s.get(p, 0.0) for p in HOST_PARTS) for s in waited)
    res["all_decode_host_s"] = {p: sum(s.get(p, 0.0) for s in steps) for p in HOST_PARTS}  # every decode step's
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--out", default="b_schedule_cpu.json")
    args = ap.parse_args()
    d = model_dir_for(TINY, Path(tempfile.mkdtemp(prefix="radixlm-bsched-")), "tiny")
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "pool_tokens": POOL_TOKENS}
    for with_eviction in (False, True):
        r = run(d, args.requests, with_eviction)
        report["eviction_on" if with_eviction else "eviction_off"] = {k: v for k, v in r.items() if k != "tokens"}
        report.setdefault("_tokens", []).append(r["tokens"])
        print(f"AHEAD_WITH_EVICTION {with_eviction}: {r['decode_steps']} decode steps, {r['ahead']} ahead of the commit, "
              f"{r['waited']} waited for it (from decode step {r['first_waited_step']}, {r['waited_rows_mean']:.0f} rows on "
              f"average; their host work {r['waited_host_s_total']:.2f} s on this CPU), {r['retractions']} retractions, "
              f"{r['wall_s']:.1f} s", flush=True)
        print("  every decode step's host parts, s: " + ", ".join(f"{p} {v:.2f}" for p, v in r["all_decode_host_s"].items()),
              flush=True)
        for k, v in r["waited_host_ms"].items():
            print(f"  waited, {k} rows: {v['steps']} steps, host ms a step: " + ", ".join(
                f"{p} {v[p]:.2f}" for p in (*HOST_PARTS, "sum")), flush=True)
    off, on = report.pop("_tokens")
    report["same_tokens"] = off == on
    print(f"same tokens with and without: {report['same_tokens']}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

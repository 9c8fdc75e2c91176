"""The scheduler's admission of a burst of requests (`Scheduler._schedule_prefill`), in-process, on the
device given: item (f)'s first step spends it (H100, 2026-12-05: "schedule prefill" 22-43 ms of a 256-row
first step in both runs, against ~9 ms on the 2-core CPU), and its spread between runs is most of the
spread of one (f) pair's ratio. Prints the wall time per burst, the Python functions that take it
(cProfile, by own time) and, on a GPU, the device operations it launches (torch.profiler: kernels and
copies, with their count per request).

The model is a 2-layer random-weight Llama with the default tokenizer's vocabulary (admission does not
read weights); prompts are item (f)'s (128 random tokens, cached by a first run), `--json` gives each
request item (f)'s schema.

    python benchmarks/admission_cost.py --batch 256 [--json] [--device cuda]
"""
from __future__ import annotations

import argparse
import cProfile
import io
import json
import pstats
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> None:
    import torch
    from gpu_throughput import SCHEMA
    from host_step import make_model_dir
    from transformers import AutoTokenizer

    from radixlm.runtime import prefill_admission
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.server_args import ServerArgs

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--rounds", type=int, default=5, help="bursts timed (the last one profiled)")
    ap.add_argument("--json", action="store_true", help="each request constrained by item (f)'s schema")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tokenizer", default=".gpu_assets/smollm_tok")
    ap.add_argument("--sort", default="tottime", help="cProfile's order (tottime, cumulative, ...)")
    ap.add_argument("--rows", type=int, default=18, help="cProfile rows printed")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    model = make_model_dir(Path(tempfile.mkdtemp(prefix="radixlm-admission-")), Path(args.tokenizer), 49152)
    sched = Scheduler(ServerArgs(model_path=str(model), tokenizer_path=args.tokenizer, load_format="dummy", device=args.device,
                                 max_total_tokens=200_000,
                                 max_running_requests=1024, chunked_prefill_size=65536, max_prefill_tokens=65536,
                                 enable_overlap_schedule_on_cpu=True).resolve(), model,
                      AutoTokenizer.from_pretrained(args.tokenizer))
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(args.batch)]
    extra = {"json_schema": json.dumps(SCHEMA)} if args.json else {}

    def burst(tag: str, params: dict, n: int | None = None) -> None:
        for i, p in enumerate(prompts[:n]):
            sched.handle(TokenizedGenerateReq(rid=f"{tag}{i}", input_ids=p, params=SamplingParams(
                temperature=1.0, seed=i, max_new_tokens=2, ignore_eos=True, **params)))
        while not sched.idle:
            if not sched.step():
                time.sleep(0.001)  # a grammar compiling
            for o in sched.pop_outputs():
                if o.finished_reason is not None and o.finished_reason.kind == "abort":
                    aborts.append(o.finished_reason.message)  # (a grammar worker that failed: nothing measured)

    aborts: list[str] = []
    mismatched: list[int] = []  # per timed admission: rows whose device table differs from the host mirror
    inner = sched._schedule_prefill
    walls: list[float] = []
    profiler: dict = {"py": cProfile.Profile(), "torch": None}
    armed = {"on": False}

    def timed():  # the burst's admission: the step whose batch takes the waiting requests
        if any(r.grammar_pending for r in sched.waiting):
            return inner()  # a grammar still compiling (the first JSON burst): not an admission to time
        profiled = armed["on"] and len(sched.waiting) == args.batch  # the profiled round's admission, once
        armed["on"] = armed["on"] and not profiled
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        t = time.perf_counter()
        if profiled:
            profiler["py"].enable()
            if profiler["torch"] is not None:
                profiler["torch"].__enter__()
        batch = inner()
        if profiled:
            profiler["py"].disable()
            if profiler["torch"] is not None:
                torch.cuda.synchronize()
                profiler["torch"].__exit__(None, None, None)
        if batch is not None and len(batch.reqs) == args.batch:
            walls.append(time.perf_counter() - t)
            pool = sched.req_to_token_pool  # every admitted prefix on the device as on the host (after the timing)
            rows = torch.tensor([r.req_pool_idx for r in batch.reqs])
            mismatched.append(int((pool.req_to_token[rows.to(pool.req_to_token.device)].cpu() != pool.host[rows]).any(1).sum()))
        return batch

    sched._schedule_prefill = timed
    burst("cache-", {})  # the prompts cached
    burst("warm-", extra, 2)  # the schema compiled
    for r in range(args.rounds):
        if r == args.rounds - 1:
            armed["on"] = True
            if args.device.startswith("cuda"):
                from torch.profiler import ProfilerActivity, profile
                profiler["torch"] = profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA])
        burst(f"r{r}-", extra)
    ms = [1e3 * w for w in walls]
    print(f"admission of {args.batch} {'JSON ' if args.json else ''}requests on {args.device}: "
          f"{[round(x, 2) for x in ms]} ms (median of the unprofiled {statistics.median(ms[:-1] or ms):.2f}; "
          f"the last one profiled); {len(aborts)} requests aborted {sorted(set(aborts))[:2]}; prefixes deferred "
          f"{prefill_admission.DEFER_ADMISSION_WRITES}; rows whose device table differs from the host's {mismatched}")
    text = io.StringIO()
    pstats.Stats(profiler["py"], stream=text).sort_stats(args.sort).print_stats(args.rows)
    print(text.getvalue())
    report: dict = {"batch": args.batch, "json": args.json, "device": args.device, "wall_ms": ms, "aborts": len(aborts),
                    "deferred": prefill_admission.DEFER_ADMISSION_WRITES, "rows_mismatched": mismatched}
    if profiler["torch"] is not None:
        events = [e for e in profiler["torch"].key_averages() if e.key.startswith(("aten::", "cuda", "Memcpy", "Memset"))]
        events.sort(key=lambda e: -e.cpu_time_total)
        print(f"{'op':<40} {'calls':>7} {'per request':>11} {'host us total':>14}")
        for e in events[:20]:
            print(f"{e.key:<40} {e.count:>7} {e.count / args.batch:>11.2f} {e.cpu_time_total:>14.0f}")
        report["ops"] = [{"op": e.key, "calls": e.count, "host_us": e.cpu_time_total} for e in events[:40]]
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

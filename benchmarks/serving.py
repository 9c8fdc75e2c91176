"""Online serving benchmark: an async load generator on the OpenAI API, then the offline Engine on the
same workload, in one run.

    python benchmarks/serving.py --num-requests 32 --input-len 64 --output-len 32
    python benchmarks/serving.py --base-url http://127.0.0.1:30000 --request-rate 4 --skip-engine

Without --base-url it starts `python -m radixlm.launch_server` on a free loopback port and stops it
before the Engine runs, so the two never share the CPU/GPU. Requests are random token-id prompts
(seeded, same for both), streamed from /v1/completions with ignore_eos and greedy sampling.
Per request: TTFT (first streamed text), ITL (gaps between streamed chunks), TPOT
((E2E - TTFT) / (output tokens - 1)), E2E. Prints a table and writes JSON to benchmarks/results/.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

from radixlm.runtime.bench.serving import make_workload, run_load, start_server, stop_server

RESULTS = Path(__file__).resolve().parent / "results"


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ("model_path", "max_total_tokens", "cpu_threads", "max_running_requests", "device", "dtype"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


# ------------------------------------------------------------------------------------ engine side
def run_engine(workload: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    import radixlm

    options = {k: getattr(args, k) for k in ("max_total_tokens", "cpu_threads", "max_running_requests", "device",
                                              "dtype") if getattr(args, k) is not None}
    engine = radixlm.Engine(args.model_path, **options)
    try:
        params = {"temperature": 0, "ignore_eos": True}
        engine.generate(input_ids=workload[0]["prompt_ids"], sampling_params={**params, "max_new_tokens": 4})
        engine.flush_cache()  # the server's run started cold too (random prompts share nothing anyway)
        start = time.perf_counter()
        outs = engine.generate(input_ids=[w["prompt_ids"] for w in workload],
                               sampling_params=[{**params, "max_new_tokens": w["output_len"]} for w in workload])
        duration = time.perf_counter() - start
    finally:
        engine.shutdown()
    out_tokens = sum(o["meta_info"]["completion_tokens"] for o in outs)
    in_tokens = sum(o["meta_info"]["prompt_tokens"] for o in outs)
    return {"completed": len(outs), "duration_s": duration, "total_input_tokens": in_tokens,
            "total_output_tokens": out_tokens, "request_throughput": len(outs) / duration,
            "output_throughput": out_tokens / duration, "total_throughput": (in_tokens + out_tokens) / duration}


# ------------------------------------------------------------------------------------ report
def print_table(server: dict[str, Any], engine: dict[str, Any] | None) -> None:
    rows = [("Successful requests", f"{server['completed']} (failed {server['failed']})"),
            ("Benchmark duration (s)", f"{server['duration_s']:.2f}"),
            ("Total input / output tokens", f"{server['total_input_tokens']} / {server['total_output_tokens']}"),
            ("Request throughput (req/s)", f"{server['request_throughput']:.2f}"),
            ("Output token throughput (tok/s)", f"{server['output_throughput']:.2f}"),
            ("Total token throughput (tok/s)", f"{server['total_throughput']:.2f}"),
            ("Concurrency", f"{server['concurrency']:.2f}")]
    for name in ("ttft_ms", "tpot_ms", "itl_ms", "e2e_ms"):
        s = server[name]
        if s:
            label = name.removesuffix("_ms").upper()
            rows.append((f"{label} mean / median / p99 (ms)", f"{s['mean']:.1f} / {s['median']:.1f} / {s['p99']:.1f}"))
    if engine:
        rows += [("Engine duration (s)", f"{engine['duration_s']:.2f}"),
                 ("Engine output throughput (tok/s)", f"{engine['output_throughput']:.2f}"),
                 ("Server / engine output throughput", f"{server['output_throughput'] / engine['output_throughput']:.3f}")]
    width = max(len(k) for k, _ in rows)
    print("=" * (width + 24))
    print(" radixlm serving benchmark ".center(width + 24, "="))
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("=" * (width + 24))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base-url", default=None, help="benchmark a running server instead of starting one")
    p.add_argument("--model-path", default=None)
    p.add_argument("--max-total-tokens", type=int, default=16384)
    p.add_argument("--max-running-requests", type=int, default=None)
    p.add_argument("--cpu-threads", type=int, default=None)
    p.add_argument("--device", default=None)
    p.add_argument("--dtype", default=None)
    p.add_argument("--num-requests", type=int, default=32)
    p.add_argument("--input-len", type=int, default=64)
    p.add_argument("--output-len", type=int, default=32)
    p.add_argument("--request-rate", type=float, default=float("inf"), help="Poisson arrivals per second (inf: all at once)")
    p.add_argument("--max-concurrency", type=int, default=None)
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--vocab-size", type=int, default=None, help="token-id range of the prompts (default: the model's)")
    p.add_argument("--request-timeout", type=float, default=1800)
    p.add_argument("--startup-timeout", type=float, default=600)
    p.add_argument("--skip-engine", action="store_true")
    p.add_argument("--output-file", default=str(RESULTS / "serving.json"))
    args = p.parse_args(argv)

    proc = None
    url = args.base_url
    if url is None:
        proc, url, _log = start_server(server_flags(args), args.startup_timeout)
    try:
        vocab = args.vocab_size
        if vocab is None:
            info = asyncio.run(_get_json(url + "/get_server_info"))
            vocab = int(info.get("vocab_size", 32000))
        workload = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, vocab)
        server = asyncio.run(run_load(url, workload, request_rate=args.request_rate,
                                      max_concurrency=args.max_concurrency, warmup=args.warmup, seed=args.seed,
                                      request_timeout=args.request_timeout))
    finally:
        if proc is not None:
            stop_server(proc)
    engine = None if args.skip_engine or args.base_url else run_engine(workload, args)
    print_table(server, engine)
    record = {
        "config": {k: (v if v != float("inf") else "inf") for k, v in vars(args).items()},
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "cpus": os.cpu_count()},
        "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "server": server, "engine": engine,
        "server_over_engine_output_throughput": (server["output_throughput"] / engine["output_throughput"]
                                                 if engine else None),
    }
    out = Path(args.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0 if server["failed"] == 0 else 1


async def _get_json(url: str) -> dict[str, Any]:
    async with aiohttp.ClientSession() as s:
        async with s.get(url) as r:
            return await r.json()


if __name__ == "__main__":
    sys.exit(main())

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
import random
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

RESULTS = Path(__file__).resolve().parent / "results"


# ------------------------------------------------------------------------------------ workload
def make_workload(n: int, input_len: int, output_len: int, seed: int, vocab: int) -> list[dict[str, Any]]:
    rng = random.Random(seed)
    hi = min(vocab, 32000)
    return [{"prompt_ids": [rng.randrange(256, hi) for _ in range(input_len)], "output_len": output_len}
            for _ in range(n)]


def arrival_gaps(n: int, rate: float, seed: int) -> list[float]:
    if rate == float("inf"):
        return [0.0] * n
    rng = random.Random(seed + 1)
    return [rng.expovariate(rate) for _ in range(n)]


# ------------------------------------------------------------------------------------ server side
def start_server(args: argparse.Namespace) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="radixlm-bench-")) / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--log-level", "warning", *server_flags(args)]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        m = re.search(r"ready at (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1), log
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready within {args.startup_timeout}s")


def server_flags(args: argparse.Namespace) -> list[str]:
    flags = []
    for name in ("model_path", "max_total_tokens", "cpu_threads", "max_running_requests", "device", "dtype"):
        value = getattr(args, name)
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


async def one_request(session: aiohttp.ClientSession, url: str, item: dict[str, Any]) -> dict[str, Any]:
    body = {"model": "bench", "prompt": item["prompt_ids"], "max_tokens": item["output_len"], "temperature": 0,
            "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, last, itl, usage, error = None, start, [], None, None
    try:
        async with session.post(url + "/v1/completions", json=body) as r:
            if r.status != 200:
                return {"ok": False, "error": f"HTTP {r.status}: {(await r.text())[:200]}"}
            async for raw in r.content:
                line = raw.strip()
                if not line.startswith(b"data: ") or line == b"data: [DONE]":
                    continue
                event = json.loads(line[6:])
                if "error" in event:
                    error = event["error"]["message"]
                    continue
                if event.get("usage"):
                    usage = event["usage"]
                if event.get("choices") and event["choices"][0].get("text"):
                    now = time.perf_counter()
                    if ttft is None:
                        ttft = now - start
                    else:
                        itl.append(now - last)
                    last = now
    except aiohttp.ClientError as exc:
        return {"ok": False, "error": repr(exc)}
    e2e = time.perf_counter() - start
    out = usage["completion_tokens"] if usage else 0
    if error or ttft is None:
        return {"ok": False, "error": error or "no output"}
    return {"ok": True, "ttft": ttft, "itl": itl, "e2e": e2e, "output_tokens": out,
            "input_tokens": usage["prompt_tokens"] if usage else len(item["prompt_ids"]),
            "tpot": (e2e - ttft) / (out - 1) if out > 1 else None}


async def run_load(url: str, workload: list[dict[str, Any]], args: argparse.Namespace) -> dict[str, Any]:
    sem = asyncio.Semaphore(args.max_concurrency) if args.max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=args.request_timeout)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn) as session:
        for _ in range(args.warmup):
            await one_request(session, url, {**workload[0], "output_len": 4})

        async def limited(item: dict[str, Any]) -> dict[str, Any]:
            if sem is None:
                return await one_request(session, url, item)
            async with sem:
                return await one_request(session, url, item)

        tasks = []
        start = time.perf_counter()
        for item, gap in zip(workload, arrival_gaps(len(workload), args.request_rate, args.seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(item)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        async with session.get(url + "/get_server_info") as r:
            info = await r.json() if r.status == 200 else {}
    return summarize(results, duration, info)


def _stats(values: list[float], scale: float = 1000.0) -> dict[str, float]:
    if not values:
        return {}
    v = sorted(x * scale for x in values)

    def pct(p: float) -> float:
        return v[min(len(v) - 1, max(0, round(p / 100 * (len(v) - 1))))]

    return {"mean": statistics.fmean(v), "median": statistics.median(v), "std": statistics.pstdev(v),
            "p90": pct(90), "p99": pct(99), "max": v[-1]}


def summarize(results: list[dict[str, Any]], duration: float, info: dict[str, Any]) -> dict[str, Any]:
    ok = [r for r in results if r["ok"]]
    out_tokens = sum(r["output_tokens"] for r in ok)
    in_tokens = sum(r["input_tokens"] for r in ok)
    return {
        "completed": len(ok), "failed": len(results) - len(ok),
        "errors": sorted({r["error"] for r in results if not r["ok"]})[:5],
        "duration_s": duration, "total_input_tokens": in_tokens, "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration, "input_throughput": in_tokens / duration,
        "output_throughput": out_tokens / duration, "total_throughput": (in_tokens + out_tokens) / duration,
        "concurrency": sum(r["e2e"] for r in ok) / duration,
        "ttft_ms": _stats([r["ttft"] for r in ok]),
        "tpot_ms": _stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": _stats([x for r in ok for x in r["itl"]]),
        "e2e_ms": _stats([r["e2e"] for r in ok]),
        "server_cache_hit_rate": info.get("cache_hit_rate"),
        "server_last_gen_throughput": info.get("last_gen_throughput"),
    }


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
        proc, url, _log = start_server(args)
    try:
        vocab = args.vocab_size
        if vocab is None:
            info = asyncio.run(_get_json(url + "/get_server_info"))
            vocab = int(info.get("vocab_size", 32000))
        workload = make_workload(args.num_requests, args.input_len, args.output_len, args.seed, vocab)
        server = asyncio.run(run_load(url, workload, args))
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

"""Online serving load: seeded random-token prompts streamed from /v1/completions of a server.

Per request: TTFT (first streamed text), ITL (gaps between streamed chunks), TPOT ((E2E - TTFT) /
(output tokens - 1)), E2E. Without a URL the server is started (`python -m radixlm.launch_server`
on a free loopback port, with the flags given) and stopped afterwards.
"""
from __future__ import annotations

import asyncio
import json
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import aiohttp

from radixlm.runtime.bench.report import latency_section, latency_stats, summary_table


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


def start_server(flags: list[str], startup_timeout: float) -> tuple[subprocess.Popen, str, Path]:
    log = Path(tempfile.mkdtemp(prefix="radixlm-bench-")) / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--log-level", "warning", *flags]
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + startup_timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        m = re.search(r"ready at (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1), log
        time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"server not ready within {startup_timeout}s (log: {log})")


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


async def run_load(url: str, workload: list[dict[str, Any]], *, request_rate: float = float("inf"),
                   max_concurrency: int | None = None, warmup: int = 1, seed: int = 0,
                   request_timeout: float = 1800, headers: dict[str, str] | None = None,
                   progress: bool = True) -> dict[str, Any]:
    from tqdm.auto import tqdm

    sem = asyncio.Semaphore(max_concurrency) if max_concurrency else None
    timeout = aiohttp.ClientTimeout(total=request_timeout)
    conn = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(timeout=timeout, connector=conn, headers=headers) as session:
        for _ in range(warmup):
            await one_request(session, url, {**workload[0], "output_len": 4})
        bar = tqdm(total=len(workload), desc="requests", unit="req", disable=not progress)

        async def limited(item: dict[str, Any]) -> dict[str, Any]:
            try:
                if sem is None:
                    return await one_request(session, url, item)
                async with sem:
                    return await one_request(session, url, item)
            finally:
                bar.update(1)

        tasks = []
        start = time.perf_counter()
        for item, gap in zip(workload, arrival_gaps(len(workload), request_rate, seed)):
            if gap:
                await asyncio.sleep(gap)
            tasks.append(asyncio.create_task(limited(item)))
        results = await asyncio.gather(*tasks)
        duration = time.perf_counter() - start
        bar.close()
        async with session.get(url + "/get_server_info") as r:
            info = await r.json() if r.status == 200 else {}
    return summarize(results, duration, info)


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
        "ttft_ms": latency_stats([r["ttft"] for r in ok]),
        "tpot_ms": latency_stats([r["tpot"] for r in ok if r["tpot"] is not None]),
        "itl_ms": latency_stats([x for r in ok for x in r["itl"]]),
        "e2e_ms": latency_stats([r["e2e"] for r in ok]),
        "server_cache_hit_rate": info.get("cache_hit_rate"),
        "server_last_gen_throughput": info.get("last_gen_throughput"),
    }


def serving_table(s: dict[str, Any], request_rate: float, max_concurrency: int | None) -> str:
    sections = [(None, [
        ("Backend", "radixlm"), ("Traffic request rate", request_rate),
        ("Max request concurrency", max_concurrency or "not set"),
        ("Successful requests", s["completed"]), ("Failed requests", s["failed"]),
        ("Benchmark duration (s)", s["duration_s"]), ("Total input tokens", s["total_input_tokens"]),
        ("Total generated tokens", s["total_output_tokens"]), ("Request throughput (req/s)", s["request_throughput"]),
        ("Input token throughput (tok/s)", s["input_throughput"]),
        ("Output token throughput (tok/s)", s["output_throughput"]),
        ("Total token throughput (tok/s)", s["total_throughput"]), ("Concurrency", s["concurrency"])])]
    sections += latency_section("End-to-End Latency", "E2E Latency", s["e2e_ms"])
    sections += latency_section("Time to First Token", "TTFT", s["ttft_ms"])
    sections += latency_section("Time per Output Token (excl. 1st token)", "TPOT", s["tpot_ms"])
    sections += latency_section("Inter-Token Latency", "ITL", s["itl_ms"])
    return summary_table("Serving Benchmark Result", sections)

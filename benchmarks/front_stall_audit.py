"""Trust: can one request stall OTHER clients on the HTTP server's event loop? (stall3, 2026-12-05)

The HTTP/tokenizer process serves every client from one asyncio loop. This starts a real server on the
default model (CPU), keeps one client streaming (`/generate`, ignore_eos) and a probe polling `/health`
every 10 ms, then sends one hostile request per case and reports, over the window from its send until
it is answered (+0.3 s), the probe's longest round trip and the stream's longest gap between chunks,
next to the same figures in the second before it (`base`). A stalled loop shows in the probe first: the
stream's gaps also carry the scheduler's step (the scheduler shares the CPU).

    timeout 1200 python benchmarks/front_stall_audit.py --out /tmp/front_stall.json [--cases tokenize,chat]
"""
from __future__ import annotations

import argparse
import asyncio
import json
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import aiohttp

WORDS = "The quick brown fox jumps over the lazy dog, said Emile; 12345 "


def tools(count: int) -> list[dict[str, Any]]:
    props = {f"field_{j}": {"type": "string", "description": "a field of the record " * 4} for j in range(12)}
    return [{"type": "function", "function": {"name": f"tool_{i}", "description": "Looks a record up. " * 8,
                                              "parameters": {"type": "object", "properties": props}}}
            for i in range(count)]


def numbers_body(mb: float, number: str, field: str) -> bytes:
    """A /generate body of about `mb` MB, nearly all of it `number`s in one list under `field` (encoded here,
    so the client's own encoding does not share the window)."""
    count = int(mb * 2**20 / (len(number) + 2))
    head = b'{"text": "hi", "sampling_params": {"max_new_tokens": 1}, "' + field.encode() + b'": ['
    return head + b", ".join([number.encode()] * count) + b"]}"


def cases(mb: float, body_mb: float = 16.0) -> dict[str, tuple[str, str, Any]]:
    """name -> (method, path, body): each a request a client may send (valid or refused)."""
    text = WORDS * int(mb * 1e6 / len(WORDS))
    chat = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"message number {i}"} for i in range(5000)]
    schema = {"type": "object", "properties": {f"k{i}": {"type": "string", "maxLength": 8} for i in range(4000)}}
    return {
        "generate_text_mb": ("POST", "/generate", {"text": text, "sampling_params": {"max_new_tokens": 1}}),
        "tokenize_mb": ("POST", "/tokenize", {"prompt": text}),
        "chat_5000_messages": ("POST", "/v1/chat/completions", {"model": "m", "messages": chat, "max_tokens": 1}),
        "chat_1000_tools": ("POST", "/v1/chat/completions", {"model": "m", "max_tokens": 1, "tools": tools(1000),
                                                             "messages": [{"role": "user", "content": "hi"}]}),
        "json_schema_4000_keys": ("POST", "/generate", {"text": "hi", "sampling_params": {
            "max_new_tokens": 1, "json_schema": json.dumps(schema)}}),
        "input_ids_1m": ("POST", "/generate", {"input_ids": [17] * 1_000_000, "sampling_params": {"max_new_tokens": 1}}),
        # (trust5) bodies of numbers of --body-mb: ids (with text too: a 400) and floats in an unknown field (ignored:
        # served) — the kinds json.loads parses slowest, at the size the body limit lets through
        "ids_body_mb": ("POST", "/generate", numbers_body(body_mb, "12345", "input_ids")),
        "floats_body_mb": ("POST", "/generate", numbers_body(body_mb, "0.123456", "unknown_numbers")),
        "n_128_stream": ("POST", "/generate", {"text": "Once upon a time", "stream": True, "sampling_params": {
            "n": 128, "max_new_tokens": 48, "ignore_eos": True, "temperature": 1.0}}),
        "top_logprobs_20_stream": ("POST", "/v1/completions", {
            "model": "m", "prompt": "Once upon a time", "max_tokens": 400, "logprobs": 5, "stream": True,
            "ignore_eos": True}),
    }


async def send(session: aiohttp.ClientSession, url: str, method: str, path: str, body: Any) -> tuple[int, float]:
    t = time.perf_counter()
    kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    async with session.request(method, url + path, **kw) as r:
        async for _ in r.content.iter_any():
            pass
        return r.status, time.perf_counter() - t


async def probe(session: aiohttp.ClientSession, url: str, marks: list[tuple[float, float]], stop: asyncio.Event) -> None:
    while not stop.is_set():
        t = time.perf_counter()
        async with session.get(url + "/health") as r:
            await r.read()
        marks.append((t, time.perf_counter() - t))
        await asyncio.sleep(0.01)


async def stream(session: aiohttp.ClientSession, url: str, chunks: list[float]) -> None:
    body = {"text": "Tell me a long story.", "stream": True,
            "sampling_params": {"max_new_tokens": 4000, "ignore_eos": True, "temperature": 0.0}}
    async with session.post(url + "/generate", json=body) as r:
        async for line in r.content:
            if line.startswith(b"data: "):
                chunks.append(time.perf_counter())


def window_stats(marks: list[tuple[float, float]], chunks: list[float], lo: float, hi: float) -> dict[str, float]:
    rtt = [d for t, d in marks if lo <= t <= hi or lo <= t + d <= hi]
    gaps = [b - a for a, b in zip(chunks, chunks[1:]) if lo <= b <= hi]
    return {"probe_max_ms": round(max(rtt, default=0.0) * 1e3, 1), "probes": len(rtt),
            "stream_max_gap_ms": round(max(gaps, default=0.0) * 1e3, 1), "chunks": len(gaps)}


async def run_case(url: str, method: str, path: str, body: Any, flood: int = 0) -> dict[str, Any]:
    """`flood`: first that many requests (a 1-token prompt, 200 tokens each) are sent and left in flight (most
    queued); the hostile request (then /abort_request abort_all) comes 3 s later; `drained_s`: until every
    flooded request was answered."""
    marks: list[tuple[float, float]] = []
    chunks: list[float] = []
    stop = asyncio.Event()
    connector = aiohttp.TCPConnector(limit=0)  # (aiohttp's default holds all but 100 back)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=900), connector=connector) as session:
        streamer = asyncio.create_task(stream(session, url, chunks))
        prober = asyncio.create_task(probe(session, url, marks, stop))
        while len(chunks) < 8:
            await asyncio.sleep(0.01)
        filler = {"text": "hi", "sampling_params": {"max_new_tokens": 200, "ignore_eos": True}}
        flights = [asyncio.create_task(send(session, url, "POST", "/generate", filler)) for _ in range(flood)]
        await asyncio.sleep(3.0 if flood else 1.0)
        t0 = time.perf_counter()
        status, answered = await send(session, url, method, path, body)
        t1 = time.perf_counter()
        done = await asyncio.gather(*flights)
        drained = time.perf_counter() - t0
        await asyncio.sleep(0.3)
        stop.set()
        await prober
        streamer.cancel()
    out = {"status": [status], "answered_s": round(answered, 2), "base": window_stats(marks, chunks, t0 - 1.0, t0),
           "during": window_stats(marks, chunks, t0, max(t1, t0 + drained) + 0.3)}
    if flood:
        out |= {"flooded": flood, "flood_status": sorted({s for s, _ in done}), "drained_s": round(drained, 2)}
    return out


def start_server(args: argparse.Namespace, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--max-total-tokens", str(args.max_total_tokens), "--cpu-threads", "1",
           "--max-inflight-requests", "2048", *args.server_args]
    proc = subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        m = re.search(r"ready at (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1)
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("the server did not start")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--cases", default="", help="comma-separated names (default: all, then abort_all)")
    ap.add_argument("--mb", type=float, default=1.0, help="the long text's size in MB")
    ap.add_argument("--body-mb", type=float, default=16.0, help="the numbers bodies' size in MB (ids_body_mb, floats_body_mb)")
    ap.add_argument("--abort-count", type=int, default=1000)
    ap.add_argument("--max-total-tokens", type=int, default=65536)
    ap.add_argument("--log", type=Path, default=Path("/tmp/front_stall_audit.log"))
    ap.add_argument("server_args", nargs="*", help="more server flags (after --)")
    args = ap.parse_args()
    proc, url = start_server(args, args.log)
    results: dict[str, Any] = {}
    try:
        table = cases(args.mb, args.body_mb)
        names = args.cases.split(",") if args.cases else [*table, "abort_all"]
        for name in names:
            if name == "abort_all":
                results[name] = asyncio.run(run_case(url, "POST", "/abort_request", {"abort_all": True},
                                                     flood=args.abort_count))
            else:
                results[name] = asyncio.run(run_case(url, *table[name]))
            print(name, json.dumps(results[name]), flush=True)
            if args.out:
                args.out.write_text(json.dumps(results, indent=1))
    finally:
        proc.terminate()
        proc.wait(30)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Item (g) of the H200 suite on any machine: the HTTP server against the offline Engine on the same
slice of workload (b), with the forward steps each one took.

    python benchmarks/server_vs_engine.py                          # CPU: tiny random Llama, 300 requests
    python benchmarks/server_vs_engine.py --client-limits 100,0    # aiohttp's default pool vs unlimited

The server is driven as in gpu_throughput.item_g: every request is a non-streaming POST /generate
with input_ids, all launched at once from one aiohttp session. `--client-limits` sets that session's
connection pool (aiohttp's default is 100: with more requests than that the client, not the server,
caps the concurrency; 0 = unlimited). Each run reports the scheduler's forward steps (from
/server_info and Engine.get_server_info), which show whether both paths formed the same batches,
and the slowest GET /health answer while it ran (from a thread polling every 10 ms), which shows
whether the server's event loop stalled.
The default model is a random Llama (hidden 64, 2 layers, vocab 32,000), so host-side costs are
visible. The Engine runs first and is shut down before the server starts; they never share the CPU.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

from gpu_throughput import drive_server, params_for, workload_b  # item (g)'s workload and client (this folder is on sys.path)

RESULTS = Path(__file__).resolve().parent / "results"


def tiny_llama(out_dir: Path, vocab: int) -> Path:
    import torch
    import transformers as tf

    torch.manual_seed(0)
    cfg = tf.LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                         tie_word_embeddings=False)
    tf.LlamaForCausalLM(cfg).save_pretrained(str(out_dir))
    return out_dir


def engine_options(args: argparse.Namespace) -> dict[str, Any]:
    opts = {"load_format": "dummy", "skip_tokenizer_init": True, "context_length": 4096, "log_level": "warning",
            "device": args.device, "cpu_threads": args.cpu_threads, "max_total_tokens": args.max_total_tokens,
            "max_running_requests": args.max_running_requests, "chunked_prefill_size": args.chunked_prefill_size}
    return {k: v for k, v in opts.items() if v is not None}


def run_engine(model: str, prompts: list[list[int]], outs: list[int], args: argparse.Namespace) -> dict[str, Any]:
    import radixlm

    with radixlm.Engine(model, **engine_options(args)) as eng:
        eng.generate(input_ids=prompts[:4], sampling_params=params_for([4] * 4))
        eng.flush_cache()
        steps = eng.get_server_info()["forward_steps"]
        t = time.perf_counter()
        res = eng.generate(input_ids=prompts, sampling_params=params_for(outs))
        seconds = time.perf_counter() - t
        steps = eng.get_server_info()["forward_steps"] - steps
    assert [r["meta_info"]["completion_tokens"] for r in res] == outs
    return {"seconds": seconds, "forward_steps": steps}


def start_server(model: str, args: argparse.Namespace) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", model, "--host", "127.0.0.1",
           "--port", "0"]
    for name, value in engine_options(args).items():
        flag = "--" + name.replace("_", "-")
        cmd += [flag] if value is True else [flag, str(value)]
    log = Path(tempfile.mkdtemp(prefix="radixlm-g-")) / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited with {proc.returncode}:\n{log.read_text()[-4000:]}")
        m = re.search(r"ready at (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1)
        time.sleep(0.5)
    proc.kill()
    raise SystemExit("server not ready within 300 s")


def _get(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=30) as r:
        return json.loads(r.read() or b"null")


class HealthProbe:
    """GET /health every 10 ms on its own thread; the slowest answer is the event loop's worst stall."""

    def __init__(self, url: str) -> None:
        self.url, self.worst, self._stop = url, 0.0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(0.01):
            t = time.perf_counter()
            urllib.request.urlopen(f"{self.url}/health", timeout=60).read()
            self.worst = max(self.worst, time.perf_counter() - t)

    def __enter__(self) -> "HealthProbe":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def run_server(model: str, prompts: list[list[int]], outs: list[int], args: argparse.Namespace,
               limit: int) -> dict[str, Any]:
    """A fresh server per run, as the Engine is: a second run on a used KV pool (scattered slots)
    was 8-20% slower on the CPU."""
    proc, url = start_server(model, args)
    try:
        asyncio.run(drive_server(url, prompts[:4], [4] * 4, limit))
        urllib.request.urlopen(f"{url}/flush_cache", timeout=30).read()
        steps = _get(f"{url}/server_info")["forward_steps"]
        with HealthProbe(url) as probe:
            seconds = asyncio.run(drive_server(url, prompts, outs, limit))
        steps = _get(f"{url}/server_info")["forward_steps"] - steps
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
    return {"seconds": seconds, "forward_steps": steps, "client_connection_limit": limit,
            "health_ms_max": probe.worst * 1e3}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-path", default=None, help="default: a tiny random Llama built in a temp folder")
    p.add_argument("--vocab-size", type=int, default=32000)
    p.add_argument("--num-requests", type=int, default=300)
    p.add_argument("--client-limits", default="100,0", help="aiohttp pool sizes to drive the server with (0: none)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu-threads", type=int, default=1)
    p.add_argument("--max-total-tokens", type=int, default=262144, help="room for every request at once, as on the H200")
    p.add_argument("--max-running-requests", type=int, default=1024, help="the CUDA default")
    p.add_argument("--chunked-prefill-size", type=int, default=8192, help="the CUDA default")
    p.add_argument("--output-file", default=str(RESULTS / "server_vs_engine-cpu.json"))
    args = p.parse_args(argv)

    model = args.model_path or str(tiny_llama(Path(tempfile.mkdtemp(prefix="radixlm-tiny-")), args.vocab_size))
    vocab = json.loads((Path(model) / "config.json").read_text())["vocab_size"]
    prompts, outs = workload_b(args.num_requests, vocab, seed=11)
    total = sum(map(len, prompts)) + sum(outs)
    runs = {"engine": run_engine(model, prompts, outs, args)}
    for limit in (int(x) for x in args.client_limits.split(",")):
        runs[f"server_client_limit_{limit}"] = run_server(model, prompts, outs, args, limit)
    engine_s = runs["engine"]["seconds"]
    print(f"{args.num_requests} requests, {total} tokens (prompt + output)")
    print(f"{'path':<26} {'seconds':>8} {'total tok/s':>12} {'forward steps':>14} {'vs engine':>10} "
          f"{'/health max ms':>15}")
    for name, run in runs.items():
        run["total_tok_s"] = total / run["seconds"]
        run["vs_engine"] = engine_s / run["seconds"]
        print(f"{name:<26} {run['seconds']:>8.2f} {run['total_tok_s']:>12.0f} {run['forward_steps']:>14} "
              f"{run['vs_engine']:>9.3f}x {run.get('health_ms_max', float('nan')):>15.0f}")
    record = {"config": vars(args), "model": model, "total_tokens": total, "runs": runs,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
              "timestamp": time.strftime("%Y-%m-%dT%H:%M:%S")}
    out = Path(args.output_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Soak: many mixed requests against one live server, then exact KV accounting, no 5xx, RSS growth.

The mix (weights in MIX): plain /generate, streaming /generate, n > 1, logprobs (with input
logprobs), regex and json_schema, /v1/completions, /v1/chat/completions (plain and streaming),
10% streams the client drops after the first event, 5% hostile bodies (malformed JSON, lone
surrogates, huge / non-finite numbers, wrong types, empty prompts, nested junk, unknown fields, and
soak_hostile.py's catalogue: tools, odd schemas, logprob / stop / max_tokens extremes, unknown adapters,
stream_options, huge `messages`, deep nesting, a wrong type in every field). After the warm-up every
hostile case is sent once (--no-catalogue: not), each checked against its contract (a 4xx naming its field,
or a 2xx for a valid extreme request).
Pass criteria: every status < 500 (hostile ones 4xx or, for ignored unknown fields, 200), after
the run nothing runs or is locked, and after /flush_cache every KV slot is free (0 leaked).
It reports the resident memory of the front (HTTP) process and of the scheduler process after the
warm-up and at the end.

CPU (default model):
    python benchmarks/soak.py --requests 10000 --concurrency 32
H200 (random-weight Llama-3.1-8B shape with the default model's tokenizer, so every kind of
request runs; 256 concurrent connections):
    python benchmarks/soak.py --shape llama-8b --requests 10000 --concurrency 256
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent))
from soak_hostile import Case, hostile_cases  # noqa: E402

MIX = {"plain": 18, "stream": 12, "n": 8, "logprobs": 8, "regex": 5, "json_schema": 5, "completion": 10,
       "chat": 10, "chat_stream": 9, "disconnect": 10, "hostile": 5}
WORDS = ("the cat sat on a mat while seven blue birds sang about rivers and the old city of Paris in "
         "spring light because numbers like 42 and 17 matter to every careful engineer").split()
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"], "additionalProperties": False}
# Llama-3.1-8B's shape; the vocabulary is the default model's, whose tokenizer it borrows.
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
            "max_position_embeddings": 8192, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


def hostile_bodies() -> list[Case]:
    """The first mix's hostile bodies (each must get a 4xx, or a 200 where only unknown fields are wrong)
    and soak_hostile's catalogue of the request kinds added since."""
    msg = [{"role": "user", "content": "hi"}]
    cases: list[tuple[str, Any]] = [
        ("/generate", b"{not json"), ("/generate", b"[1, 2]"), ("/generate", b""), ("/generate", b'{"text": NaN}'),
        ("/generate", b'{"text": "\\ud800"}'), ("/generate", b'{"text": "x", "sampling_params": {"temperature": 1e400}}'),
        ("/generate", {"text": ""}), ("/generate", {"input_ids": []}), ("/generate", {"input_ids": [[1], []]}),
        ("/generate", {"text": "x", "logprob_start_len": [0, 1]}),
        ("/generate", {"text": ["a", "b"], "top_logprobs_num": [1]}),
        ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2**63}}),
        ("/generate", {"text": "x", "sampling_params": {"top_p": "high", "zz": 1}}),
        ("/generate", {"text": "x", "sampling_params": {"stop": {"a": [1]}}}),
        ("/generate", {"input_ids": [[1, [2, [3]]]]}),
        ("/generate", {"text": "x", "unknown_field": {"deep": [1, {"x": None}]}, "sampling_params": {"max_new_tokens": 1}}),
        ("/v1/chat/completions", {"messages": [*msg, {"role": "user", "content": "a\udc00"}]}),
        ("/v1/chat/completions", {"messages": msg, "max_tokens": 2**64}),
        ("/v1/chat/completions", {"messages": msg, "tools": [{"type": "function", "function": {"name": "f",
                                  "parameters": {"type": "object", "properties": {"a": {"type": [[{}]]}}}}}]}),
        ("/v1/chat/completions", {"messages": msg, "response_format": {"type": "json_schema",
                                                                       "json_schema": {"schema": [1, {"x": 2}]}}}),
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]}),
        ("/v1/chat/completions", {"messages": msg, "logit_bias": {"1": [1]}}),
        ("/v1/completions", {"prompt": [[1, 2], "x"]}), ("/v1/completions", {"prompt": ""}),
        ("/v1/completions", {"prompt": "x", "n": 10**30}), ("/v1/completions", {"prompt": "x", "stop": [None]}),
    ]
    out = [Case(path, body if isinstance(body, bytes) else json.dumps(body).encode(),
                "2xx" if isinstance(body, dict) and "unknown_field" in body else "4xx") for path, body in cases]
    return out + hostile_cases()


def prompt(rng: random.Random) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 40)))


def make_request(kind: str, rng: random.Random, max_new: int) -> tuple[str, Any, bool]:
    """(path, body, streaming) for one request of the given kind."""
    sp: dict[str, Any] = {"max_new_tokens": rng.randint(1, max_new), "temperature": rng.choice([0, 0.7, 1.0])}
    if kind == "plain":
        return "/generate", {"text": prompt(rng), "sampling_params": sp}, False
    if kind in ("stream", "disconnect"):
        return "/generate", {"text": prompt(rng), "sampling_params": {**sp, "max_new_tokens": max_new}, "stream": True}, True
    if kind == "n":
        return "/generate", {"text": prompt(rng), "sampling_params": {**sp, "n": rng.randint(2, 4), "temperature": 0.8}}, False
    if kind == "logprobs":
        return "/generate", {"text": prompt(rng), "sampling_params": sp, "return_logprob": True,
                             "logprob_start_len": rng.choice([-1, 0, 2]), "top_logprobs_num": rng.randint(0, 3)}, False
    if kind == "regex":
        return "/generate", {"text": prompt(rng), "sampling_params": {**sp, "regex": r"(yes|no|[0-9]{1,3})"}}, False
    if kind == "json_schema":
        return "/generate", {"text": prompt(rng), "sampling_params": {**sp, "max_new_tokens": 24,
                                                                      "json_schema": json.dumps(SCHEMA)}}, False
    if kind == "completion":
        return "/v1/completions", {"prompt": prompt(rng), "max_tokens": sp["max_new_tokens"], "logprobs": rng.choice([None, 2])}, False
    stream = kind == "chat_stream"
    body = {"messages": [{"role": "user", "content": prompt(rng)}], "max_tokens": sp["max_new_tokens"],
            "temperature": sp["temperature"], "stream": stream}
    return "/v1/chat/completions", body, stream


class Soak:
    def __init__(self, url: str, args: argparse.Namespace) -> None:
        self.url = url
        self.args = args
        self.headers = {"Content-Type": "application/json"}
        self.statuses: Counter[str] = Counter()
        self.server_errors: list[str] = []
        self.hostile = hostile_bodies()
        self.done = 0

    async def one(self, session: aiohttp.ClientSession, i: int, rng: random.Random) -> None:
        kind = rng.choices(list(MIX), weights=list(MIX.values()))[0]
        if kind == "hostile":
            await self.send_case(session, rng.choice(self.hostile), kind)
            return
        path, body, stream = make_request(kind, rng, self.args.max_new_tokens)
        raw = json.dumps(body).encode()
        try:
            async with session.post(self.url + path, data=raw, headers=self.headers) as r:
                if kind == "disconnect" and r.status == 200:
                    await r.content.readline()  # the first event line, then drop the connection
                    r.close()
                    status = r.status
                else:
                    text = await r.text()
                    status = r.status
                    if status == 200 and stream and "data: [DONE]" not in text:
                        self._server_error(kind, path, raw, f"stream without [DONE]: {text[-300:]}")
                    if status == 200 and stream and '"error"' in text:
                        self._server_error(kind, path, raw, f"error event in stream: {text[-300:]}")
                    if status >= 500:
                        self._server_error(kind, path, raw, f"{status}: {text[:300]}")
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status = 599
            self._server_error(kind, path, raw, f"client error {type(exc).__name__}: {exc}")
        self.statuses[f"{kind}:{status}"] += 1
        self.done += 1

    async def send_case(self, session: aiohttp.ClientSession, case: Case, kind: str) -> None:
        """A hostile request: its status must keep the case's contract (soak_hostile.Case.check)."""
        try:
            async with session.post(self.url + case.path, data=case.raw, headers=self.headers) as r:
                status, text = r.status, await r.text()
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            status, text = 599, f"client error {type(exc).__name__}: {exc}"
        why = case.check(status, text)
        if why is not None:
            self._server_error(kind, case.path, case.raw, why)
        self.statuses[f"{kind}:{status}"] += 1
        self.done += 1

    async def catalogue(self, concurrency: int = 4) -> float:
        """Every hostile case once, `concurrency` at a time."""
        t0 = time.monotonic()
        cases = iter(self.hostile)
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout)
        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            async def worker() -> None:
                for case in cases:
                    await self.send_case(session, case, "catalogue")
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        return time.monotonic() - t0

    def _server_error(self, kind: str, path: str, raw: bytes, what: str) -> None:
        if len(self.server_errors) < 50:
            self.server_errors.append(f"{kind} {path} {raw[:200]!r}: {what}")
        else:
            self.server_errors.append("...")

    async def run(self, n: int, seed: int) -> float:
        conn = aiohttp.TCPConnector(limit=0)
        timeout = aiohttp.ClientTimeout(total=self.args.request_timeout)
        counter = iter(range(n))
        t0 = time.monotonic()

        async def worker(w: int) -> None:
            rng = random.Random(seed * 100003 + w)
            for i in counter:
                if time.monotonic() - t0 > self.args.time_limit:
                    break  # bounded in time: the summary says how many ran
                await self.one(session, i, rng)
                if self.args.progress and self.done % max(n // 20, 1) == 0:
                    print(f"  {self.done}/{n} requests, {time.monotonic() - t0:.0f} s", flush=True)

        async with aiohttp.ClientSession(connector=conn, timeout=timeout) as session:
            await asyncio.gather(*(worker(w) for w in range(self.args.concurrency)))
        return time.monotonic() - t0

    async def get(self, path: str) -> tuple[int, Any]:
        async with aiohttp.ClientSession() as s:
            async with s.get(self.url + path) as r:
                text = await r.text()
                try:
                    return r.status, json.loads(text)
                except ValueError:
                    return r.status, text

    async def kv_after(self, timeout: float = 120.0) -> dict[str, Any]:
        """Wait until nothing runs, check that used KV is all cache, flush, count what stays used."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            _, info = await self.get("/get_server_info")
            if info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0 and info["kv_locked_tokens"] == 0:
                break
            await asyncio.sleep(0.5)
        idle = dict(info)
        status, _ = await self.get("/flush_cache")
        _, after = await self.get("/get_server_info")
        return {"idle_running": idle["num_running_reqs"], "idle_waiting": idle["num_waiting_reqs"],
                "idle_locked_tokens": idle["kv_locked_tokens"],
                "idle_used_minus_cached": idle["kv_used_tokens"] - idle["kv_cached_tokens"],
                "flush_status": status, "total_tokens": after["max_total_num_tokens"],
                "leaked_tokens": after["max_total_num_tokens"] - after["kv_free_tokens"]}


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 2**20


def model_dir_for_shape(shape: str, root: Path, tokenizer_dir: Path | None = None) -> Path:
    """A random-weight model of `shape` with the default model's tokenizer (files copied; from
    `tokenizer_dir` on a machine without the default model's package, e.g. the H200)."""
    from radixlm.runtime.model_source import resolve_model_path

    small = tokenizer_dir if tokenizer_dir is not None else resolve_model_path(None)
    small_cfg = json.loads((small / "config.json").read_text())
    cfg = {**LLAMA_8B, "vocab_size": small_cfg["vocab_size"], "bos_token_id": small_cfg.get("bos_token_id"),
           "eos_token_id": small_cfg.get("eos_token_id")}
    d = root / shape
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    for f in small.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab", "merges", "generation_config", "chat_template")):
            shutil.copy(f, d / f.name)
    return d


def start_server(args: argparse.Namespace, model_dir: Path | None, log: Path) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--log-level", "warning", "--max-inflight-requests", str(max(4 * args.concurrency, 64) * 4)]
    if model_dir is not None:
        cmd += ["--model-path", str(model_dir), "--load-format", "dummy", "--dtype", "bfloat16"]
    cmd += args.server_args
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    out = open(log, "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        m = re.search(r"ready at (http://\S+)", log.read_text())
        if m:
            return proc, m.group(1)
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError("server not ready in 900 s")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=10000)
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=8)
    ap.add_argument("--warmup", type=int, default=200, help="requests before the first RSS reading")
    ap.add_argument("--shape", choices=["llama-8b"], default=None,
                    help="random weights of this shape (--load-format dummy) instead of the default model")
    ap.add_argument("--request-timeout", type=float, default=600.0)
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="stop sending new requests after this many seconds (the summary counts what ran)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--tokenizer-dir", type=Path, default=None,
                    help="with --shape: a folder with the default model's tokenizer and config.json")
    ap.add_argument("--out", type=Path, default=None, help="write the summary JSON here")
    ap.add_argument("--progress", action="store_true")
    ap.add_argument("--catalogue", action=argparse.BooleanOptionalAction, default=True,
                    help="after the warm-up, send every hostile case once (benchmarks/soak_hostile.py), 4 at a time")
    ap.add_argument("server_args", nargs="*", help="extra server flags after --, e.g. -- --cpu-threads 1")
    args = ap.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the server too (the finally below)
    tmp = Path(tempfile.mkdtemp(prefix="radixlm-soak-"))
    model_dir = model_dir_for_shape(args.shape, tmp, args.tokenizer_dir) if args.shape else None
    log = tmp / "server.log"
    proc, url = start_server(args, model_dir, log)
    try:
        sched = psutil.Process(proc.pid).children(recursive=True)
        sched_pid = max(sched, key=lambda p: p.memory_info().rss).pid if sched else None
        soak = Soak(url, args)
        asyncio.run(soak.run(args.warmup, args.seed + 1))
        catalogue_s = asyncio.run(soak.catalogue()) if args.catalogue else None
        rss0 = (rss_mb(proc.pid), rss_mb(sched_pid) if sched_pid else None)
        mixed0 = soak.done  # (the warm-up and the catalogue before it)
        seconds = asyncio.run(soak.run(args.requests, args.seed))
        kv = asyncio.run(soak.kv_after())
        rss1 = (rss_mb(proc.pid), rss_mb(sched_pid) if sched_pid else None)
    finally:
        proc.terminate()
        try:
            code = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            code = None
    log_text = log.read_text(errors="replace")
    tracebacks = log_text.count("Traceback")
    log_errors = len(re.findall(r"\] (?:ERROR|CRITICAL) ", log_text))
    kinds = Counter(k.split(":")[0] for k in soak.statuses.elements())
    five = sum(v for k, v in soak.statuses.items() if int(k.split(":")[1]) >= 500)
    summary = {
        "requests_asked": args.requests, "requests_run": soak.done, "warmup": args.warmup,
        "concurrency": args.concurrency, "seconds": round(seconds, 1), "hostile_cases": len(soak.hostile),
        "catalogue_seconds": None if catalogue_s is None else round(catalogue_s, 1),
        "mixed_requests": soak.done - mixed0, "requests_per_s": round((soak.done - mixed0) / seconds, 2),
        "by_kind": dict(kinds),
        "statuses": dict(sorted(soak.statuses.items())), "5xx": five, "failures": soak.server_errors,
        "kv": kv, "server_tracebacks_in_log": tracebacks, "server_error_lines_in_log": log_errors, "server_exit_code": code,
        "rss_mb": {"front": [round(rss0[0], 1), round(rss1[0], 1)],
                   "scheduler": [round(rss0[1], 1), round(rss1[1], 1)] if rss0[1] else None},
        "shape": args.shape or "default", "server_log": str(log),
    }
    print(json.dumps(summary, indent=1))
    if args.out:
        args.out.write_text(json.dumps(summary, indent=1))
    ok = (five == 0 and not soak.server_errors and kv["leaked_tokens"] == 0 and kv["idle_locked_tokens"] == 0
          and kv["idle_used_minus_cached"] == 0 and code == 0 and tracebacks == 0 and log_errors == 0)
    print("SOAK PASSED" if ok else "SOAK FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())

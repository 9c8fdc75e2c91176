"""One live server for the whole session: `python -m radixlm.launch_server` on a free loopback port
with the default model, a small KV pool, metrics, an API key, a small body limit and in-flight cap.
Its teardown checks the shutdown: SIGTERM -> exit code 0 and no process left behind."""
from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

API_KEY = "test-key-123"
MAX_INFLIGHT = 96
MAX_BODY = 1_000_000
STARTUP_TIMEOUT_S = 240


@dataclass
class LiveServer:
    url: str
    proc: subprocess.Popen
    log: Path

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {API_KEY}"}

    def run(self, coro: Any) -> Any:
        return asyncio.run(coro)

    async def post(self, path: str, body: Any, *, raw: bytes | None = None,
                   headers: dict[str, str] | None = None) -> tuple[int, Any]:
        import aiohttp

        async with aiohttp.ClientSession(headers=self.headers if headers is None else headers) as s:
            kw = {"data": raw} if raw is not None else {"json": body}
            async with s.post(self.url + path, **kw) as r:
                text = await r.text()
                return r.status, _maybe_json(text)

    async def get(self, path: str, headers: dict[str, str] | None = None) -> tuple[int, Any]:
        import aiohttp

        async with aiohttp.ClientSession(headers=self.headers if headers is None else headers) as s:
            async with s.get(self.url + path) as r:
                return r.status, _maybe_json(await r.text())

    async def stream(self, path: str, body: Any) -> list[Any]:
        """All SSE payloads of a streaming POST (decoded JSON, and the string '[DONE]')."""
        import aiohttp

        events: list[Any] = []
        async with aiohttp.ClientSession(headers=self.headers) as s:
            async with s.post(self.url + path, json=body) as r:
                assert r.status == 200, await r.text()
                assert r.headers["Content-Type"].startswith("text/event-stream")
                async for line in r.content:
                    line = line.strip()
                    if line.startswith(b"data: "):
                        data = line[6:].decode()
                        events.append(data if data == "[DONE]" else json.loads(data))
        return events

    async def wait_kv_idle(self, timeout: float = 30.0) -> dict[str, Any]:
        """Poll /get_server_info until nothing runs and every used KV slot is only cache (bounded)."""
        deadline = time.monotonic() + timeout
        info: dict[str, Any] = {}
        while time.monotonic() < deadline:
            status, info = await self.get("/get_server_info")
            assert status == 200
            if (info["num_running_reqs"] == 0 and info["num_waiting_reqs"] == 0 and info["kv_locked_tokens"] == 0
                    and info["kv_used_tokens"] == info["kv_cached_tokens"]):
                return info
            await asyncio.sleep(0.2)
        raise AssertionError(f"KV not released within {timeout}s: {info}")


def _maybe_json(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text


def _children(pid: int) -> list[int]:
    import psutil

    try:
        return [c.pid for c in psutil.Process(pid).children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _alive(pid: int) -> bool:
    import psutil

    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def start_server(cmd: list[str], log: Path, timeout: float = STARTUP_TIMEOUT_S) -> LiveServer:
    """Start `radixlm.launch_server` (`cmd`, with --port 0) logging to `log`; wait for its "ready at" line."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    url = None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and url is None:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}:\n{log.read_text()}")
        m = re.search(r"ready at (http://\S+)", log.read_text())
        url = m.group(1) if m else None
        if url is None:
            time.sleep(0.3)
    if url is None:
        proc.kill()
        raise RuntimeError(f"server not ready in {timeout}s:\n{log.read_text()}")
    return LiveServer(url=url, proc=proc, log=log)


@pytest.fixture(scope="session")
def server(tmp_path_factory: pytest.TempPathFactory) -> LiveServer:
    log = tmp_path_factory.mktemp("server") / "server.log"
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--host", "127.0.0.1", "--port", "0",
           "--max-total-tokens", "16384", "--enable-metrics", "--api-key", API_KEY,
           "--max-inflight-requests", str(MAX_INFLIGHT), "--max-request-body-bytes", str(MAX_BODY),
           # Info logs with a request log and a short decode-line interval: test_logging reads them.
           "--log-level", "info", "--log-requests", "--decode-log-interval", "4",
           # One intra-op thread: on a small shared CPU, two OpenMP threads per process spin against
           # each other and every other process (decode measured ~6x slower under load).
           "--cpu-threads", "1"]
    live = start_server(cmd, log)
    proc = live.proc
    yield live
    # Clean shutdown: SIGTERM ends the server and its scheduler process, exit code 0.
    children = _children(proc.pid)
    proc.send_signal(signal.SIGTERM)
    try:
        code = proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        raise AssertionError(f"server did not stop within 30 s of SIGTERM:\n{log.read_text()[-3000:]}")
    deadline = time.monotonic() + 10
    while any(_alive(p) for p in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [p for p in children if _alive(p)]
    for pid in left:
        os.kill(pid, signal.SIGKILL)
    assert code == 0, f"exit code {code}:\n{log.read_text()[-3000:]}"
    assert children, "the scheduler child process was not found"
    assert not left, f"processes left after shutdown: {left}"
    assert "Traceback" not in log.read_text(), log.read_text()[-3000:]


def grammar_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("radixlm.runtime.grammar_runtime") is not None

"""`Runtime`: start a local radixlm server in a child process and talk to it as a RuntimeEndpoint."""
from __future__ import annotations

import atexit
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from typing import Any

from radixlm.lang.backend.base import BackendError, BackendUnreachableError
from radixlm.lang.backend.runtime_endpoint import SSE_DONE, RuntimeEndpoint, parse_sse_line


def _port_is_free(port: int, host: str) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
    return True


def find_free_port(start: int = 30000, host: str = "127.0.0.1") -> int:
    for port in range(start, start + 1000):
        if _port_is_free(port, host):
            return port
    raise RuntimeError(f"no free port in [{start}, {start + 1000})")


def server_cli_args(server_args: dict[str, Any]) -> list[str]:
    """ServerArgs keywords as launch_server flags: True → `--flag`, False/None → omitted."""
    out: list[str] = []
    for key, value in server_args.items():
        if value is None or value is False:
            continue
        flag = "--" + key.replace("_", "-")
        if value is True:
            out.append(flag)
        elif isinstance(value, (list, tuple)):
            out += [flag, *map(str, value)]
        elif isinstance(value, dict):
            out += [flag, json.dumps(value)]
        else:
            out += [flag, str(value)]
    return out


class Runtime:
    """A server process owned by this object: `.endpoint`, `.url`, `shutdown()`, context manager."""

    def __init__(self, log_level: str = "error", launch_timeout: float = 300.0, *, host: str = "127.0.0.1",
                 port: int = 30000, api_key: str | None = None, chat_template_name: str | None = None,
                 **server_args: Any) -> None:
        self.port = find_free_port(port, host)
        self.url = f"http://{host}:{self.port}"
        self.api_key = api_key
        args = {"host": host, "port": self.port, "log_level": log_level, "api_key": api_key, **server_args}
        cmd = [sys.executable, "-m", "radixlm.launch_server", *server_cli_args(args)]
        self._log = tempfile.NamedTemporaryFile(prefix="radixlm-runtime-", suffix=".log", delete=False)
        self.log_path = self._log.name
        self.process: subprocess.Popen | None = subprocess.Popen(
            cmd, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, start_new_session=True)
        atexit.register(self.shutdown)
        self.endpoint: RuntimeEndpoint
        try:
            self._wait_ready(launch_timeout)
            self.endpoint = RuntimeEndpoint(self.url, api_key=api_key, chat_template_name=chat_template_name)
        except BaseException:
            self.shutdown()
            raise

    def _log_tail(self, limit: int = 4000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                return f.read().decode(errors="replace")[-limit:]
        except OSError:
            return ""

    def _wait_ready(self, timeout: float) -> None:
        """Poll /health_generate (a real 1-token generation) until it answers 200."""
        from radixlm.lang.backend.runtime_endpoint import HttpClient

        client = HttpClient(self.url, self.api_key, timeout=10)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.process is not None
            code = self.process.poll()
            if code is not None:
                raise RuntimeError(f"the radixlm server exited with code {code} during startup:\n{self._log_tail()}")
            try:
                client.request("/health_generate")
                return
            except (BackendError, BackendUnreachableError):
                time.sleep(1.0)
        raise TimeoutError(f"the radixlm server at {self.url} was not ready after {timeout:.0f}s:\n{self._log_tail()}")

    # ------------------------------------------------------------------------------ helpers
    def generate(self, prompt: str | list[str], sampling_params: dict | None = None, return_logprob: bool = False,
                 logprob_start_len: int | None = None, top_logprobs_num: int | None = None,
                 lora_path: str | None = None) -> str:
        """POST /generate and return the JSON text, like SGLang's Runtime.generate."""
        body: dict[str, Any] = {"text": prompt, "sampling_params": sampling_params or {},
                                "return_logprob": return_logprob}
        for key, value in (("logprob_start_len", logprob_start_len), ("top_logprobs_num", top_logprobs_num),
                           ("lora_path", lora_path)):
            if value is not None:
                body[key] = value
        return json.dumps(self.endpoint.http.request("/generate", body))

    async def async_generate(self, prompt: str, sampling_params: dict | None = None) -> AsyncIterator[str]:
        """Stream text deltas of one generation (the server sends cumulative text)."""
        import aiohttp

        headers = {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}
        body = {"text": prompt, "sampling_params": sampling_params or {}, "stream": True}
        cursor = 0
        async with aiohttp.ClientSession(headers=headers) as session:
            async with session.post(self.url + "/generate", json=body) as resp:
                if resp.status != 200:
                    raise BackendError(f"POST {self.url}/generate returned HTTP {resp.status}: {await resp.text()}",
                                       status=resp.status)
                async for raw in resp.content:
                    event = parse_sse_line(raw, f"POST {self.url}/generate")
                    if event is SSE_DONE:
                        return
                    if event is not None:
                        yield event["text"][cursor:]
                        cursor = len(event["text"])

    add_request = async_generate

    def encode(self, prompt: str | list[str]) -> str:
        """POST /encode (embedding models); the JSON text of the answer."""
        return json.dumps(self.endpoint.http.request("/encode", {"text": prompt}))

    def get_tokenizer(self) -> Any:
        from transformers import AutoTokenizer

        info = self.endpoint.model_info
        return AutoTokenizer.from_pretrained(info.get("tokenizer_path") or info["model_path"])

    def cache_prefix(self, prefix: str) -> None:
        self.endpoint.cache_prefix(prefix)

    def flush_cache(self) -> None:
        self.endpoint.flush_cache()

    def get_server_info(self) -> dict[str, Any]:
        return self.endpoint.get_server_info()

    def shutdown(self) -> None:
        proc, self.process = getattr(self, "process", None), None
        if proc is None:
            return
        atexit.unregister(self.shutdown)
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the server and its scheduler child
                proc.wait(15)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                try:
                    os.killpg(proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                proc.wait(5)
        self._log.close()
        try:
            os.unlink(self.log_path)
        except OSError:
            pass

    def __enter__(self) -> "Runtime":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()

    def __del__(self) -> None:
        try:
            self.shutdown()
        except Exception:  # noqa: BLE001 - interpreter teardown
            pass

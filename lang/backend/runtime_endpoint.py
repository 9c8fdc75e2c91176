"""`RuntimeEndpoint`: a radixlm (or SGLang) server over HTTP, with exactly the requests SGLang's
frontend makes. Standard library only, so DSL programs need no HTTP client package."""
from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

from radixlm.lang.backend.base import BackendError, BackendUnreachableError
from radixlm.lang.backend.native import NativeBackend
from radixlm.lang.chat_template import get_chat_template, get_chat_template_for_server


class HttpClient:
    """JSON over urllib: GET without a body, POST with one; errors name the URL and server message."""

    def __init__(self, base_url: str, api_key: str | None = None, verify: str | None = None,
                 timeout: float | None = 3600.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.api_key = api_key
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=verify) if verify else None

    def _open(self, path: str, body: Any = None, method: str | None = None, timeout: float | None = None):
        url = self.base_url + path
        data = None if body is None else json.dumps(body).encode()
        method = method or ("GET" if data is None else "POST")
        if method == "POST" and data is None:
            data = b""  # an explicit empty body (Content-Length: 0)
        req = urllib.request.Request(url, data=data, method=method)
        if body is not None:
            req.add_header("Content-Type", "application/json; charset=utf-8")
        if self.api_key:
            req.add_header("Authorization", f"Bearer {self.api_key}")
        try:
            return urllib.request.urlopen(req, timeout=timeout or self.timeout, context=self._ssl)
        except urllib.error.HTTPError as exc:
            raise BackendError(f"{req.method} {url} returned HTTP {exc.code}: {_error_message(exc.read())}",
                               status=exc.code) from None
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            reason = getattr(exc, "reason", exc)
            raise BackendUnreachableError(f"cannot reach the server at {self.base_url} ({req.method} {path}): {reason}") from None

    def request(self, path: str, body: Any = None, method: str | None = None, timeout: float | None = None) -> Any:
        with self._open(path, body, method, timeout) as resp:
            raw = resp.read()
        try:
            return json.loads(raw)
        except ValueError:
            return raw.decode(errors="replace")

    def stream(self, path: str, body: Any) -> Iterator[dict[str, Any]]:
        with self._open(path, body) as resp:
            for raw in resp:
                event = parse_sse_line(raw, f"POST {self.base_url}{path}")
                if event is SSE_DONE:
                    return
                if event is not None:
                    yield event


SSE_DONE = object()


def parse_sse_line(raw: bytes, what: str) -> Any:
    """One server-sent-event line: the `data: {json}` payload, SSE_DONE at `data: [DONE]`, None for
    anything else (comments, blank lines); an `{"error": ...}` event raises."""
    line = raw.decode("utf-8", errors="replace").strip()
    if not line.startswith("data:"):
        return None
    payload = line[5:].strip()
    if payload == "[DONE]":
        return SSE_DONE
    event = json.loads(payload)
    if isinstance(event, dict) and "error" in event:
        raise BackendError(f"{what} failed mid-stream: {_error_message(event)}")
    return event


def _error_message(raw: bytes | dict) -> str:
    try:
        obj = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
    except ValueError:
        return raw.decode(errors="replace")[:500] if isinstance(raw, bytes) else str(raw)
    if isinstance(obj, dict):
        err = obj.get("error", obj)
        if isinstance(err, dict):
            return str(err.get("message", err))
        return str(err)
    return str(obj)


class RuntimeEndpoint(NativeBackend):
    support_concate_and_append = False  # the server has no /concate_and_append_request route

    def __init__(self, base_url: str, api_key: str | None = None, verify: str | None = None,
                 chat_template_name: str | None = None, timeout: float | None = 3600.0) -> None:
        super().__init__()
        self.base_url = base_url.rstrip("/")
        self.http = HttpClient(self.base_url, api_key, verify, timeout)
        self.model_info: dict[str, Any] = self.http.request("/get_model_info", timeout=30)
        if not isinstance(self.model_info, dict) or "model_path" not in self.model_info:
            raise BackendError(f"{self.base_url}/get_model_info: unexpected answer {self.model_info!r}")
        if chat_template_name:
            self.chat_template = get_chat_template(chat_template_name)
        else:
            self.chat_template = get_chat_template_for_server(self.model_info)

    def __repr__(self) -> str:
        return f"RuntimeEndpoint({self.base_url!r})"

    def get_model_name(self) -> str:
        return self.model_info["model_path"]

    def flush_cache(self) -> None:
        self.http.request("/flush_cache", method="POST")

    def get_server_info(self) -> dict[str, Any]:
        try:
            return self.http.request("/server_info")
        except BackendError as exc:
            if exc.status != 404:
                raise
            return self.http.request("/get_server_info")

    def _post_generate(self, body: dict[str, Any]) -> Any:
        return self.http.request("/generate", body)

    def _post_generate_stream(self, body: dict[str, Any]) -> Iterator[dict[str, Any]]:
        return self.http.stream("/generate", body)

    def start_profile(self) -> None:
        self.http.request("/start_profile", method="POST")

    def stop_profile(self) -> None:
        self.http.request("/stop_profile", method="POST")

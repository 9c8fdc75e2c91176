"""A forwarding HTTP proxy that records every request body: put it between a frontend and the live
server to compare what SGLang's frontend and radixlm's send for the same program."""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any


class RecordingProxy:
    def __init__(self, upstream: str, headers: dict[str, str] | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.extra_headers = headers or {}
        self.requests: list[tuple[str, str, Any]] = []  # (method, path, decoded JSON body or None)
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> "RecordingProxy":
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def _forward(self) -> None:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else None
                with proxy._lock:
                    proxy.requests.append((self.command, self.path, json.loads(raw) if raw else None))
                req = urllib.request.Request(proxy.upstream + self.path, data=raw, method=self.command)
                for key in ("Content-Type", "Authorization"):
                    if self.headers.get(key):
                        req.add_header(key, self.headers[key])
                for key, value in proxy.extra_headers.items():
                    req.add_header(key, value)
                try:
                    with urllib.request.urlopen(req, timeout=600) as resp:
                        status, ctype, data = resp.status, resp.headers.get("Content-Type"), resp.read()
                except urllib.error.HTTPError as exc:
                    status, ctype, data = exc.code, exc.headers.get("Content-Type"), exc.read()
                self.send_response(status)
                self.send_header("Content-Type", ctype or "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            do_GET = do_POST = _forward

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def take(self) -> list[tuple[str, str, Any]]:
        with self._lock:
            out, self.requests = self.requests, []
        return out

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

"""A logging fake of the native server: records every request and answers in the /generate shape,
so tests can assert the exact request sequences of SGLang's frontend (protocol §2.6)."""
from __future__ import annotations

import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

_TOKEN = re.compile(r"\s?[^\s]+|\s+")


def fake_tokens(text: str) -> list[str]:
    """Words with their leading space: close enough to BPE pieces for protocol tests."""
    return _TOKEN.findall(text)


def fake_logprob(token: str) -> float:
    return -0.5 if "good" in token else -3.0


@dataclass
class Recorded:
    method: str
    path: str
    body: Any
    headers: dict[str, str]


@dataclass
class MockServer:
    model_path: str = "mock/SmolLM2-135M-Instruct"
    completion: str = " mock answer"
    requests: list[Recorded] = field(default_factory=list)
    fail_generate: tuple[int, str] | None = None

    def start(self) -> "MockServer":
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _record(self) -> Any:
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length) if length else b""
                body = json.loads(raw) if raw else None
                owner.requests.append(Recorded(self.command, self.path, body, dict(self.headers)))
                return body

            def _json(self, obj: Any, status: int = 200) -> None:
                data = json.dumps(obj).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                self._record()
                if self.path == "/get_model_info":
                    self._json({"model_path": owner.model_path, "tokenizer_path": None, "is_generation": True})
                elif self.path == "/server_info":
                    self._json({"version": "mock", "cache_hit_rate": 0.5})
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def do_POST(self) -> None:
                body = self._record()
                if self.path == "/flush_cache":
                    data = b"Cache flushed."
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                elif self.path == "/generate":
                    if owner.fail_generate is not None:
                        status, msg = owner.fail_generate
                        self._json({"error": {"message": msg}}, status)
                    elif body.get("stream"):
                        self._stream(body)
                    else:
                        self._json(owner.answer(body))
                else:
                    self._json({"error": {"message": "not found"}}, 404)

            def _stream(self, body: dict) -> None:
                self.send_response(200)
                self.send_header("Content-Type", "text/event-stream")
                self.end_headers()
                text = ""
                for piece in fake_tokens(owner.completion):
                    text += piece
                    event = {"text": text, "meta_info": {"finish_reason": None}}
                    self.wfile.write(b": keep-alive comment\n\n" + f"data: {json.dumps(event)}\n\n".encode())
                    self.wfile.flush()
                self.wfile.write(b"data: [DONE]\n\n")
                self.wfile.flush()

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        # shutdown() waits for the loop's next poll: 0.5 s by default, after every test that used a mock
        threading.Thread(target=self.httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
        return self

    def stop(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()

    def answer(self, body: dict) -> Any:
        sp = body.get("sampling_params") or {}
        if "input_ids" in body:
            prompts = body["input_ids"]
            return [self._item([str(t) for t in p], sp, body) for p in prompts]
        texts = body["text"]
        if isinstance(texts, list):
            return [self._item(fake_tokens(t), sp, body) for t in texts]
        n = sp.get("n", 1)
        items = [self._item(fake_tokens(texts), sp, body) for _ in range(n)]
        return items if n > 1 else items[0]

    def _item(self, tokens: list[str], sp: dict, body: dict) -> dict:
        out = "" if sp.get("max_new_tokens") == 0 else self.completion
        meta: dict[str, Any] = {"prompt_tokens": len(tokens), "completion_tokens": len(fake_tokens(out)),
                                "cached_tokens": 0, "finish_reason": {"type": "length", "length": 0}}
        if body.get("return_logprob"):
            start = body.get("logprob_start_len", 0)
            meta["input_token_logprobs"] = [
                [None if i == 0 else fake_logprob(t), 1000 + i, t if body.get("return_text_in_logprobs") else None]
                for i, t in enumerate(tokens) if i >= start
            ]
            meta["output_token_logprobs"] = []
        return {"text": out, "output_ids": [], "meta_info": meta}

    def generate_bodies(self) -> list[Any]:
        return [r.body for r in self.requests if r.path == "/generate"]

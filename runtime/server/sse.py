"""Server-sent events as SGLang and OpenAI write them: `data: <json>\\n\\n` ... `data: [DONE]\\n\\n`."""
from __future__ import annotations

from typing import Any

from aiohttp import web

from radixlm.runtime.server.errors import dumps, error_body

DONE = b"data: [DONE]\n\n"


class ClientGone(Exception):
    """The client closed the connection; the caller must stop (and so abort its request)."""


class EventStream:
    def __init__(self, request: web.Request) -> None:
        self.request = request
        self.response = web.StreamResponse(status=200, headers={
            "Content-Type": "text/event-stream; charset=utf-8",
            "Cache-Control": "no-cache",
            "X-Accel-Buffering": "no",
        })
        self.started = False

    async def start(self) -> None:
        if not self.started:
            self.started = True
            await self.response.prepare(self.request)

    async def _write(self, data: bytes) -> None:
        await self.start()
        transport = self.request.transport
        if transport is None or transport.is_closing():
            raise ClientGone()
        try:
            await self.response.write(data)
        except (ConnectionError, RuntimeError) as exc:  # aiohttp's ClientConnectionResetError is a ConnectionError
            raise ClientGone() from exc

    async def send(self, payload: Any) -> None:
        await self._write(b"data: " + dumps(payload).encode() + b"\n\n")

    async def send_error(self, status: int, message: str, param: str | None = None) -> None:
        await self.send(error_body(status, message, param))

    async def done(self) -> web.StreamResponse:
        await self._write(DONE)
        try:
            await self.response.write_eof()
        except (ConnectionError, RuntimeError):
            pass
        return self.response

"""One request's CPU work in the HTTP process, kept off its event loop.

The HTTP/tokenizer process serves every client from one asyncio loop: whatever one request computes on it
(tokenizing a long prompt, rendering a chat of thousands of messages, checking a thousand tool schemas,
validating a million input ids) holds every other client's stream. On the 2-core CPU (2026-12-05,
benchmarks/front_stall_audit.py) a 1-MB prompt held the loop 1.4 s, a 5,000-message chat 2.6 s and a
1,000-tool chat 24 s. Such work runs here, on worker threads: the tokenizer's native encode releases the
GIL, and pure-Python work (Jinja, jsonschema, validation) gives it back every switch interval, so the
loop keeps serving. Small requests (the common case) stay inline: a thread hop costs more than their
work, and they keep their arrival order.
"""
from __future__ import annotations

import asyncio
import functools
import logging
import multiprocessing
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")

# Requests whose body or text is at most this many bytes (characters) are handled on the loop: ~5 ms of
# tokenization or template work at worst here, a thread hop and a reordering not worth it.
INLINE_BYTES = 16 * 1024
# Worker threads: a large request's work queues behind at most this many others, never behind the loop.
THREADS = 2
# Bodies over this many bytes are parsed in a child process (runtime/server/request_body.py): json.loads holds
# the GIL throughout, on any thread; unpickling the child's result costs the loop 2.5-7x less for bodies of
# numbers (token ids), the kind that parses slowest (~12 ms a MB here idle, ~50 loaded). Below it the
# child's round trip (~1 ms) is not worth it.
PROCESS_BYTES = 1 << 20


class FrontWork:
    """The worker threads of one HTTP process (owned by its TokenizerManager)."""

    def __init__(self, threads: int = THREADS) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="front-work")
        self.child: ProcessPoolExecutor | None = None  # started by `warm`, or at the first body over PROCESS_BYTES

    async def parse(self, raw: bytes, allow_empty: bool = False) -> dict[str, Any]:
        """A request body as a JSON object (400s raised as ApiError): inline, on a worker thread, or over
        PROCESS_BYTES in the child process, by its size."""
        from radixlm.runtime.server import request_body

        if len(raw) <= PROCESS_BYTES:
            return await self.run(len(raw), request_body.parse_body, raw, allow_empty)
        child = self._child()
        try:
            future = child.submit(request_body.parse_in_child, raw, allow_empty)
        except BrokenProcessPool:  # it died before this body (e.g. killed while idle): a new one
            self._drop(child)
            child = self._child()
            future = child.submit(request_body.parse_in_child, raw, allow_empty)
        try:
            result = await asyncio.wrap_future(future)
        except BrokenProcessPool:  # it died parsing this body (e.g. killed for memory): not parsed here, which could kill us
            logger.error("the body parser process died while parsing a %d-byte body; the next gets another", len(raw))
            self._drop(child)
            raise request_body.ApiError(500, "internal error: the request body's parser process died") from None
        return request_body.from_child(result)

    def warm(self) -> None:
        """Start the child now (the server does at start-up): spawning it and its imports took 1-3.5 s of the
        first large body's time on the 2-core CPU."""
        from radixlm.runtime.server import request_body

        self._child().submit(request_body.parse_in_child, b"{}", True)

    def _child(self) -> ProcessPoolExecutor:
        if self.child is None:  # spawned: a fork would copy the front's threads' locks mid-use
            self.child = ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn"))
        return self.child

    def _drop(self, child: ProcessPoolExecutor) -> None:
        if self.child is child:
            self.child = None
        child.shutdown(wait=False, cancel_futures=True)

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args): inline when `size` (the request's bytes or characters) is at most INLINE_BYTES, else
        on a worker thread while the loop serves others. Exceptions (400s) propagate as raised."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)
        if self.child is not None:  # (waits for a parse under way: no process is left behind)
            self.child.shutdown(wait=True, cancel_futures=True)
            self.child = None

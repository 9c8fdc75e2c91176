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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")

# Requests whose body or text is at most this many bytes (characters) are handled on the loop: ~5 ms of
# tokenization or template work at worst here, a thread hop and a reordering not worth it.
INLINE_BYTES = 16 * 1024
# Worker threads: a large request's work queues behind at most this many others, never behind the loop.
THREADS = 2


class FrontWork:
    """The worker threads of one HTTP process (owned by its TokenizerManager)."""

    def __init__(self, threads: int = THREADS) -> None:
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="front-work")

    async def run(self, size: int, fn: Callable[..., T], *args: Any) -> T:
        """fn(*args): inline when `size` (the request's bytes or characters) is at most INLINE_BYTES, else
        on a worker thread while the loop serves others. Exceptions (400s) propagate as raised."""
        if size <= INLINE_BYTES:
            return fn(*args)
        return await asyncio.get_running_loop().run_in_executor(self.pool, functools.partial(fn, *args))

    def shutdown(self) -> None:
        self.pool.shutdown(wait=False, cancel_futures=True)

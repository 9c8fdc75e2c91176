"""The server's side of one generation call, shared by the native and the OpenAI API.

* admission: a cap on sequences in flight in this process (503 beyond it: back-pressure);
* results: the runtime's typed `SequenceDelta`s, summed per sequence by `collect`; the APIs render them;
* metrics: TTFT / ITL / E2E per sequence (the runtime is asked to stream internally when metrics
  are on, so non-streaming requests are timed too);
* abort: the TokenizerManager generator is always closed, which aborts unfinished requests
  (client disconnects arrive here as task cancellation).
"""
from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from radixlm.runtime.front_work import FrontWork
from radixlm.runtime.generate_request import GenerateItem, GenerateRequest
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.sequence_output import SequenceDelta, SequenceResult
from radixlm.runtime.server.errors import ApiError
from radixlm.runtime.server.metrics import SequenceTimer, ServerMetrics
from radixlm.runtime.server.sse import ClientGone, EventStream
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer_manager import SchedulerDiedError, TokenizerManager

Update = list[SequenceDelta]
logger = logging.getLogger(__name__)


class Admission:
    """Counts the sequences (prompts x n) this HTTP server admitted and that have not finished;
    refuses beyond `limit` (back-pressure before any work reaches the scheduler)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.admitted = 0

    def acquire(self, k: int) -> None:
        if self.admitted + k > self.limit:
            raise ApiError(503, f"the server is at capacity ({self.admitted} of {self.limit} sequences in flight, "
                                f"this request needs {k}); retry later", headers={"Retry-After": "1"})
        self.admitted += k

    def release(self, k: int) -> None:
        self.admitted = max(self.admitted - k, 0)


@dataclass
class ServerContext:
    args: ServerArgs
    tm: TokenizerManager
    model_name: str
    admission: Admission
    metrics: ServerMetrics | None = None
    chat: Any = None  # chat.ChatTemplate
    work: FrontWork = field(default_factory=FrontWork)  # a large request's parsing, off the event loop
    created: int = field(default_factory=lambda: int(time.time()))
    shutting_down: bool = False

    @property
    def vocab_size(self) -> int:
        return self.tm.info.vocab_size

    @property
    def context_len(self) -> int:
        return self.tm.info.context_len

    def check_alive(self) -> None:
        if self.tm.dead:
            raise ApiError(503, self.tm.dead)
        if self.shutting_down:
            raise ApiError(503, "the server is shutting down")


def sequence_count(req: GenerateRequest) -> int:
    return sum(item.params.n for item in req.items)


async def generate(ctx: ServerContext, req: GenerateRequest, *, admit: bool = True,
                   timed: bool = True) -> AsyncIterator[Update]:
    """Yields the runtime's updates: one `SequenceDelta` per sequence that changed (`.index`: its
    position, prompt-major then n); a sequence's last delta carries its finish. Use it inside
    `contextlib.aclosing` so an early exit aborts the requests at once."""
    ctx.check_alive()
    k = sequence_count(req)
    if admit:
        ctx.admission.acquire(k)
    try:
        metrics = ctx.metrics if timed else None
        internal = req if req.stream or metrics is None else dataclasses.replace(req, stream=True)
        start = time.monotonic()
        timers = [SequenceTimer(metrics, start) for _ in range(k)]
        try:
            async with aclosing(ctx.tm.generate(internal)) as updates:
                async for update in updates:
                    for delta in update:
                        timers[delta.index].update(delta)
                    yield update
        except SchedulerDiedError as exc:
            raise ApiError(503, str(exc)) from None
        except (BrokenPipeError, EOFError, ConnectionResetError) as exc:  # the scheduler's pipe, while stopping
            raise ApiError(503, f"the scheduler is gone ({type(exc).__name__}); the server is shutting down") from None
        except InvalidRequestError:
            timers = []  # refused before it ran: not an abort
            raise
        finally:
            for timer in timers:
                timer.cancel()
    finally:
        if admit:
            ctx.admission.release(k)


# The fields the scheduler's 400s begin with: a grammar that does not compile, a backtracking stop_regex,
# an adapter unloaded since the front checked it.
_RUNTIME_FIELDS = ("regex", "json_schema", "ebnf", "stop_regex", "lora_path")


def sequence_items(req: GenerateRequest) -> list[GenerateItem]:
    """The item of each sequence, by its index (prompt-major, then n)."""
    return [item for item in req.items for _ in range(item.params.n)]


def scheduler_error(item: GenerateItem | None, status: int, message: str) -> ApiError:
    """A sequence the scheduler failed with `status`, as an error naming the field the client sent: the
    message's leading field (`json_schema: ...`) or, for a grammar's own message, the item's constraint."""
    if status >= 500 or item is None:
        return ApiError(status, message)
    name, sep, rest = message.partition(": ")
    if sep and name in _RUNTIME_FIELDS:
        param = item.error_field(name)
    elif item.params.constraint is not None:
        param, rest = item.error_field(item.params.constraint[0]), message
    else:
        return ApiError(status, message)
    return ApiError(status, f"{param}: {rest}", param)


def raise_for_error(d: SequenceDelta | SequenceResult, item: GenerateItem | None = None) -> None:
    """A sequence the scheduler failed with a status (e.g. 400: a grammar that does not compile)."""
    if d.finish is not None and d.finish.status_code:
        raise scheduler_error(item, d.finish.status_code, d.finish.message or "request failed")


async def collect(ctx: ServerContext, req: GenerateRequest, **kw: Any) -> list[SequenceResult]:
    """Run to completion; every sequence's result, by index."""
    results: dict[int, SequenceResult] = {}
    async with aclosing(generate(ctx, req, **kw)) as updates:
        async for update in updates:
            for delta in update:
                results.setdefault(delta.index, SequenceResult(delta.index)).add(delta)
    outs = [results[i] for i in sorted(results)]
    items = sequence_items(req)
    for out in outs:
        raise_for_error(out, items[out.index])
    return outs


async def stream_sse(request: web.Request, ctx: ServerContext, req: GenerateRequest,
                     emit: Callable[[EventStream, SequenceDelta], Awaitable[None]],
                     on_failed: Callable[[int], None] | None = None,
                     on_end: Callable[[EventStream], Awaitable[None]] | None = None) -> web.StreamResponse:
    """The one SSE driver of the native and OpenAI APIs; `emit` renders one sequence's delta.

    The first update comes before the headers, so that a failure up to then is a plain HTTP error.
    After it, a sequence failed by the scheduler (e.g. its grammar) is an error event (`on_failed`
    hears of it), and a client that goes away ends the loop: leaving `aclosing` aborts the
    requests and frees their KV. `on_end` writes whatever closes a complete stream (usage)."""
    sse = EventStream(request)
    items = sequence_items(req)
    async with aclosing(generate(ctx, req)) as updates:
        first = await anext(updates, [])
        for delta in first:
            raise_for_error(delta, items[delta.index])
        try:
            update: Update | None = first
            while update is not None:
                for delta in update:
                    if delta.failed_status is not None:
                        err = scheduler_error(items[delta.index], delta.failed_status, str(delta.finish.message))
                        await sse.send_error(err.status, err.message, err.param)
                        if on_failed is not None:
                            on_failed(delta.index)
                        continue
                    await emit(sse, delta)
                update = await anext(updates, None)
            if on_end is not None:
                await on_end(sse)
        except ClientGone:
            return sse.response
        except ApiError as exc:
            await sse.send_error(exc.status, exc.message, exc.param)
        except Exception as exc:  # noqa: BLE001 - the headers are gone: report in-stream
            logger.exception("error while streaming")
            await sse.send_error(500, f"internal error: {exc}")
    return await sse.done()

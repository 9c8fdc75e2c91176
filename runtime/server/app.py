"""The HTTP server: aiohttp app + TokenizerManager in this process (one asyncio loop), the scheduler in
its own process. Middleware: API key, errors as JSON, metrics of failures. Lifecycle: start, print
the URL, serve until SIGINT/SIGTERM (or the scheduler dies), then stop everything.
"""
from __future__ import annotations

import asyncio
import hmac
import logging
import signal
import socket
import sys
import time
from collections.abc import Awaitable, Callable

from aiohttp import web

from radixlm.runtime.log_setup import configure_logging, startup_summary
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.served_name import served_model_name
from radixlm.runtime.server import lora_api, native_api, openai_api, playground, tokenize_api
from radixlm.runtime.server.chat import ChatTemplate, load_chat_template
from radixlm.runtime.server.errors import ApiError, error_response
from radixlm.runtime.server.generation import Admission, ServerContext
from radixlm.runtime.server.metrics import ServerMetrics
from radixlm.runtime.server.native_api import CTX, too_large
from radixlm.runtime.server_args import ServerArgs

logger = logging.getLogger("radixlm.server")
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
# Liveness probes and the Prometheus scrape need no key (as in SGLang); nor do the playground page
# and /version, which carry no model output (the page asks for the key to call the API).
_OPEN_PATHS = {"/health", "/health_generate", "/metrics", "/version", "/", "/playground"}
# The listen queue. aiohttp's default of 128 drops the SYNs of a burst beyond it, and each dropped
# client retries only after 1 s (then 3 s): 300 connections opened at once waited 1 s at the median.
# 2048 is uvicorn's default, i.e. SGLang's (the kernel caps it at net.core.somaxconn).
LISTEN_BACKLOG = 2048


def make_context(args: ServerArgs, tm: object, chat_template: str | None = None) -> ServerContext:
    info = tm.info  # type: ignore[attr-defined]
    limit = args.inflight_limit(info.max_running_requests)
    ctx = ServerContext(
        args=args, tm=tm,  # type: ignore[arg-type]
        model_name=served_model_name(args.model_path, args.served_model_name),
        admission=Admission(int(limit)),
    )
    work = getattr(tm, "work", None)
    if work is not None:  # (the TokenizerManager's worker threads serve the handlers' parsing too)
        ctx.work = work
    ctx.chat = ChatTemplate(tm.tokenizer, chat_template)  # type: ignore[attr-defined]
    if args.enable_metrics:
        ctx.metrics = ServerMetrics(ctx.model_name)
    return ctx


@web.middleware
async def _errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    ctx = request.app[CTX]
    try:
        if ctx.args.api_key and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {ctx.args.api_key}".encode()):
                raise ApiError(401, "missing or invalid API key (send 'Authorization: Bearer <key>')")
        return await handler(request)
    except ApiError as exc:
        response = error_response(exc.status, exc.message, exc.param, exc.headers)
    except InvalidRequestError as exc:
        response = error_response(400, str(exc), exc.field)
    except web.HTTPRequestEntityTooLarge:
        response = error_response(413, f"body: the request body is too large; {too_large(ctx.args.max_request_body_bytes)}",
                                  "body")
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = error_response(exc.status, f"{exc.reason}: {request.method} {request.path}", None,
                                  {"Allow": exc.headers["Allow"]} if "Allow" in exc.headers else None)
    except (asyncio.CancelledError, ConnectionError):
        raise
    except Exception as exc:  # noqa: BLE001 - a server bug must not take the server down
        logger.exception("unhandled error on %s %s", request.method, request.path)
        response = error_response(500, f"internal server error: {type(exc).__name__}: {exc}")
    if ctx.metrics is not None:
        ctx.metrics.http_errors.inc()
        if response.status == 503:
            ctx.metrics.rejected.inc()
    return response


def build_app(ctx: ServerContext) -> web.Application:
    # aiohttp enforces the body limit itself when the handler reads; read_json also checks Content-Length.
    app = web.Application(middlewares=[_errors], client_max_size=ctx.args.max_request_body_bytes)
    app[CTX] = ctx
    native_api.add_routes(app, ctx.args.enable_metrics)
    openai_api.add_routes(app)
    tokenize_api.add_routes(app)
    lora_api.add_routes(app)
    playground.add_routes(app)
    return app


def bind_listen_socket(host: str, port: int) -> socket.socket:
    """Bind the server's address before the model loads, so a port in use fails in a second, not
    after minutes of loading. Not listening yet: until the app runs, connections are refused."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    return sock


def run_server(args: ServerArgs) -> int:
    """Blocking: start, serve until a signal, shut down. Returns the process exit code."""
    started = time.monotonic()
    args = args.resolve()
    configure_logging(args.log_level, "server")
    try:
        template = load_chat_template(args.chat_template)
    except (OSError, ValueError) as exc:
        print(f"radixlm: error: {exc}", file=sys.stderr)
        return 2
    try:
        sock = bind_listen_socket(args.host, args.port)
    except OSError as exc:
        print(f"radixlm: error: cannot listen on {args.host}:{args.port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    from radixlm.runtime.tokenizer_manager import TokenizerManager

    try:
        tm = TokenizerManager(args)
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as exc:
        sock.close()
        print(f"radixlm: error: could not start the model: {exc}", file=sys.stderr)
        return 1
    try:
        ctx = make_context(args, tm, template)
        logger.info("%s", startup_summary(ctx.model_name, tm.info, args, time.monotonic() - started))
        return asyncio.run(_serve(ctx, sock))
    except KeyboardInterrupt:
        return 130
    finally:
        sock.close()
        tm.shutdown()


async def _serve(ctx: ServerContext, sock: socket.socket) -> int:
    args, tm = ctx.args, ctx.tm
    loop = asyncio.get_running_loop()
    tm.start(loop)
    ctx.work.warm()  # the large-body parser process, started while the server comes up
    runner = web.AppRunner(build_app(ctx), handler_cancellation=True, shutdown_timeout=3.0,
                           access_log=logging.getLogger("aiohttp.access"))
    await runner.setup()
    site = web.SockSite(runner, sock, backlog=LISTEN_BACKLOG)
    try:
        await site.start()
    except OSError as exc:
        print(f"radixlm: error: cannot listen on {args.host}:{args.port}: {exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"radixlm server ready at http://{host}:{port} (model {ctx.model_name}, "
          f"context {ctx.context_len}, KV pool {tm.info.max_total_tokens} tokens)", flush=True)

    stop = asyncio.Event()
    exit_code = 0

    def on_signal(sig: signal.Signals) -> None:
        logger.info("received %s: shutting down", sig.name)
        ctx.shutting_down = True
        stop.set()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        while not stop.is_set():
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except asyncio.TimeoutError:
                pass
            if tm.dead and not stop.is_set():
                logger.error("%s; shutting down the server", tm.dead)
                exit_code = 1
                break
    finally:
        ctx.shutting_down = True
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await runner.cleanup()  # closes connections; in-flight handlers are cancelled, which aborts their requests
        await asyncio.sleep(0)  # let the aborts reach the scheduler before it is asked to stop
        await loop.run_in_executor(None, tm.shutdown)  # while the loop still runs the receiver's callbacks
        await asyncio.sleep(0.05)
    return exit_code

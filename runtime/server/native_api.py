"""SGLang's native HTTP API: /generate, model/server info, health, cache and abort control, metrics."""
from __future__ import annotations

import asyncio
import logging
import uuid
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from aiohttp import web

from radixlm.runtime.field_checks import ignore_unknown
from radixlm.runtime.generate_request import GenerateRequest, build_generate_request, parse_generate_request
from radixlm.runtime.native_output import native_output
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.sequence_output import SequenceDelta, SequenceResult
from radixlm.runtime.server.builtin_chat_templates import builtin_chat_template_name
from radixlm.runtime.server.errors import ApiError, json_response
from radixlm.runtime.server.generation import ServerContext, collect, stream_sse
from radixlm.runtime.server.sse import EventStream

logger = logging.getLogger(__name__)

CTX = web.AppKey("radixlm_ctx", ServerContext)
BODY_BYTES = web.RequestKey("radixlm_body_bytes", int)
HEALTH_TIMEOUT_S = 20.0
FLUSHED = ("Cache flushed.\nPlease check backend logs for more details. "
           "(When there are running or waiting requests, the operation will not be performed.)\n")


def builtin_template_name(value: str | None) -> str | None:
    """The built-in template --chat-template names (None for a file, a Jinja string or no flag)."""
    if not value or Path(value).expanduser().is_file():
        return None
    return builtin_chat_template_name(value)


def radixlm_version() -> str:
    try:
        return version("radixlm")
    except PackageNotFoundError:
        return "0.0.0"


async def read_json(request: web.Request, *, allow_empty: bool = False) -> dict[str, Any]:
    """The body as a JSON object, or a 400/413 naming what is wrong."""
    limit = request.app[CTX].args.max_request_body_bytes
    if request.content_length is not None and request.content_length > limit:
        raise ApiError(413, f"body: the request body has {request.content_length} bytes; {too_large(limit)}", "body")
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(413, f"body: the request body is too large; {too_large(limit)}", "body") from None
    request[BODY_BYTES] = len(raw)
    return await request.app[CTX].work.parse(raw, allow_empty)


def too_large(limit: int) -> str:
    return f"the limit is {limit} bytes (the server's --max-request-body-bytes)"


def body_bytes(request: web.Request) -> int:
    """The size of the body `read_json` read: a large one is parsed on a worker thread (front_work.py)."""
    return request.get(BODY_BYTES, 0)


# ------------------------------------------------------------------------------------ /generate
async def generate_handler(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)
    try:
        req = await ctx.work.run(body_bytes(request), parse_generate_request, body, ctx.vocab_size,
                                 ctx.context_len, True)  # (read_json walked the body's strings)
    except InvalidRequestError as exc:
        raise ApiError.from_invalid(exc) from None
    many = req.is_batch or sum(item.params.n for item in req.items) > 1
    try:
        if not req.stream:
            outs = [native_output(r) for r in await collect(ctx, req)]
            return json_response(outs if many else outs[0])
        return await _stream(request, ctx, req, many)
    except InvalidRequestError as exc:  # raised while submitting: prompt too long, rid in use, ...
        raise ApiError.from_invalid(exc) from None


async def _stream(request: web.Request, ctx: ServerContext, req: GenerateRequest, many: bool) -> web.StreamResponse:
    """SGLang's native stream: every event carries the sequence's whole output so far."""
    results: dict[int, SequenceResult] = {}

    async def emit(sse: EventStream, d: SequenceDelta) -> None:
        out = native_output(results.setdefault(d.index, SequenceResult(d.index)).add(d))
        await sse.send({**out, "index": d.index} if many else out)

    return await stream_sse(request, ctx, req, emit)


# ------------------------------------------------------------------------------------ info
async def model_info(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    info = ctx.tm.info
    chat = ctx.chat
    return json_response({
        # As given, else the folder loaded: SGLang's programs load a tokenizer from it (get_model_name()).
        # Clients choosing a template by name should read served_model_name.
        "model_path": ctx.args.model_path or str(ctx.tm.model_dir),
        # What this server loaded its tokenizer from: a local folder a client on this machine can load.
        "tokenizer_path": ctx.args.tokenizer_path or str(ctx.tm.model_dir),
        # The template /v1/chat/completions renders with, so clients can render prompts the same way.
        "chat_template": (chat.template or getattr(chat.tokenizer, "chat_template", None)) if chat else None,
        "chat_template_name": builtin_template_name(ctx.args.chat_template),
        "is_generation": True,
        "preferred_sampling_params": None,
        "weight_version": "default",
        "served_model_name": ctx.model_name,
        "has_image_understanding": False,
        "has_audio_understanding": False,
        "architectures": [info.architecture],
        "context_length": info.context_len,
        # As loaded (a checkpoint's own FP8 scheme shows even without the flag): none | gguf | fp8.
        "quantization": info.quantization,
        "kv_cache_dtype": ctx.args.kv_cache_dtype,  # the flag: auto | fp8_e4m3 | fp8_e5m2
        "kv_cache_storage_dtype": info.kv_cache_dtype,  # what the pool holds (bfloat16, float8_e4m3fn, ...)
    })


async def server_info(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    ctx.check_alive()
    try:
        sched = (await ctx.tm.control("get_info", timeout=10.0)).payload
    except asyncio.TimeoutError:
        raise ApiError(503, "the scheduler did not answer get_info within 10 s") from None
    args = ctx.args.public_dict()
    info = ctx.tm.info
    out: dict[str, Any] = {
        **args,
        "model_path": ctx.args.model_path or str(ctx.tm.model_dir),
        "served_model_name": ctx.model_name,
        "context_length": info.context_len,
        "max_running_requests": info.max_running_requests,
        "device": info.device,
        "dtype": info.dtype,
        "vocab_size": info.vocab_size,
        "quantization": info.quantization,  # as loaded (none | gguf | fp8 | gptq | awq | w4a16), not the flag
        "kv_cache_storage_dtype": info.kv_cache_dtype,
        **sched,
        "lora_adapters": dict(ctx.tm.lora_adapters),  # name -> folder; what /load_lora_adapter added included
        "lora_routes": ["/load_lora_adapter", "/unload_lora_adapter"] if ctx.args.enable_lora else [],
        "http_inflight_sequences": ctx.admission.admitted,
        "http_max_inflight_sequences": ctx.admission.limit,
    }
    out["internal_states"] = [{
        "last_gen_throughput": sched.get("last_gen_throughput", 0.0),
        "avg_spec_accept_length": sched.get("avg_spec_accept_length"),
        "num_running_reqs": sched.get("num_running_reqs", 0),
        "num_waiting_reqs": sched.get("num_waiting_reqs", 0),
    }]
    out["version"] = radixlm_version()
    return json_response(out)


# ------------------------------------------------------------------------------------ health
async def health(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    if ctx.tm.dead or ctx.shutting_down:
        return web.Response(status=503, text=ctx.tm.dead or "shutting down")
    return web.Response(status=200)


async def health_generate(request: web.Request) -> web.Response:
    """A 1-token generation through the scheduler; 200 if it answers within the timeout."""
    ctx = request.app[CTX]
    if ctx.tm.dead or ctx.shutting_down:
        return web.Response(status=503, text=ctx.tm.dead or "shutting down")
    req = build_generate_request(ctx.vocab_size, input_ids=[0], rid=f"HEALTH_CHECK_{uuid.uuid4().hex}",
                                 sampling_params={"max_new_tokens": 1, "temperature": 0})
    try:
        await asyncio.wait_for(collect(ctx, req, admit=False, timed=False), HEALTH_TIMEOUT_S)
    except (asyncio.TimeoutError, ApiError) as exc:
        return web.Response(status=503, text=f"health check failed: {str(exc) or 'timeout'}")
    return web.Response(status=200)


# ------------------------------------------------------------------------------------ control
async def flush_cache(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    ctx.check_alive()
    resp = await ctx.tm.control("flush_cache", timeout=30.0)
    if resp.ok:
        return web.Response(status=200, text=FLUSHED)
    return web.Response(status=400, text=str(resp.payload.get("message", "Cache not flushed")) + "\n")


async def abort_request(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request, allow_empty=True)
    rid, abort_all = body.get("rid", ""), body.get("abort_all", False)
    if not isinstance(rid, str):
        raise ApiError.bad_request("rid", "must be a string")
    if not isinstance(abort_all, bool):
        raise ApiError.bad_request("abort_all", "must be a boolean")
    ignore_unknown("", body, ("rid", "abort_all", "finished_reason", "abort_message"))
    if not rid and not abort_all:
        raise ApiError.bad_request("rid", "give a request id, or abort_all: true")
    aborted = ctx.tm.abort_request(None if abort_all else rid, "aborted by /abort_request")
    return json_response({"success": True, "aborted": aborted})


async def metrics(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    assert ctx.metrics is not None
    if not ctx.tm.dead:
        try:
            info = (await ctx.tm.control("get_info", timeout=5.0)).payload
            ctx.metrics.update_from_scheduler(info, ctx.admission.admitted)
        except (asyncio.TimeoutError, Exception):  # noqa: BLE001 - serve the counters anyway
            logger.warning("metrics: scheduler info unavailable")
    return web.Response(body=ctx.metrics.render(), headers={"Content-Type": ctx.metrics.content_type})


def add_routes(app: web.Application, enable_metrics: bool) -> None:
    r = app.router
    r.add_post("/generate", generate_handler)
    r.add_put("/generate", generate_handler)
    for path in ("/get_model_info", "/model_info"):
        r.add_get(path, model_info)
    for path in ("/get_server_info", "/server_info"):
        r.add_get(path, server_info)
    r.add_get("/health", health)
    r.add_get("/health_generate", health_generate)
    r.add_get("/flush_cache", flush_cache)
    r.add_post("/flush_cache", flush_cache)
    r.add_post("/abort_request", abort_request)
    if enable_metrics:
        r.add_get("/metrics", metrics)

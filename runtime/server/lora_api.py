"""SGLang's adapter management routes: POST /load_lora_adapter and /unload_lora_adapter.

The scheduler reads and checks the folder (a bad one is a 400 naming the folder and the cause);
unloading an adapter that requests still use is a 409 saying how many (nothing is unloaded)."""
from __future__ import annotations

from aiohttp import web

from radixlm.runtime.field_checks import ignore_unknown
from radixlm.runtime.io_struct import ControlResp
from radixlm.runtime.server.errors import ApiError, json_response
from radixlm.runtime.server.native_api import CTX, read_json


def _name(body: dict, field: str) -> str:
    value = body.get(field)
    if not isinstance(value, str) or not value:
        raise ApiError.bad_request(field, "must be a non-empty string")
    return value


def _answer(resp: ControlResp) -> web.Response:
    if not resp.ok:
        payload = resp.payload
        raise ApiError(int(payload.get("status", 400)), str(payload.get("message")), payload.get("param"))
    return json_response({"success": True, "error_message": None,
                          "loaded_adapters": resp.payload.get("loaded_adapters", {})})


async def load_lora_adapter(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    ctx.check_alive()
    body = await read_json(request)
    ignore_unknown("", body, ("lora_name", "lora_path", "pinned"))
    name, path = _name(body, "lora_name"), _name(body, "lora_path")
    if not ctx.args.enable_lora:
        raise ApiError.bad_request("lora_name", "this server runs without LoRA (start it with --enable-lora)")
    if name in ctx.tm.lora_adapters:
        raise ApiError.bad_request("lora_name", f"LoRA adapter {name!r} is already loaded; unload it first")
    return _answer(await ctx.tm.load_lora_adapter(name, path))


async def unload_lora_adapter(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    ctx.check_alive()
    body = await read_json(request)
    ignore_unknown("", body, ("lora_name",))
    name = _name(body, "lora_name")
    if name not in ctx.tm.lora_adapters:
        raise ApiError(404, f"lora_name: unknown LoRA adapter {name!r}", "lora_name")
    return _answer(await ctx.tm.unload_lora_adapter(name))


def add_routes(app: web.Application) -> None:
    app.router.add_post("/load_lora_adapter", load_lora_adapter)
    app.router.add_post("/unload_lora_adapter", unload_lora_adapter)

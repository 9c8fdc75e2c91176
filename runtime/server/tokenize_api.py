"""/tokenize, /detokenize (SGLang's and vLLM's shapes, with and without /v1) and /version.

/tokenize takes `prompt` (a string, or a list of strings: SGLang) or chat `messages` rendered with the
server's chat template (vLLM); it answers {tokens, count, max_model_len} plus `token_strs` when asked
(vLLM). /detokenize takes `tokens` and answers the text under both names in use: `text` (SGLang)
and `prompt` (vLLM).
"""
from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from radixlm.runtime.server.chat import normalize_messages, template_kwargs
from radixlm.runtime.server.errors import ApiError, dumps, json_response
from radixlm.runtime.server.native_api import CTX, body_bytes, radixlm_version, read_json

logger = logging.getLogger(__name__)
_TOKENIZE_FIELDS = {"model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                    "continue_final_message", "chat_template_kwargs", "return_token_strs"}
_DETOKENIZE_FIELDS = {"model", "tokens", "skip_special_tokens"}


def _warn_unknown(path: str, body: dict[str, Any], known: set[str]) -> None:
    unknown = sorted(set(body) - known)
    if unknown:
        logger.warning("%s: ignoring unknown field(s) %s", path, ", ".join(unknown))


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if not isinstance(value, bool):
        raise ApiError.bad_request(name, "must be a boolean")
    return value


def _tokenizer(request: web.Request) -> Any:
    tokenizer = request.app[CTX].tm.tokenizer
    if tokenizer is None:
        raise ApiError(400, "this server runs with --skip-tokenizer-init and has no tokenizer")
    return tokenizer


async def tokenize(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    _warn_unknown(request.path, body, _TOKENIZE_FIELDS)
    tokenizer = _tokenizer(request)
    # a long prompt or chat is rendered and tokenized on a worker thread (front_work.py), its answer made there too
    text = await ctx.work.run(body_bytes(request), lambda: dumps(_tokenized(ctx, tokenizer, body)))
    return web.Response(text=text, content_type="application/json")


def _tokenized(ctx: Any, tokenizer: Any, body: dict[str, Any]) -> dict[str, Any]:
    strs = _bool(body, "return_token_strs", False)
    if "messages" in body:
        if "prompt" in body:
            raise ApiError.bad_request("prompt", "give either prompt or messages, not both")
        continue_final = _bool(body, "continue_final_message", False)
        generation_prompt = _bool(body, "add_generation_prompt", not continue_final)
        if continue_final and generation_prompt:
            raise ApiError.bad_request("continue_final_message", "cannot be combined with add_generation_prompt: true")
        messages = normalize_messages(body["messages"])
        kwargs = template_kwargs(body.get("chat_template_kwargs"))
        if generation_prompt or continue_final:
            text = ctx.chat.render(messages, continue_final=continue_final, template_kwargs=kwargs)
        else:  # the conversation as it stands (vLLM's add_generation_prompt: false)
            text = ctx.chat.render(messages, template_kwargs={**kwargs, "add_generation_prompt": False})
        # The rendered template already holds the special tokens it wants (vLLM's default is False here).
        ids = tokenizer.encode(text, add_special_tokens=_bool(body, "add_special_tokens", False))
        return _answer(tokenizer, ids, ctx.context_len, strs)
    prompt = body.get("prompt")
    special = _bool(body, "add_special_tokens", True)
    if isinstance(prompt, str):
        return _answer(tokenizer, tokenizer.encode(prompt, add_special_tokens=special), ctx.context_len, strs)
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        ids = [tokenizer.encode(p, add_special_tokens=special) for p in prompt]
        out: dict[str, Any] = {"tokens": ids, "count": [len(x) for x in ids], "max_model_len": ctx.context_len}
        if strs:
            out["token_strs"] = [tokenizer.convert_ids_to_tokens(x) for x in ids]
        return out
    raise ApiError.bad_request("prompt", "must be a string or a non-empty list of strings (or send messages)")


def _answer(tokenizer: Any, ids: list[int], max_len: int, strs: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"tokens": ids, "count": len(ids), "max_model_len": max_len}
    if strs:
        out["token_strs"] = tokenizer.convert_ids_to_tokens(ids)
    return out


async def detokenize(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    body = await read_json(request)
    _warn_unknown(request.path, body, _DETOKENIZE_FIELDS)
    tokenizer = _tokenizer(request)
    text = await ctx.work.run(body_bytes(request), _detokenized, tokenizer, body.get("tokens"), ctx.vocab_size,
                              _bool(body, "skip_special_tokens", False))
    return json_response({"text": text, "prompt": text})


def _detokenized(tokenizer: Any, tokens: Any, vocab_size: int, skip_special: bool) -> str:
    if not isinstance(tokens, list) or not all(isinstance(t, int) and not isinstance(t, bool) for t in tokens):
        raise ApiError.bad_request("tokens", "must be a list of token ids (integers)")
    bad = next((i for i, t in enumerate(tokens) if not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ApiError.bad_request(f"tokens[{bad}]", f"{tokens[bad]} is outside the vocabulary [0, {vocab_size})")
    return tokenizer.decode(tokens, skip_special_tokens=skip_special)


async def version(request: web.Request) -> web.Response:
    return json_response({"version": radixlm_version()})


def add_routes(app: web.Application) -> None:
    r = app.router
    for prefix in ("", "/v1"):
        r.add_post(prefix + "/tokenize", tokenize)
        r.add_post(prefix + "/detokenize", detokenize)
    r.add_get("/version", version)

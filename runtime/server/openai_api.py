"""OpenAI-compatible API: /v1/models, /v1/completions, /v1/chat/completions (plain and SSE)."""
from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.sequence_output import SequenceDelta, SequenceResult, TokenLogprob, common_prefix_len
from radixlm.runtime.served_name import DEFAULT_MODEL_ID
from radixlm.runtime.server.errors import ApiError, json_response
from radixlm.runtime.server.generation import ServerContext, collect, stream_sse
from radixlm.runtime.server.native_api import CTX, body_bytes, read_json
from radixlm.runtime.server.openai_protocol import OpenAIRequest, parse_chat, parse_completion
from radixlm.runtime.server.sse import EventStream
from radixlm.runtime.server.tools import could_be_call, openai_tool_calls, parse_calls

_RENAME = {"max_new_tokens": "max_tokens", "input_ids": "prompt", "text": "prompt"}


# ------------------------------------------------------------------------------------ models
def _model_card(ctx: ServerContext) -> dict[str, Any]:
    return {"id": ctx.model_name, "object": "model", "created": ctx.created, "owned_by": "radixlm",
            "root": ctx.args.model_path or DEFAULT_MODEL_ID, "max_model_len": ctx.context_len}


def _adapter_card(ctx: ServerContext, name: str, path: str) -> dict[str, Any]:
    """A LoRA adapter as vLLM lists it: its own id, the base model as parent."""
    return {"id": name, "object": "model", "created": ctx.created, "owned_by": "radixlm", "root": path,
            "parent": ctx.model_name, "max_model_len": ctx.context_len}


async def list_models(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    adapters = [_adapter_card(ctx, n, p) for n, p in sorted(ctx.tm.lora_adapters.items())]
    return json_response({"object": "list", "data": [_model_card(ctx), *adapters]})


async def get_model(request: web.Request) -> web.Response:
    ctx = request.app[CTX]
    name = request.match_info["model"]
    if name in ctx.tm.lora_adapters:
        return json_response(_adapter_card(ctx, name, ctx.tm.lora_adapters[name]))
    if name != ctx.model_name:
        raise ApiError(404, f"the model {name!r} does not exist; this server serves {ctx.model_name!r}", "model")
    return json_response(_model_card(ctx))


# ------------------------------------------------------------------------------------ pieces
def _finish(out: SequenceResult) -> tuple[str | None, Any]:
    """OpenAI's finish_reason and SGLang's matched_stop (the stop token id or string, else None)."""
    reason = out.finish
    if reason is None:
        return None, None
    return reason.kind, reason.matched if reason.kind == "stop" else None


def _usage(req: OpenAIRequest, outs: list[SequenceResult]) -> dict[str, Any]:
    firsts = outs[:: req.n]  # the prompt counts once for its n samples
    prompt = sum(o.prompt_tokens for o in firsts)
    completion = sum(o.completion_tokens for o in outs)
    cached = sum(o.cached_tokens for o in firsts)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion,
            "prompt_tokens_details": {"cached_tokens": cached}}


def _completion_logprobs(entries: list[TokenLogprob], tops: list | None, offset: int) -> dict[str, Any]:
    tokens, lps, top_out, offsets = [], [], [], []
    for j, (lp, _tid, text) in enumerate(entries):
        text = text or ""
        tokens.append(text)
        lps.append(lp)
        offsets.append(offset)
        offset += len(text)
        top = tops[j] if tops is not None and j < len(tops) else None
        top_out.append(None if top is None else {t or "": v for v, _i, t in top})
    return {"tokens": tokens, "token_logprobs": lps, "top_logprobs": top_out if tops is not None else None,
            "text_offset": offsets}


def _chat_logprobs(entries: list[TokenLogprob], tops: list | None) -> dict[str, Any]:
    content = []
    for j, (lp, _tid, text) in enumerate(entries):
        text = text or ""
        top = tops[j] if tops is not None and j < len(tops) else None
        content.append({"token": text, "logprob": lp, "bytes": list(text.encode("utf-8")),
                        "top_logprobs": [{"token": t or "", "logprob": v, "bytes": list((t or "").encode("utf-8"))}
                                         for v, _i, t in (top or [])]})
    return {"content": content}


class _Choice:
    """What one sequence has emitted so far (for stream deltas)."""

    def __init__(self) -> None:
        self.text = ""
        self.n_logprobs = 0
        self.n_input_logprobs = 0
        self.started = False
        self.finished = False
        self.holding = False  # output held back: it may be a tool call (sent whole at the end)


def _logprob_delta(req: OpenAIRequest, st: _Choice, out: SequenceResult) -> dict[str, Any] | None:
    """The logprobs of what `st` has not sent yet (with echo, the prompt's first)."""
    if not req.logprobs:
        return None
    lp = out.logprobs
    out_lp = lp.output_tokens if lp is not None else []
    out_top = lp.output_top if lp is not None and req.top_logprobs > 0 else None
    new, new_top = out_lp[st.n_logprobs:], (out_top[st.n_logprobs:] if out_top is not None else None)
    offset = len(st.text)
    if req.kind == "completion" and req.echo and not st.started:
        inp = lp.input_tokens if lp is not None else []
        inp_top = lp.input_top if lp is not None and req.top_logprobs > 0 else None
        new, new_top = inp + new, ((inp_top or []) + (new_top or []) if new_top is not None else None)
        offset = 0
    st.n_logprobs = len(out_lp)
    if req.kind == "chat":
        return _chat_logprobs(new, new_top)
    return _completion_logprobs(new, new_top if req.top_logprobs > 0 else ([None] * len(new)), offset)


# ------------------------------------------------------------------------------------ handlers
async def completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)
    return await _serve(request, ctx, await ctx.work.run(body_bytes(request), parse_completion, ctx, body))


async def chat_completions(request: web.Request) -> web.StreamResponse:
    ctx = request.app[CTX]
    body = await read_json(request)  # a large one's template and tokenization run on a worker thread
    return await _serve(request, ctx, await ctx.work.run(body_bytes(request), parse_chat, ctx, body))


async def _serve(request: web.Request, ctx: ServerContext, req: OpenAIRequest) -> web.StreamResponse:
    try:
        if req.stream:
            return await _stream(request, ctx, req)
        outs = await collect(ctx, req.generate)
    except InvalidRequestError as exc:
        raise ApiError.from_invalid(exc, _RENAME) from None
    return json_response(_full_response(req, outs))


def _full_response(req: OpenAIRequest, outs: list[SequenceResult]) -> dict[str, Any]:
    choices = []
    for i, out in enumerate(outs):
        reason, matched = _finish(out)
        st = _Choice()
        lp = _logprob_delta(req, st, out)
        if req.kind == "chat":
            message = {"role": "assistant", "content": out.text, "reasoning_content": None, "tool_calls": None}
            calls = _tool_calls(req, out)
            if calls:
                message.update(content=None, tool_calls=calls)
                reason = "tool_calls"
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason,
                            "matched_stop": matched})
        else:
            text = (req.prompts[i // req.n] + out.text) if req.echo else out.text
            choices.append({"index": i, "text": text, "logprobs": lp, "finish_reason": reason,
                            "matched_stop": matched})
    return {"id": req.rid, "object": "chat.completion" if req.kind == "chat" else "text_completion",
            "created": int(time.time()), "model": req.model, "choices": choices, "usage": _usage(req, outs)}


def _tool_calls(req: OpenAIRequest, out: SequenceResult) -> list[dict[str, Any]] | None:
    """The calls in a finished chat output (OpenAI shape), when tools are in play and it is made of calls."""
    if req.tools is None or not req.tools.parses:
        return None
    calls = parse_calls(out.text, req.tools)
    return openai_tool_calls(calls) if calls else None


async def _stream(request: web.Request, ctx: ServerContext, req: OpenAIRequest) -> web.StreamResponse:
    chat = req.kind == "chat"
    obj = "chat.completion.chunk" if chat else "text_completion"
    created = int(time.time())
    states: dict[int, _Choice] = {}
    finals: dict[int, SequenceResult] = {}  # each sequence so far

    def chunk(choice: dict[str, Any], usage: dict[str, Any] | None = None) -> dict[str, Any]:
        return {"id": req.rid, "object": obj, "created": created, "model": req.model, "choices": [choice],
                "usage": usage}

    async def emit(sse: EventStream, d: SequenceDelta) -> None:
        i = d.index
        out = finals.setdefault(i, SequenceResult(i)).add(d)
        st = states.setdefault(i, _Choice())
        if st.finished:
            return
        reason, matched = _finish(out)
        text = out.text
        delta = text[common_prefix_len(st.text, text):]
        if req.echo and not st.started:
            delta = req.prompts[i // req.n] + delta
        usage = None
        if req.continuous_usage:
            usage = {"prompt_tokens": out.prompt_tokens, "completion_tokens": out.completion_tokens,
                     "total_tokens": out.prompt_tokens + out.completion_tokens}
        if chat and not st.started:
            forced = req.tools is not None and req.tools.constrained
            await sse.send(chunk({"index": i, "delta": {"role": "assistant", "content": None if forced else ""},
                                  "logprobs": None, "finish_reason": None}, usage))
            st.holding = req.tools is not None and req.tools.parses
        if st.holding:
            st.started = True
            if reason is None and (req.tools.constrained or could_be_call(text)):
                return  # still possibly a call: hold the text (and its logprobs) back
            calls = _tool_calls(req, out) if reason is not None else None
            if calls:
                st.finished = True
                lp = _logprob_delta(req, st, out)
                deltas = [{"index": k, **call} for k, call in enumerate(calls)]
                await sse.send(chunk({"index": i, "delta": {"tool_calls": deltas}, "logprobs": lp,
                                      "finish_reason": None}, usage))
                await sse.send(chunk({"index": i, "delta": {}, "logprobs": None, "finish_reason": "tool_calls",
                                      "matched_stop": matched}, usage))
                return
            st.holding = False  # not a call: what was held goes out as content below
        lp = _logprob_delta(req, st, out)  # (before `started`: echoed prompt logprobs come first)
        st.started = True
        st.text = text
        if delta or lp is not None and (lp.get("content") or lp.get("tokens")):
            if chat:
                piece = {"index": i, "delta": {"content": delta}, "logprobs": lp, "finish_reason": None}
            else:
                piece = {"index": i, "text": delta, "logprobs": lp, "finish_reason": None}
            if reason is not None and not chat:
                piece.update(finish_reason=reason, matched_stop=matched)
                st.finished = True
            await sse.send(chunk(piece, usage))
        if reason is not None and not st.finished:
            st.finished = True
            piece = {"index": i, "delta": {}, "logprobs": None} if chat else {"index": i, "text": "", "logprobs": None}
            piece.update(finish_reason=reason, matched_stop=matched)
            await sse.send(chunk(piece, usage))

    def on_failed(i: int) -> None:
        states.setdefault(i, _Choice()).finished = True

    async def on_end(sse: EventStream) -> None:
        if req.include_usage and finals:
            outs = [finals[i] for i in sorted(finals)]
            await sse.send({"id": req.rid, "object": obj, "created": created, "model": req.model,
                            "choices": [], "usage": _usage(req, outs)})

    return await stream_sse(request, ctx, req.generate, emit, on_failed, on_end)


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_get("/v1/models", list_models)
    r.add_get("/v1/models/{model:.+}", get_model)
    r.add_post("/v1/completions", completions)
    r.add_post("/v1/chat/completions", chat_completions)

"""OpenAI request bodies (/v1/completions, /v1/chat/completions) -> validated GenerateRequests.

Every field is checked here and a failure is a 400 naming the OpenAI field. The prompt is tokenized
here, so length errors name `prompt` / `messages` / `max_tokens` rather than the runtime's fields.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
import uuid
from dataclasses import dataclass
from typing import Any

from radixlm.constrained.schema import ANY_JSON
from radixlm.runtime.field_checks import MAX_INT, check_depth, ignore_unknown, require_bool, require_int, require_number, require_str
from radixlm.runtime.generate_request import GenerateRequest, build_generate_request
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.server.chat import normalize_messages, template_kwargs
from radixlm.runtime.server.errors import ApiError
from radixlm.runtime.server.generation import ServerContext
from radixlm.runtime.server.tools import ToolSpec, parse_tool_spec
from radixlm.runtime.stop_regex import validate_all as validate_stop_regexes

# Accepted and without effect here (OpenAI bookkeeping fields).
_IGNORED = {"user", "store", "metadata", "service_tier", "parallel_tool_calls", "safety_identifier",
            "prompt_cache_key"}
_COMMON = {"model", "stream", "stream_options", "n", "stop", "temperature", "top_p", "seed", "logit_bias",
           "presence_penalty", "frequency_penalty", "response_format", "logprobs",
           # SGLang's extras
           "top_k", "min_p", "min_tokens", "regex", "ebnf", "json_schema", "repetition_penalty",
           "stop_token_ids", "stop_regex", "no_stop_trim", "ignore_eos", "skip_special_tokens",
           "spaces_between_special_tokens", "rid", "lora_path", "session_params"}
_COMPLETION = _COMMON | _IGNORED | {"prompt", "max_tokens", "echo", "suffix", "best_of"}
_CHAT = _COMMON | _IGNORED | {"messages", "max_tokens", "max_completion_tokens", "top_logprobs", "tools",
                              "tool_choice", "functions", "function_call", "chat_template_kwargs",
                              "continue_final_message", "separate_reasoning", "stream_reasoning"}
# Sampling fields passed through under the runtime's names.
_PASS = {"temperature": "temperature", "top_p": "top_p", "seed": "seed", "presence_penalty": "presence_penalty",
         "frequency_penalty": "frequency_penalty", "top_k": "top_k", "min_p": "min_p", "min_tokens": "min_new_tokens",
         "repetition_penalty": "repetition_penalty", "stop_token_ids": "stop_token_ids", "stop_regex": "stop_regex", "ignore_eos": "ignore_eos",
         "no_stop_trim": "no_stop_trim", "skip_special_tokens": "skip_special_tokens",
         "spaces_between_special_tokens": "spaces_between_special_tokens", "regex": "regex", "ebnf": "ebnf",
         "json_schema": "json_schema"}
_GENERIC_JSON_OBJECT = '{"type": "object"}'


@dataclass
class OpenAIRequest:
    kind: str  # "completion" | "chat"
    model: str
    rid: str
    stream: bool
    include_usage: bool
    continuous_usage: bool
    n: int
    echo: bool
    logprobs: bool
    top_logprobs: int
    prompts: list[str]
    generate: GenerateRequest
    tools: ToolSpec | None = None  # chat with tools: calls are parsed from (or forced on) the output


def _bad(param: str, message: str) -> ApiError:
    return ApiError.bad_request(param, message)


def _typed(body: dict[str, Any], name: str, kind: str, lo: float | None = None, hi: float | None = None) -> Any:
    """body[name] checked as a bool / int / finite number / str within [lo, hi]; None if absent."""
    value = body.get(name)
    if value is None:
        return None
    if kind == "int":
        return require_int(value, name, None if lo is None else int(lo), MAX_INT if hi is None else int(hi))
    if kind == "num":
        return require_number(value, name, lo, hi)
    return require_bool(value, name) if kind == "bool" else require_str(value, name)


def _check_fields(body: dict[str, Any], allowed: set[str]) -> None:
    """Unknown fields are ignored (logged); known ones are all checked below."""
    ignore_unknown("", body, allowed)


def _stop(body: dict[str, Any]) -> list[str] | None:
    stop = body.get("stop")
    if stop is None:
        return None
    items = [stop] if isinstance(stop, str) else stop
    if not isinstance(items, list) or not all(isinstance(s, str) and s for s in items):
        raise _bad("stop", "must be a non-empty string or a list of non-empty strings")
    return items


def _stop_regex(body: dict[str, Any]) -> None:
    value = body.get("stop_regex")
    if value is None:
        return
    items = [value] if isinstance(value, str) else value
    if not isinstance(items, list) or not all(isinstance(p, str) for p in items):
        raise _bad("stop_regex", "must be a regular expression or a list of them")
    why = validate_stop_regexes(items)
    if why is not None:
        raise _bad("stop_regex", why)


def _logit_bias(body: dict[str, Any], vocab: int) -> dict[str, float] | None:
    bias = body.get("logit_bias")
    if bias is None:
        return None
    if not isinstance(bias, dict):
        raise _bad("logit_bias", "must be an object mapping token ids to biases")
    out = {}
    for key, value in bias.items():
        try:
            tid = int(key)
        except (TypeError, ValueError):
            raise _bad("logit_bias", f"key {key!r} is not a token id") from None
        if not 0 <= tid < vocab:
            raise _bad("logit_bias", f"token id {tid} is outside the vocabulary [0, {vocab})")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
            raise _bad("logit_bias", f"the bias of token {tid} must be a number in [-100, 100]")
        out[str(tid)] = float(value)
    return out


def _response_format(body: dict[str, Any]) -> str | None:
    """response_format -> a JSON schema string for the json_schema sampling parameter (or None)."""
    fmt = body.get("response_format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict) or not isinstance(fmt.get("type"), str):
        raise _bad("response_format", "must be an object with a 'type'")
    kind = fmt["type"]
    if kind == "text":
        return None
    if kind == "json_object":
        return _GENERIC_JSON_OBJECT
    if kind != "json_schema":
        raise _bad("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    spec = fmt.get("json_schema")
    if not isinstance(spec, dict):
        raise _bad("response_format.json_schema", "must be an object with a 'schema'")
    schema = spec.get("schema", spec.get("schema_"))
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema", "must be a JSON schema object")
    _check_schema(schema, "response_format.json_schema.schema")
    return json.dumps(schema)


def _check_schema(schema: Any, param: str) -> None:
    """A 400 unless `schema` is valid against its draft's metaschema (`_schema_problem`, remembered per schema
    text: a client sends the same tools with every request, and a check costs ~8 ms of pure Python)."""
    problem = _schema_problem(json.dumps(schema, sort_keys=True, ensure_ascii=False))
    if problem is not None:
        raise _bad(param, f"not a valid JSON schema: {problem}")


@functools.lru_cache(maxsize=1024)
def _schema_problem(text: str) -> str | None:
    """Why the schema (as JSON text) is invalid against its draft's metaschema, or None. jsonschema is a core dependency:
    a check that ran only where a test extra happened to be installed let `{"type": [[{}]]}` in a
    tool's parameters through on the H200 (benchmarks/soak.py). Imported at the first schema to check, not
    at server start: with jsonschema's format checkers installed (the test extra's [format-nongpl]), its
    import builds ~40 lark parsers (rfc3987-syntax), 2-2.5 CPU-s measured on every server's startup path."""
    from jsonschema import Draft202012Validator
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import validator_for

    schema = json.loads(text)
    try:  # against the metaschema of the draft the schema declares ($schema), else 2020-12
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        return exc.message
    return None


def _sampling(body: dict[str, Any], vocab: int) -> dict[str, Any]:
    _typed(body, "temperature", "num", 0, 2)
    _typed(body, "top_p", "num", 0, 1)
    if body.get("top_p") == 0:
        raise _bad("top_p", "must be > 0")
    for name in ("presence_penalty", "frequency_penalty"):
        _typed(body, name, "num", -2, 2)
    _typed(body, "repetition_penalty", "num", 0, 2)
    _typed(body, "min_p", "num", 0, 1)
    _typed(body, "top_k", "int", -1)
    _typed(body, "seed", "int")
    _typed(body, "min_tokens", "int", 0)
    for name in ("ignore_eos", "no_stop_trim", "skip_special_tokens", "spaces_between_special_tokens"):
        _typed(body, name, "bool")
    for name in ("regex", "ebnf"):
        _typed(body, name, "str")
    if body.get("regex") is not None:
        try:
            re.compile(body["regex"])
        except re.error as exc:
            raise _bad("regex", f"not a valid regular expression: {exc}") from None
        except (RecursionError, OverflowError):  # (thousands of nested groups)
            raise _bad("regex", "nested too deeply to compile") from None
    sp: dict[str, Any] = {wire: body[name] for name, wire in _PASS.items() if body.get(name) is not None}
    if isinstance(sp.get("json_schema"), str) and sp["json_schema"] != ANY_JSON:
        try:
            schema = json.loads(sp["json_schema"])
        except (ValueError, RecursionError):
            raise _bad("json_schema", "must be a JSON schema (an object, or a string holding one)") from None
        try:
            check_depth(schema, "json_schema")  # (a string escapes the body's own depth check)
        except InvalidRequestError as exc:
            raise ApiError.from_invalid(exc) from None
        _check_schema(schema, "json_schema")
    elif isinstance(sp.get("json_schema"), dict):
        _check_schema(sp["json_schema"], "json_schema")
    fmt_schema = _response_format(body)
    if fmt_schema is not None:
        if any(sp.get(k) is not None for k in ("regex", "ebnf", "json_schema")):
            raise _bad("response_format", "cannot be combined with regex, ebnf or json_schema")
        sp["json_schema"] = fmt_schema
    _stop_regex(body)
    stop = _stop(body)
    if stop is not None:
        sp["stop"] = stop
    bias = _logit_bias(body, vocab)
    if bias:
        sp["logit_bias"] = bias
    n = _typed(body, "n", "int", 1, 128)
    if n is not None:
        sp["n"] = n
    return sp


def _stream_options(body: dict[str, Any], stream: bool) -> tuple[bool, bool]:
    opts = body.get("stream_options")
    if opts is None:
        return False, False
    if not stream:
        raise _bad("stream_options", "is only allowed when stream is true")
    if not isinstance(opts, dict):
        raise _bad("stream_options", "must be an object")
    ignore_unknown("stream_options", opts, ("include_usage", "continuous_usage_stats"))
    named = {f"stream_options.{k}": v for k, v in opts.items()}  # (errors name stream_options.include_usage)
    inc = _typed(named, "stream_options.include_usage", "bool") or False
    cont = _typed(named, "stream_options.continuous_usage_stats", "bool") or False
    return inc, cont


def _common(ctx: ServerContext, body: dict[str, Any]) -> tuple[str, bool, bool, bool, str]:
    model = _typed(body, "model", "str") or ctx.model_name
    stream = _typed(body, "stream", "bool") or False
    include_usage, continuous = _stream_options(body, stream)
    rid = body.get("rid")
    if rid is not None and (not isinstance(rid, str) or not rid):
        raise _bad("rid", "must be a non-empty string")
    if body.get("session_params") is not None:
        raise _bad("session_params", "is not supported by this server")
    return model, stream, include_usage, continuous, rid


def adapter_of(ctx: ServerContext, body: dict[str, Any], model: str) -> str | None:
    """The LoRA adapter a request runs with: SGLang's `lora_path` field, else `model` naming an
    adapter as "base:adapter" (SGLang) or "adapter" (vLLM); None for the base model."""
    explicit = _typed(body, "lora_path", "str")
    if explicit:
        try:
            ctx.tm.check_adapter(explicit, "lora_path")
        except InvalidRequestError as exc:
            raise ApiError.from_invalid(exc) from None
        return explicit
    adapters = ctx.tm.lora_adapters
    if not ctx.args.enable_lora or model == ctx.model_name:
        return None
    if model in adapters:
        return model
    base, sep, name = model.rpartition(":")
    if sep:
        if name not in adapters:
            loaded = ", ".join(sorted(adapters)) or "none"
            raise _bad("model", f"unknown LoRA adapter {name!r} in {model!r} (loaded: {loaded})")
        return name
    return None


def _check_length(ctx: ServerContext, ids: list[int], max_tokens: int, prompt_param: str, max_param: str) -> None:
    limit = ctx.context_len
    if not ids:
        raise _bad(prompt_param, "prompt is empty")
    if len(ids) >= limit:
        raise _bad(prompt_param, f"the prompt has {len(ids)} tokens; this model's context length is {limit}")
    if len(ids) + max_tokens > limit:
        raise _bad(max_param, f"the prompt ({len(ids)} tokens) + {max_param} ({max_tokens}) exceeds the "
                              f"context length {limit}")


def _build(ctx: ServerContext, rename: dict[str, str], constraint_field: str | None, **fields: Any) -> GenerateRequest:
    """The native request builder on the translated fields; its errors name the OpenAI fields (`rename`), and so
    do the scheduler's later ones (the sampling fields are top-level here; a schema may come from `constraint_field`)."""
    try:
        req = build_generate_request(ctx.vocab_size, False, **fields)  # (read_json checked the body's strings)
    except InvalidRequestError as exc:
        raise ApiError.from_invalid(exc, rename) from None
    items = [dataclasses.replace(item, params_field="", constraint_field=constraint_field) for item in req.items]
    return dataclasses.replace(req, items=items)


def _constraint_field(body: dict[str, Any], tools: ToolSpec | None = None) -> str | None:
    """The OpenAI field a request's constraint came from when it is not json_schema / regex / ebnf."""
    if tools is not None and tools.constrained:
        return "tool_choice"
    fmt = body.get("response_format")
    return "response_format" if isinstance(fmt, dict) and fmt.get("type") != "text" else None


def parse_completion(ctx: ServerContext, body: dict[str, Any]) -> OpenAIRequest:
    _check_fields(body, _COMPLETION)
    model, stream, include_usage, continuous, rid = _common(ctx, body)
    max_tokens = _typed(body, "max_tokens", "int", 1)
    max_tokens = 16 if max_tokens is None else max_tokens
    echo = _typed(body, "echo", "bool") or False
    top = _typed(body, "logprobs", "int", 0, 20)
    if body.get("suffix"):
        raise _bad("suffix", "is not supported by this server")
    sp = _sampling(body, ctx.vocab_size)
    n = sp.get("n", 1)
    best_of = _typed(body, "best_of", "int", 1)
    if best_of is not None and best_of != n:
        raise _bad("best_of", "only best_of == n is supported")
    prompt = body.get("prompt")
    tok = ctx.tm.tokenizer
    if isinstance(prompt, str):
        texts, ids = [prompt], [tok.encode(prompt, add_special_tokens=False)]
        batch = False
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        texts, ids, batch = list(prompt), [tok.encode(p, add_special_tokens=False) for p in prompt], True
    elif isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        ids, batch = [list(prompt)], False
        texts = []
    elif isinstance(prompt, list) and prompt and all(isinstance(p, list) and p for p in prompt):
        ids, batch = [list(p) for p in prompt], True
        texts = []
    else:
        raise _bad("prompt", "must be a string, a list of strings, a list of token ids or a list of such lists")
    for p in ids:
        _check_length(ctx, p, max_tokens, "prompt", "max_tokens")  # (first: a million ids take ~0.1 s to check)
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < ctx.vocab_size for t in p):
            raise _bad("prompt", f"token ids must be integers in [0, {ctx.vocab_size})")
    if not texts:
        texts = [tok.decode(p) for p in ids] if echo else [""] * len(ids)
    rid = rid or f"cmpl-{uuid.uuid4().hex}"
    req = _build(ctx, {"max_new_tokens": "max_tokens", "min_new_tokens": "min_tokens", "input_ids": "prompt",
                       "top_logprobs_num": "logprobs"}, _constraint_field(body),
                 input_ids=ids if batch else ids[0], rid=rid, stream=stream, lora_path=adapter_of(ctx, body, model),
                 sampling_params={**sp, "max_new_tokens": max_tokens},
                 return_logprob=top is not None, top_logprobs_num=top or 0,
                 logprob_start_len=0 if (echo and top is not None) else -1, return_text_in_logprobs=True)
    return OpenAIRequest("completion", model, rid, stream, include_usage, continuous, n, echo, top is not None,
                         top or 0, texts, req)


def parse_chat(ctx: ServerContext, body: dict[str, Any]) -> OpenAIRequest:
    _check_fields(body, _CHAT)
    model, stream, include_usage, continuous, rid = _common(ctx, body)
    messages = normalize_messages(body.get("messages"))
    max_param = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    max_tokens = _typed(body, max_param, "int", 1)
    want_lp = _typed(body, "logprobs", "bool") or False
    top = _typed(body, "top_logprobs", "int", 0, 20)
    if top is not None and top > 0 and not want_lp:
        raise _bad("top_logprobs", "requires logprobs: true")
    continue_final = _typed(body, "continue_final_message", "bool") or False
    if continue_final and messages[-1]["role"] != "assistant":
        raise _bad("continue_final_message", "the last message must be from the assistant")
    for name in ("separate_reasoning", "stream_reasoning"):
        _typed(body, name, "bool")
    kwargs = template_kwargs(body.get("chat_template_kwargs"))
    tools = parse_tool_spec(body, _check_schema)
    sp = _sampling(body, ctx.vocab_size)
    if tools is not None and tools.constrained:
        if any(sp.get(k) is not None for k in ("regex", "ebnf", "json_schema")):
            raise _bad("tool_choice", "a required or named tool call constrains the output and cannot be combined "
                                      "with response_format, regex, ebnf or json_schema")
        sp["json_schema"] = json.dumps(tools.schema(), ensure_ascii=False)
    if ctx.chat is None:
        raise ApiError(400, "messages: this server has no chat template", "messages")
    prompt = ctx.chat.render(messages, continue_final=continue_final, template_kwargs=kwargs, tools=tools)
    ids = ctx.tm.tokenizer.encode(prompt, add_special_tokens=False)
    if max_tokens is None:  # OpenAI's default: up to the end of the context
        _check_length(ctx, ids, 1, "messages", max_param)
        max_tokens = ctx.context_len - len(ids)
    _check_length(ctx, ids, max_tokens, "messages", max_param)
    rid = rid or f"chatcmpl-{uuid.uuid4().hex}"
    req = _build(ctx, {"max_new_tokens": max_param, "min_new_tokens": "min_tokens", "input_ids": "messages",
                       "top_logprobs_num": "top_logprobs"}, _constraint_field(body, tools),
                 input_ids=ids, rid=rid, stream=stream, lora_path=adapter_of(ctx, body, model),
                 sampling_params={**sp, "max_new_tokens": max_tokens},
                 return_logprob=want_lp, top_logprobs_num=top or 0, return_text_in_logprobs=True)
    return OpenAIRequest("chat", model, rid, stream, include_usage, continuous, sp.get("n", 1), False, want_lp,
                         top or 0, [prompt], req, tools)

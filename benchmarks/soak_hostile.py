"""The soak's hostile requests: bodies a careless or malicious client sends, each with what it must get.

`Case.expect`: "4xx" (refused, and where `param` is given the error's param starts with it), "2xx"
(a valid but extreme request: it must be served), or "<500" (either, e.g. junk in a field whose valid
range the junk may hit; a 4xx must then name `param`). Every case keeps its generation short (small
max_tokens, or a constraint that ends it) so a soak on a CPU is not held by one of them. The catalogue
covers the request kinds the soak's first mix did not: tools / tool_choice, odd response_format
schemas, n > 1 with a schema, logprob extremes, many / huge stop strings, max_tokens at and past its
bounds, unknown LoRA adapters, stream_options, huge `messages` arrays, deep nesting, and a wrong type
in every field of /generate's sampling_params and of /v1/chat/completions and /v1/completions.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class Case:
    path: str
    raw: bytes
    expect: str  # "4xx" | "2xx" | "<500"
    param: str | None = None  # a 4xx's error param must start with this

    def check(self, status: int, text: str) -> str | None:
        """Why the answer breaks the case's contract, or None."""
        if status >= 500:
            return f"{status}"
        if self.expect == "4xx" and not 400 <= status < 500:
            return f"expected a 4xx, got {status}"
        if self.expect == "2xx" and not 200 <= status < 300:
            return f"expected a 2xx, got {status}: {text[:200]}"
        if 400 <= status < 500 and self.param is not None and status != 413:
            try:
                param = json.loads(text)["error"]["param"]
            except (ValueError, KeyError, TypeError):
                return f"{status} without the error JSON: {text[:200]}"
            if not isinstance(param, str) or not param.startswith(self.param):
                return f"{status} names {param!r}, not {self.param!r}: {text[:200]}"
        return None


MSG = [{"role": "user", "content": "hi"}]
TOOL = {"type": "function", "function": {"name": "get_weather", "description": "weather of a city",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                        "required": ["city"]}}}
# Values of the wrong type (or out of every range) for any field; a field that takes one of them (a bool
# where a bool is due) is served and the case expects "<500".
WRONG = ["x", [1], {"a": 1}, True, 1.5, -7, 2**64, 1e308, [], {}]
SP_FIELDS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
             "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "stop_regex", "n", "seed",
             "logit_bias", "regex", "json_schema", "ebnf", "ignore_eos", "skip_special_tokens",
             "spaces_between_special_tokens", "no_stop_trim", "structural_tag"]
CHAT_FIELDS = ["model", "stream", "stream_options", "n", "stop", "temperature", "top_p", "seed", "logit_bias",
               "presence_penalty", "frequency_penalty", "response_format", "logprobs", "top_logprobs", "max_tokens",
               "max_completion_tokens", "top_k", "min_p", "min_tokens", "regex", "ebnf", "json_schema",
               "repetition_penalty", "stop_token_ids", "stop_regex", "ignore_eos", "skip_special_tokens",
               "rid", "lora_path", "tools", "tool_choice", "chat_template_kwargs", "continue_final_message",
               "messages", "separate_reasoning", "session_params"]
COMPLETION_FIELDS = ["prompt", "max_tokens", "echo", "suffix", "best_of", "logprobs", "n", "stop", "stream",
                     "stream_options", "temperature", "seed", "logit_bias", "json_schema", "lora_path", "model"]
GEN_FIELDS = ["text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
              "top_logprobs_num", "return_text_in_logprobs", "extra_key", "cache_salt", "lora_path", "image_data",
              "priority", "modalities"]


def _case(path: str, body: Any, expect: str, param: str | None = None) -> Case:
    raw = body if isinstance(body, bytes) else json.dumps(body).encode()
    for depth in re.findall(rb'"@deep(\d+)@"', raw):  # (json.dumps itself cannot write the deepest ones)
        text = b'{"a": ' * int(depth) + b"1" + b"}" * int(depth)
        raw = raw.replace(b'"@deep' + depth + b'@"', text)
    return Case(path, raw, expect, param)


def _deep(depth: int) -> str:
    """`depth` nested objects {"a": {"a": ... 1}}, written into the body by `_case`."""
    return f"@deep{depth}@"


def _nested_schema(levels: int) -> dict[str, Any]:
    """An object schema `levels` objects deep (twice as many JSON levels)."""
    schema: dict[str, Any] = {"type": "string"}
    for _ in range(levels):
        schema = {"type": "object", "properties": {"a": schema}}
    return schema


def wrong_type_cases() -> list[Case]:
    """Every field of /generate (and its sampling_params), chat and completions given each WRONG value."""
    out = []
    for name in SP_FIELDS:
        for value in WRONG:
            sp = {"max_new_tokens": 2, name: value}
            out.append(_case("/generate", {"text": "hi", "sampling_params": sp}, "<500", f"sampling_params.{name}"))
    for name in GEN_FIELDS:
        for value in WRONG:
            body = {"text": "hi", "sampling_params": {"max_new_tokens": 2}, name: value}
            out.append(_case("/generate", body, "<500", None if name == "sampling_params" else name))
    for name in CHAT_FIELDS:
        for value in WRONG:
            body = {"messages": MSG, "max_tokens": 2, name: value}
            out.append(_case("/v1/chat/completions", body, "<500", name))
    for name in COMPLETION_FIELDS:
        for value in WRONG:
            body = {"prompt": "hi", "max_tokens": 2, name: value}
            out.append(_case("/v1/completions", body, "<500", name))
    return out


def targeted_cases() -> list[Case]:
    chat, gen, cmpl = "/v1/chat/completions", "/generate", "/v1/completions"
    sp2 = {"max_new_tokens": 2}
    ends = {"regex": "[ab]{1,3}"}  # a constraint that ends the output within 3 tokens
    cases = [
        # tools / tool_choice
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL]}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL], "tool_choice": "required"}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL], "n": 2,
                     "tool_choice": {"type": "function", "function": {"name": "get_weather"}}}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL],
                     "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "4xx", "tool_choice"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tool_choice": "required"}, "4xx", "tool_choice"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL], "tool_choice": "sometimes"}, "4xx", "tool_choice"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [{"type": "function", "function": {}}]}, "4xx", "tools"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL, TOOL]}, "<500", "tools"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": _deep(3000)}}]}, "4xx", None),
        _case(chat, {"messages": MSG, "max_tokens": 4, "tools": [TOOL] * 129}, "4xx", "tools"),
        _case(chat, {"messages": [*MSG, {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": "{not json"}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "sunny"}], "max_tokens": 2, "tools": [TOOL]}, "<500",
            "messages"),
        # response_format json_schema, odd schemas (served, or refused naming the schema)
        *[_case(chat, {"messages": MSG, "max_tokens": 6, "response_format": {"type": "json_schema", "json_schema": {
            "name": "x", "schema": schema}}}, "<500", "response_format") for schema in (
            {}, {"type": "object", "properties": {}}, {"type": "string", "pattern": "(a|b"},
            {"$ref": "#/definitions/missing"}, {"$ref": "#"}, {"type": "integer", "minimum": 5, "maximum": 1},
            {"enum": []}, {"type": "array", "minItems": 100000}, {"type": "string", "minLength": 10**9},
            {"anyOf": []}, {"not": {}}, {"type": "string", "pattern": "(a*)*b"}, {"type": "string", "format": "email"},
            {"type": "number", "multipleOf": 1e-9}, {"type": ["string", "null"]}, {"const": {"a": [1, 2]}},
            {"type": "object", "properties": {f"k{i}": {"type": "integer"} for i in range(300)}},
            {"type": "object", "patternProperties": {"^(a+)+$": {}}}, _deep(60), _deep(900),
            {"type": "string", "maxLength": 2**63}, {"type": "integer", "minimum": -2**70},
            {"type": "array", "items": {"$ref": "#"}}, {"allOf": [{"type": "string"}, {"type": "integer"}]})],
        _case(chat, {"messages": MSG, "max_tokens": 4, "response_format": {"type": "json_schema"}}, "4xx",
              "response_format"),
        _case(chat, {"messages": MSG, "max_tokens": 4, "response_format": {"type": "json_schema", "json_schema": {
            "schema": {"type": "object"}}}, "regex": "a"}, "4xx", "response_format"),
        # n > 1 with a schema
        _case(chat, {"messages": MSG, "max_tokens": 6, "n": 4, "response_format": {"type": "json_schema",
                     "json_schema": {"name": "x", "schema": {"type": "object"}}}}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": {"max_new_tokens": 6, "n": 3, "json_schema": '{"type": "string"}'}}, "2xx"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 6, "n": 64, "json_schema": {"type": "boolean"}}, "2xx"),
        # logprobs at and past their bounds
        _case(chat, {"messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 20}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": 21}, "4xx", "top_logprobs"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "logprobs": True, "top_logprobs": -1}, "4xx", "top_logprobs"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "top_logprobs": 5}, "4xx", "top_logprobs"),
        _case(cmpl, {"prompt": "hi there", "max_tokens": 2, "logprobs": 20, "echo": True}, "2xx"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 2, "logprobs": 21}, "4xx", "logprobs"),
        _case(gen, {"text": "hi there", "sampling_params": sp2, "return_logprob": True, "logprob_start_len": 0,
                    "top_logprobs_num": 100}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": sp2, "return_logprob": True, "top_logprobs_num": 101}, "4xx",
              "top_logprobs_num"),
        _case(gen, {"text": "hi", "sampling_params": sp2, "return_logprob": True, "logprob_start_len": 10**9}, "<500",
              "logprob_start_len"),
        _case(gen, {"text": "hi", "sampling_params": sp2, "return_logprob": True, "logprob_start_len": -5}, "<500",
              "logprob_start_len"),
        _case(gen, {"text": ["a", "b"], "sampling_params": sp2, "return_logprob": [True, False],
                    "logprob_start_len": [0, -1], "top_logprobs_num": [3, 100]}, "2xx"),
        # stop strings: many, huge, at the bounds
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop": [f"s{i}" for i in range(257)]}}, "4xx",
              "sampling_params.stop"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop": [f"{i:031d}x" for i in range(256)]}}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop": "y" * 9000}}, "4xx", "sampling_params.stop"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop": [""]}}, "4xx", "sampling_params.stop"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop_token_ids": list(range(5000))}}, "4xx",
              "sampling_params.stop_token_ids"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "stop_token_ids": [7] * 100000}}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "stop": [f"s{i}" for i in range(300)]}, "4xx", "stop"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "stop": "z" * 10000}, "4xx", "stop"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "stop_regex": "(" * 2000 + ")" * 2000}, "4xx", "stop_regex"),
        # max_tokens 0 / negative / huge (huge ends by the constraint)
        _case(gen, {"text": "hi", "sampling_params": {"max_new_tokens": 0}}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": {"max_new_tokens": -1}}, "4xx", "sampling_params.max_new_tokens"),
        _case(gen, {"text": "hi", "sampling_params": {"max_new_tokens": 8000, **ends}}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": {"max_new_tokens": 2**62, **ends}}, "4xx",
              "sampling_params.max_new_tokens"),
        _case(gen, {"text": ["a", "b"], "sampling_params": [sp2, {"max_new_tokens": 9000}]}, "4xx",
              "sampling_params[1].max_new_tokens"),
        _case(chat, {"messages": MSG, "max_tokens": 0}, "4xx", "max_tokens"),
        _case(chat, {"messages": MSG, "max_tokens": -3}, "4xx", "max_tokens"),
        _case(chat, {"messages": MSG, "max_tokens": 10**9, **ends}, "4xx", "max_tokens"),
        _case(chat, {"messages": MSG, "max_completion_tokens": 0}, "4xx", "max_completion_tokens"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 0}, "<500", "max_tokens"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 2**63}, "4xx", "max_tokens"),
        # unknown LoRA adapters (served without --enable-lora, or with other adapters)
        _case(gen, {"text": "hi", "sampling_params": sp2, "lora_path": "nope"}, "4xx", "lora_path"),
        _case(gen, {"text": ["a", "b"], "sampling_params": sp2, "lora_path": [None, "nope"]}, "4xx", "lora_path"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "lora_path": "nope"}, "4xx", "lora_path"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "model": "base:nope"}, "<500", "model"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 2, "model": "nope"}, "<500", "model"),
        # stream_options
        _case(chat, {"messages": MSG, "max_tokens": 2, "stream_options": {"include_usage": True}}, "4xx", "stream_options"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "stream": True, "stream_options": {
            "include_usage": True, "continuous_usage_stats": True}}, "2xx"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "stream": True, "stream_options": {"include_usage": "yes"}},
              "4xx", "stream_options"),
        _case(cmpl, {"prompt": "hi", "max_tokens": 2, "stream": True, "n": 2, "stream_options": {"include_usage": True,
                     "other": 1}}, "2xx"),
        # huge messages arrays, odd messages
        _case(chat, {"messages": MSG * 5000, "max_tokens": 2}, "4xx", "messages"),
        _case(chat, {"messages": [{"role": "user", "content": "x" * 200_000}], "max_tokens": 2}, "4xx", "messages"),
        _case(chat, {"messages": [], "max_tokens": 2}, "4xx", "messages"),
        _case(chat, {"messages": [{"role": "user"}], "max_tokens": 2}, "<500", "messages"),
        _case(chat, {"messages": [{"role": "wizard", "content": "hi"}], "max_tokens": 2}, "<500", "messages"),
        _case(chat, {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}],
                     "max_tokens": 2}, "4xx", "messages"),
        _case(chat, {"messages": [{"role": "user", "content": "hi", "name": 5}], "max_tokens": 2}, "<500", "messages"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "continue_final_message": True}, "4xx", "continue_final_message"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "chat_template_kwargs": {"enable_thinking": [1] * 10}}, "<500",
              "chat_template_kwargs"),
        # deep nesting and odd bodies
        _case(gen, b"[" * 100_000 + b"]" * 100_000, "4xx", "body"),
        _case(gen, b'{"text": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}", "4xx", "body"),
        _case(gen, {"text": "hi", "sampling_params": sp2, "unknown_field": _deep(100)}, "2xx"),
        _case(gen, {"text": "hi", "sampling_params": sp2, "unknown_field": _deep(500)}, "4xx", "unknown_field"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "json_schema": _deep(900)}}, "<500",
              "sampling_params.json_schema"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "json_schema": "{\"a\": " * 900 + "1" + "}" * 900}}, "<500",
              "sampling_params.json_schema"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "regex": "(" * 5000 + "a" + ")" * 5000}}, "<500",
              "sampling_params.regex"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "ebnf": "root ::= " + "(" * 3000 + '"a"' + ")" * 3000}},
              "<500", "sampling_params.ebnf"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "regex": "(" * 5000 + "a" + ")" * 5000}, "<500", "regex"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "json_schema": json.dumps(_nested_schema(150))}, "4xx",
              "json_schema"),
        _case(chat, {"messages": MSG, "max_tokens": 2, "response_format": {"type": "json_schema", "json_schema": {
            "schema": _nested_schema(150)}}}, "4xx", "response_format"),
        _case(chat, {"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
            "function": {"name": "get_weather", "arguments": "[" * 5000 + "]" * 5000}}]},
            {"role": "tool", "tool_call_id": "c", "content": "x"}, *MSG], "max_tokens": 2, "tools": [TOOL]}, "<500",
            "messages"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "logit_bias": {"1e3": 1}}}, "4xx", "sampling_params.logit_bias"),
        _case(gen, {"text": "hi", "sampling_params": {**sp2, "logit_bias": {str(10**30): 1}}}, "4xx",
              "sampling_params.logit_bias"),
        _case(gen, {"input_ids": [[1, 2], []], "sampling_params": sp2}, "4xx", "input_ids"),
        _case(gen, {"input_ids": [10**30], "sampling_params": sp2}, "4xx", "input_ids"),
        _case(gen, {"text": "hi", "rid": "x" * 100_000, "sampling_params": sp2}, "<500", "rid"),
        _case(gen, {"text": ["a", "b"], "rid": ["same-rid-in-a-batch", "same-rid-in-a-batch"], "sampling_params": sp2},
              "4xx", "rid["),  # (rid[1]; rid[0] where a concurrent copy holds it)
        _case("/tokenize", {"prompt": "hi", "messages": MSG}, "<500", None),
        _case("/detokenize", {"tokens": [[1, 2], 3]}, "4xx", "tokens"),
        _case("/detokenize", {"tokens": [-1, 10**30]}, "4xx", "tokens"),
    ]
    return cases


def hostile_cases() -> list[Case]:
    return targeted_cases() + wrong_type_cases()

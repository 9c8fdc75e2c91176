"""Every bad request is a 4xx in one JSON shape naming the field, and the server keeps serving."""
from __future__ import annotations

import pytest

from tests.server.conftest import MAX_BODY

MSG = [{"role": "user", "content": "hi"}]
LONG = "hello " * 9000  # > 8192 tokens of context

CASES = [
    # (path, body, status, param)
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "max_completion_tokens": 9000}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": -0.5}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": MSG, "n": 0}, 400, "n"),
    ("/v1/chat/completions", {"messages": MSG, "top_logprobs": 3}, 400, "top_logprobs"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"x": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "logit_bias": {"999999": 1}}, 400, "logit_bias"),
    ("/v1/chat/completions", {"messages": MSG, "stop": [""]}, 400, "stop"),
    ("/v1/chat/completions", {"messages": MSG, "stream_options": {"include_usage": True}}, 400, "stream_options"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "x"}]}, 400, "messages[0].role"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, 400,
     "messages[0].content[0].type"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {}}]}, 400,
     "tools[0].function.name"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "yaml"}}, 400, "response_format.type"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": 5}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": MSG, "regex": "(unclosed"}, 400, "regex"),
    ("/v1/chat/completions", {"messages": MSG, "regex": "a", "ebnf": "root ::= 'a'"}, 400, "regex"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 0}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("/v1/completions", {"prompt": [[1, 2], 3]}, 400, "prompt"),
    ("/v1/completions", {"prompt": [10**9]}, 400, "prompt"),
    ("/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("/v1/completions", {"prompt": "x", "logprobs": 99}, 400, "logprobs"),
    ("/v1/completions", {"prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("/v1/completions", {"prompt": "x", "best_of": 3}, 400, "best_of"),
    ("/v1/completions", {"prompt": "x", "echo": "yes"}, 400, "echo"),
    ("/v1/completions", {"prompt": "x", "min_tokens": 50, "max_tokens": 10}, 400, "min_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"temperature": -1}}, 400, "sampling_params.temperature"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": -1}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "x", "input_ids": [1]}, 400, "input_ids"),  # (both given: the second is named)
    ("/generate", {"input_ids": [10**9]}, 400, "input_ids"),
    ("/generate", {"text": LONG}, 400, "text"),
    ("/generate", {"text": "x", "stream": "yes"}, 400, "stream"),
    ("/generate", {"text": "x", "sampling_params": {"regex": "a", "json_schema": "{}"}}, 400, "sampling_params.regex"),
    ("/abort_request", {"rid": 5}, 400, "rid"),
    # issue 13: empty prompts (they crashed the scheduler), batch-length lists, lone surrogates, huge numbers
    ("/generate", {"text": "", "sampling_params": {"max_new_tokens": 4}}, 400, "text"),
    ("/generate", {"input_ids": []}, 400, "input_ids"),
    ("/generate", {"text": ["a", ""]}, 400, "text[1]"),
    ("/generate", {"input_ids": [[5, 6], []]}, 400, "input_ids[1]"),
    ("/v1/completions", {"prompt": ["a", ""]}, 400, "prompt"),
    ("/generate", {"text": "x", "logprob_start_len": [0]}, 400, "logprob_start_len"),
    ("/generate", {"text": ["x", "y", "z"], "logprob_start_len": [0, 1]}, 400, "logprob_start_len"),
    ("/generate", {"text": ["x", "y"], "top_logprobs_num": [1, "2"]}, 400, "top_logprobs_num[1]"),
    ("/generate", {"text": ["x", "y"], "sampling_params": [{}, {"top_p": 2}]}, 400, "sampling_params[1].top_p"),
    ("/generate", {"text": "x", "return_logprob": "yes"}, 400, "return_logprob"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 2**63}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"max_new_tokens": 9000}}, 400, "sampling_params.max_new_tokens"),
    ("/generate", {"text": "x", "sampling_params": {"stop_token_ids": {"1": 2}}}, 400, "sampling_params.stop_token_ids"),
    ("/generate", {"input_ids": [1, [2]]}, 400, "input_ids"),
    ("/generate", {"input_ids": [[1], [2**63]]}, 400, "input_ids[1]"),
    ("/generate", {"text": "\ud800"}, 400, "text"),
    ("/v1/chat/completions", {"messages": [*MSG, {"role": "assistant", "content": "x"},
                                           {"role": "user", "content": "a\udc00b"}]}, 400, "messages[2].content"),
    ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2**63}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "max_tokens": 2**70}, 400, "max_tokens"),
    ("/v1/completions", {"prompt": "x", "temperature": 10**400}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": MSG, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": [[]]}}}}}]}, 400,
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": {"type": "json_schema", "json_schema": {
        "schema": {"properties": 5}}}}, 400, "response_format.json_schema.schema"),
    ("/v1/chat/completions", {"messages": MSG, "response_format": [1]}, 400, "response_format"),
]


def _check_shape(body, status, param):
    err = body["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["code"] == status and isinstance(err["message"], str) and err["message"]
    assert err["param"] == param, err


@pytest.mark.parametrize("path,body,status,param", CASES, ids=[f"{c[0]}:{c[3]}:{i}" for i, c in enumerate(CASES)])
def test_bad_request(server, path, body, status, param):
    st, out = server.run(server.post(path, body))
    assert st == status, out
    _check_shape(out, status, param)


def test_malformed_and_non_object_json(server):
    for raw in (b"{not json", b"[1, 2]", b"", b'{"text": NaN}'):
        st, out = server.run(server.post("/generate", None, raw=raw, headers={**server.headers,
                                                                              "Content-Type": "application/json"}))
        assert st == 400, (raw, out)
        _check_shape(out, 400, "body")
    st, out = server.run(server.post("/v1/chat/completions", None, raw=b'{"messages": [', headers=server.headers))
    assert st == 400 and out["error"]["param"] == "body"


def test_body_too_large(server):
    st, out = server.run(server.post("/generate", None, raw=b"x" * (MAX_BODY + 10), headers=server.headers))
    assert st == 413
    _check_shape(out, 413, "body")
    # the message names the limit and the flag that raises it
    assert f"the limit is {MAX_BODY} bytes (the server's --max-request-body-bytes)" in out["error"]["message"], out


def test_auth(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "test-key-123"}):
        st, out = server.run(server.post("/generate", {"text": "x"}, headers=headers))
        assert st == 401
        assert out["error"]["type"] == "authentication_error"
        st, _ = server.run(server.get("/v1/models", headers=headers))
        assert st == 401
        st, _ = server.run(server.get("/get_model_info", headers=headers))
        assert st == 401
    st, _ = server.run(server.get("/health", headers={}))
    assert st == 200


def test_unknown_route_and_method(server):
    st, out = server.run(server.get("/nope"))
    assert st == 404 and out["error"]["code"] == 404
    st, out = server.run(server.get("/generate"))
    assert st == 405 and out["error"]["code"] == 405
    st, out = server.run(server.get("/v1/models/other-model"))
    assert st == 404 and out["error"]["param"] == "model"


def test_non_finite_numbers(server):
    """1e400 is valid JSON and parses as infinity: a 400 naming the field, not an infinite temperature."""
    for path, raw, param in (
            ("/generate", b'{"text": "x", "sampling_params": {"temperature": 1e400}}', "sampling_params.temperature"),
            ("/v1/chat/completions", b'{"messages": [{"role": "user", "content": "x"}], "top_p": -1e999}', "top_p"),
            ("/v1/completions", b'{"prompt": "x", "logit_bias": {"5": 1e400}}', "logit_bias")):
        st, out = server.run(server.post(path, None, raw=raw, headers={**server.headers,
                                                                        "Content-Type": "application/json"}))
        assert st == 400, (raw, out)
        _check_shape(out, 400, param)


def test_unknown_fields_are_ignored_with_a_warning(server):
    """As in SGLang and vLLM: an unknown field is logged and ignored; a known one is validated."""
    st, out = server.run(server.post("/generate", {"text": "x", "nonsense_field_7": 1,
                                                   "sampling_params": {"max_new_tokens": 1, "bogus_param_7": 1}}))
    assert st == 200, out
    st, out = server.run(server.post("/v1/chat/completions", {
        "messages": [{"role": "user", "content": "hi", "frobnicate_msg_7": True}], "max_tokens": 1,
        "frobnicate_7": 1, "stream_options_x": 1}))
    assert st == 200, out
    log = server.log.read_text()
    for name in ("nonsense_field_7", "sampling_params.bogus_param_7", "frobnicate_7", "messages[0].frobnicate_msg_7"):
        assert name in log, name


def test_still_serving_after_errors(server):
    st, out = server.run(server.post("/generate", {"text": "Hello", "sampling_params": {"max_new_tokens": 2}}))
    assert st == 200 and out["meta_info"]["completion_tokens"] <= 2
    server.run(server.wait_kv_idle())

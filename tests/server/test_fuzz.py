"""Property-based fuzz of every POST route (hypothesis): random well-typed and ill-typed bodies.

For each body: the status is < 500; an error has the one JSON shape ({"error": {message, type,
param, code}}, code == status); a success is well-formed JSON or an SSE stream ending in [DONE].
Afterwards the server answers a greedy request exactly as before the fuzz, and the KV pool is back
to free + evictable == total. Bounded: few examples, few tokens, one shared server.
"""
from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytestmark = pytest.mark.timeout(900)

GREEDY = {"text": "The capital of France is", "sampling_params": {"max_new_tokens": 6, "temperature": 0}}
SETTINGS = dict(deadline=None, derandomize=True, suppress_health_check=list(HealthCheck), database=None)

# Strings with the awkward cases: empty, unicode, lone surrogates, control characters.
texts = st.one_of(st.sampled_from(["", " ", "hi", "Hello world", "\x00", "\ud800", "a\udc00b", "é漢字🙂"]),
                  st.text(st.characters(codec=None, exclude_categories=()), max_size=12))
numbers = st.one_of(st.integers(min_value=-2**70, max_value=2**70), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, -1, 2**63, 2**63 - 1, 1e308, 0.5]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
junk = st.recursive(scalars, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                     st.dictionaries(texts, inner, max_size=3)), max_leaves=8)

SP_FIELDS = ["max_new_tokens", "min_new_tokens", "temperature", "top_p", "top_k", "min_p", "frequency_penalty",
             "presence_penalty", "repetition_penalty", "stop", "stop_token_ids", "n", "seed", "logit_bias",
             "regex", "json_schema", "ebnf", "ignore_eos", "skip_special_tokens", "no_stop_trim", "unknown_sp"]
GEN_FIELDS = ["text", "input_ids", "sampling_params", "rid", "stream", "return_logprob", "logprob_start_len",
              "top_logprobs_num", "return_text_in_logprobs", "extra_key", "image_data", "lora_path", "unknown_field"]
OPENAI_FIELDS = ["model", "stream", "stream_options", "n", "stop", "temperature", "top_p", "seed", "logit_bias",
                 "presence_penalty", "frequency_penalty", "response_format", "logprobs", "max_tokens", "top_k",
                 "regex", "json_schema", "min_tokens", "ignore_eos", "user", "unknown_field"]
COMPLETION_FIELDS = OPENAI_FIELDS + ["prompt", "echo", "suffix", "best_of"]
CHAT_FIELDS = OPENAI_FIELDS + ["messages", "max_completion_tokens", "top_logprobs", "tools", "tool_choice",
                               "chat_template_kwargs", "continue_final_message"]
ROUTES = {"/generate": GEN_FIELDS, "/v1/completions": COMPLETION_FIELDS, "/v1/chat/completions": CHAT_FIELDS,
          "/abort_request": ["rid", "abort_all", "unknown_field"],
          "/tokenize": ["model", "prompt", "messages", "add_special_tokens", "add_generation_prompt",
                        "chat_template_kwargs", "continue_final_message", "return_token_strs", "unknown_field"],
          "/detokenize": ["model", "tokens", "skip_special_tokens", "unknown_field"],
          # (this server runs without --enable-lora: the routes must still answer 4xx for any body)
          "/load_lora_adapter": ["lora_name", "lora_path", "pinned", "unknown_field"],
          "/unload_lora_adapter": ["lora_name", "unknown_field"]}

# Well-typed bodies: right types, values around the edges of their ranges; few tokens.
small_new = st.integers(min_value=0, max_value=3)
sampling = st.fixed_dictionaries({"max_new_tokens": small_new}, optional={
    "temperature": st.sampled_from([0, 0.5, 1.0, 2.0, -1]), "top_p": st.sampled_from([0.1, 1.0, 0, 1.5]),
    "top_k": st.sampled_from([-1, 1, 5, 0]), "min_p": st.sampled_from([0.0, 0.2, 2]),
    "n": st.sampled_from([1, 2, 0]), "stop": st.one_of(texts, st.lists(texts, max_size=2)),
    "stop_token_ids": st.lists(st.integers(-1, 60000), max_size=2), "seed": st.integers(-2**63, 2**63),
    "logit_bias": st.dictionaries(st.sampled_from(["1", "7", "x", "99999"]), st.sampled_from([1, -100, 200]),
                                  max_size=2),
    "regex": st.sampled_from(["[a-z]+", "(", "\\d{2}"]), "json_schema": st.sampled_from(['{"type": "string"}',
                                                                                         '{"type": 5}', "nope"]),
    "ignore_eos": st.booleans(), "min_new_tokens": small_new, "presence_penalty": st.sampled_from([0.5, -3]),
})
messages = st.lists(st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "system", "tool", "x"]),
                                           "content": st.one_of(texts, st.none(), st.lists(st.fixed_dictionaries(
                                               {"type": st.sampled_from(["text", "image_url"]), "text": texts}),
                                               max_size=2))}), min_size=0, max_size=3)
typed_bodies = st.one_of(
    st.tuples(st.just("/generate"), st.fixed_dictionaries({"sampling_params": sampling}, optional={
        "text": st.one_of(texts, st.lists(texts, min_size=1, max_size=2)),
        "input_ids": st.one_of(st.lists(st.integers(-1, 50000), max_size=4),
                               st.lists(st.lists(st.integers(0, 100), max_size=3), max_size=2)),
        "stream": st.booleans(), "return_logprob": st.booleans(), "logprob_start_len": st.sampled_from([-1, 0, 3, [0]]),
        "top_logprobs_num": st.sampled_from([0, 2, 101]), "lora_path": st.sampled_from([None, "a", ["a"], [None]]),
        "unknown_field": junk})),
    st.tuples(st.just("/v1/completions"), st.fixed_dictionaries({"prompt": st.one_of(
        texts, st.lists(texts, max_size=2), st.lists(st.integers(-1, 50000), max_size=3)),
        "max_tokens": st.sampled_from([1, 2, 3, 0, 10**6])}, optional={"temperature": st.sampled_from([0, 1, 3]),
        "logprobs": st.sampled_from([0, 2, 30]), "echo": st.booleans(), "n": st.sampled_from([1, 2]),
        "stream": st.booleans(), "stop": texts, "seed": st.integers(0, 10)})),
    # (max_tokens always: chat's default is the rest of the context, thousands of tokens on a CPU)
    st.tuples(st.just("/v1/chat/completions"), st.fixed_dictionaries({
        "messages": messages, "max_tokens": st.sampled_from([1, 2, 3, 0, 10**6])}, optional={"temperature": st.sampled_from([0, 1]),
        "logprobs": st.booleans(), "top_logprobs": st.sampled_from([0, 2, 21]), "stream": st.booleans(),
        "response_format": st.sampled_from([{"type": "json_object"}, {"type": "text"}, {"type": "xml"}]),
        "tools": st.sampled_from([[], [{"type": "function", "function": {"name": "f"}}], [{"type": "function"}]]),
        "tool_choice": st.sampled_from(["auto", "none", "required", {"type": "function", "function": {"name": "g"}}]),
        "n": st.sampled_from([1, 2])})),
)


@st.composite
def ill_typed_bodies(draw: Any) -> tuple[str, Any]:
    """A route and a body whose known fields (and sampling_params' fields) hold arbitrary junk."""
    path = draw(st.sampled_from(sorted(ROUTES)))
    names = draw(st.lists(st.sampled_from(ROUTES[path]), max_size=4, unique=True))
    body = {name: draw(junk) for name in names}
    if path == "/generate" and "sampling_params" not in body:
        body["sampling_params"] = {"max_new_tokens": draw(small_new)}  # (the default, 128, is slow on a CPU)
    if path == "/generate" and draw(st.booleans()):
        sp_names = draw(st.lists(st.sampled_from(SP_FIELDS), max_size=3, unique=True))
        body["sampling_params"] = {n: draw(junk) for n in sp_names} | {"max_new_tokens": draw(small_new)}
        body.setdefault("text", draw(texts))
    return path, draw(st.one_of(st.just(body), junk))  # sometimes not even an object


async def post(server, path: str, body: Any) -> tuple[int, str]:
    import aiohttp

    raw = json.dumps(body, allow_nan=True, ensure_ascii=True).encode()  # NaN / Infinity / \ud800 on the wire
    async with aiohttp.ClientSession(headers={**server.headers, "Content-Type": "application/json"}) as s:
        async with s.post(server.url + path, data=raw) as r:
            return r.status, await r.text()


def check_response(status: int, text: str, body: Any) -> None:
    assert status < 500, (status, text[:500], body)
    if status >= 400:
        err = json.loads(text)["error"]
        assert set(err) == {"message", "type", "param", "code"}, text
        assert err["code"] == status and isinstance(err["message"], str) and err["message"], text
        assert err["param"] is None or isinstance(err["param"], str), text
    elif text.startswith("data:"):
        assert text.rstrip().endswith("data: [DONE]"), text[-500:]
        for line in text.splitlines():
            if line.startswith("data: ") and line != "data: [DONE]":
                event = json.loads(line[6:])
                assert "error" not in event or event["error"]["code"] < 500, line
    elif text:
        json.loads(text)


@pytest.fixture(scope="module")
def baseline(server):
    status, text = server.run(post(server, "/generate", GREEDY))
    assert status == 200, text
    return json.loads(text)["output_ids"]


def after_fuzz_still_serving(server, baseline: list[int]) -> None:
    status, text = server.run(post(server, "/generate", GREEDY))
    assert status == 200 and json.loads(text)["output_ids"] == baseline, text
    info = server.run(server.wait_kv_idle(timeout=60))
    assert info["kv_free_tokens"] + info["kv_evictable_tokens"] == info["max_total_num_tokens"], info


def test_fuzz_well_typed_bodies(server, baseline):
    @settings(max_examples=40, **SETTINGS)
    @given(typed_bodies)
    def run(case: tuple[str, Any]) -> None:
        path, body = case
        status, text = server.run(post(server, path, body))
        check_response(status, text, body)

    run()
    after_fuzz_still_serving(server, baseline)


def test_fuzz_ill_typed_bodies(server, baseline):
    @settings(max_examples=120, **SETTINGS)
    @given(ill_typed_bodies())
    def run(case: tuple[str, Any]) -> None:
        path, body = case
        status, text = server.run(post(server, path, body))
        check_response(status, text, body)

    run()
    after_fuzz_still_serving(server, baseline)


def test_fuzz_concurrent_burst_leaves_kv_exact(server, baseline):
    """Well-typed bodies sent 16 at a time (batches mixing good and bad requests, n > 1, streams)."""
    @settings(max_examples=3, **SETTINGS)
    @given(st.lists(typed_bodies, min_size=16, max_size=16))
    def run(cases: list[tuple[str, Any]]) -> None:
        async def burst() -> list[tuple[int, str]]:
            return await asyncio.gather(*(post(server, p, b) for p, b in cases))

        for (status, text), (_, body) in zip(server.run(burst()), cases):
            check_response(status, text, body)

    run()
    after_fuzz_still_serving(server, baseline)

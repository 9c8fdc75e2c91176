"""The OpenAI backend: against the live server's /v1 API, and its refusals before any request."""
from __future__ import annotations

import json
import re

import pytest

import radixlm as sgl
from radixlm.lang.interpreter import ProgramError
from tests.lang.mock_server import MockServer

pytest.importorskip("openai")


@pytest.fixture(scope="module")
def oai_chat(runtime):
    return sgl.OpenAI(runtime.endpoint.get_model_name(), base_url=runtime.url + "/v1", api_key="unused")


@pytest.fixture(scope="module")
def oai_completion(runtime):
    return sgl.OpenAI(runtime.endpoint.get_model_name(), is_chat_model=False, base_url=runtime.url + "/v1",
                      api_key="unused")


def test_chat_model_roles_and_gen(oai_chat):
    @sgl.function
    def chat(s):
        s += sgl.system("Answer in one short sentence.")
        s += sgl.user("What is the capital of France?")
        s += sgl.assistant(sgl.gen("answer", max_tokens=12, temperature=0))

    state = chat.run(backend=oai_chat)
    assert state.error() is None, state.error()
    assert state["answer"].strip()
    assert [m["role"] for m in state.messages()] == ["system", "user", "assistant"]
    assert oai_chat.token_usage.completion_tokens > 0


def test_chat_model_constrained_outputs(oai_chat):
    jsonschema = pytest.importorskip("jsonschema")
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 12}},
              "required": ["city"], "additionalProperties": False}

    @sgl.function
    def prog(s):
        s += sgl.user("Give the capital of France as JSON.")
        s += sgl.assistant(sgl.gen("json", json_schema=schema, max_tokens=32, temperature=0))
        s += sgl.user("How many legs does a cat have?")
        s += sgl.assistant(sgl.gen("legs", dtype=int, max_tokens=4, temperature=0))
        s += sgl.user("Is Paris in France?")
        s += sgl.assistant(sgl.select("yes", choices=["Yes", "No"]))

    state = prog.run(backend=oai_chat)
    assert state.error() is None, state.error()
    jsonschema.validate(json.loads(state["json"]), schema)
    assert re.fullmatch(r"[-+]?\d+", state["legs"])
    assert state["yes"] in ("Yes", "No")


def test_completion_model_select_scores_with_echoed_logprobs(oai_completion):
    @sgl.function
    def prog(s):
        s += "The capital of France is" + sgl.select("city", choices=[" London", " Paris", " Berlin"])
        s += "." + sgl.gen("more", max_tokens=4, temperature=0)

    state = prog.run(backend=oai_completion)
    assert state.error() is None, state.error()
    meta = state.get_meta_info("city")
    assert [[t[2] for t in opt] for opt in meta["input_token_logprobs"]] == [[" London"], [" Paris"], [" Berlin"]]
    scores = meta["normalized_prompt_logprobs"]
    assert state["city"] == [" London", " Paris", " Berlin"][scores.index(max(scores))]


def test_chat_gen_outside_assistant_is_refused(oai_chat):
    @sgl.function
    def prog(s):
        s += "Plain text " + sgl.gen("x", max_tokens=2)

    state = prog.run(backend=oai_chat)
    with pytest.raises(ProgramError, match="right after the assistant role"):
        state["x"]


def test_regex_refused_before_any_request_when_the_server_cannot():
    mock = MockServer().start()
    try:
        backend = sgl.OpenAI("gpt-test", base_url=mock.url + "/v1", api_key="k", structured_extras=False)

        @sgl.function
        def prog(s):
            s += sgl.user("An IP address please.")
            s += sgl.assistant(sgl.gen("ip", regex=r"\d+\.\d+\.\d+\.\d+", max_tokens=16))

        state = prog.run(backend=backend)
        with pytest.raises(ProgramError, match="regex needs regex-constrained decoding"):
            state["ip"]
        assert mock.requests == []
    finally:
        mock.stop()

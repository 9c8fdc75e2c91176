"""The OpenAI API through the official `openai` client."""
from __future__ import annotations

import json

import openai
import pytest

from tests.server.conftest import API_KEY, grammar_available

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def test_models(client, server):
    models = client.models.list().data
    assert len(models) == 1
    card = client.models.retrieve(models[0].id)
    assert card.id == models[0].id
    assert card.model_extra["max_model_len"] > 0


def test_chat_greedy_and_usage(client):
    r = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, temperature=0)
    choice = r.choices[0]
    assert "Paris" in choice.message.content
    assert choice.message.role == "assistant"
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.completion_tokens <= 16
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens
    again = client.chat.completions.create(model="any", messages=QUESTION, max_tokens=16, temperature=0)
    assert again.choices[0].message.content == choice.message.content
    assert again.usage.prompt_tokens_details.cached_tokens > 0  # the prompt is in the radix cache now


def test_chat_stream_equals_non_stream(client):
    msgs = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name three colors."}]
    full = client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=24, temperature=0)
    chunks = list(client.chat.completions.create(model="m", messages=msgs, max_completion_tokens=24, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens


def test_chat_logprobs(client):
    r = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=6, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3
        assert entry.logprob <= 0
        # greedy: the chosen token is the most likely one
        assert entry.logprob == pytest.approx(max(t.logprob for t in entry.top_logprobs), abs=1e-4)
        assert entry.bytes == list(entry.token.encode())


def test_chat_n_and_seed(client):
    kw = dict(model="m", messages=QUESTION, max_tokens=8, temperature=1.0, seed=7, n=3)
    r = client.chat.completions.create(**kw)
    assert [c.index for c in r.choices] == [0, 1, 2]
    single = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=8, temperature=0)
    assert r.usage.prompt_tokens == single.usage.prompt_tokens  # counted once for the n samples
    assert r.usage.completion_tokens <= 3 * 8
    again = client.chat.completions.create(**kw)
    assert [c.message.content for c in again.choices] == [c.message.content for c in r.choices]


def test_logit_bias_forces_token(client):
    r = client.completions.create(model="m", prompt="Hello", max_tokens=3, temperature=0,
                                  logit_bias={"42": 100}, logprobs=0)
    assert r.usage.completion_tokens == 3
    tokens = r.choices[0].logprobs.tokens
    assert len(tokens) == 3 and len(set(tokens)) == 1
    assert r.choices[0].text == tokens[0] * 3


def test_completion_echo_logprobs(client):
    prompt = "The capital of France is"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=4, temperature=0, echo=True, logprobs=2)
    c = r.choices[0]
    assert c.text.startswith(prompt)
    lp = c.logprobs
    assert len(lp.tokens) == r.usage.prompt_tokens + r.usage.completion_tokens
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(x, float) for x in lp.token_logprobs[1:])
    assert all(len(t) <= 2 for t in lp.top_logprobs[1:])
    assert "".join(lp.tokens) == c.text or c.finish_reason == "stop"


def test_completion_batch_n_order(client):
    r = client.completions.create(model="m", prompt=["One, two,", "A, B,"], max_tokens=3, temperature=0, n=2)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples of a prompt agree
    assert r.choices[2].text == r.choices[3].text
    assert r.choices[0].text != r.choices[2].text


def test_completion_stop_and_stream(client):
    prompt = "The capital of France is Paris. The capital of Germany is"
    r = client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0, stop=["."])
    c = r.choices[0]
    assert "." not in c.text
    if c.finish_reason == "stop":
        assert c.model_extra["matched_stop"] == "."
    chunks = list(client.completions.create(model="m", prompt=prompt, max_tokens=20, temperature=0, stop=["."],
                                            stream=True, stream_options={"include_usage": True}))
    assert "".join(ch.choices[0].text for ch in chunks if ch.choices) == c.text
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens


def test_completion_token_ids_prompt_and_extras(client):
    r = client.completions.create(model="m", prompt=[504, 3575, 282], max_tokens=5, temperature=0.7,
                                  extra_body={"top_k": 5, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                                              "min_tokens": 5, "rid": "my-rid-1"})
    assert r.id == "my-rid-1"
    assert r.usage.completion_tokens == 5 and r.usage.prompt_tokens == 3


def test_response_format(client):
    kw = dict(model="m", messages=[{"role": "user", "content": "Give a JSON object with a name."}], temperature=0)
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12}}, "required": ["name"],
              "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": schema}}
    if not grammar_available():
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(response_format=fmt, max_tokens=8, **kw)
        assert err.value.body["param"] == "response_format"
        return
    r = client.chat.completions.create(response_format=fmt, max_tokens=48, **kw)
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content)["name"], str)
    else:  # cut by max_tokens: still a prefix of a schema-valid object
        assert r.choices[0].message.content.lstrip().startswith("{")
    r = client.chat.completions.create(response_format={"type": "json_object"}, max_tokens=16, **kw)
    assert r.choices[0].message.content.lstrip().startswith("{")


def test_response_format_real_world_schema_keywords(client):
    """Draft-04 flags, annotations and vendor keys, oneOf and not pass through unchanged; a
    validation keyword we cannot enforce is a 400 naming keyword and pointer."""
    if not grammar_available():
        pytest.skip("no grammar backend")
    kw = dict(model="m", messages=[{"role": "user", "content": "Give a JSON object."}], temperature=0)
    schema = {"$schema": "http://json-schema.org/draft-04/schema#", "id": "person", "type": "object",
              "properties": {"age": {"type": "integer", "minimum": 0, "exclusiveMinimum": True, "readonly": True},
                             "name": {"oneOf": [{"type": "string", "maxLength": 8}, {"type": "null"}],
                                      "not": {"const": ""}}},
              "required": ["age", "name"], "additionalProperties": False, "x-owner": "team"}
    fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": schema}}
    r = client.chat.completions.create(response_format=fmt, max_tokens=48, **kw)
    if r.choices[0].finish_reason == "stop":
        doc = json.loads(r.choices[0].message.content)
        assert doc["age"] > 0 and (doc["name"] is None or 0 < len(doc["name"]) <= 8)
    tags = {"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": "x"}}}}
    r = client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "t", "schema": tags}},
                                       max_tokens=48, **kw)  # contains: enforced (Lark with %json leaves)
    if r.choices[0].finish_reason == "stop":
        doc = json.loads(r.choices[0].message.content)
        assert not isinstance(doc.get("tags"), list) or "x" in doc["tags"]
    bad = {"type": "object", "properties": {"tags": {"type": "array", "contains": {"const": "x"}, "maxContains": 1}}}
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(response_format={"type": "json_schema", "json_schema": {"name": "b", "schema": bad}},
                                       max_tokens=8, **kw)
    message = err.value.body["message"]
    assert "'contains'" in message and "/properties/tags" in message and "maxContains" in message

"""OpenAI tool calling: `tools` / `tool_choice` through the official `openai` client against the live
server (named and required calls are constrained by a JSON schema), plus the pieces without a server:
validation, output parsing, the call schema, and rendering with a template that does / does not
know tools."""
from __future__ import annotations

import json

import jsonschema
import openai
import pytest

from radixlm.runtime.server.chat import ChatTemplate, normalize_messages
from radixlm.runtime.server.errors import ApiError
from radixlm.runtime.server.openai_protocol import _check_schema
from radixlm.runtime.server.tools import could_be_call, parse_calls, parse_tool_spec
from tests.server.conftest import API_KEY, grammar_available

WEATHER_PARAMS = {"type": "object", "properties": {
    "city": {"type": "string", "maxLength": 16},
    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
    "required": ["city", "unit"], "additionalProperties": False}
TIME_PARAMS = {"type": "object", "properties": {"timezone": {"type": "string", "maxLength": 16}},
               "required": ["timezone"], "additionalProperties": False}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather of a city",
                                            "parameters": WEATHER_PARAMS}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "Current time in a timezone",
                                         "parameters": TIME_PARAMS}}
PARAMS = {"get_weather": WEATHER_PARAMS, "get_time": TIME_PARAMS}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
HISTORY = [*ASK,
           {"role": "assistant", "content": None, "tool_calls": [
               {"id": "call_abc123", "type": "function",
                "function": {"name": "get_weather", "arguments": '{"city": "Paris", "unit": "celsius"}'}}]},
           {"role": "tool", "tool_call_id": "call_abc123", "content": '{"temperature": 22, "sky": "sunny"}'}]
NAMED = {"type": "function", "function": {"name": "get_weather"}}
CALL_TOKENS = 48  # a {"name": ..., "arguments": {...}} object here takes ~30 tokens

needs_grammar = pytest.mark.skipif(not grammar_available(), reason="no grammar runtime in this build")


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, max_retries=0, timeout=180)


def _valid_call(call) -> dict:
    assert call.type == "function" and call.id.startswith("call_")
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, PARAMS[call.function.name])
    return args


# ------------------------------------------------------------------------------------ live server
@needs_grammar
def test_named_tool_choice(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED,
                                       max_tokens=CALL_TOKENS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _valid_call(choice.message.tool_calls[0])
    assert r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


@needs_grammar
def test_required_picks_one_of_two(client):
    msgs = [{"role": "user", "content": "What time is it in Tokyo?"}]
    r = client.chat.completions.create(model="m", messages=msgs, tools=[WEATHER, TIME], tool_choice="required",
                                       max_tokens=CALL_TOKENS, temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert len(choice.message.tool_calls) == 1
    assert choice.message.tool_calls[0].function.name in PARAMS
    _valid_call(choice.message.tool_calls[0])


@needs_grammar
def test_stream_equals_non_stream(client):
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], tool_choice=NAMED, max_tokens=CALL_TOKENS,
              temperature=0)
    full = client.chat.completions.create(**kw)
    chunks = list(client.chat.completions.create(**kw, stream=True, stream_options={"include_usage": True}))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].role == "assistant"
    assert not "".join(d.content or "" for d in deltas)
    streamed = [tc for d in deltas for tc in (d.tool_calls or [])]
    assert len(streamed) == 1 and streamed[0].index == 0 and streamed[0].id.startswith("call_")
    want = full.choices[0].message.tool_calls[0].function
    assert (streamed[0].function.name, streamed[0].function.arguments) == (want.name, want.arguments)
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == ["tool_calls"]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


@needs_grammar
def test_auto_parses_a_call(client):
    """"auto" generates freely and parses; a response_format shaped like a call makes the text one,
    held back while streaming and sent as a tool call."""
    schema = _spec({"tools": [WEATHER, TIME], "tool_choice": NAMED}).schema()
    kw = dict(model="m", messages=ASK, tools=[WEATHER, TIME], max_tokens=CALL_TOKENS, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "call", "schema": schema}})
    full = client.chat.completions.create(**kw)
    choice = full.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    _valid_call(choice.message.tool_calls[0])
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    assert deltas[0].content == "" and not "".join(d.content or "" for d in deltas)
    streamed = [(tc.function.name, tc.function.arguments) for d in deltas for tc in (d.tool_calls or [])]
    assert streamed == [(c.function.name, c.function.arguments) for c in choice.message.tool_calls]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_tool_result_conversation(client):
    """An assistant tool_calls message and its role "tool" result render and get an answer ("auto":
    text, or a call if the model makes one); streaming gives the same."""
    kw = dict(model="m", messages=HISTORY, tools=[WEATHER], max_tokens=24, temperature=0)
    r = client.chat.completions.create(**kw)
    choice = r.choices[0]
    short = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens > short.usage.prompt_tokens + 20  # the call and its result are in the prompt
    chunks = list(client.chat.completions.create(**kw, stream=True))
    deltas = [c.choices[0].delta for c in chunks if c.choices]
    if choice.message.tool_calls:
        assert choice.finish_reason == "tool_calls"
        _valid_call(choice.message.tool_calls[0])
        streamed = [tc.function.arguments for d in deltas for tc in (d.tool_calls or [])]
        assert streamed == [c.function.arguments for c in choice.message.tool_calls]
    else:
        assert choice.message.content and choice.finish_reason in ("stop", "length")
        assert "".join(d.content or "" for d in deltas) == choice.message.content
    assert chunks[-1].choices[0].finish_reason == choice.finish_reason


def test_tool_choice_none_is_plain_content(client):
    r = client.chat.completions.create(model="m", messages=ASK, tools=[WEATHER], tool_choice="none", max_tokens=8,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.message.tool_calls is None and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    plain = client.chat.completions.create(model="m", messages=ASK, max_tokens=8, temperature=0)
    assert choice.message.content == plain.choices[0].message.content  # "none": tools are not shown at all


BAD = [
    ({"tools": {"type": "function"}}, "tools"),
    ({"tools": [WEATHER, {"type": "function", "function": {"description": "x"}}]}, "tools[1].function.name"),
    ({"tools": [{"type": "function", "function": {"name": "bad name"}}]}, "tools[0].function.name"),
    ({"tools": [WEATHER, WEATHER]}, "tools[1].function.name"),
    ({"tools": [{"type": "retrieval", "function": {"name": "f"}}]}, "tools[0].type"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": 5}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}]},
     "tools[0].function.parameters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "tools[0].function.parameters"),
    ({"tools": [WEATHER], "tool_choice": "always"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function"}}, "tool_choice.function"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [*ASK, {"role": "tool", "tool_call_id": "call_x", "content": "1"}]}, "messages[1].tool_call_id"),
    ({"messages": [*HISTORY[:2], {"role": "tool", "content": "1"}]}, "messages[2].tool_call_id"),
    ({"messages": [*ASK, {"role": "assistant", "tool_calls": [{"id": "c1", "function": {"arguments": "{}"}}]}]},
     "messages[1].tool_calls[0].function.name"),
    ({"messages": [*ASK, {"role": "assistant", "content": None, "tool_calls": "x"}]}, "messages[1].tool_calls"),
]


@pytest.mark.parametrize("extra,param", BAD, ids=[p for _, p in BAD])
def test_bad_tools_are_400(client, extra, param):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(**{"model": "m", "messages": ASK, "max_tokens": 4, **extra})
    assert err.value.status_code == 400
    assert err.value.body["param"] == param, err.value.body


# ------------------------------------------------------------------------------------ no server
def _spec(body):
    return parse_tool_spec(body, _check_schema)


def test_parse_calls_formats():
    spec = _spec({"tools": [WEATHER, TIME]})
    call = '{"name": "get_time", "arguments": {"timezone": "UTC"}}'
    want = [{"name": "get_time", "arguments": {"timezone": "UTC"}}]
    for text in (call, f"  {call}\n", f"<tool_call>\n{call}\n</tool_call>", f"<tool_call>{call}",
                 f"```json\n{call}\n```", f"```\n{call}\n```", call.replace("arguments", "parameters")):
        assert parse_calls(text, spec) == want, text
    assert parse_calls(f"{call}\n{call}", spec) == want * 2
    assert parse_calls(f"<tool_call>{call}</tool_call>\n<tool_call>{call}</tool_call>", spec) == want * 2
    for text in ("It is sunny.", '{"name": "unknown", "arguments": {}}', '{"name": "get_time", "arguments": "x"}',
                 '{"name": "get_time"', f"Sure: {call}", f"{call} done", '{"temperature": 22}', ""):
        assert parse_calls(text, spec) is None, text
    named = _spec({"tools": [WEATHER, TIME], "tool_choice": NAMED})
    assert parse_calls(call, named) is None  # only the named function may be called


def test_could_be_call():
    for text in ("", "  ", "{", ' {"na', "<", "<tool_", "<tool_call>{", "`", "```js", "```json\n{", "```\n"):
        assert could_be_call(text), text
    for text in ("Hi", "<b>", "```python", "```json\nx", "[1]"):
        assert not could_be_call(text), text


def test_schema_named_required_and_defs():
    named = _spec({"tools": [WEATHER, TIME], "tool_choice": NAMED}).schema()
    assert named == {"type": "object", "properties": {"name": {"const": "get_weather"}, "arguments": WEATHER_PARAMS},
                     "required": ["name", "arguments"], "additionalProperties": False}
    both = _spec({"tools": [WEATHER, TIME], "tool_choice": "required"}).schema()
    validator = jsonschema.Draft202012Validator(both)
    assert validator.is_valid({"name": "get_time", "arguments": {"timezone": "UTC"}})
    assert not validator.is_valid({"name": "get_time", "arguments": {"city": "Paris", "unit": "celsius"}})
    assert not validator.is_valid({"name": "other", "arguments": {}})
    # pydantic-style $defs move to the root, renamed per tool, refs rewritten
    nested = {"type": "function", "function": {"name": "book", "parameters": {
        "type": "object", "properties": {"guest": {"$ref": "#/$defs/Person"}}, "required": ["guest"],
        "$defs": {"Person": {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}}}}}
    schema = _spec({"tools": [nested, TIME], "tool_choice": "required"}).schema()
    assert set(schema["$defs"]) == {"book__Person"}
    validator = jsonschema.Draft202012Validator(schema)
    assert validator.is_valid({"name": "book", "arguments": {"guest": {"name": "Ann"}}})
    assert not validator.is_valid({"name": "book", "arguments": {"guest": {}}})
    # no parameters: the function takes none
    bare = _spec({"tools": [{"type": "function", "function": {"name": "ping"}}], "tool_choice": "required"})
    assert jsonschema.Draft202012Validator(bare.schema()).is_valid({"name": "ping", "arguments": {}})
    assert not jsonschema.Draft202012Validator(bare.schema()).is_valid({"name": "ping", "arguments": {"x": 1}})


def test_spec_defaults():
    assert _spec({}) is None and _spec({"tools": [], "tool_choice": "none"}) is None
    assert _spec({"tools": [WEATHER]}).choice == "auto"
    with pytest.raises(ApiError) as err:
        _spec({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": 3}}})
    assert err.value.param == "tool_choice.function.name"


@pytest.fixture(scope="module")
def tokenizer():
    from radixlm.runtime.model_source import resolve_model_path
    from radixlm.runtime.scheduler_process import load_tokenizer

    return load_tokenizer(resolve_model_path(None, progress=False))


def test_render_fallback_for_a_template_without_tools(tokenizer):
    """The default model's template ignores tools and tool_calls: they go in as text."""
    chat = ChatTemplate(tokenizer, None)
    support = chat.tool_support()
    assert not support.tools and not support.tool_calls
    text = chat.render(normalize_messages(HISTORY), tools=_spec({"tools": [WEATHER, TIME]}))
    assert text.index("get_time") < text.index("What is the weather")  # the tool list comes first (system)
    assert '"name": <function name>, "arguments"' in text
    assert '{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}' in text
    assert '{"temperature": 22, "sky": "sunny"}' in text
    none = chat.render(normalize_messages(ASK), tools=_spec({"tools": [WEATHER], "tool_choice": "none"}))
    assert none == chat.render(normalize_messages(ASK))


TOOL_TEMPLATE = (
    "{% if tools %}<tools>{% for t in tools %}{{ t.function.name }};{% endfor %}</tools>\n{% endif %}"
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.id }} {{ c.function.name }} {{ c.function.arguments | tojson }}]"
    "{% endfor %}{% if m.role == 'tool' %}(for {{ m.tool_call_id }}){% endif %}</{{ m.role }}>\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}")
PLAIN_TEMPLATE = ("{% for m in messages %}{% if m.role not in ['user', 'assistant', 'system'] %}"
                  "{{ raise_exception('bad role') }}{% endif %}<{{ m.role }}>{{ m.content }}\n{% endfor %}")


def test_render_with_a_template_that_knows_tools(tokenizer):
    chat = ChatTemplate(tokenizer, TOOL_TEMPLATE)
    support = chat.tool_support()
    assert support.tools and support.tool_calls and support.tool_role
    text = chat.render(normalize_messages(HISTORY), tools=_spec({"tools": [WEATHER, TIME]}))
    assert text.startswith("<tools>get_weather;get_time;</tools>")
    assert '[call call_abc123 get_weather {"city": "Paris", "unit": "celsius"}]' in text  # arguments as an object
    assert "(for call_abc123)" in text
    assert "You can call" not in text


def test_render_tool_results_as_user_text_when_the_role_is_refused(tokenizer):
    chat = ChatTemplate(tokenizer, PLAIN_TEMPLATE)
    assert not chat.tool_support().tool_role
    msgs = normalize_messages([*HISTORY, {"role": "tool", "tool_call_id": "call_abc123", "content": "second"}])
    text = chat.render(msgs, tools=_spec({"tools": [WEATHER]}))
    assert text.startswith("<system>You can call")
    assert text.count("<user>") == 2  # the question + both results in one user message
    assert "Result of the function get_weather (call call_abc123):\nsecond" in text

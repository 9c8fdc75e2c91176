"""Hostile requests found by the soak's catalogue (benchmarks/soak_hostile.py, trust5, 2026-12-05): each was a
500 or a 400 that did not name the field. The HTTP layer runs against a fake TokenizerManager (no model);
the last test sends the whole catalogue to the live test server."""
from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from radixlm.runtime.field_checks import MAX_DEPTH, find_too_deep
from radixlm.runtime.generate_request import parse_generate_request
from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.sampling_params import InvalidRequestError
from radixlm.runtime.sequence_output import SequenceDelta
from radixlm.runtime.server.app import build_app, make_context
from radixlm.runtime.server.tools import ToolSpec, arguments_value, parse_calls, parse_tool_spec
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer_manager import TokenizerManager

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "benchmarks"))
from soak_hostile import hostile_cases  # noqa: E402

MSG = [{"role": "user", "content": "hi"}]
TEMPLATE = "{% for m in messages %}{{ m.content }}{% endfor %}"


def nested(levels: int, leaf: object = 1) -> bytes:
    return b'{"a": ' * levels + json.dumps(leaf).encode() + b"}" * levels


class GrammarFailingTM:
    """Fails every constrained request as the scheduler does when its grammar does not compile: a 400 whose
    message starts with the sampling field (`json_schema: ...`), or the grammar library's own message."""

    def __init__(self, message: str) -> None:
        self.message = message
        self.info = SimpleNamespace(max_running_requests=8, context_len=256, vocab_size=1000, architecture="Fake",
                                    max_total_tokens=2048, device="cpu", dtype="float32")
        self.tokenizer = SimpleNamespace(chat_template=None, encode=lambda t, add_special_tokens=False: [1] * len(t),
                                         decode=lambda ids: "x" * len(ids), apply_chat_template=self.render)
        self.model_dir = "/fake/model"
        self.lora_adapters: dict[str, str] = {}
        self.dead = None

    @staticmethod
    def render(messages, tokenize=False, chat_template=None, **kwargs) -> str:
        return "".join(str(m.get("content")) for m in messages) + json.dumps(kwargs.get("tools"))

    async def generate(self, req):
        for i, item in enumerate(req.items):
            reason = FinishReason.abort(self.message, status_code=400) if item.params.constraint else FinishReason.stop(2)
            yield [SequenceDelta(index=i, rid=item.rid, text="", text_start=0, output_ids=[], prompt_tokens=3,
                                 completion_tokens=0, cached_tokens=0, finish=reason)]


def post_all(message: str, calls: list[tuple[str, object]]) -> list[tuple[int, dict]]:
    """(status, error) of each (path, body) against the app on a GrammarFailingTM; raw bodies as bytes."""
    async def go() -> list[tuple[int, dict]]:
        ctx = make_context(ServerArgs(), GrammarFailingTM(message), TEMPLATE)
        client = TestClient(TestServer(build_app(ctx)))
        await client.start_server()
        out = []
        try:
            for path, body in calls:
                kw = {"data": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {
                    "json": body}
                r = await client.post(path, **kw)
                text = await r.text()
                if text.startswith("data: "):  # a stream: its error event
                    events = [json.loads(line[6:]) for line in text.splitlines()
                              if line.startswith("data: {")]
                    out.append((r.status, next((e["error"] for e in events if "error" in e), {})))
                else:
                    out.append((r.status, json.loads(text).get("error", {}) if text else {}))
        finally:
            await client.close()
        return out
    return asyncio.run(go())


def test_deep_nesting_is_a_400_naming_the_field():
    """Past the JSON parser's ~1,000 levels it raised RecursionError (a 500); a tool schema ~100 objects deep
    passed the parser and exhausted the metaschema check's stack (a 500)."""
    tool = json.dumps({"messages": MSG, "max_tokens": 2, "tools": [{"type": "function", "function": {
        "name": "f", "parameters": "@"}}]}).encode().replace(b'"@"', nested(3000))
    deep_schema: dict = {"type": "string"}
    for _ in range(150):
        deep_schema = {"type": "object", "properties": {"a": deep_schema}}
    results = post_all("unused", [
        ("/generate", b"[" * 100_000 + b"]" * 100_000),
        ("/generate", b'{"text": "hi", "x": ' + b"[" * 50_000 + b"]" * 50_000 + b"}"),
        ("/v1/chat/completions", tool),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "tools": [{"type": "function", "function": {
            "name": "f", "parameters": deep_schema}}]}),
        ("/generate", b'{"text": "hi", "unknown_field": ' + nested(MAX_DEPTH) + b"}"),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "json_schema": json.dumps(deep_schema)}),
    ])
    params = [(status, err.get("param")) for status, err in results]
    assert params[:3] == [(400, "body")] * 3, results  # (past the parser's own limit: where is not known)
    assert params[3][0] == 400 and params[3][1].startswith("tools[0].function.parameters.properties.a"), results
    assert params[4][0] == 400 and params[4][1].startswith("unknown_field.a.a"), results
    assert params[5][0] == 400 and params[5][1].startswith("json_schema.properties.a.properties.a."), results
    assert len(params[5][1]) == 120 and params[5][1].endswith("..."), results
    assert "nested more than 128 levels" in results[4][1]["message"]


def test_depth_bound_counts_containers():
    assert find_too_deep(json.loads(nested(MAX_DEPTH))) is None
    assert find_too_deep(json.loads(nested(MAX_DEPTH + 1))) is not None
    assert find_too_deep({"ids": [list(range(1000))] * 3}) is None  # numbers-only lists are one level
    assert find_too_deep([[[1]]], limit=2) == "[0][0]"


def test_regex_nested_past_the_compiler_is_a_400():
    """re.compile of 5,000 nested groups raised RecursionError in the chat parser (a 500)."""
    [(status, err)] = post_all("unused", [("/v1/chat/completions", {"messages": MSG, "max_tokens": 2,
                                                                     "regex": "(" * 5000 + "a" + ")" * 5000})])
    assert (status, err["param"]) == (400, "regex"), err


def test_errors_name_the_field_as_sent():
    results = post_all("unused", [
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "stream": True,
                                  "stream_options": {"include_usage": "yes"}}),
        ("/generate", {"text": "hi", "input_ids": [1, 2]}),
    ])
    assert [(s, e["param"]) for s, e in results] == [(400, "stream_options.include_usage"), (400, "input_ids")], results
    assert results[0][1]["message"].startswith("stream_options.include_usage: must be a boolean")


@pytest.mark.parametrize("message,rest", [("json_schema: Unsatisfiable schema: anyOf is empty",
                                           "Unsatisfiable schema: anyOf is empty"),
                                          ("unsupported JSON-schema keyword '$ref' at #", None)])
def test_a_grammar_failure_names_where_the_constraint_came_from(message, rest):
    """The scheduler's 400 for a grammar that does not compile came back with param null; now it names the
    field the client sent: sampling_params(.[i]).json_schema, response_format, tool_choice, json_schema."""
    schema = {"type": "object"}
    tool = {"type": "function", "function": {"name": "f", "parameters": schema}}
    calls = [
        ("/generate", {"text": "hi", "sampling_params": {"json_schema": json.dumps(schema)}}),
        ("/generate", {"text": "hi", "stream": True, "sampling_params": {"json_schema": json.dumps(schema)}}),
        ("/generate", {"text": ["a", "b"], "sampling_params": [{}, {"json_schema": json.dumps(schema)}]}),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "response_format": {
            "type": "json_schema", "json_schema": {"name": "x", "schema": schema}}}),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "stream": True, "response_format": {
            "type": "json_object"}}),
        ("/v1/chat/completions", {"messages": MSG, "max_tokens": 2, "tools": [tool], "tool_choice": "required"}),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2, "json_schema": schema}),
    ]
    want = ["sampling_params.json_schema", "sampling_params.json_schema", "sampling_params[1].json_schema",
            "response_format", "response_format", "tool_choice", "json_schema"]
    results = post_all(message, calls)
    assert [(s, e.get("param")) for s, e in results] == [(400, p) for p in want], results
    for (_, err), param in zip(results, want):
        assert err["message"] == f"{param}: {rest or message}", err


def test_a_scheduler_400_without_a_field_keeps_its_message():
    """lora_path / stop_regex messages are named by their own field; other 400s are passed on as they are."""
    from radixlm.runtime.server.generation import scheduler_error

    item = parse_generate_request({"text": ["a", "b"], "lora_path": [None, "x"],
                                   "sampling_params": {"stop_regex": "a"}}).items[1]
    err = scheduler_error(item, 400, "lora_path: unknown LoRA adapter 'x'")
    assert (err.param, err.message) == ("lora_path[1]", "lora_path[1]: unknown LoRA adapter 'x'")
    err = scheduler_error(item, 400, "stop_regex: the search ran past its budget")
    assert err.param == "sampling_params.stop_regex"
    assert scheduler_error(item, 400, "something else").param is None
    assert scheduler_error(item, 500, "json_schema: boom").param is None


def test_validate_length_names_the_prompts_max_new_tokens():
    """`sampling_params[1].max_new_tokens`, not `max_new_tokens` (no such top-level field in /generate)."""
    req = parse_generate_request({"text": ["a", "b"], "sampling_params": [{"max_new_tokens": 1},
                                                                        {"max_new_tokens": 300}]})
    tm = SimpleNamespace(info=SimpleNamespace(context_len=256, max_total_tokens=4096),
                         args=SimpleNamespace(disable_radix_cache=False))
    TokenizerManager.validate_length(tm, [1, 2], req.items[0])
    with pytest.raises(InvalidRequestError) as exc:
        TokenizerManager.validate_length(tm, [1, 2], req.items[1])
    assert exc.value.field == "sampling_params[1].max_new_tokens"


def test_tool_calls_nested_past_the_parser_are_text():
    """A model's output (or a client's arguments string) nested past the parser's ~1,000 levels raised
    RecursionError after the generation (a 500); it is plain text, as any other non-call."""
    spec = parse_tool_spec({"tools": [{"type": "function", "function": {"name": "f"}}]}, lambda schema, param: None)
    assert isinstance(spec, ToolSpec)
    deep = "[" * 5000 + "]" * 5000
    assert parse_calls('{"name": "f", "arguments": ' + deep + "}", spec) is None
    assert parse_calls(deep, spec) is None
    assert arguments_value(deep) == deep


def test_catalogue_against_the_live_server(server):
    """Every case of the soak's hostile catalogue keeps its contract on the live test server: no 5xx, a 4xx
    naming its field where one is due, valid extremes served; then the KV pool is whole."""
    import aiohttp

    async def go() -> list[str]:
        bad: list[str] = []
        sem = asyncio.Semaphore(4)
        headers = {**server.headers, "Content-Type": "application/json"}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=600)) as s:
            async def one(case) -> None:
                async with sem:
                    async with s.post(server.url + case.path, data=case.raw) as r:
                        why = case.check(r.status, await r.text())
                if why is not None:
                    bad.append(f"{case.path} {case.raw[:160]!r}: {why}")
            await asyncio.gather(*(one(c) for c in hostile_cases()))
        return bad

    assert server.run(go()) == []
    info = server.run(server.wait_kv_idle(timeout=120))
    assert info["kv_free_tokens"] + info["kv_evictable_tokens"] == info["max_total_num_tokens"], info


def test_a_large_body_is_parsed_in_the_child_process():
    """A body over PROCESS_BYTES is parsed (and checked) in the front's child process, not on a thread of the
    event loop's process, where json.loads holds the GIL throughout; its 400s come back as they are; a child
    killed while idle is replaced."""
    import os
    import signal
    import time

    from radixlm.runtime.front_work import PROCESS_BYTES, FrontWork
    from radixlm.runtime.server.errors import ApiError

    ids = list(range(PROCESS_BYTES // 6 + 10))
    raw = json.dumps({"input_ids": ids, "x": "é"}).encode()
    assert len(raw) > PROCESS_BYTES
    work = FrontWork()

    async def parse(body: bytes) -> object:
        try:
            return await work.parse(body)
        except ApiError as exc:
            return exc.status, exc.param

    try:
        work.warm()  # (the server starts it at start-up)
        assert work.child is not None
        assert asyncio.run(parse(raw)) == {"input_ids": ids, "x": "é"}
        pids = list(work.child._processes)
        assert len(pids) == 1 and pids[0] != os.getpid()
        assert asyncio.run(parse(raw[:-1])) == (400, "body")
        assert asyncio.run(parse(raw[:-1] + b', "y": "\\ud800"}')) == (400, "y")
        assert asyncio.run(parse(raw[:-1] + b', "z": ' + nested(MAX_DEPTH + 1) + b"}"))[1].startswith("z.a.a")
        assert asyncio.run(parse(json.dumps({"x": "small"}).encode())) == {"x": "small"}
        assert list(work.child._processes) == pids  # (one child, kept)

        first = work.child
        os.kill(pids[0], signal.SIGKILL)
        deadline = time.monotonic() + 10
        while not first._broken and time.monotonic() < deadline:
            time.sleep(0.05)
        assert asyncio.run(parse(raw)) == {"input_ids": ids, "x": "é"}  # a new child
        assert work.child is not first and list(work.child._processes) != pids
    finally:
        work.shutdown()
    assert work.child is None


def test_an_over_context_prompt_is_refused_before_its_ids_are_walked():
    """/generate passes the context length to the parser: a prompt of input_ids that long is a 400 on its length
    at once (its last id, outside the vocabulary, is never reached); within the context the ids are checked."""
    body = {"input_ids": [[1, 2], [1] * 299 + [5000]]}
    with pytest.raises(InvalidRequestError) as exc:
        parse_generate_request(body, 1000, 256)
    assert exc.value.field == "input_ids[1]" and "the prompt has 300 tokens; this model's context is 256" in str(exc.value)
    with pytest.raises(InvalidRequestError) as exc:
        parse_generate_request({"input_ids": [1] * 9 + [5000]}, 1000, 256)
    assert "outside the vocabulary" in str(exc.value)

"""A large request's CPU work (tokenizing, chat templates, tool schemas, parsing) runs off the HTTP process's
event loop (runtime/front_work.py): while a tokenizer call of a long prompt is held on purpose, the same loop
answers other clients; a small request is handled inline. Each test fails where that work ran on the loop
(the held call would wait for an answer the loop could not give)."""
from __future__ import annotations

import asyncio
import threading
from types import SimpleNamespace

import pytest
from aiohttp.test_utils import TestClient, TestServer

from radixlm.runtime.front_work import INLINE_BYTES, FrontWork
from radixlm.runtime.generate_request import parse_generate_request
from radixlm.runtime.server.app import build_app, make_context
from radixlm.runtime.server.errors import ApiError
from radixlm.runtime.server.openai_protocol import _schema_problem
from radixlm.runtime.server.tools import MAX_TOOLS, parse_tool_spec
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer_manager import TokenizerManager

LONG = "word " * (INLINE_BYTES // 2)  # past INLINE_BYTES


class HeldTokenizer:
    """encode / decode / the chat template wait until `release` is set (by a request the loop must answer
    meanwhile), recording the thread they ran on."""

    chat_template = "{{ messages }}"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.threads: list[str] = []
        self.released: list[bool] = []

    def _hold(self) -> None:
        self.threads.append(threading.current_thread().name)
        self.released.append(self.release.wait(10))

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        if len(text) > INLINE_BYTES:
            self._hold()
        return [1] * min(len(text), 8)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        self._hold()
        return "x" * len(ids)

    def apply_chat_template(self, messages, tokenize=False, chat_template=None, **kw) -> str:
        self._hold()
        return "rendered"


def _fake_tm(tokenizer: HeldTokenizer) -> SimpleNamespace:
    info = SimpleNamespace(max_running_requests=8, context_len=256, vocab_size=1000, architecture="Fake",
                           max_total_tokens=2048, device="cpu", dtype="float32")
    return SimpleNamespace(info=info, tokenizer=tokenizer, model_dir="/fake", dead=None, work=FrontWork())


@pytest.mark.parametrize("path,body", [
    ("/tokenize", {"prompt": LONG}),
    ("/v1/tokenize", {"messages": [{"role": "user", "content": LONG}]}),
    ("/detokenize", {"tokens": [5] * (INLINE_BYTES // 2)}),
])
def test_a_large_request_is_tokenized_while_the_loop_answers_others(path: str, body: dict) -> None:
    async def go() -> None:
        tok = HeldTokenizer()
        client = TestClient(TestServer(build_app(make_context(ServerArgs(), _fake_tm(tok)))))
        await client.start_server()
        try:
            big = asyncio.ensure_future(client.post(path, json=body))
            while not tok.threads:  # the held call has started
                await asyncio.sleep(0.01)
            for _ in range(3):
                r = await client.get("/health")  # answered while the held call waits
                assert r.status == 200
            tok.release.set()
            r = await big
            assert r.status == 200, await r.text()
        finally:
            await client.close()
        assert tok.released == [True] and tok.threads[0].startswith("front-work")
    asyncio.run(go())


def test_a_small_request_stays_inline() -> None:
    seen: list[str] = []

    def where() -> str:
        seen.append(threading.current_thread().name)
        return "done"

    async def go() -> None:
        work = FrontWork()
        assert await work.run(INLINE_BYTES, where) == "done"
        assert await work.run(INLINE_BYTES + 1, where) == "done"
        with pytest.raises(ZeroDivisionError):  # errors (400s) come back as raised
            await work.run(INLINE_BYTES + 1, lambda: 1 / 0)
        work.shutdown()
    asyncio.run(go())
    assert seen[0] == threading.current_thread().name and seen[1].startswith("front-work")


def test_the_tokenizer_manager_tokenizes_a_long_prompt_off_the_loop() -> None:
    """TokenizerManager.generate: the prompt's tokenization runs on a front-work thread while the loop runs
    other coroutines; the request is sent once it is tokenized."""
    tok = HeldTokenizer()
    sent: list[object] = []
    replica = SimpleNamespace(index=0, open_sequences=0)
    tm = object.__new__(TokenizerManager)
    tm.tokenizer, tm.states, tm.work, tm.lora_adapters, tm.request_log = tok, {}, FrontWork(), {}, None
    tm.args = SimpleNamespace(disable_radix_cache=False)

    class Replicas:  # one replica that records what is sent
        info = SimpleNamespace(context_len=1 << 20, max_total_tokens=1 << 20)
        dead = None

        def route(self, ids, key):
            return replica

        def send(self, msgs, r):
            sent.append(msgs)

        def __getitem__(self, i):
            return replica

    tm.replicas = Replicas()
    req = parse_generate_request({"text": LONG, "sampling_params": {"max_new_tokens": 1}}, 1000)

    async def go() -> None:
        gen = tm.generate(req)
        first = asyncio.ensure_future(anext(gen))
        while not tok.threads and not first.done():
            await asyncio.sleep(0.01)
        assert not first.done(), first.exception()
        assert not sent  # still tokenizing, and the loop runs this
        tok.release.set()
        while not sent and not first.done():
            await asyncio.sleep(0.01)
        assert not first.done(), first.exception()
        first.cancel()
    asyncio.run(go())
    assert tok.released == [True] and tok.threads[0].startswith("front-work")
    assert sent[0][0].input_ids == [1] * 8


def test_tools_beyond_the_cap_are_refused_and_schema_checks_are_remembered() -> None:
    tool = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
    body = {"tools": [{**tool, "function": {**tool["function"], "name": f"f{i}"}} for i in range(MAX_TOOLS + 1)]}
    with pytest.raises(ApiError) as err:
        parse_tool_spec(body, lambda s, p: None)
    assert err.value.param == "tools" and str(MAX_TOOLS) in err.value.message
    assert parse_tool_spec({"tools": body["tools"][:MAX_TOOLS]}, lambda s, p: None) is not None
    _schema_problem.cache_clear()
    assert _schema_problem('{"type": "object"}') is None
    assert _schema_problem('{"type": 5}') is not None
    assert _schema_problem('{"type": "object"}') is None
    assert _schema_problem.cache_info().hits == 1

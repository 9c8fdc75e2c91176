"""The HTTP layer against a fake TokenizerManager (no model, no subprocess): routing, error statuses
from the runtime, and that a client hanging up closes the runtime's generator (= abort)."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import aiohttp
from aiohttp.test_utils import TestClient, TestServer

from radixlm.runtime.io_struct import FinishReason
from radixlm.runtime.sequence_output import SequenceDelta
from radixlm.runtime.server.app import build_app, make_context
from radixlm.runtime.server_args import ServerArgs


class FakeTM:
    def __init__(self) -> None:
        self.info = SimpleNamespace(max_running_requests=8, context_len=256, vocab_size=1000, architecture="Fake",
                                    max_total_tokens=2048, device="cpu", dtype="float32")
        self.tokenizer = SimpleNamespace(chat_template=None, encode=lambda t, add_special_tokens=False: [1] * len(t))
        self.model_dir = "/fake/model"
        self.dead = None
        self.closed: list[str] = []

    async def generate(self, req):
        item = req.items[0]

        def out(i, reason=None):
            return SequenceDelta(index=0, rid=item.rid, text="x" if i else "", text_start=max(i - 1, 0),
                                 output_ids=[7] if i else [], prompt_tokens=3, completion_tokens=i, cached_tokens=0,
                                 finish=reason)

        try:
            if item.text == "bad grammar":
                yield [out(0, FinishReason.abort("the grammar does not compile", status_code=400))]
                return
            for i in range(1, 10_000):
                await asyncio.sleep(0.005)
                yield [out(i)]
        finally:
            self.closed.append(item.rid)


async def _client(**args) -> tuple[TestClient, FakeTM]:
    tm = FakeTM()
    ctx = make_context(ServerArgs(**args), tm)
    client = TestClient(TestServer(build_app(ctx)))
    await client.start_server()
    return client, tm


def test_metrics_route_only_when_enabled():
    async def go():
        client, _ = await _client()
        try:
            r = await client.get("/metrics")
            assert r.status == 404
            assert (await r.json())["error"]["code"] == 404
        finally:
            await client.close()
    asyncio.run(go())


def test_runtime_error_status_becomes_http_error():
    async def go():
        client, _ = await _client()
        try:
            for stream in (False, True):
                r = await client.post("/generate", json={"text": "bad grammar", "stream": stream})
                assert r.status == 400
                assert "does not compile" in (await r.json())["error"]["message"]
        finally:
            await client.close()
    asyncio.run(go())


def test_hang_up_closes_the_runtime_generator():
    async def go():
        client, tm = await _client()
        try:
            for stream in (True, False):
                rid = f"gone-{stream}"
                body = {"text": "hello", "rid": rid, "stream": stream}
                url = str(client.make_url("/generate"))
                async with aiohttp.ClientSession() as s:
                    try:
                        async with s.post(url, json=body, timeout=aiohttp.ClientTimeout(total=0.3)) as r:
                            async for _ in r.content:
                                pass
                    except asyncio.TimeoutError:
                        pass
                for _ in range(200):  # bounded wait for the server to notice
                    if rid in tm.closed:
                        break
                    await asyncio.sleep(0.01)
                assert rid in tm.closed
        finally:
            await client.close()
    asyncio.run(go())


def test_playground_page_is_self_contained():
    """The page is served without the API key, and names no other origin: no CDN, no fonts, no
    scripts from elsewhere (its CSP forbids them too). The browser test drives it for real."""
    import re

    async def go():
        client, _ = await _client(api_key="k")
        try:
            for path in ("/", "/playground"):
                r = await client.get(path)
                assert r.status == 200 and r.content_type == "text/html"
                page = await r.text()
                assert "<title>radixlm playground</title>" in page
                assert "connect-src 'self'" in r.headers["Content-Security-Policy"]
            assert not re.findall(r"(?:https?:)?//[a-z0-9.-]+\.[a-z]{2,}", page), "the page references another origin"
            assert (await client.get("/v1/models")).status == 401
        finally:
            await client.close()
    asyncio.run(go())

"""SGLang's native API over HTTP (aiohttp client)."""
from __future__ import annotations

import asyncio
import json

import aiohttp

from tests.server.conftest import grammar_available

PROMPT = "The capital of France is"


def test_generate_shapes(server):
    async def go():
        st, one = await server.post("/generate", {"text": PROMPT, "sampling_params": {"max_new_tokens": 6,
                                                                                      "temperature": 0}})
        assert st == 200 and set(one) == {"text", "output_ids", "meta_info"}
        meta = one["meta_info"]
        assert meta["completion_tokens"] == len(one["output_ids"]) <= 6
        assert meta["finish_reason"]["type"] in ("stop", "length") and meta["e2e_latency"] > 0
        st, batch = await server.post("/generate", {"text": [PROMPT, "1, 2, 3,"], "rid": "b",
                                                    "sampling_params": {"max_new_tokens": 3, "temperature": 0}})
        assert st == 200 and isinstance(batch, list) and [o["meta_info"]["id"] for o in batch] == ["b_0", "b_1"]
        assert batch[0]["text"] == one["text"][: len(batch[0]["text"])]
        st, ids = await server.post("/generate", {"input_ids": [[504, 3575], [504]],
                                                  "sampling_params": [{"max_new_tokens": 2}, {"max_new_tokens": 1}]})
        assert st == 200 and [o["meta_info"]["completion_tokens"] for o in ids] == [2, 1]
        st, n = await server.post("/generate", {"text": PROMPT, "rid": "nn", "sampling_params": {"n": 2,
                                                                                                "max_new_tokens": 2}})
        assert st == 200 and [o["meta_info"]["id"] for o in n] == ["nn-0", "nn-1"]
    server.run(go())


def test_prefill_only_logprobs(server):
    async def go():
        body = {"text": [PROMPT + " Paris", PROMPT + " London"], "sampling_params": {"max_new_tokens": 0,
                                                                                     "temperature": 0},
                "return_logprob": True, "logprob_start_len": 0, "return_text_in_logprobs": True, "top_logprobs_num": 2}
        st, outs = await server.post("/generate", body)
        assert st == 200
        for o in outs:
            assert o["text"] == "" and o["meta_info"]["completion_tokens"] == 0
            lps = o["meta_info"]["input_token_logprobs"]
            assert len(lps) == o["meta_info"]["prompt_tokens"]
            assert lps[0][0] is None and all(isinstance(t[0], float) and isinstance(t[2], str) for t in lps[1:])
            assert o["meta_info"]["input_top_logprobs"][0] is None
        paris, london = (sum(t[0] for t in o["meta_info"]["input_token_logprobs"][1:]) for o in outs)
        assert paris > london
    server.run(go())


def test_stream_cumulative(server):
    async def go():
        body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 8, "temperature": 0}, "return_logprob": True}
        events = await server.stream("/generate", {**body, "stream": True})
        assert events[-1] == "[DONE]"
        texts = [e["text"] for e in events[:-1]]
        assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))
        st, full = await server.post("/generate", body)
        assert texts[-1] == full["text"]
        assert events[-2]["meta_info"]["finish_reason"] == full["meta_info"]["finish_reason"]
        assert len(events[-2]["meta_info"]["output_token_logprobs"]) == full["meta_info"]["completion_tokens"]
        batch = await server.stream("/generate", {"text": [PROMPT, "Hi"], "stream": True,
                                                  "sampling_params": {"max_new_tokens": 2}})
        assert {e["index"] for e in batch[:-1]} == {0, 1}
    server.run(go())


def test_info_endpoints(server):
    async def go():
        st, mi = await server.get("/get_model_info")
        assert st == 200 and mi["is_generation"] is True and mi["model_path"]
        assert (mi["quantization"], mi["kv_cache_dtype"]) == ("gguf", "auto")  # as loaded (the default model on a CPU) / the flag
        assert mi["kv_cache_storage_dtype"] in ("float32", "bfloat16", "float16")
        for path in ("/get_server_info", "/server_info"):
            st, si = await server.get(path)
            assert st == 200
            for key in ("max_total_num_tokens", "kv_used_tokens", "kv_cached_tokens", "kv_locked_tokens",
                        "cache_hit_rate", "context_length", "max_total_tokens", "schedule_policy", "version",
                        "quantization", "kv_cache_dtype", "kv_cache_storage_dtype"):
                assert key in si, key
            assert si["kv_cache_storage_dtype"] == si["dtype"]  # auto: the model's dtype
            assert si["api_key"] == "<set>"
            assert "last_gen_throughput" in si["internal_states"][0]
        st, _ = await server.get("/health", headers={})  # no key needed
        assert st == 200
        st, _ = await server.get("/health_generate", headers={})
        assert st == 200
        st, text = await server.get("/metrics")
        assert st == 200
        for name in ("sglang:time_to_first_token_seconds_bucket", "sglang:e2e_request_latency_seconds_count",
                     "sglang:inter_token_latency_seconds_count", "sglang:generation_tokens_total",
                     "sglang:num_running_reqs", "sglang:token_usage", "sglang:cache_hit_rate"):
            assert name in text, name
        count = [ln for ln in text.splitlines() if ln.startswith("sglang:num_requests_total")]
        assert float(count[0].split()[-1]) > 0
    server.run(go())


def test_flush_cache_and_abort(server):
    async def go():
        st, text = await server.post("/flush_cache", None)
        assert st == 200 and text.startswith("Cache flushed")
        body = {"text": "Count: 1, 2, 3,", "rid": "long-one", "stream": True,
                "sampling_params": {"max_new_tokens": 2000, "ignore_eos": True}}
        async with aiohttp.ClientSession(headers=server.headers) as s:
            async with s.post(server.url + "/generate", json=body) as r:
                assert r.status == 200
                await r.content.readline()  # the request is running now
                st, text = await server.post("/flush_cache", None)
                assert st == 400
                st, res = await server.post("/abort_request", {"rid": "long-one"})
                assert st == 200 and res["aborted"] == 1
                last = None
                async for line in r.content:
                    if line.startswith(b"data: {"):
                        last = json.loads(line[6:])
        assert last["meta_info"]["finish_reason"]["type"] == "abort"
        assert last["meta_info"]["completion_tokens"] < 2000
        await server.wait_kv_idle()
        st, _ = await server.post("/flush_cache", None)
        assert st == 200
    server.run(go())


def test_constrained_regex(server):
    async def go():
        body = {"text": "My phone number is ", "sampling_params": {"max_new_tokens": 16, "regex": r"\d{3}-\d{4}",
                                                                    "temperature": 0}}
        st, out = await server.post("/generate", body)
        if not grammar_available():
            assert st == 400 and out["error"]["param"] == "regex"
            return
        import re

        assert st == 200 and re.fullmatch(r"\d{3}-\d{4}", out["text"])
    server.run(go())


def test_concurrent_health_generate_under_load(server):
    async def go():
        body = {"text": PROMPT, "sampling_params": {"max_new_tokens": 16, "ignore_eos": True}}
        results = await asyncio.gather(*[server.post("/generate", body) for _ in range(4)],
                                       server.get("/health_generate", headers={}))
        assert all(st == 200 for st, _ in results)
    server.run(go())

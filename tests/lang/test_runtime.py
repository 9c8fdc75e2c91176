"""`sgl.Runtime`: the local server process behind a RuntimeEndpoint, and its helpers."""
from __future__ import annotations

import asyncio
import json

import pytest

import radixlm as sgl


def test_runtime_helpers(runtime):
    assert runtime.url.startswith("http://127.0.0.1:")
    assert isinstance(runtime.endpoint, sgl.RuntimeEndpoint)
    assert runtime.endpoint.get_chat_template().name == "smollm2"
    out = json.loads(runtime.generate("Once upon a time,", {"max_new_tokens": 6, "temperature": 0}))
    assert out["meta_info"]["completion_tokens"] <= 6

    async def stream() -> list[str]:
        return [d async for d in runtime.async_generate("Once upon a time,", {"max_new_tokens": 6, "temperature": 0})]

    assert "".join(asyncio.run(stream())) == out["text"]
    assert runtime.flush_cache() is None
    info = runtime.get_server_info()
    assert "cache_hit_rate" in info and "version" in info
    # set_default_backend unwraps a Runtime to its endpoint.
    sgl.set_default_backend(runtime)
    try:
        assert sgl.global_config.default_backend is runtime.endpoint
        assert sgl.get_server_info()["version"] == info["version"]
    finally:
        sgl.set_default_backend(None)


def test_runtime_startup_failure_is_a_clear_error(tmp_path):
    with pytest.raises(RuntimeError, match="exited with code") as err:
        sgl.Runtime(model_path=str(tmp_path / "no-such-model"), launch_timeout=120)
    assert "no-such-model" in str(err.value)  # the server's own log tail explains why

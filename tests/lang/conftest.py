"""One in-process Engine and one live local server per test session, each started only when a test
asks for it. `backend` runs a test on both: the Engine first, then the server."""
from __future__ import annotations

import importlib.util
from typing import Any

import pytest

import radixlm as sgl

KV_TOKENS = 16384
# One torch thread: on a shared 2-core box, OpenMP threads spin against other processes and a
# program suite ran ~5x slower with the default thread count.
CPU_THREADS = 1


@pytest.fixture(scope="session")
def engine():
    eng = sgl.Engine(max_total_tokens=KV_TOKENS, cpu_threads=CPU_THREADS)
    yield eng
    eng.shutdown()


@pytest.fixture(scope="session")
def runtime():
    rt = sgl.Runtime(max_total_tokens=KV_TOKENS, cpu_threads=CPU_THREADS, launch_timeout=300)
    yield rt
    rt.shutdown()


@pytest.fixture(scope="session", params=["engine", "server"])
def backend(request) -> Any:
    if request.param == "engine":
        return sgl.EngineBackend(request.getfixturevalue("engine"))
    return request.getfixturevalue("runtime").endpoint


@pytest.fixture(scope="session")
def tokenizer(backend):
    from transformers import AutoTokenizer

    # The server names the model by its hub id; its tokenizer_path is the local folder it loaded.
    info = getattr(backend, "model_info", None)
    return AutoTokenizer.from_pretrained(info["tokenizer_path"] if info else backend.get_model_name())


def require_constrained_decoding(backend: Any) -> None:
    """The in-process scheduler dies on a constrained request while the grammar runtime is missing
    (the HTTP server answers 400 instead): fail with that reason rather than kill the shared Engine."""
    if isinstance(backend, sgl.EngineBackend) and importlib.util.find_spec("radixlm.runtime.grammar_runtime") is None:
        pytest.fail("constrained decoding is not wired into the runtime yet (radixlm.runtime.grammar_runtime is missing)")

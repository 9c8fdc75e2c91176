"""Shared fixtures: the default model (converted once, cached) and tiny random models; the session's Triton mode."""
from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest

import radixlm  # noqa: F401  (first: it takes the repository root off sys.path, see radixlm/__init__.py)

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def _interpret_triton_without_cuda() -> None:
    """One Triton mode for the whole session, chosen before anything imports triton: without CUDA, its CPU
    interpreter. Triton fixes the mode of every @triton.jit function when that function's module is
    imported, its own `tl.cumsum` among them, and triton is imported incidentally (transformers imports
    torch._dynamo, which imports it), so a variable a test sets for itself comes too late for whatever was
    imported before (a kernel calling `tl.cumsum` under the interpreter then failed after another module's
    tests) and, undone after it, tells later tests a mode the process no longer has."""
    if importlib.util.find_spec("triton") is None:
        return
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("TRITON_INTERPRET", "1")


_interpret_triton_without_cuda()


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread() -> None:
    """Each test module starts with one torch intra-op thread in this process, as every server and
    Engine the suite starts has (--cpu-threads 1): on a shared 2-core machine a second OpenMP thread
    spins against the other processes (six short float32 forwards of the default model measured 18 s
    with two threads, 6 s with one, under load), and a module that sets a count of its own (a
    ModelRunner with cpu_threads=2) no longer leaves it to every module after it."""
    import torch

    torch.set_num_threads(1)


@pytest.fixture(scope="session", autouse=True)
def shared_packed_weights():
    """Every in-process load of one converted GGUF file (the default model: some 40 Schedulers, Engines and
    ModelRunners over the suite) shares the packed weights the first one built, for the whole session
    (runtime/quantization/packed_cache.py): unpacking the default model's blocks and its dense bfloat16
    copies is ~4 of its ~5 s CPU load. The packing itself is checked by the tests of its own module and the
    first load of each file; servers and other subprocesses load on their own."""
    from radixlm.runtime.quantization import packed_cache

    with packed_cache.hold():
        yield


@pytest.fixture(scope="session")
def default_model_dir() -> Path:
    from radixlm.runtime.model_source import resolve_model_path

    return resolve_model_path(None, progress=False)


@pytest.fixture(scope="session")
def gguf_reference_model():
    """transformers' own GGUF loader on the default model's file (float32, eval): the reference that
    tests/runtime/test_gguf_convert.py and test_model_logits.py check conversion and logits against.
    Loaded once per session: transformers parses the file twice and maps every tensor name (~15 s idle)."""
    pytest.importorskip("accelerate")  # transformers needs it to load a GGUF file itself
    import torch
    from transformers import AutoModelForCausalLM

    from radixlm.runtime.model_source import default_gguf_path

    gguf = default_gguf_path()
    return AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory):
    """Factory: tiny_model_dir("llama") -> folder with config, safetensors and tokenizer."""
    from tests.fixtures.tiny_models import build_tiny_model

    cache: dict[str, Path] = {}

    def make(kind: str = "llama") -> Path:
        if kind not in cache:
            cache[kind] = build_tiny_model(kind, tmp_path_factory.mktemp(f"tiny-{kind}"))
        return cache[kind]

    return make

"""Run one of SGLang's test programs through one frontend against a live server."""
from __future__ import annotations

import functools
import json
import types
import urllib.request
from typing import Any

from tests.compat.catalog import OPENAI_PROGRAMS, PROGRAMS
from tests.compat.program_source import frontend_module, load_programs


@functools.lru_cache(maxsize=None)
def programs(frontend: str) -> types.ModuleType:
    return load_programs(frontend)


def model_path(url: str) -> str:
    with urllib.request.urlopen(url + "/get_model_info", timeout=30) as resp:
        return json.loads(resp.read())["model_path"]


def make_backend(frontend: str, name: str, url: str) -> Any:
    sgl = frontend_module(frontend)
    if name in OPENAI_PROGRAMS:
        return sgl.OpenAI(model_path(url), is_chat_model=OPENAI_PROGRAMS[name], base_url=url + "/v1", api_key="EMPTY")
    backend = sgl.RuntimeEndpoint(url)
    # SGLang's suite sets an sgl.Runtime as the default backend, and test_gen_min_new_tokens reads its
    # `.endpoint`; a RuntimeEndpoint is its own endpoint.
    backend.endpoint = backend
    return backend


def run_program(frontend: str, name: str, url: str) -> None:
    """Raises what the program raises (AssertionError: a content check failed)."""
    sgl = frontend_module(frontend)
    sgl.set_default_backend(make_backend(frontend, name, url))
    getattr(programs(frontend), name)(**PROGRAMS[name])

"""Run one of SGLang's test programs through one frontend against a live server."""
from __future__ import annotations

import functools
import json
import logging
import types
import urllib.request
from typing import Any

from tests.compat.catalog import OPENAI_PROGRAMS, PROGRAMS, SGLANG_SETTINGS
from tests.compat.program_source import frontend_module, load_programs


@functools.lru_cache(maxsize=None)
def programs(frontend: str, trimmed: bool = False) -> types.ModuleType:
    return load_programs(frontend, trimmed)


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


class ProgramStepFailed(RuntimeError):
    """A step of a program failed inside radixlm's interpreter. SGLang's test functions do not look
    (`state.sync()` swallows it, in both frontends), so the harness does, for our frontend."""


class _StepFailures(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("program step"):
            self.messages.append(record.getMessage())


def run_program(frontend: str, name: str, url: str, trimmed: bool = False) -> None:
    """Raises what the program raises (AssertionError: a content check failed), or
    ProgramStepFailed when a step failed inside radixlm's interpreter. `trimmed`: with
    program_source.CI_TRIMS (shorter generations) applied."""
    sgl = frontend_module(frontend)
    sgl.set_default_backend(make_backend(frontend, name, url))
    failures = _StepFailures()
    logger = logging.getLogger("radixlm.lang.interpreter")
    logger.addHandler(failures)
    settings = SGLANG_SETTINGS.get(name, ({}, ""))[0] if frontend == "sglang" else {}
    config = sgl.global_config
    saved = {key: getattr(config, key) for key in settings}
    try:
        for key, value in settings.items():
            setattr(config, key, value)
        getattr(programs(frontend, trimmed), name)(**PROGRAMS[name])
    finally:
        for key, value in saved.items():
            setattr(config, key, value)
        logger.removeHandler(failures)
    if failures.messages:
        raise ProgramStepFailed(" | ".join(" ".join(m.split())[-400:] for m in failures.messages))

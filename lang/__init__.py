"""The structured-generation language: SGLang's frontend API, source compatible."""
from __future__ import annotations

from typing import Any

from radixlm.lang.api import (
    SglFunction,
    assistant,
    assistant_begin,
    assistant_end,
    flush_cache,
    function,
    gen,
    gen_int,
    gen_string,
    get_server_info,
    image,
    select,
    set_default_backend,
    system,
    system_begin,
    system_end,
    user,
    user_begin,
    user_end,
    video,
)
from radixlm.lang.choices import greedy_token_selection, token_length_normalized, unconditional_likelihood_normalized
from radixlm.lang.global_config import global_config
from radixlm.lang.state import ProgramState, ProgramStateGroup

_LAZY_BACKENDS = ("BaseBackend", "RuntimeEndpoint", "Runtime", "EngineBackend", "OpenAI")


def __getattr__(name: str) -> Any:
    if name in _LAZY_BACKENDS:
        from radixlm.lang import backend

        return getattr(backend, name)
    raise AttributeError(f"module 'radixlm.lang' has no attribute {name!r}")


EAGER_NAMES = [
    "SglFunction", "ProgramState", "ProgramStateGroup", "function", "gen", "gen_int", "gen_string", "select",
    "image", "video", "system", "user", "assistant", "system_begin", "system_end", "user_begin", "user_end",
    "assistant_begin", "assistant_end", "set_default_backend", "flush_cache", "get_server_info",
    "token_length_normalized", "greedy_token_selection", "unconditional_likelihood_normalized", "global_config",
]
__all__ = [*EAGER_NAMES, *_LAZY_BACKENDS]

"""Backends a program can run on. Imported lazily: each pulls in only what it needs."""
from __future__ import annotations

from typing import Any

_LAZY = {
    "BaseBackend": "radixlm.lang.backend.base",
    "RuntimeEndpoint": "radixlm.lang.backend.runtime_endpoint",
    "Runtime": "radixlm.lang.backend.local_runtime",
    "EngineBackend": "radixlm.lang.backend.engine",
    "OpenAI": "radixlm.lang.backend.openai",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'radixlm.lang.backend' has no attribute {name!r}")

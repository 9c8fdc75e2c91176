"""radixlm: a structured-generation language and LLM serving runtime with RadixAttention."""
from __future__ import annotations

from typing import Any

__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    # Lazy: `import radixlm` must stay cheap for DSL programs that only talk HTTP.
    if name == "Engine":
        from radixlm.runtime.engine import Engine

        return Engine
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")

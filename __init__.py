"""radixlm: a structured-generation language and LLM serving runtime with RadixAttention.

`import radixlm as sgl` gives SGLang's frontend API. Backends, `Engine` and `ServerArgs` load
lazily: `import radixlm` must stay cheap (no torch) for programs that only talk HTTP.
"""
from __future__ import annotations

from typing import Any

from radixlm import lang as _lang

# The DSL is the package's public API (`import radixlm as sgl`); backends stay lazy.
globals().update({_name: getattr(_lang, _name) for _name in _lang.EAGER_NAMES})

__version__ = "0.1.0"

_LAZY = {
    "Engine": ("radixlm.runtime.engine", "Engine"),
    "ServerArgs": ("radixlm.runtime.server_args", "ServerArgs"),
    # The Hugging Face tokenizer of a model folder (e.g. a server's /get_model_info tokenizer_path).
    "get_tokenizer": ("radixlm.runtime.scheduler_process", "load_tokenizer"),
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        return getattr(importlib.import_module(module), attr)
    if name in _lang.__all__:  # the backends, loaded on first use
        return getattr(_lang, name)
    raise AttributeError(f"module 'radixlm' has no attribute {name!r}")


__all__ = [*_lang.__all__, *_LAZY]

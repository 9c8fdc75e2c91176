"""radixlm: a structured-generation language and LLM serving runtime with RadixAttention.

`import radixlm as sgl` gives SGLang's frontend API. Backends, `Engine` and `ServerArgs` load
lazily: `import radixlm` must stay cheap (no torch) for programs that only talk HTTP.
"""
from __future__ import annotations

import importlib.abc as _importlib_abc
import importlib.machinery as _importlib_machinery
import os as _os
import sys as _sys
from typing import Any

_OWN_DIRECTORY = _os.path.dirname(_os.path.abspath(__file__))


class _OthersFirst(_importlib_abc.MetaPathFinder):
    """Run from the repository root (`python -m ...`, pytest), the package's own directory is on
    sys.path, so its subpackages are importable as top-level names too and shadow PyPI packages of
    those names: transformers >= 5.25 imports Hugging Face's `kernels` at start and found ours. Such a
    top-level name is looked up everywhere else on sys.path first (ours are always `radixlm.<name>`)."""

    NAMES = frozenset({"kernels", "runtime", "lang", "radix", "constrained"})

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if path is not None or name not in self.NAMES:
            return None
        others = [p for p in _sys.path if _os.path.abspath(p or _os.curdir) != _OWN_DIRECTORY]
        return _importlib_machinery.PathFinder.find_spec(name, others)


if not any(isinstance(finder, _OthersFirst) for finder in _sys.meta_path):
    _sys.meta_path.insert(0, _OthersFirst())

from radixlm import lang as _lang  # noqa: E402

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

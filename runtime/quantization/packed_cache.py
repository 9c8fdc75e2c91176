"""Packed CPU weights shared by the models one process loads from the same converted GGUF file.

Unpacking GGUF blocks into the CPU kernels' layouts and the dense bfloat16 copies are most of a CPU
load of a quantized model (about 4 of 5 s for the default one). A process that loads the same file
more than once (a benchmark sweeping scheduler options, an Engine made again in a notebook, the test
suite) reuses the packed weights: `Int4PackedWeight` is read-only once built, so models can share it.

Entries are keyed by the tensors' origin (file, size, mtime, tensor, rows), never by content, and held
weakly: they go with the last model using them, unless a `hold()` is open (it keeps them for its span).
"""
from __future__ import annotations

import weakref
from collections.abc import Hashable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # (no torch import here: the test suite's conftest opens a hold() at its start)
    from radixlm.runtime.quantization.base import QuantizedWeight

_entries: weakref.WeakValueDictionary[Hashable, QuantizedWeight] = weakref.WeakValueDictionary()
_held: list[dict[Hashable, QuantizedWeight]] = []


def lookup(key: Hashable | None) -> QuantizedWeight | None:
    return None if key is None else _entries.get(key)


def store(key: Hashable | None, weight: QuantizedWeight) -> None:
    if key is None:
        return
    _entries[key] = weight
    if _held:
        _held[-1][key] = weight


@contextmanager
def hold() -> Iterator[None]:
    """Keep every weight stored while this is open, even when no model uses it any more."""
    _held.append(dict(_held[-1]) if _held else {})
    try:
        yield
    finally:
        _held.pop()

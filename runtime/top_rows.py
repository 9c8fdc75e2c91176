"""A prefill chunk's input top-logprobs shipped as two arrays, made into per-token lists on the front.

Making a chunk's top-k (logprob, token id) pairs Python lists took the scheduler's loop ~0.25 s for
2,048 rows at top 100 on the 2-core CPU (by that figure up to ~1 s for a GPU chunk of 8,192 rows),
and pickling those lists for the pipe about as long again: every other request waited. The loop
keeps the arrays (numpy pickles them as two buffers); the front, off the loop, expands them into
the same lists (`expand`) as it receives them.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True, eq=False)
class TopRows:
    """Consecutive prompt tokens' top-k: values [rows, k] (float32 logprobs) and ids [rows, k]."""

    values: np.ndarray
    ids: np.ndarray

    def __len__(self) -> int:
        return len(self.values)

    def pairs(self) -> list[list[tuple[float, int]]]:
        """Each row's [(logprob, id), ...], exactly as the tensors' `.tolist()` gave them."""
        return [list(zip(v, t)) for v, t in zip(self.values.tolist(), self.ids.tolist())]


def expand(items: Iterable[Any]) -> list[Any]:
    """Per-token entries from a mix of entries (None or a row's pairs) and `TopRows`."""
    out: list[Any] = []
    for item in items:
        if isinstance(item, TopRows):
            out.extend(item.pairs())
        else:
            out.append(item)
    return out

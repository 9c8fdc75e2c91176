"""Objects that must repeat no key: where the backend's grammar counts keys toward `minProperties`.

llguidance (and our Lark route's `%json` leaves) lets a key outside `properties` repeat in the
text — a grammar cannot remember every key — and counts each pair, so `{"x": 1, "x": 2}` met
`minProperties: 2` while the parsed object (the last key wins) holds one key: an invalid
document accepted (benchmarks/schema_fuzz.py, seed 4). The run-time check of unique_check.py
keeps those objects' keys distinct, at their instance paths (unique_paths.py) where it can follow
them, else in every object of the document (stricter, never looser).
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .unique_paths import NO_UNIQUE_ARRAYS, UniquePaths, Unsupported, counted, schema_nodes, unique_paths


def counts_keys(schema: Any) -> bool:
    """Does the backend's grammar count keys toward a `minProperties` of 2 or more? It lets a key
    outside `properties` repeat (a grammar cannot remember every key), so `{"x": 1, "x": 2}` would
    meet `minProperties: 2` while the parsed object (last key wins) holds one: such a schema needs
    distinct keys checked beside the grammar (unique_check.py)."""
    return any(counted(n) for n in schema_nodes(schema))


def check_paths(schema: Any, unique: bool, keys: bool) -> UniquePaths | None:
    """Where the run-time check applies: unique arrays (`unique`: Unsupported where they cannot be
    placed) and, where `keys` (`counts_keys`), objects kept from repeating a key — at their paths,
    or in every object where those paths cannot be followed (a counted object under a pattern key,
    `not` ...)."""
    if keys:
        try:
            return unique_paths(schema, counted=True)
        except Unsupported:
            pass
    paths = unique_paths(schema) if unique else None
    if keys:
        paths = dataclasses.replace(paths or NO_UNIQUE_ARRAYS, distinct_keys=True, distinct_at=())
    return paths

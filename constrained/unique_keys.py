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

from .schema_pattern_complement import pattern_words
from .unique_paths import NO_UNIQUE_ARRAYS, Alternative, UniquePaths, Unsupported, counted, schema_nodes, unique_paths

MAX_NAMES = 64  # names of a counted object looked at for dead ends


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


def key_names(analysis: Any, alts: frozenset[Alternative]) -> tuple[str, ...] | None:
    """Every key an object at this path can have, where each alternative admitting an object has a
    node that closes its keys (`additionalProperties: false`: its named keys and the words of its
    patterns, `pattern_words`); None where some does not. With the keys kept distinct, an object
    that has used them all and must take one more is a dead end (unique_items_left.keys_left)."""
    def names(node: dict[str, Any]) -> list[str] | None:
        if node.get("additionalProperties") is not False:
            return None
        try:  # a key a `false` pattern matches is no name it can have
            return sorted(set(node.get("properties", {})).union(
                *(pattern_words(p, MAX_NAMES) for p, sub in node.get("patternProperties", {}).items() if sub is not False)))
        except Unsupported:
            return None

    out = analysis.bounded(alts, "object", names)
    return None if out is None or len(set(out)) > MAX_NAMES else tuple(sorted(set(out)))

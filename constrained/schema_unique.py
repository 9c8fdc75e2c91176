"""`uniqueItems: true` made exact where the item values come from a small finite set.

A context-free grammar cannot remember which of unboundedly many strings it has produced, so
uniqueness is enforced only where it is trivial (at most one item) or where the items are drawn
from a few scalar values (enum, const, boolean, null): then the arrays without repeats are listed
as an `enum`. Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import permutations
from typing import Any

from .schema_negation import Unsupported

MAX_ARRAYS = 4096  # the listed arrays; 6 values give 1957 repetition-free arrays
_NON_ARRAY = ["null", "boolean", "object", "number", "string"]


def _scalar_key(v: Any) -> Any:
    if isinstance(v, float) and v.is_integer():
        return ("number", int(v))
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return ("number", v)
    return (type(v).__name__, v)


def finite_domain(items: Any) -> list[Any] | None:
    """Every value `items` can accept, when that is a short list of scalars (a superset is fine:
    the item schema still applies to each element)."""
    if not isinstance(items, dict):
        return None
    if "const" in items:
        values = [items["const"]]
    elif "enum" in items and isinstance(items["enum"], list):
        values = list(items["enum"])
    else:
        kinds = items.get("type")
        kinds = [kinds] if isinstance(kinds, str) else kinds
        if not isinstance(kinds, list) or not set(kinds) <= {"boolean", "null"}:
            return None
        values = ([False, True] if "boolean" in kinds else []) + ([None] if "null" in kinds else [])
    if any(isinstance(v, (dict, list)) for v in values):
        return None
    seen: dict[Any, Any] = {}
    for v in values:
        seen.setdefault(_scalar_key(v), v)
    return list(seen.values())


def unique_items(node: dict[str, Any], vet_items: Callable[[Any], Any]) -> list[Any]:
    """Schemas to intersect with `node` so that uniqueItems holds exactly (or Unsupported)."""
    max_items = node.get("maxItems")
    if isinstance(max_items, int) and max_items <= 1:
        return []
    if isinstance(node.get("items"), list) or "prefixItems" in node:
        raise Unsupported("uniqueItems", "unique items next to tuple items (prefixItems)")
    domain = finite_domain(vet_items(node.get("items", True)))
    if domain is None:
        raise Unsupported("uniqueItems", "unique items are enforced only when the items are a few "
                                         "scalar values (enum, const, boolean, null) or maxItems <= 1")
    low = node.get("minItems", 0) if isinstance(node.get("minItems"), int) else 0
    high = len(domain) if not isinstance(max_items, int) else min(max_items, len(domain))
    arrays = [list(p) for k in range(low, high + 1) for p in permutations(domain, k)]
    if len(arrays) > MAX_ARRAYS:
        raise Unsupported("uniqueItems", f"{len(arrays)} distinct unique arrays to list (limit {MAX_ARRAYS})")
    return [{"anyOf": [{"type": _NON_ARRAY}, {"enum": arrays}]}]

"""Counting constraints made exact by listing: `uniqueItems: true` where the item values come from
a small finite set, `minProperties` / `maxProperties` over a closed set of keys.

A context-free grammar cannot remember which of unboundedly many strings it has produced, so
uniqueness is enforced only where it is trivial (at most one item) or where the items are drawn
from a few scalar values (enum, const, boolean, null): then the arrays without repeats are listed
as an `enum`. Anything else is refused.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import combinations, permutations
from math import comb, perm
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
    kinds = [node["type"]] if isinstance(node.get("type"), str) else node.get("type")
    if isinstance(kinds, list) and "array" not in kinds:
        return []  # a keyword about arrays, on a schema that admits none: vacuous
    if isinstance(node.get("items"), list) or "prefixItems" in node:
        raise Unsupported("uniqueItems", "unique items next to tuple items (prefixItems)")
    domain = finite_domain(vet_items(node.get("items", True)))
    if domain is None:
        raise Unsupported("uniqueItems", "unique items are enforced only when the items are a few "
                                         "scalar values (enum, const, boolean, null) or maxItems <= 1")
    low = node.get("minItems", 0) if isinstance(node.get("minItems"), int) else 0
    high = len(domain) if not isinstance(max_items, int) else min(max_items, len(domain))
    count = sum(perm(len(domain), k) for k in range(low, high + 1))  # counted first: 60 values have ~10^80
    if count > MAX_ARRAYS:
        raise Unsupported("uniqueItems", f"{count} distinct unique arrays to list (limit {MAX_ARRAYS})")
    arrays = [list(p) for k in range(low, high + 1) for p in permutations(domain, k)]
    return [{"anyOf": [{"type": _NON_ARRAY}, {"enum": arrays}]}]


MAX_KEY_SUBSETS = 64


def closed_count(node: dict[str, Any]) -> list[Any] | None:
    """min/maxProperties over a closed key set (`additionalProperties: false`, no patterns) as an
    `anyOf` of the allowed key subsets, each required and the other keys forbidden; [] when the
    bounds are trivially met. None when the key set is open or too many subsets would be listed."""
    props = node.get("properties", {})
    if node.get("additionalProperties") is not False or node.get("patternProperties") or not isinstance(props, dict):
        return None
    low, high = node.get("minProperties", 0), node.get("maxProperties", len(props))
    if not isinstance(low, int) or not isinstance(high, int) or isinstance(low, bool) or isinstance(high, bool):
        return None
    required = set(node.get("required", ())) if isinstance(node.get("required"), list) else set()
    keys = [k for k in props if props[k] is not False]
    if low <= len(required & set(keys)) and high >= len(keys):
        return []
    must = [k for k in keys if k in required]
    free = [k for k in keys if k not in required]
    sizes = [k - len(must) for k in range(max(low, 0), min(high, len(keys)) + 1) if k >= len(must)]
    if sum(comb(len(free), n) for n in sizes) > MAX_KEY_SUBSETS:
        return None  # counted before listing (subsets of 60 keys would not fit in memory)
    subsets = [set(must) | set(c) for n in sizes for c in combinations(free, n)]
    if not subsets:  # no object fits; the counts say nothing about other instances
        return [{"type": ["null", "boolean", "number", "string", "array"]}]
    return [{"anyOf": [{"required": sorted(c), "properties": {k: False for k in keys if k not in c}} for c in subsets]}]


MAX_COUNT_BRANCHES = 16


def open_count(node: dict[str, Any], hoist: Callable[[Any], Any]) -> Any:
    """min/maxProperties next to optional named properties (llguidance counts keys only where
    every named property is required) as an `anyOf` of whole copies of `node`, one per set of
    optional properties present: in each, those are required and the others forbidden (`false`),
    and the bounds stay. Exact: every object has exactly one such set. None when not needed or
    more than MAX_COUNT_BRANCHES copies; `hoist` moves a shared property value to `$defs`."""
    props = node.get("properties")
    if not isinstance(props, dict) or not ("minProperties" in node or "maxProperties" in node):
        return None
    required = [k for k in node.get("required", ()) if isinstance(k, str)]
    optional = [k for k, v in props.items() if v is not False and k not in required]
    if not optional:
        return None
    high = node.get("maxProperties")
    room = len(optional) if not isinstance(high, int) or isinstance(high, bool) \
        else high - len(set(required) | {k for k, v in props.items() if v is not False and k in required})
    sizes = range(0, min(room, len(optional)) + 1)
    if sum(comb(len(optional), n) for n in sizes) > MAX_COUNT_BRANCHES:
        return None  # counted before listing: 60 optional keys under maxProperties 8 are 2.9e9 sets
    subsets = [list(c) for n in sizes for c in combinations(optional, n)]
    if not subsets:
        return False
    shared = {k: hoist(v) for k, v in props.items() if v is not False}
    copies = []
    for present in subsets:
        copy = dict(node)
        copy["properties"] = {k: shared[k] if k in shared and (k in required or k in present) else False
                              for k in props}
        if required or present:
            copy["required"] = list(dict.fromkeys([*required, *present]))
        copies.append(copy)
    return {"anyOf": copies}

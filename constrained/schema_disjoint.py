"""Proofs that two vetted schemas share no instance, so that `oneOf` can be enforced as `anyOf`.

`oneOf` means "exactly one branch": with pairwise disjoint branches that is the same as "at
least one". We prove disjointness from instance types, const/enum values and required
discriminator properties (required on both sides with disjoint values, or required on one side
and forbidden on the other), looking through `$ref`, `allOf` and `anyOf`. A pair we cannot prove
disjoint is reported, never assumed.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from .schema_pattern_complement import pattern_matches

# Instance kinds: "number" splits into integers and the other numbers.
_KINDS = {"null": {"null"}, "boolean": {"boolean"}, "object": {"object"}, "array": {"array"},
          "string": {"string"}, "integer": {"integer"}, "number": {"integer", "fraction"}}
_ALL = frozenset({"null", "boolean", "object", "array", "string", "integer", "fraction"})
_MAX_DEPTH = 12
Deref = Callable[[str], Any]


def _kind(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int) or (isinstance(v, float) and v.is_integer()):
        return "integer"
    if isinstance(v, float):
        return "fraction"
    return {str: "string", dict: "object", list: "array"}[type(v)]


def _canon(v: Any) -> str:
    """JSON equality (1 == 1.0, key order irrelevant) as a string key."""
    def norm(x: Any) -> Any:
        if isinstance(x, float) and x.is_integer():
            return int(x)
        if isinstance(x, dict):
            return {k: norm(y) for k, y in x.items()}
        if isinstance(x, list):
            return [norm(y) for y in x]
        return x
    return json.dumps(norm(v), sort_keys=True)


def _values(s: dict[str, Any]) -> list[Any] | None:
    if "const" in s:
        return [s["const"]]
    if isinstance(s.get("enum"), list):
        return s["enum"]
    return None


def _kinds(s: dict[str, Any]) -> frozenset[str]:
    kinds = set(_ALL)
    t = s.get("type")
    if t is not None:
        names = [t] if isinstance(t, str) else t
        kinds &= set().union(*(_KINDS.get(n, set()) for n in names))
    values = _values(s)
    if values is not None:
        kinds &= {_kind(v) for v in values}
    return frozenset(kinds)


def _prop(s: dict[str, Any], key: str) -> Any:
    """The schema `s` applies to property `key`, or None when patternProperties may apply."""
    props = s.get("properties", {})
    if key in props:
        return props[key]
    if s.get("patternProperties"):
        return None
    return s.get("additionalProperties", True)


def rejects(s: Any, value: Any, deref: Deref, depth: int = 0) -> bool:
    """True only when `s` surely rejects `value` (type, const/enum, pattern, items, required, properties)."""
    if s is True or s is False or depth > _MAX_DEPTH:
        return s is False
    if "$ref" in s and rejects(deref(s["$ref"]), value, deref, depth + 1):
        return True
    if _kind(value) not in _kinds(s):
        return True
    values = _values(s)
    if values is not None and _canon(value) not in {_canon(v) for v in values}:
        return True
    if isinstance(value, str) and isinstance(s.get("pattern"), str) and pattern_matches(s["pattern"], value) is False:
        return True
    if any(rejects(m, value, deref, depth + 1) for m in s.get("allOf", ())):
        return True
    if s.get("anyOf") and all(rejects(m, value, deref, depth + 1) for m in s["anyOf"]):
        return True
    if isinstance(value, list):
        if len(value) < s.get("minItems", 0) or len(value) > s.get("maxItems", len(value)):
            return True
        prefix = s.get("prefixItems", [])
        if any(rejects(prefix[k] if k < len(prefix) else s.get("items", True), v, deref, depth + 1)
               for k, v in enumerate(value)):
            return True
    if isinstance(value, dict):
        if any(k not in value for k in s.get("required", ())):
            return True
        for k, v in value.items():
            sub = _prop(s, k)
            if sub is not None and rejects(sub, v, deref, depth + 1):
                return True
    return False


Memo = dict[tuple[int, int], tuple[Any, Any, bool]]


def disjoint(a: Any, b: Any, deref: Deref, depth: int = 0, memo: Memo | None = None) -> bool:
    """True only when no instance satisfies both `a` and `b`. With `memo` (which keeps the
    schemas it keys by id alive), each pair is worked out once: shared `$ref`s and nested
    applicators otherwise make this exponential."""
    if a is False or b is False:
        return True
    if a is True or b is True or depth > _MAX_DEPTH:
        return False
    if memo is None:
        return _disjoint(a, b, deref, depth, None)
    hit = memo.get((id(a), id(b)))
    if hit is None:
        hit = memo[(id(a), id(b))] = (a, b, _disjoint(a, b, deref, depth, memo))
    return hit[2]


def _disjoint(a: Any, b: Any, deref: Deref, depth: int, memo: Memo | None) -> bool:
    d = depth + 1
    for x, y in ((a, b), (b, a)):
        if "$ref" in x and disjoint(deref(x["$ref"]), y, deref, d, memo):
            return True
        if any(disjoint(m, y, deref, d, memo) for m in x.get("allOf", ())):
            return True
        for key in ("anyOf", "oneOf"):
            if x.get(key) and all(disjoint(m, y, deref, d, memo) for m in x[key]):
                return True
    common = _kinds(a) & _kinds(b)
    if not common:
        return True
    va, vb = _values(a), _values(b)
    if va is not None and all(rejects(b, v, deref, d) for v in va):
        return True
    if vb is not None and all(rejects(a, v, deref, d) for v in vb):
        return True
    if common == {"array"} and counts_disjoint([a], [b], "array"):
        return True
    return common == {"object"} and _objects_disjoint(a, b, deref, d, memo)


def _objects_disjoint(a: dict[str, Any], b: dict[str, Any], deref: Deref, depth: int, memo: Memo | None) -> bool:
    """A discriminator: a property both require with disjoint values, or one requires and the
    other forbids; or key counts that cannot meet (more keys required than the other allows)."""
    if counts_disjoint([a], [b], "object"):
        return True
    req_a, req_b = set(a.get("required", ())), set(b.get("required", ()))
    for key in req_a | req_b:
        pa, pb = _prop(a, key), _prop(b, key)
        if key in req_a and key in req_b and pa is not None and pb is not None \
                and disjoint(pa, pb, deref, depth, memo):
            return True
        if (key in req_a and pb is False) or (key in req_b and pa is False):
            return True
    return False


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def key_count_bounds(ms: list[Any]) -> tuple[int, int | None]:
    """Fewest and most keys an object valid for every member of `ms` can have: the distinct
    required names and minProperties below, maxProperties and a closed key set
    (`additionalProperties: false`, no patterns: only the named keys not `false`) above."""
    names: set[str] = set()
    low, high = 0, None
    for m in ms:
        if not isinstance(m, dict):
            continue
        names |= {k for k in m.get("required", ()) if isinstance(k, str)}
        low = max(low, _count(m.get("minProperties")) or 0)
        bounds = [_count(m.get("maxProperties"))]
        props = m.get("properties", {})
        if m.get("additionalProperties") is False and not m.get("patternProperties") and isinstance(props, dict):
            bounds.append(sum(1 for v in props.values() if v is not False))
        for bound in bounds:
            if bound is not None:
                high = bound if high is None else min(high, bound)
    return max(low, len(names)), high


def item_count_bounds(ms: list[Any]) -> tuple[int, int | None]:
    """Fewest and most items an array valid for every member of `ms` can have (minItems,
    maxItems, and tuple items closed by `items: false`)."""
    low, high = 0, None
    for m in ms:
        if not isinstance(m, dict):
            continue
        low = max(low, _count(m.get("minItems")) or 0)
        bounds = [_count(m.get("maxItems"))]
        if m.get("items") is False:
            bounds.append(len(m.get("prefixItems", ())))
        for bound in bounds:
            if bound is not None:
                high = bound if high is None else min(high, bound)
    return low, high


def counts_disjoint(ma: list[Any], mb: list[Any], kind: str) -> bool:
    """True when no `kind` instance ("object" or "array") valid for every member of `ma` and of
    `mb` has a key / item count both allow (e.g. two required keys against maxProperties 1)."""
    low, high = (key_count_bounds if kind == "object" else item_count_bounds)(ma + mb)
    return high is not None and low > high


def first_overlap(branches: list[Any], deref: Deref) -> tuple[int, int] | None:
    """The first pair of branches not proven disjoint, or None when all pairs are."""
    memo: Memo = {}
    for i in range(len(branches)):
        for j in range(i + 1, len(branches)):
            if not disjoint(branches[i], branches[j], deref, 0, memo):
                return i, j
    return None

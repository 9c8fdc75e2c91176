"""The intersection of two vetted schemas, worked out by us where llguidance cannot.

llguidance intersects schemas itself (allOf, a named property under a matching pattern), but not
through recursive references. `meet(a, b)` returns a schema with exactly the instances valid for
both, pushing the intersection down where that is exact: equal schemas, `true`/`false`, branches
of `anyOf` proven disjoint from the other side (dropped), per-keyword merges (type sets,
bounds, `required`, `items` met recursively) when the keyword groups that read each other
(`properties`/`patternProperties`/`additionalProperties`, `items`/`prefixItems`, ...) come from
one side only. Anything else is left as `{"allOf": [a, b]}` for the backend, as before.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

from .schema_disjoint import disjoint
from .schema_negation import Unsupported
from .schema_pattern_complement import complement_pattern, pattern_cells, pattern_matches

Deref = Callable[[str], Any]
_MAX_DEPTH = 12
_GROUPS = (
    frozenset({"properties", "patternProperties", "additionalProperties"}),
    frozenset({"prefixItems", "additionalItems"}),
    frozenset({"contains", "minContains", "maxContains"}),
    frozenset({"if", "then", "else"}),
)
_LOWER = ("minimum", "minLength", "minItems", "minProperties", "exclusiveMinimum")
_UPPER = ("maximum", "maxLength", "maxItems", "maxProperties", "exclusiveMaximum")
_TYPES = ("null", "boolean", "object", "array", "number", "integer", "string")


def _same(a: Any, b: Any) -> bool:
    return json.dumps(a, sort_keys=True) == json.dumps(b, sort_keys=True)


def _types(value: Any) -> set[str] | None:
    names = [value] if isinstance(value, str) else value
    return set(names) if isinstance(names, list) and all(n in _TYPES for n in names) else None


def _meet_types(a: Any, b: Any) -> Any:
    ta, tb = _types(a), _types(b)
    if ta is None or tb is None:
        return None
    out = ta & tb
    if "number" in ta and "integer" in tb or "integer" in ta and "number" in tb:
        out.add("integer")
    out = {t for t in _TYPES if t in out}
    return sorted(out, key=_TYPES.index) if len(out) != 1 else next(iter(out))


def meet(a: Any, b: Any, deref: Deref, depth: int = 0) -> Any:
    """A schema equivalent to `allOf: [a, b]`."""
    if a is True or _same(a, b):
        return b
    if b is True:
        return a
    if a is False or b is False:
        return False
    if not isinstance(a, dict) or not isinstance(b, dict) or depth > _MAX_DEPTH:
        return {"allOf": [a, b]}
    if disjoint(a, b, deref):
        return False
    for x, y in ((a, b), (b, a)):
        if isinstance(x.get("anyOf"), list) and "anyOf" not in y:  # x = rest and anyOf: distributed
            rest = {k: v for k, v in x.items() if k != "anyOf"}
            base = meet(y, rest, deref, depth + 1) if rest else y
            if base is False:
                return False
            kept = [m for m in (meet(base, branch, deref, depth + 1) for branch in x["anyOf"]) if m is not False]
            return False if not kept else kept[0] if len(kept) == 1 else {"anyOf": kept}
    for x, y in ((a, b), (b, a)):
        if list(x) == ["$ref"] and isinstance(x["$ref"], str) and "$ref" not in y:
            target = deref(x["$ref"])
            if isinstance(target, dict) and "$ref" not in target:  # a copy: the result may replace a node it holds
                return meet(copy.deepcopy(target), y, deref, depth + 1)
    return _merge(a, b, deref, depth)


def _merge(a: dict[str, Any], b: dict[str, Any], deref: Deref, depth: int) -> Any:
    """Keyword by keyword, where each keyword's meaning does not depend on the other side."""
    both = set(a) & set(b)
    if _GROUPS[0] & set(a) and _GROUPS[0] & set(b):
        fields = _merge_fields(a, b, deref, depth)
        if fields is None:
            return {"allOf": [a, b]}
        a = {**{k: v for k, v in a.items() if k not in _GROUPS[0]}, **fields}
        b = {k: v for k, v in b.items() if k not in _GROUPS[0]}
        both = set(a) & set(b)
    for group in _GROUPS:
        if (group & set(a)) and (group & set(b)) and not all(_same(a.get(k), b.get(k)) for k in group):
            return {"allOf": [a, b]}
    tuples = _GROUPS[1] & (set(a) | set(b))  # `items` reads the prefixItems of its own schema only
    if tuples and "items" in set(a) | set(b) and not all(_same(a.get(k), b.get(k)) for k in (*_GROUPS[1], "items")):
        return {"allOf": [a, b]}
    if any(k in both for k in ("$ref", "anyOf", "oneOf", "not", "allOf", "enum", "const")) \
            and not all(_same(a[k], b[k]) for k in both):
        return {"allOf": [a, b]}
    out = dict(a)
    if isinstance(out.get("allOf"), list):
        out["allOf"] = list(out["allOf"])
    for key, value in b.items():
        if key not in out or _same(out[key], value):
            out[key] = value
        elif key == "type":
            merged = _meet_types(out[key], value)
            if merged is None:
                return {"allOf": [a, b]}
            if merged == []:
                return False
            out[key] = merged
        elif key == "items":
            out[key] = meet(out[key], value, deref, depth + 1)
        elif key == "required" and isinstance(value, list) and isinstance(out[key], list):
            out[key] = list(dict.fromkeys([*out[key], *value]))
        elif key in _LOWER and _numbers(out[key], value):
            out[key] = max(out[key], value)
        elif key in _UPPER and _numbers(out[key], value):
            out[key] = min(out[key], value)
        else:  # a keyword without subschemas: the backend intersects leaves itself
            out.setdefault("allOf", []).append({key: value})
    return out


def _numbers(x: Any, y: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in (x, y))


def _field(node: dict[str, Any], key: str) -> Any:
    """What `node` says about the value of `key` (None: a pattern we cannot read)."""
    parts: list[Any] = []
    if key in node.get("properties", {}):
        parts.append(node["properties"][key])
    for pattern, sub in node.get("patternProperties", {}).items():
        hit = pattern_matches(pattern, key)
        if hit is None:
            return None
        if hit:
            parts.append(sub)
    if not parts:
        parts.append(node.get("additionalProperties", True))
    return parts[0] if len(parts) == 1 else {"allOf": parts}


def _merge_fields(a: dict[str, Any], b: dict[str, Any], deref: Deref, depth: int) -> dict[str, Any] | None:
    """properties / patternProperties / additionalProperties of both sides as one group, where
    exact: at most one side has patterns, and the other side's additional keys are free."""
    pa, pb = a.get("patternProperties", {}), b.get("patternProperties", {})
    if not all(isinstance(x, dict) for x in (a.get("properties", {}), b.get("properties", {}), pa, pb)):
        return None
    for x, y in ((a, b), (b, a)):
        names = _names_only(y)
        if names is not None and not x.get("properties") and len(x.get("patternProperties", {})) == 1:
            (pattern, sub), = x["patternProperties"].items()
            if _universal(pattern):  # every key is x's pattern key: keys matching `names` only
                return {"patternProperties": {names: sub}, "additionalProperties": False}
    if pa and pb:
        return _meet_patterns(a, b, deref, depth)
    if pa and b.get("additionalProperties", True) is not True \
            or pb and a.get("additionalProperties", True) is not True:
        return None
    out: dict[str, Any] = {"properties": {}}
    for key in dict.fromkeys([*a.get("properties", {}), *b.get("properties", {})]):
        fa, fb = _field(a, key), _field(b, key)
        if fa is None or fb is None:
            return None
        out["properties"][key] = meet(fa, fb, deref, depth + 1)
    if pa or pb:
        out["patternProperties"] = pa or pb
    extra = meet(a.get("additionalProperties", True), b.get("additionalProperties", True), deref, depth + 1)
    if extra is not True:
        out["additionalProperties"] = extra
    return out


_MAX_MET_PATTERNS = 8  # pattern pairs of two sides met into disjoint classes


def _meet_patterns(a: dict[str, Any], b: dict[str, Any], deref: Deref, depth: int) -> dict[str, Any] | None:
    """Patterns on both sides, no named properties: a key matching p of a and q of b gets both
    schemas; p and none of b's, p's schema and b's additional one; q and none of a's, a's
    additional schema and q's; neither, both additional schemas. Those classes (our automata; the
    empty ones left out) become the patterns, the last `additionalProperties`. Keys matching
    several patterns of one side fall in several classes, whose schemas then all apply, as theirs
    did."""
    pa, pb = a["patternProperties"], b["patternProperties"]
    if len(pa) * len(pb) > _MAX_MET_PATTERNS or a.get("properties") or b.get("properties"):
        return None
    ea, eb = a.get("additionalProperties", True), b.get("additionalProperties", True)
    try:
        both, only_a, only_b = pattern_cells(list(pa), list(pb))
    except Unsupported:
        return None
    sa, sb = list(pa.values()), list(pb.values())
    classes = [(both[i][j], sa[i], sb[j]) for i in range(len(sa)) for j in range(len(sb))]
    classes += [(only_a[i], sa[i], eb) for i in range(len(sa))] + [(only_b[j], ea, sb[j]) for j in range(len(sb))]
    patterns: dict[str, Any] = {}
    for regex, x, y in classes:
        if regex is not None:
            met = meet(x, y, deref, depth + 1)
            patterns[regex] = meet(patterns[regex], met, deref, depth + 1) if regex in patterns else met
    out: dict[str, Any] = {"patternProperties": patterns} if patterns else {}
    extra = meet(ea, eb, deref, depth + 1)
    if extra is not True:
        out["additionalProperties"] = extra
    return out


def meet_object_fields(a: dict[str, Any], b: dict[str, Any], deref: Deref) -> dict[str, Any] | None:
    """properties / patternProperties / additionalProperties of two allOf members as one group
    (the keywords of both sides' group, met), None where that is not exact."""
    return _merge_fields(a, b, deref, 0)


def _names_only(node: dict[str, Any]) -> str | None:
    """The one pattern every key must match, where `node` says nothing else about keys (what
    `propertyNames` becomes: `{patternProperties: {P: true}, additionalProperties: false}`)."""
    patterns = node.get("patternProperties", {})
    if node.get("properties") or node.get("additionalProperties", True) is not False or len(patterns) != 1:
        return None
    (pattern, sub), = patterns.items()
    return pattern if sub is True or sub == {} else None


def _universal(pattern: str) -> bool:
    """True only when `pattern` matches in every string (`.*`, `^.*`, `""`...)."""
    try:
        return complement_pattern(pattern) is None
    except Unsupported:
        return False

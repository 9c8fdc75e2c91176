"""Exact simplifications of the vetted schema that spare llguidance intersections.

llguidance 1.9.1 intersects a schema with its sibling keywords, and a named property's schema
with every `patternProperties` schema whose pattern matches the name; where one side reaches a
recursive `$ref` it gives up ("circular references with sibling keys are not supported"). Real
schemas (WashingtonPost's ANS, hayson) do both in ways that are redundant, so the intersection
can be removed without changing the schema's language:

- a `type` next to `anyOf`/`oneOf` whose branches each admit only types it allows adds nothing
  (every instance valid for a branch already has such a type);
- a named property whose schema is the same schema (same vetted JSON) as that of every pattern
  matching its name says nothing more than the patterns: the key is still checked by them, and is
  still not "additional"; if it is required, `required` keeps naming it;
- a one-branch `anyOf` with no sibling keywords is that branch.

Runs on the vetted schema (references are `#/$defs/rN`) before the property-order rewriting.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from collections.abc import Callable
from typing import Any

from .schema_any_order import hoist
from .schema_meet import meet
from .schema_negation import Unsupported
from .schema_pattern_complement import pattern_parts, pattern_without, patterns_disjoint

_ANY = frozenset({"null", "boolean", "object", "array", "number", "integer", "string"})
_BRANCHES = ("anyOf", "oneOf")


def _type_set(value: Any) -> frozenset[str] | None:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        return None
    out = set(names)
    if "number" in out:
        out.add("integer")
    return frozenset(out)


def _value_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):  # 1.0 is no integer in draft 4: "number" keeps this bound loose
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(v)]


class _Types:
    """An upper bound on the instance types a vetted schema admits (None: any type)."""

    def __init__(self, defs: dict[str, Any]) -> None:
        self.defs = defs
        self.memo: dict[str, frozenset[str] | None] = {}

    def of(self, node: Any, depth: int = 0) -> frozenset[str] | None:
        if node is False:
            return frozenset()
        if not isinstance(node, dict) or depth > 32:
            return None
        bounds: list[frozenset[str]] = []
        if "type" in node and _type_set(node["type"]) is not None:
            bounds.append(_type_set(node["type"]))  # type: ignore[arg-type]
        if "const" in node:
            bounds.append(frozenset({_value_type(node["const"])}))
        if isinstance(node.get("enum"), list):
            bounds.append(frozenset(_value_type(v) for v in node["enum"]))
        ref = node.get("$ref")
        if isinstance(ref, str):
            name = ref.rsplit("/", 1)[-1]
            if name not in self.memo:
                self.memo[name] = None  # a cycle bounds nothing
                self.memo[name] = self.of(self.defs.get(name), depth + 1)
            if self.memo[name] is not None:
                bounds.append(self.memo[name])  # type: ignore[arg-type]
        for key in _BRANCHES:
            if isinstance(node.get(key), list):
                parts = [self.of(b, depth + 1) for b in node[key]]
                if all(p is not None for p in parts):
                    bounds.append(frozenset().union(*parts))  # type: ignore[arg-type]
        for part in node.get("allOf", []) if isinstance(node.get("allOf"), list) else []:
            t = self.of(part, depth + 1)
            if t is not None:
                bounds.append(t)
        if not bounds:
            return None
        out = frozenset(_ANY)
        for b in bounds:
            out &= b
        return out


def _deref_in(schema: dict[str, Any]) -> Callable[[str], Any]:
    """`$ref` -> the root's `$defs` entry it names (refs are resolved into `$defs` by the vetter),
    `true` when absent, as `meet` takes it."""
    defs = schema.get("$defs", {})
    return lambda ref: defs.get(ref.rsplit("/", 1)[-1], True)


def _walk(schema: Any) -> list[dict[str, Any]]:
    """Every schema object of the document, definitions included (each once)."""
    out: list[dict[str, Any]] = []
    seen: set[int] = set()
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict) or id(node) in seen:
            continue
        seen.add(id(node))
        out.append(node)
        for key, value in node.items():
            if key in ("properties", "patternProperties", "$defs", "dependentSchemas"):
                if isinstance(value, dict):
                    stack.extend(value.values())
            elif key not in ("enum", "const", "required", "type", "pattern", "format"):
                stack.append(value)
    return out


def _matches(pattern: str, key: str) -> bool | None:
    try:
        return re.search(pattern, key) is not None
    except re.error:
        return None  # a pattern Python cannot read: unknown


def drop_implied_types(schema: Any) -> int:
    """`type` next to `anyOf`/`oneOf` whose branches admit only types it allows: removed."""
    if not isinstance(schema, dict):
        return 0
    types = _Types(schema.get("$defs", {}))
    changed = 0
    for node in _walk(schema):
        if "type" not in node or not any(isinstance(node.get(k), list) for k in _BRANCHES):
            continue
        allowed = _type_set(node["type"])
        if allowed is None:
            continue
        for key in _BRANCHES:
            if isinstance(node.get(key), list):
                parts = [types.of(b) for b in node[key]]
                if all(p is not None and p <= allowed for p in parts):
                    del node["type"]
                    changed += 1
                    break
    return changed


def drop_shadowed_properties(schema: Any) -> int:
    """Named properties whose schema equals that of every pattern matching the name: removed
    from `properties` (they stay in `required` where they are)."""
    changed = 0
    for node in _walk(schema):
        props, patterns = node.get("properties"), node.get("patternProperties")
        if not isinstance(props, dict) or not isinstance(patterns, dict) or not patterns:
            continue
        texts = {p: json.dumps(v, sort_keys=True) for p, v in patterns.items()}
        for key in list(props):
            hits = [_matches(p, key) for p in patterns]
            if None in hits or not any(hits):
                continue
            mine = json.dumps(props[key], sort_keys=True)
            if all(texts[p] == mine for p, hit in zip(patterns, hits) if hit):
                del props[key]
                changed += 1
        if not props:
            del node["properties"]
    return changed


def separate_named_from_patterns(schema: Any) -> int:
    """A named property matched by patterns whose schemas reach a reference: its schema becomes
    our intersection with theirs (schema_meet.py), and the patterns stop matching its name."""
    if not isinstance(schema, dict):
        return 0
    deref = _deref_in(schema)

    changed = 0
    for node in _walk(schema):
        props, patterns = node.get("properties"), node.get("patternProperties")
        if not isinstance(props, dict) or not isinstance(patterns, dict) or not props or not patterns:
            continue
        hits = {k: [p for p in patterns if _matches(p, k)] for k in props}
        if any(_matches(p, k) is None for k in props for p in patterns):
            continue
        hits = {k: ps for k, ps in hits.items() if ps}
        if not hits or not any('"$ref"' in json.dumps([props[k], *(patterns[p] for p in ps)])
                               for k, ps in hits.items()):
            continue
        try:
            renamed = {p: pattern_without(p, tuple(k for k, ps in hits.items() if p in ps))
                       for p in {p for ps in hits.values() for p in ps}}
        except Unsupported:
            continue
        for k, ps in hits.items():
            for p in ps:
                props[k] = meet(props[k], patterns[p], deref)
        node["patternProperties"] = {renamed.get(p, p): v for p, v in patterns.items()
                                     if renamed.get(p, p) is not None}
        if not node["patternProperties"]:
            del node["patternProperties"]
        changed += 1
    return changed


def merge_all_of(schema: Any) -> int:
    """A node with `allOf` becomes our meet of its parts and its other keywords where that meet
    is complete (no `allOf` left): a plain node that llguidance does not merge, so its
    properties can take any order. Partial meets are dropped (the node stays as it was)."""
    if not isinstance(schema, dict):
        return 0
    deref = _deref_in(schema)

    changed = 0
    for node in _walk(schema):
        parts = node.get("allOf")
        if not isinstance(parts, list) or not parts:
            continue
        merged: Any = {k: v for k, v in node.items() if k not in ("allOf", "$defs")}
        for part in parts:
            merged = meet(merged, part, deref)
            if not isinstance(merged, dict) or "allOf" in merged:
                break
        else:
            keep = {"$defs": node["$defs"]} if "$defs" in node else {}
            node.clear()
            node.update(merged, **keep)
            changed += 1
    return changed


MAX_SPLIT_PATTERNS = 4


def disjoin_patterns(schema: Any) -> int:
    """Two overlapping `patternProperties` (llguidance wants them disjoint) become three disjoint
    ones: first only, both (the two schemas met), second only. Nodes with more overlaps than one
    pair among at most MAX_SPLIT_PATTERNS patterns are left alone."""
    if not isinstance(schema, dict):
        return 0
    deref = _deref_in(schema)

    changed = 0
    for node in _walk(schema):
        patterns = node.get("patternProperties")
        if not isinstance(patterns, dict) or not 1 < len(patterns) <= MAX_SPLIT_PATTERNS:
            continue
        names = list(patterns)
        overlaps = [(p, q) for i, p in enumerate(names) for q in names[i + 1:] if not patterns_disjoint(p, q)]
        if len(overlaps) != 1:
            continue
        p, q = overlaps[0]
        try:
            only_p, shared, only_q = pattern_parts(p, q)
        except Unsupported:
            continue
        out: dict[str, Any] = {}
        for name in names:
            if name == p:
                for regex, sub in ((only_p, patterns[p]), (shared, meet(patterns[p], patterns[q], deref))):
                    if regex is not None:
                        out[regex] = sub
            elif name == q:
                if only_q is not None:
                    out[only_q] = patterns[q]
            else:
                out[name] = patterns[name]
        node["patternProperties"] = out
        changed += 1
    return changed


MAX_KEY_BRANCHES = 8
MAX_KEY_PRODUCT = 1024


KeyCase = tuple[frozenset[str], frozenset[str], bool]  # (forbidden keys, required keys, objects only)
_ANY_CASE: KeyCase = (frozenset(), frozenset(), False)


def _and(a: KeyCase, b: KeyCase) -> KeyCase:
    return a[0] | b[0], a[1] | b[1], a[2] or b[2]


def _key_cases(branch: Any) -> list[KeyCase] | None:
    """`branch` as a union of (forbidden keys, required keys, objects only) cases, when it says
    only which keys are absent/present (through nested allOf/anyOf; `type: object`; `properties`
    of `true`/`false`). None for anything else or past MAX_KEY_PRODUCT cases."""
    if not isinstance(branch, dict):
        return [_ANY_CASE] if branch is True else None
    cases: list[KeyCase] = [_ANY_CASE]

    def conjoin(other: list[KeyCase] | None) -> bool:
        nonlocal cases
        if other is None or len(cases) * len(other) > MAX_KEY_PRODUCT:
            return False
        cases = [_and(a, b) for a in cases for b in other]
        return True

    for key, value in branch.items():
        if key == "type" and value == "object":
            ok = conjoin([(frozenset(), frozenset(), True)])
        elif key == "properties" and isinstance(value, dict) and all(v is False or v is True or v == {}
                                                                     for v in value.values()):
            ok = conjoin([(frozenset(k for k, v in value.items() if v is False), frozenset(), False)])
        elif key == "required" and isinstance(value, list) and all(isinstance(k, str) for k in value):
            ok = conjoin([(frozenset(), frozenset(value), False)])
        elif key == "allOf" and isinstance(value, list):
            ok = all(conjoin(_key_cases(part)) for part in value)
        elif key == "anyOf" and isinstance(value, list):
            alts = [_key_cases(part) for part in value]
            ok = None not in alts and conjoin([c for alt in alts for c in alt])  # type: ignore[union-attr]
        else:
            return None
        if not ok:
            return None
    return cases


def _conjuncts(parts: Any) -> list[Any]:
    """allOf members, nested plain allOf nodes flattened."""
    out: list[Any] = []
    for part in parts if isinstance(parts, list) else [parts]:
        if isinstance(part, dict) and list(part) == ["allOf"]:
            out += _conjuncts(part["allOf"])
        else:
            out.append(part)
    return out


def _fewest(options: list[list[KeyCase]]) -> list[KeyCase] | None:
    """The combinations of one case per part, without the contradictory ones and those another
    one subsumes (fewer forbidden and required keys, objects only at most where it is: it accepts
    a superset); None when the product is too large to list."""
    if math.prod(len(o) for o in options) > MAX_KEY_PRODUCT:
        return None
    merged: set[KeyCase] = set()
    for combo in itertools.product(*options):
        case = _ANY_CASE
        for c in combo:
            case = _and(case, c)
        if not case[0] & case[1]:
            merged.add(case)
    kept = [m for m in merged if not any(o != m and o[0] <= m[0] and o[1] <= m[1] and o[2] <= m[2] for o in merged)]
    return sorted(kept, key=lambda m: (sorted(m[0]), sorted(m[1]), m[2]))


def distribute_key_conditions(schema: Any) -> int:
    """An object node whose `allOf`/`anyOf` parts only say which keys are absent or present (what
    `dependencies`/`dependentRequired`, `not: {required}` and many `oneOf`s become) turns into an
    `anyOf` of whole copies of the node, one per combination of cases: each is then a plain object
    that llguidance does not merge (and whose properties can take any order). The values move to
    `$defs` once, shared."""
    if not isinstance(schema, dict):
        return 0
    defs = schema.setdefault("$defs", {})
    changed = 0
    for node in _walk(schema):
        keyed = isinstance(node.get("properties"), dict) or (
            isinstance(node.get("patternProperties"), dict) and "properties" not in node)
        if not keyed or "oneOf" in node or not ("allOf" in node or "anyOf" in node):
            continue
        parts = _conjuncts(node.get("allOf", [])) + ([{"anyOf": node["anyOf"]}] if "anyOf" in node else [])
        options: list[list[KeyCase]] = []
        for part in parts:
            cases = _key_cases(part)
            if cases is None:
                break
            options.append(cases)
        else:
            combos = _fewest(options)
            if combos is None or not 1 < len(combos) <= MAX_KEY_BRANCHES:
                continue
            base = {k: v for k, v in node.items() if k not in ("allOf", "anyOf", "$defs")}
            props = {k: hoist(v, defs) for k, v in base.pop("properties", {}).items()}
            if "additionalProperties" in base:
                base["additionalProperties"] = hoist(base["additionalProperties"], defs)
            if isinstance(base.get("patternProperties"), dict):
                base["patternProperties"] = {k: hoist(v, defs) for k, v in base["patternProperties"].items()}
            types = _type_set(base["type"]) if "type" in base else None
            branches = []
            for forbidden, required, objects in combos:
                if forbidden & (required | set(base.get("required", []))):
                    continue
                branch = {**base, "properties": {**props, **{k: False for k in forbidden}}}
                if not branch["properties"]:
                    del branch["properties"]
                if objects and types != frozenset({"object"}):
                    if types is not None and "object" not in types:
                        continue  # objects only, in a node that admits none
                    branch["type"] = "object"
                need = list(dict.fromkeys([*base.get("required", []), *sorted(required)]))
                if need:
                    branch["required"] = need
                branches.append(branch)
            keep = {"$defs": node["$defs"]} if "$defs" in node else {}
            node.clear()
            node.update(anyOf=branches or [False], **keep)
            changed += 1
    if not defs:
        del schema["$defs"]
    return changed


def simplify(schema: Any) -> int:
    """All of the above, in place; returns how many places changed."""
    return drop_shadowed_properties(schema) + separate_named_from_patterns(schema) + drop_implied_types(schema) \
        + disjoin_patterns(schema) + merge_all_of(schema) + distribute_key_conditions(schema)

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

import json
import re
from collections.abc import Callable
from typing import Any

from .schema_key_conditions import distribute_key_conditions
from .schema_meet import meet
from .schema_negation import Unsupported
from .schema_pattern_complement import pattern_parts, pattern_within, pattern_without, patterns_disjoint

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


def _type_meet(a: frozenset[str], b: frozenset[str]) -> list[str]:
    """The type names both sets allow (`_type_set` adds "integer" under "number")."""
    both = a & b
    return sorted(both - {"integer"} if "number" in both else both)


def push_type_into_branches(schema: Any) -> int:
    """A node that is only `type` next to `anyOf`/`oneOf`: the type moves into each branch
    (T ∧ (A ∨ B) is (T ∧ A) ∨ (T ∧ B)), so llguidance no longer intersects the branches with a
    sibling and their properties can take other orders (schema_any_order.py). Branches that are
    references must already admit only the node's types (they are left as they are)."""
    if not isinstance(schema, dict):
        return 0
    types = _Types(schema.get("$defs", {}))
    changed = 0
    for node in _walk(schema):
        keys = set(node) - {"$defs", "type"}
        key = next(iter(keys)) if len(keys) == 1 else None
        allowed = _type_set(node["type"]) if "type" in node else None
        if key not in _BRANCHES or allowed is None or not isinstance(node[key], list):
            continue
        branches: list[Any] = []
        for branch in node[key]:
            bound = types.of(branch)
            own = _type_set(branch.get("type", sorted(_ANY))) if isinstance(branch, dict) else None
            if bound is not None and bound <= allowed:
                branches.append(branch)
            elif isinstance(branch, dict) and "$ref" not in branch and own is not None and _type_meet(allowed, own):
                names = _type_meet(allowed, own)
                branches.append({**branch, "type": names[0] if len(names) == 1 else names})
            else:
                break
        else:
            node[key] = branches
            del node["type"]
            changed += 1
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


MAX_COVER_PATTERNS = 8


def drop_covered_patterns(schema: Any) -> int:
    """A `patternProperties` entry whose every key another entry with the same schema (same vetted
    JSON) matches too is removed: such a key is checked by that entry all the same (S and S is S),
    and stays non-additional. llguidance wants the patterns disjoint; chrome-manifest's `commands`
    names `.*` and two literal keys, all three with one `$ref`."""
    changed = 0
    for node in _walk(schema):
        patterns = node.get("patternProperties")
        if not isinstance(patterns, dict) or not 1 < len(patterns) <= MAX_COVER_PATTERNS:
            continue
        texts = {p: json.dumps(v, sort_keys=True) for p, v in patterns.items()}
        kept = list(patterns)
        for q in list(kept):
            if any(p != q and texts[p] == texts[q] and pattern_within(q, p) for p in kept):
                kept.remove(q)
        if len(kept) < len(patterns):
            node["patternProperties"] = {p: patterns[p] for p in kept}
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


def simplify(schema: Any) -> int:
    """All of the above, in place; returns how many places changed. Named properties are separated
    from patterns again after allOf merges, which bring names and patterns into one node (hayson:
    `gridMeta` is `allOf: [dict]` plus a `ver` key that dict's pattern, a recursive value, matches)."""
    changed = drop_shadowed_properties(schema) + separate_named_from_patterns(schema) + drop_implied_types(schema) \
        + push_type_into_branches(schema) + drop_covered_patterns(schema) + disjoin_patterns(schema)
    merged = merge_all_of(schema)
    if merged:
        changed += merged + separate_named_from_patterns(schema)
    return changed + distribute_key_conditions(schema)

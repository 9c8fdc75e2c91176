"""`unevaluatedProperties` where evaluation is static: a plain `additionalProperties` next to
every property name and pattern that the node evaluates.

2020-12 §11.3: unevaluatedProperties applies to the keys that no `properties`,
`patternProperties` or `additionalProperties` evaluated, in this schema object or in the
subschemas applied in place to the same instance (allOf, $ref, and the *successful* branches of
anyOf/oneOf/if/dependentSchemas; `not` contributes nothing). Where the only in-place subschemas
that evaluate keys are unconditional (the node, allOf members, `$ref` targets — when one of
them fails, so does the whole node), the evaluated keys are fixed: the names listed and the keys
matching the patterns, or every key once some `additionalProperties` is present. Then
`unevaluatedProperties: S` is exactly `{properties: {name: true}, patternProperties: {p: true},
additionalProperties: S}` intersected with the node. A key evaluated only inside a conditional
branch has no such form: refused with the reason.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .schema_negation import Unsupported

_EVALUATES = ("properties", "patternProperties", "additionalProperties", "unevaluatedProperties")
_CONDITIONAL = ("anyOf", "oneOf", "if", "then", "else", "dependentSchemas")
Resolve = Callable[[str, Any], tuple[Any, Any] | None]  # ($ref, scope) -> (target, its scope)


def _evaluates(node: Any, resolve: Resolve, scope: Any, seen: set[int]) -> bool:
    """Some key is evaluated in `node`'s in-place closure (any applicator)."""
    if not isinstance(node, dict) or id(node) in seen:
        return False
    seen.add(id(node))
    if any(k in node for k in _EVALUATES):
        return True
    subs: list[tuple[Any, Any]] = []
    for key in ("allOf", "anyOf", "oneOf"):
        subs += [(s, scope) for s in node.get(key, ()) if isinstance(node.get(key), list)]
    subs += [(node[k], scope) for k in ("if", "then", "else") if k in node]
    deps = node.get("dependentSchemas")
    subs += [(s, scope) for s in deps.values()] if isinstance(deps, dict) else []
    if isinstance(node.get("$ref"), str):
        found = resolve(node["$ref"], scope)
        subs += [found] if found else []
    return any(_evaluates(s, resolve, sc, seen) for s, sc in subs)


def evaluated_keys(node: dict[str, Any], resolve: Resolve, scope: Any) -> tuple[list[str], list[str], bool]:
    """(names, patterns, every key) that `node` evaluates before its own unevaluatedProperties;
    Unsupported when a conditional branch evaluates keys or a `$ref` cannot be followed."""
    names: list[str] = []
    patterns: list[str] = []
    everything = False
    stack: list[tuple[Any, Any, bool]] = [(node, scope, True)]
    seen: set[int] = set()
    while stack:
        cur, sc, top = stack.pop()
        if not isinstance(cur, dict) or id(cur) in seen:
            continue
        seen.add(id(cur))
        if isinstance(cur.get("properties"), dict):
            names += [k for k in cur["properties"] if k not in names]
        if isinstance(cur.get("patternProperties"), dict):
            patterns += [p for p in cur["patternProperties"] if p not in patterns]
        everything |= "additionalProperties" in cur or (not top and "unevaluatedProperties" in cur)
        for key in _CONDITIONAL:
            value = cur.get(key)
            if key in ("anyOf", "oneOf"):
                branches = value if isinstance(value, list) else []
            elif key == "dependentSchemas":
                branches = list(value.values()) if isinstance(value, dict) else []
            else:
                branches = [value] if key in cur else []
            if any(_evaluates(b, resolve, sc, set()) for b in branches):
                raise Unsupported("unevaluatedProperties", f"keys evaluated inside {key!r} (which branch "
                                                           "holds decides which keys are evaluated)")
        if "$dynamicRef" in cur or "$recursiveRef" in cur:
            raise Unsupported("unevaluatedProperties", "keys evaluated through a dynamic reference")
        if isinstance(cur.get("allOf"), list):
            stack += [(s, sc, False) for s in cur["allOf"]]
        if isinstance(cur.get("$ref"), str):
            found = resolve(cur["$ref"], sc)
            if found is None:
                raise Unsupported("unevaluatedProperties", f"the reference {cur['$ref']!r} cannot be followed")
            stack.append((found[0], found[1], False))
    return names, patterns, everything


def unevaluated_properties(node: dict[str, Any], value: Any, resolve: Resolve, scope: Any) -> Any:
    """The schema to intersect with `node` for `unevaluatedProperties: value` (already vetted),
    or None when every key is evaluated anyway (the keyword is then vacuous)."""
    names, patterns, everything = evaluated_keys(node, resolve, scope)
    if everything or value is True:
        return None
    out: dict[str, Any] = {"additionalProperties": value}
    if names:
        out["properties"] = dict.fromkeys(names, True)
    if patterns:
        out["patternProperties"] = dict.fromkeys(patterns, True)
    return out

"""Objects whose `allOf`/`anyOf` parts only say which keys are present or absent, as an `anyOf` of
whole copies of the object (llguidance merges such parts into one node whose named properties then
come in schema order only; each copy is a plain node that schema_any_order.py frees).

What `dependencies` / `dependentRequired`, `not: {required}` and many rewritten `oneOf`s become:
each part is read as a union of cases (forbidden keys, required keys, objects only), the cases
of all parts are combined, contradictory and subsumed combinations dropped, and each remaining
one is a copy with its required keys listed and its forbidden ones `false`. Exact: the copies'
union is the node's conjunction.
"""

from __future__ import annotations

import itertools
import math
from typing import Any

from .schema_any_order import hoist

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
    from .schema_simplify import _type_set, _walk  # the document walk it is one pass of

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

"""A chain of `if`/`then`/`else` on one discriminating property, as one case split.

Real-world schemas pick a shape by a tag: `allOf: [{if: {properties: {type: {const: "a"}}},
then: A}, {if: ... "b" ...}, ...]`. Each `if` becomes a two-branch anyOf (schema.py), and the
backend multiplies N of them out into 2^N branches ("schema too large" at N ≈ 20). Yet the
conditions are decided by one thing, the instance's shape at key K, and the cases are few:

- not an object: a condition holds unless it says `type: object` (the rest is vacuous);
- an object without K: a condition holds unless it requires K; what it says of other keys stays
  a (smaller) `if` in that case;
- an object whose K is one of the listed values v: exactly the conditions naming v can hold,
  again up to what they say of other keys;
- an object whose K is something else: every condition is false.

Each case gets the `then` of the conditions that hold and the `else` of those that do not:
N + 3 branches, exactly the same instances. Used for chains of MIN_CHAIN or more conditions
whose tag values are strings; conditions may hold only `properties` (const or one-value enum
each), `required` and `type: object` (annotations aside).
"""

from __future__ import annotations

from collections import Counter
from typing import Any

MIN_CHAIN = 4
_ANNOTATIONS = frozenset({"title", "description", "$comment", "examples", "default", "markdownDescription"})


def _tag(value: Any) -> str | None:
    """The string a property condition pins (const, or an enum of one), else None."""
    if not isinstance(value, dict) or set(value) - _ANNOTATIONS - {"const", "enum", "type"}:
        return None
    if value.get("type", "string") != "string":
        return None
    if "const" in value:
        return value["const"] if isinstance(value["const"], str) else None
    enum = value.get("enum")
    return enum[0] if isinstance(enum, list) and len(enum) == 1 and isinstance(enum[0], str) else None


def _parse(member: Any) -> tuple[dict[str, Any], dict[str, str], Any, Any] | None:
    """(condition, its pinned tags, then, else) of a pure if/then/else member, else None."""
    if not isinstance(member, dict) or "if" not in member or set(member) - _ANNOTATIONS - {"if", "then", "else"}:
        return None
    cond = member["if"]
    if not isinstance(cond, dict) or set(cond) - _ANNOTATIONS - {"properties", "required", "type"}:
        return None
    props = cond.get("properties", {})
    required = cond.get("required", [])
    if not isinstance(props, dict) or not isinstance(required, list) or cond.get("type", "object") != "object":
        return None
    tags = {k: _tag(v) for k, v in props.items()}
    if any(t is None for t in tags.values()) or not set(required) <= set(props):
        return None
    return cond, tags, member.get("then", True), member.get("else", True)  # type: ignore[return-value]


def _residual(cond: dict[str, Any], key: str, then: Any, other: Any) -> Any:
    """The member once K is settled to match: what the condition says of other keys."""
    props = {k: v for k, v in cond.get("properties", {}).items() if k != key}
    required = [k for k in cond.get("required", []) if k != key]
    if not props and not required:
        return then
    rest: dict[str, Any] = {"properties": props} if props else {}
    if required:
        rest["required"] = required
    return {"if": rest, "then": then, "else": other}


_OBJECT_ONLY = frozenset({"properties", "required", "additionalProperties", "patternProperties",
                          "minProperties", "maxProperties", "propertyNames"})


def _object_only(part: Any) -> bool:
    """`part` constrains objects only (true for every other instance)."""
    return isinstance(part, dict) and "type" not in part and set(part) - _ANNOTATIONS <= _OBJECT_ONLY


def _meet(parts: list[Any]) -> list[Any]:
    """Plain `properties`/`required` parts merged into one (a key met twice gets both schemas):
    the backend intersects a long allOf one level per member and gives up past a depth."""
    plain = [p for p in parts if isinstance(p, dict) and set(p) - _ANNOTATIONS <= {"properties", "required"}
             and isinstance(p.get("properties", {}), dict) and isinstance(p.get("required", []), list)]
    if len(plain) < 2:
        return parts
    props: dict[str, list[Any]] = {}
    for p in plain:
        for k, v in p.get("properties", {}).items():
            props.setdefault(k, []).append(v)
    merged: dict[str, Any] = {"properties": {k: v[0] if len(v) == 1 else {"allOf": v} for k, v in props.items()}}
    required = list(dict.fromkeys(k for p in plain for k in p.get("required", [])))
    if required:
        merged["required"] = required
    return [merged, *[p for p in parts if not any(p is q for q in plain)]]


def _case(head: dict[str, Any], parts: list[Any]) -> dict[str, Any]:
    parts = _meet([p for p in parts if p is not True])
    return {**head, "allOf": parts} if parts else head


def split_if_chain(node: dict[str, Any]) -> dict[str, Any] | None:
    """`node` with its allOf chain of tag conditions replaced by the case split, or None."""
    members = node.get("allOf")
    if not isinstance(members, list):
        return None
    parsed = {i: p for i, m in enumerate(members) if (p := _parse(m)) is not None}
    counts = Counter(k for _, tags, _, _ in parsed.values() for k in tags)
    if not counts:
        return None
    key, n = counts.most_common(1)[0]
    if n < MIN_CHAIN:
        return None
    chain = [p for p in parsed.values() if key in p[1]]
    values = list(dict.fromkeys(tags[key] for _, tags, _, _ in chain))
    outside = [t if cond.get("type") != "object" else e for cond, _, t, e in chain]  # conditions on non-objects
    cases = [_case({"not": {"type": "object"}}, [p for p in outside if not _object_only(p)]),
             _case({"type": "object", "not": {"required": [key]}},
                   [e if key in cond.get("required", []) else _residual(cond, key, t, e) for cond, _, t, e in chain])]
    for v in values:
        cases.append(_case({"type": "object", "required": [key], "properties": {key: {"const": v}}},
                           [_residual(cond, key, t, e) if tags[key] == v else e for cond, tags, t, e in chain]))
    cases.append(_case({"type": "object", "required": [key], "properties": {key: {"not": {"enum": values}}}},
                       [e for _, _, _, e in chain]))
    rest = [m for i, m in enumerate(members) if i not in parsed or key not in parsed[i][1]]
    return {**node, "allOf": [*rest, {"anyOf": cases}]}

"""Exact complements of vetted schemas: what `not` and `if`/`else` need, without a `not` keyword.

A schema is a conjunction of keywords, so its complement is the union of each keyword's
complement. A keyword that applies to one instance type (minLength to strings, required to
objects) is true for every other type, so its complement stays inside that type. Complements
with no exact positive form (a multipleOf, an item somewhere in an array) raise
`Unsupported`; the caller refuses the schema with the keyword's pointer.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable
from typing import Any

from .schema_formats import NOT_FORMAT

TYPES = ("null", "boolean", "object", "array", "number", "string")  # "number" includes integers
_SCALAR_BOUND = {  # keyword -> (instance type, complement keyword, offset)
    "minLength": ("string", "maxLength", -1), "maxLength": ("string", "minLength", 1),
    "minItems": ("array", "maxItems", -1), "maxItems": ("array", "minItems", 1),
    "minProperties": ("object", "maxProperties", -1), "maxProperties": ("object", "minProperties", 1),
    "minimum": ("number", "exclusiveMaximum", 0), "maximum": ("number", "exclusiveMinimum", 0),
    "exclusiveMinimum": ("number", "maximum", 0), "exclusiveMaximum": ("number", "minimum", 0),
}


class Unsupported(Exception):
    """The complement of `keyword` has no exact form here."""

    def __init__(self, keyword: str, reason: str) -> None:
        super().__init__(reason)
        self.keyword, self.reason = keyword, reason


def regex_char(c: str) -> str:
    if c.isascii() and c.isalnum():
        return c
    code = ord(c)
    return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"


# Patterns not_in_pattern wrote, with their words: "in no word" is decided, and complemented (the
# words themselves), without an automaton (a trie of eight 40-character names takes 1.4 s to build).
NOT_IN_WORDS: dict[str, frozenset[str]] = {}


def words_pattern(words: list[str]) -> str:
    """An anchored regex for exactly `words`."""
    return "^(?:" + "|".join("".join(regex_char(c) for c in w) for w in sorted(set(words))) + ")$"


def not_in_pattern(words: list[str]) -> str:
    """An anchored regex for every string except `words` (built over their trie)."""
    out = _not_in_pattern(words)
    if len(NOT_IN_WORDS) > 4096:
        NOT_IN_WORDS.clear()
    NOT_IN_WORDS[out] = frozenset(words)
    return out


def _not_in_pattern(words: list[str]) -> str:
    trie: dict[str, Any] = {}
    for w in words:
        node = trie
        for c in w:
            node = node.setdefault(c, {})
        node[""] = True  # end marker

    def rx(node: dict[str, Any]) -> str:
        chars = sorted(c for c in node if c)
        alts = [] if "" in node else [""]  # this prefix itself is not a word: allowed
        alts += [regex_char(c) + rx(node[c]) for c in chars]
        other = f"[^{''.join(regex_char(c) for c in chars)}]" if chars else "[\\s\\S]"
        alts.append(other + "[\\s\\S]*")
        return "(?:" + "|".join(alts) + ")"

    return "^" + rx(trie) + "$"


def _value_type(v: Any) -> str:
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, (int, float)):
        return "number"
    return {str: "string", dict: "object", list: "array"}[type(v)]


def negate_values(values: list[Any]) -> list[Any]:
    """Branches whose union is every JSON value except `values`."""
    by_type: dict[str, list[Any]] = {}
    for v in values:
        by_type.setdefault(_value_type(v), []).append(v)
    branches: list[Any] = []
    free = [t for t in TYPES if t not in by_type]
    if free:
        branches.append({"type": free if len(free) > 1 else free[0]})
    if "boolean" in by_type and len({bool(v) for v in by_type["boolean"]}) == 1:
        branches.append({"const": not by_type["boolean"][0]})
    if "number" in by_type:
        nums = sorted(set(by_type["number"]))
        branches.append({"type": "number", "exclusiveMaximum": nums[0]})
        branches += [{"type": "number", "exclusiveMinimum": a, "exclusiveMaximum": b}
                     for a, b in zip(nums, nums[1:]) if a != b]
        branches.append({"type": "number", "exclusiveMinimum": nums[-1]})
    if "string" in by_type:
        branches.append({"type": "string", "pattern": not_in_pattern(by_type["string"])})
    if "array" in by_type:
        each = [_not_array(v) for v in by_type["array"]]
        branches.append(each[0] if len(each) == 1 else {"allOf": each})
    if "object" in by_type:
        each = [_not_object(v) for v in by_type["object"]]
        branches.append(each[0] if len(each) == 1 else {"allOf": each})
    return branches


def _not_array(value: list[Any]) -> Any:
    """Every array except `value`: another length, or some position holding another value."""
    n = len(value)
    out: list[Any] = [{"type": "array", "minItems": n + 1}]
    if n:
        out.append({"type": "array", "maxItems": n - 1})
    for k, item in enumerate(value):
        other = negate_values([item])
        other_item = other[0] if len(other) == 1 else {"anyOf": other}
        out.append({"type": "array", "minItems": k + 1, "prefixItems": [True] * k + [other_item]})
    return {"anyOf": out}


def _not_object(value: dict[str, Any]) -> Any:
    """Every object except `value`: one of its keys missing, or holding another value, or (every
    key there with its value) a key more, counted (unnamed_key_present's argument). The other
    keys stay named (`true`) in the value's order, which llguidance then accepts them in."""
    keys = list(value)

    def branch(changed: dict[str, Any], **more: Any) -> dict[str, Any]:
        return {"type": "object", "properties": {k: changed.get(k, True) for k in keys}, **more}

    out: list[Any] = [branch({k: False}) for k in keys]
    for k in keys:
        other = negate_values([value[k]])
        out.append(branch({k: other[0] if len(other) == 1 else {"anyOf": other}}, required=[k]))
    out.append(branch({}, required=keys, minProperties=len(keys) + 1) if keys
               else {"type": "object", "minProperties": 1})
    return {"anyOf": out}


def negate(schema: Any, deref: Callable[[str], Any], depth: int = 0) -> Any:
    """A vetted schema (backend form) accepting exactly the instances `schema` rejects."""
    if schema is True or schema is False:
        return not schema
    if depth > 32:
        raise Unsupported("$ref", "the complement of a recursive schema")
    branches: list[Any] = []
    for key, value in schema.items():
        if key == "additionalProperties":
            branches += _some_additional_key(schema, value, deref, depth)
        else:
            branches += negate_keyword(key, value, deref, depth)
    seen: set[str] = set()
    unique = []
    for b in branches:
        text = json.dumps(b, sort_keys=True)
        if b is not False and text not in seen:
            seen.add(text)
            unique.append(b)
    if any(b is True for b in unique):
        return True
    if not unique:
        return False
    return unique[0] if len(unique) == 1 else {"anyOf": unique}


def negate_keyword(key: str, value: Any, deref: Callable[[str], Any], depth: int) -> list[Any]:
    if key == "type":
        named = {value} if isinstance(value, str) else set(value)
        if "integer" in named and "number" not in named:
            raise Unsupported("type", "the complement of 'integer' (non-integer numbers)")
        rest = [t for t in TYPES if t not in named]
        return [{"type": rest if len(rest) > 1 else rest[0]}] if rest else []
    if key == "const":
        return negate_values([value])
    if key == "enum":
        return negate_values(list(value))
    if key == "required":
        return [{"type": "object", "properties": {k: False}} for k in value]
    if key in _SCALAR_BOUND:
        kind, other, offset = _SCALAR_BOUND[key]
        bound = value + offset
        if offset and bound < 0:
            return []  # minLength 0 and the like: nothing violates it
        return [{"type": kind, other: bound}]
    if key == "pattern":
        from .schema_pattern_complement import complement_pattern  # it builds on this module

        other = complement_pattern(value)
        return [] if other is None else [{"type": "string", "pattern": other}]
    if key == "properties":
        out = []
        for name, sub in value.items():
            neg = negate(sub, deref, depth + 1)
            if neg is not False:
                out.append({"type": "object", "required": [name], "properties": {name: neg}})
        return out
    if key == "patternProperties":
        return _some_pattern_key(value, deref, depth)
    if key == "anyOf":
        return [{"allOf": [negate(s, deref, depth + 1) for s in value]}]
    if key == "allOf":
        return [negate(s, deref, depth + 1) for s in value]
    if key == "$ref":
        return [negate(deref(value), deref, depth + 1)]
    if key == "not":  # a complement left unresolved (schema_double_negation.py): ¬¬S = S
        return [value]
    if key == "format" and value in NOT_FORMAT:
        return [{"type": "string", "pattern": NOT_FORMAT[value]}]
    raise Unsupported(key, f"the complement of {key!r} (it has no exact positive form)")


def _some_pattern_key(patterns: dict[str, Any], deref: Callable[[str], Any], depth: int) -> list[Any]:
    """¬patternProperties: some key matching a pattern has a failing value. Exact as a choice
    among named keys when each pattern matches a few strings only (propertyNames' `enum`)."""
    from .schema_pattern_complement import pattern_words  # it builds on this module

    out = []
    for pattern, sub in patterns.items():
        neg = negate(sub, deref, depth + 1)
        if neg is False:
            continue
        try:
            words = pattern_words(pattern)
        except Unsupported as exc:
            raise Unsupported("patternProperties", f"the complement of 'patternProperties' (some key's "
                                                   f"value fails): pattern {pattern!r}: {exc.reason}") from exc
        out += [_present(w, neg) for w in words]
    return out


def _some_additional_key(node: dict[str, Any], value: Any, deref: Callable[[str], Any], depth: int) -> list[Any]:
    """¬additionalProperties: some key outside properties/patterns has a failing value. Exact as a
    choice among named keys when the names outside them are a few strings (propertyNames' `not:
    {enum}` leaves such patterns), or when every name is outside and none is allowed (non-empty)."""
    from .schema_pattern_complement import unmatched_words  # it builds on this module

    neg = negate(value, deref, depth + 1)
    if neg is False:
        return []
    named, patterns = node.get("properties", {}), list(node.get("patternProperties", {}))
    if not patterns and neg is True:
        counted = unnamed_key_present(node)
        if counted is not None:
            return counted
    try:
        words = [w for w in unmatched_words(patterns) if w not in named]
    except Unsupported as exc:
        raise Unsupported("additionalProperties", f"the complement of 'additionalProperties' (some key's "
                                                  f"value fails): {exc.reason}") from exc
    return [_present(w, neg) for w in words]


MAX_OPTIONAL_SUBSETS = 16


def unnamed_key_present(node: dict[str, Any]) -> list[Any] | None:
    """Branches whose union, joined with ¬required and ¬properties of `node`, is "some key outside
    `node`'s named properties" (the complement of `additionalProperties: false`, no patterns).
    An instance outside those two has every required key and no key whose schema is `false`; it
    then has an unnamed key exactly when it has more keys than the named ones it holds: for each
    set T of optional keys present, `required` R ∪ T, the other optional keys forbidden, and
    minProperties |R ∪ T| + 1. None when more than MAX_OPTIONAL_SUBSETS sets would be listed."""
    named = node.get("properties", {})
    if not isinstance(named, dict):
        return None
    required = [k for k in node.get("required", ()) if isinstance(k, str)]
    closed = [k for k, v in named.items() if v is False]
    if any(k not in named or named[k] is False for k in required):
        return None  # a required key that is itself unnamed (or forbidden): not counted here
    optional = [k for k, v in named.items() if v is not False and k not in required]
    if 2 ** len(optional) > MAX_OPTIONAL_SUBSETS:
        return None
    out: list[Any] = []
    for n in range(len(optional) + 1):
        for present in itertools.combinations(optional, n):
            keys = list(dict.fromkeys([*required, *present]))
            absent = [k for k in optional if k not in present] + closed
            branch: dict[str, Any] = {"type": "object", "minProperties": len(keys) + 1}
            if keys:
                branch["required"] = keys
            if absent:
                branch["properties"] = dict.fromkeys(absent, False)
            out.append(branch)
    return out


def _present(name: str, value: Any) -> dict[str, Any]:
    """Objects having key `name` with a value satisfying `value`."""
    out: dict[str, Any] = {"type": "object", "required": [name]}
    if value is not True:
        out["properties"] = {name: value}
    return out

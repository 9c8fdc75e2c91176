""""Some key's value fails", kept for the Lark route as a private keyword of the vetted schema.

The complement of `additionalProperties: V` (or of `patternProperties: {P: V}`) says that some key
outside the node's names and patterns (or some key matching P) holds a value failing V. Over an
open key set that has no form in llguidance's JSON-schema vocabulary, yet its Lark front end can
write it as an object rule in which one pair's value is a ¬V leaf (schema_lark_object.py). With
Modes.contains, schema_relative writes such a complement as

    {"type": "object", SOME_KEY: {"out": [names], "match": [patterns], "unmatch": [patterns],
                                  "value": ¬V}}

"an object with a key k, not one of `out`, matching every `match` pattern and no `unmatch` one,
whose value satisfies ¬V". The keyword is no JSON-Schema keyword: proofs that do not know it
treat the node as weaker (sound), complements of it are refused, and a vetted schema holding it
never reaches llguidance's JSON compiler (schema_contains refuses such a leaf).
"""

from __future__ import annotations

import json
from typing import Any

from .schema_negation import Unsupported
from .schema_pattern_complement import complement_pattern, pattern_matches

SOME_KEY = "$someKey"
# A number with a fractional part, for "not an integer" (schema_relative with Modes.contains): the
# Lark route writes it as a terminal (schema_lark_numbers.NOT_INTEGER_TERMINALS); no JSON-Schema keyword.
NOT_INTEGER = "$notInteger"
# Numbers that are no multiple of any of the listed integers (the complement of `multipleOf`, the
# same way; schema_lark_numbers.py writes them as remainder rules).
NOT_MULTIPLE = "$notMultipleOf"
_PRIVATE = (SOME_KEY, NOT_INTEGER, NOT_MULTIPLE)


def some_key(out: list[str], match: list[str], unmatch: list[str], value: Any) -> dict[str, Any]:
    """Objects with a key of that class holding a value that satisfies `value`."""
    return {"type": "object", SOME_KEY: {"out": sorted(out), "match": list(match), "unmatch": list(unmatch),
                                         "value": value}}


def holds_marker(node: Any) -> bool:
    """True when a private keyword occurs anywhere in `node` (a leaf that must not go to llguidance as JSON)."""
    text = json.dumps(node)
    return any(f'"{k}"' in text for k in _PRIVATE)


def key_in(mark: dict[str, Any], name: str) -> bool:
    """Whether the literal key `name` is of the marker's class (Unsupported: a pattern we cannot read)."""
    if name in mark["out"]:
        return False
    for pattern, wanted in [(p, True) for p in mark["match"]] + [(p, False) for p in mark["unmatch"]]:
        hit = pattern_matches(pattern, name)
        if hit is None:
            raise Unsupported("additionalProperties", f"a key pattern we cannot decide: {pattern!r}")
        if hit != wanted:
            return False
    return True


def key_schema(marks: list[dict[str, Any]], parts: list[dict[str, Any]]) -> dict[str, Any] | None:
    """A string schema for the keys of every one of `marks` that also satisfy `parts` (string
    keywords from the caller: the key class of the object node); None when no such key exists."""
    from .schema_lark_object import not_named  # it builds on this module

    parts = list(parts)
    for mark in marks:
        parts += [not_named(mark["out"])] if mark["out"] else []
        parts += [{"pattern": p} for p in mark["match"]]
        for p in mark["unmatch"]:
            other = complement_pattern(p)
            if other is None:
                return None  # `p` matches every key: none is unmatched
            parts.append({"pattern": other})
    out: dict[str, Any] = {"type": "string"}
    if len(parts) == 1:
        out.update(parts[0])
    elif parts:
        out["allOf"] = parts
    return out

""""Some key's value fails" over open key sets, key counts and open patterns on the Lark route
(schema_some_key.py, schema_lark_object.py; issue 14 coverage), checked against `jsonschema`: every
listed instance is accepted token by token exactly when the reference validator says it is valid.
Each compiled case is refused without the change.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.errors import UnsupportedSchemaError
from radixlm.constrained.schema_negation import not_in_pattern
from radixlm.constrained.schema_pattern_complement import complement_pattern, pattern_matches

from .conftest import assert_matches_reference, encode, reference_valid, run_tokens

_LONG = [f"@angular-devkit/build-angular:{w}" for w in ("app-shell", "browser", "dev-server", "karma")]

CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # oneOf of two maps: "exactly one" needs "some value fails the other branch" over any key
    "one_of_maps": ({"type": "object", "oneOf": [{"additionalProperties": {"type": "string"}},
                                                 {"additionalProperties": {"maxLength": 2}}]}, [
        {}, {"x": "abc"}, {"x": 1}, {"x": "ab"}, {"x": "ab", "y": "abcd"}, {"x": "ab", "y": 3}, {"x": "abc", "y": 1},
        {"x": "ab", "y": "cd"}, [1]]),
    # open pattern keys (search semantics), the failing key among them (MaskBench oneof1_2's shape)
    "one_of_patterns": ({"type": "object", "oneOf": [{"patternProperties": {"a": {"maximum": 35}}},
                                                     {"patternProperties": {"a": {"maximum": 40}}}]}, [
        {}, {"a": 38}, {"b": 100, "xa": 38}, {"a": 30}, {"a": 50}, {"a": 30, "ba": 40}, {"b": 38}, {"a": "s", "ca": 39}]),
    # key counts on the route: named keys exactly; other keys as pairs toward maxProperties, as one at
    # most toward minProperties (a key may repeat in the text), so `{"b": 1, "c": 2}` is refused here
    "counted": ({"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}},
                 "minProperties": 2, "maxProperties": 3}, [
        {"a": [1], "b": 1}, {"a": [1]}, {"a": [1], "b": 1, "c": 2, "d": 3}, {"a": [0], "b": 1},
        {"b": 1}, {"a": [1], "b": 1, "c": 2}]),
    # a required key that is not named: first, once, with the value additionalProperties gives it
    "required_unlisted": ({"type": "object", "required": ["k", "a"], "additionalProperties": {"type": "integer"},
                           "properties": {"a": {"type": "array", "contains": {"const": 1}}}}, [
        {"k": 1, "a": [1]}, {"k": "x", "a": [1]}, {"a": [1]}, {"k": 1, "a": [1], "z": 2}, {"k": 1, "a": [1], "z": "s"}]),
    # two "some key matches" (Handwritten object5's shape): keys present with any value, so either
    # may come anywhere and repeat; one key may satisfy both
    "two_present_keys": ({"type": "object", "allOf": [{"not": {"propertyNames": {"not": {"pattern": "a"}}}},
                                                      {"not": {"propertyNames": {"not": {"pattern": "b"}}}}]}, [
        {"ab": 1}, {"a": 1, "b": 2}, {"b": 1, "a": 2}, {"a": 1}, {}, {"x": 1, "ab": 2}, {"x": 1, "b": [], "y": 2},
        {"xa": None, "q": 1, "yb": 2}]),
    # "not an integer" (Snowplow sp_377's shape): a oneOf of two objects, one with an integer field;
    # the other's complement holds a number with a fraction (a Lark terminal, no exponent)
    "one_of_not_integer": ({"oneOf": [{"type": "object", "required": ["a"], "properties": {"a": {"type": "string"}}},
                                      {"type": "object", "required": ["a", "n"],
                                       "properties": {"n": {"type": "integer", "minimum": 900}}}]}, [
        {"a": "x"}, {"a": "x", "n": 1000}, {"a": "x", "n": 1.5}, {"a": "x", "n": 10}, {"a": "x", "n": "s"},
        {"n": 1000, "a": 1}, {"a": 1, "n": 1.5}, {"a": "x", "n": -0.25}, {"n": 1000}]),
    # the complement of that complement inside a second oneOf: the integers again
    "not_integer_twice": ({"type": "array", "oneOf": [{"items": {"type": "integer"}}, {"items": {"type": "number"}}],
                           "maxItems": 1}, [[], [1], [1.5], ["a"], [2.25]]),
    # a bound of 0 beside "not an integer" picks the sign: non-positive numbers that are no integer
    "one_of_integer_or_non_positive": ({"oneOf": [{"type": "integer"}, {"type": "number", "maximum": 0}]}, [
        1, -1, -1.5, 0, 0.5, -0.5, "a", 7]),
    # aerleon's shape: a oneOf of files, one holding terms that are a oneOf of an open and a closed
    # object; "some term fails" is `contains` of the complement, which has `additionalProperties:
    # true` (nothing fails it) and "a key besides `include`" (minProperties on the route)
    "one_of_terms": ({"oneOf": [{"type": "object", "required": ["terms"],
                                 "properties": {"terms": {"type": "array", "items": {"$ref": "#/$defs/term"}}}},
                                {"type": "object", "required": ["filters"]}],
                      "$defs": {"term": {"oneOf": [
                          {"type": "object", "required": ["name"], "additionalProperties": True,
                           "properties": {"name": {"type": "string"}}},
                          {"type": "object", "required": ["include"], "additionalProperties": False,
                           "properties": {"include": {"type": "string"}}}]}}}, [
        {"terms": [{"name": "a"}]}, {"terms": [{"name": "a"}], "filters": 1}, {"filters": 1},
        {"terms": [{"include": "x"}, {"name": "b", "z": 1}]}, {"terms": [{"name": "a", "include": "x"}]},
        {"terms": [{"include": 1}]}, {"terms": [], "filters": 2}, {}, {"terms": [{"include": "x", "z": 1}]}]),
    # two allOf members with pattern keys (Handwritten object9's shape): met as disjoint key classes
    # (a only, both, ^.b only; the rest additional) on the route
    "patterns_in_two_members": ({"type": "object", "allOf": [
        {"patternProperties": {"a": {"type": "integer"}}},
        {"patternProperties": {"^.b": {"minimum": 3}}, "additionalProperties": {"type": "string"}},
        {"not": {"propertyNames": {"not": {"pattern": "c"}}}}]}, [
        {"ab": 3, "c": "s"}, {"ab": 2, "c": "x"}, {"xc": 1}, {"ac": 5}, {"ca": 5, "cb": 4}, {"ca": "s"}, {"cb": "s"},
        {"xb": 7, "ac": 1}, {"ab": 3}]),
    # three members (Handwritten allOfPProp4's shape): the first two's key classes, regexes of hundreds of
    # characters written from automata, are met with the third through those automata
    "patterns_in_three_members": ({"type": "object", "maxProperties": 1, "allOf": [
        {"patternProperties": {"^.{1,3}$": False}}, {"patternProperties": {"a": True}, "additionalProperties": False},
        {"patternProperties": {"b": True}, "additionalProperties": False},
        {"not": {"patternProperties": {"c": False}}}]}, [
        {"abcx": 1}, {"abc": 1}, {"abxx": 1}, {"xbca": "s"}, {"abcd": 1, "q": 2}, {"bcde": 1}, {}, {"cab\nx": 1}]),
    # a required key only a pattern names (Handwritten object7's shape): checked by that pattern
    "required_by_pattern": ({"type": "object", "required": ["da"], "patternProperties": {"^d": {"type": "integer"}},
                             "additionalProperties": False, "not": {"propertyNames": {"not": {"pattern": "b"}}}}, [
        {"da": 1, "db": 2}, {"da": 1}, {"da": "x", "db": 1}, {"db": 1}, {"da": 1, "xb": 1}, {"dab": 3}]),
    # four "some key matches" in one object (object7 asks a, b, c and d of two keys)
    "four_present_keys": ({"type": "object", "maxProperties": 2, "allOf": [
        {"not": {"propertyNames": {"not": {"pattern": c}}}} for c in "abcd"]}, [
        {"ab": 1, "cd": 2}, {"abcd": 1}, {"ab": 1}, {"ab": 1, "cd": 2, "x": 3}, {"ac": 1, "bd": 1}, {"ad": 1, "c": 2}]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_some_key_matches_reference(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    assert_matches_reference(tokenizer, C.compile(tokenizer, json_schema=schema, cache=None), schema, instances)


def test_met_classes_proved_without_a_parse(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the automata kept for the regexes written from them, the third member's meet sees
    patterns past the proof cap and the schema is refused."""
    from radixlm.constrained import schema_pattern_complement as spc

    monkeypatch.setattr(spc, "_too_long", lambda p: len(p) > spc.MAX_PROOF_PATTERN)
    with pytest.raises(UnsupportedSchemaError):
        C.compile(tokenizer, json_schema=CASES["patterns_in_three_members"][0], cache=None)


def test_failing_key_last_and_duplicates(tokenizer: Any) -> None:
    """A failing key outside the named ones is the object's last pair: a parser keeps the last of
    repeated keys, so `{"x": "abcd", "x": "a"}` (parsed: `{"x": "a"}`, valid for both branches, so
    invalid for the oneOf) is refused; a valid instance whose failing key comes first is refused
    too (stricter than the schema, never looser)."""
    schema, _ = CASES["one_of_maps"]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for text, ok in [('{"x": "abcd", "x": "a"}', False), ('{"y": "abcd", "x": "ab"}', False),
                     ('{"x": "ab", "y": "abcd"}', True), (json.dumps({"x": "ab", "y": "abcd"}, indent=2), True)]:
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == ok, text
    assert reference_valid(schema, {"y": "abcd", "x": "ab"})


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}}, "minProperties": 9},
    # named keys × keys counted past the object rule's state cap
    {"type": "object", "minProperties": 8, "maxProperties": 8, "not": {"additionalProperties": {"type": "string"}},
     "properties": {f"k{i}": {"type": "integer"} for i in range(60)}},
    # five failing keys asked of one object
    {"type": "object", "allOf": [{"not": {"additionalProperties": {"type": t}}}
                                 for t in ("string", "number", "null", "array", "boolean")]},
])
def test_outside_the_route_still_refused(tokenizer: Any, schema: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchemaError):
        C.compile(tokenizer, json_schema=schema, cache=None)


def test_not_integer_terminal_is_stricter(tokenizer: Any) -> None:
    """Non-integers are written with a fraction digit and no exponent, at most 15 significant digits
    (a double reads such a decimal back exactly, so no reader takes it for an integer): 9.005e2 and
    1000.00000000000001 (a double reads 1000.0) are refused; 1000.0 is an integer (both branches)."""
    schema, _ = CASES["one_of_not_integer"]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for number, ok in [("1000.5", True), ("900.25", True), ("1000.0", False), ("9.005e2", False),
                       ("1000.00000000000001", False), ("123456789012345.5", False), ("12345678901234.5", True)]:
        text = '{"a": "x", "n": ' + number + "}"
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == ok, text


def test_not_in_words_decided_without_automaton() -> None:
    """"None of these words" patterns are decided and complemented by their words (an automaton of
    eight long names takes seconds): the complement is exactly the words."""
    pattern = not_in_pattern(_LONG)
    assert all(pattern_matches(pattern, w) is False for w in _LONG)
    assert pattern_matches(pattern, _LONG[0] + "x") is True
    other = complement_pattern(pattern)
    assert other is not None
    import re

    assert all(re.fullmatch(other[1:-1], w) for w in _LONG)
    assert not re.fullmatch(other[1:-1], _LONG[0][:-1]) and not re.fullmatch(other[1:-1], "")

"""Exact simplifications before llguidance (constrained/schema_simplify.py, schema_meet.py) and
the `required`-order branch of schema_any_order.py, checked against `jsonschema`: every instance
is accepted token by token exactly when the reference validator says it is valid. Each case
fails without its rewrite (llguidance refuses the schema, or rejects a valid instance)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema as schema_module
from radixlm.constrained import schema_simplify
from radixlm.constrained.errors import GrammarCompileError
from radixlm.constrained.schema_meet import meet

from .conftest import encode, run_tokens

INT, STR = {"type": "integer"}, {"type": "string"}
_REDIRECT = {"type": "object", "additionalProperties": False, "required": ["type", "url"],
             "properties": {"type": {"enum": ["redirect"]}, "url": STR}}
_ITEM = {"type": "object", "required": ["type"], "additionalProperties": {},
         "properties": {"type": {"enum": ["story", "image"]}, "children": {"$ref": "#/$defs/related"}}}
_HAYSON = {"$ref": "#/$defs/hval", "$defs": {
    "hval": {"anyOf": [STR, {"type": "number"}, {"$ref": "#/$defs/dict"}, {"$ref": "#/$defs/grid"}]},
    "dict": {"type": "object", "properties": {"_kind": {"enum": ["dict"]}}, "additionalProperties": False,
             "patternProperties": {"^[a-z][0-9a-zA-Z_]*": {"$ref": "#/$defs/hval"}}},
    "grid": {"type": "object", "additionalProperties": False, "required": ["_kind", "meta"],
             "properties": {"_kind": {"enum": ["grid"]}, "meta": {"$ref": "#/$defs/meta"}}},
    "meta": {"allOf": [{"$ref": "#/$defs/dict"}], "type": "object", "required": ["ver"], "properties": {"ver": {"enum": ["3.0"]}}}}}
CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # WashingtonPost's shape: a named property under a matching pattern whose items recurse
    "named_under_recursive_pattern": ({"$ref": "#/$defs/item", "$defs": {
        "item": _ITEM, "redirect": _REDIRECT,
        "related": {"type": "object", "patternProperties": {".*": {
            "type": "array", "items": {"anyOf": [{"$ref": "#/$defs/item"}, {"$ref": "#/$defs/redirect"}], "type": "object"}}},
            "properties": {"redirect": {"type": "array", "maxItems": 1, "items": {"$ref": "#/$defs/redirect"}}}}}},
        [{"type": "story", "children": {"redirect": [{"type": "redirect", "url": "u"}]}},
         {"type": "story", "children": {"redirect": [{"type": "story"}]}},
         {"type": "story", "children": {"redirect": [{"type": "redirect", "url": "u"}, {"type": "redirect", "url": "v"}]}},
         {"type": "image", "children": {"other": [{"type": "story"}, {"type": "redirect", "url": "u"}]}},
         {"type": "image", "children": {"other": [{"type": "redirect"}]}},
         {"type": "image", "children": {"redirectx": [{"type": "image", "children": {}}]}}]),
    # a `type` next to an anyOf of recursive references that all imply it
    "implied_type": ({"$ref": "#/$defs/n", "$defs": {"n": {"type": "object", "properties": {
        "kids": {"type": "array", "items": {"anyOf": [{"$ref": "#/$defs/n"}], "type": "object"}},
        "v": INT}}}},
        [{"v": 1, "kids": [{"v": 2, "kids": []}]}, {"kids": [3]}, {"kids": [{"v": "x"}]}]),
    # a named property whose schema equals the pattern's that matches it (both recursive)
    "shadowed_by_equal_pattern": ({"$ref": "#/$defs/n", "$defs": {"n": {
        "type": "object", "required": ["by"],
        "properties": {"by": {"type": "array", "items": {"$ref": "#/$defs/n"}}},
        "patternProperties": {"^[a-z_]*": {"type": "array", "items": {"$ref": "#/$defs/n"}}}}}},
        [{"by": []}, {"by": [{"by": []}], "x": []}, {"x": []}, {"by": [{}]}, {"by": [], "Y": 1}]),
    # dependentRequired / dependencies: the object no longer merged, so its keys take any order
    "dependencies_any_order": ({"$schema": "http://json-schema.org/draft-07/schema#",
                                "type": "object", "additionalProperties": False,
                                "dependencies": {"c": ["d"], "e": {"required": ["a"]}},
                                "properties": {k: INT for k in "abcde"}},
                               [{"d": 1, "c": 2}, {"c": 2}, {"e": 1, "a": 3, "b": 2}, {"e": 1}, {"b": 1, "a": 2},
                                {"d": 1, "c": "x"}, {"f": 1}]),
    # past three required keys: the order `required` lists them in is taken too
    "required_listing_order": ({"type": "object", "required": ["name", "version", "id", "kind"],
                                "properties": {k: STR for k in ("id", "kind", "name", "opt", "version")}},
                               [{"name": "n", "version": "v", "id": "i", "kind": "k"},
                                {"id": "i", "kind": "k", "name": "n", "opt": "o", "version": "v"},
                                {"name": "n", "version": "v", "id": "i", "kind": "k", "opt": "o"},
                                {"name": "n", "version": "v", "id": "i"}, {"name": 1, "version": "v", "id": "i", "kind": "k"}]),
    # allOf of an open map and named properties: one plain node after our meet, any key order
    "all_of_met": ({"type": "object", "properties": {"links": {"allOf": [{"$ref": "#/$defs/links"}, {"$ref": "#/$defs/pages"}]}},
                    "$defs": {"links": {"type": "object", "additionalProperties": STR},
                              "pages": {"properties": {"next": {"type": ["string", "null"]}, "first": STR}}}},
                   [{"links": {"self": "/a", "next": "/b"}}, {"links": {"next": "/b", "self": "/a"}}, {"links": {"self": 1}},
                    {"links": {"next": None}}, {"links": {"first": "f", "next": 2}}]),
    # two overlapping patternProperties (llguidance wants disjoint ones)
    "overlapping_patterns": ({"type": "object", "additionalProperties": False, "patternProperties": {
        "^\\w[-\\w_]*$": {}, "^(relationships|links)$": {"not": {}}}},
        [{"a": 1, "b-c": [2]}, {"links": 1}, {"-x": 1}, {"relationships": {}}, {"linksx": 1}]),
    # chrome-manifest's `commands`: `.*` and two literal keys, all three with one schema (three
    # overlapping pairs: llguidance refuses them, disjoin_patterns takes one pair only)
    "covered_patterns": ({"type": "object", "patternProperties": {
        ".*": {"$ref": "#/$defs/cmd"}, "^_run$": {"$ref": "#/$defs/cmd"}, "^_page$": {"$ref": "#/$defs/cmd"}},
        "$defs": {"cmd": {"type": "object", "properties": {"key": STR}, "additionalProperties": False}}},
        [{"_run": {"key": "a"}, "x": {}}, {"_page": {"key": 1}}, {"_run": {"k": "a"}}, {"y": {"key": "b"}, "_page": {}},
         {"z": 1}, {}]),
    # hayson's shape: `meta` is allOf [dict] plus a `ver` key that dict's recursive pattern matches
    "named_after_all_of_merge": (_HAYSON, [
        {"_kind": "grid", "meta": {"_kind": "dict", "ver": "3.0"}}, {"_kind": "grid", "meta": {"ver": "2.0"}},
        {"_kind": "grid", "meta": {"ver": "3.0", "x": 1}}, {"_kind": "grid", "meta": {"ver": "3.0", "X": 1}},
        {"_kind": "dict", "a": {"_kind": "dict"}}, "s", {"_kind": "grid"}]),
}
# instance index of a valid instance that the case's rewrite is needed for (None: needed to compile)
NEEDS = {"named_after_all_of_merge": None, "named_under_recursive_pattern": None, "implied_type": None, "shadowed_by_equal_pattern": None,
         "dependencies_any_order": 4, "required_listing_order": 0, "all_of_met": 0, "overlapping_patterns": None,
         "covered_patterns": None}


def _valid(schema: Any, instance: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema).is_valid(instance)


def _accepts(tokenizer: Any, grammar: Any, instance: Any) -> bool:
    return run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instance, ensure_ascii=False)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        assert _accepts(tokenizer, grammar, instance) == _valid(schema, instance), f"{name}: {instance}"


@pytest.mark.parametrize("name", sorted(CASES))
def test_fails_without_the_rewrite(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema, instances = CASES[name]
    monkeypatch.setattr(schema_module, "simplify", lambda s: 0)
    if name == "required_listing_order":
        monkeypatch.setattr(schema_module, "free_optional_order", lambda s: 0)
    index = NEEDS[name]
    if index is None:
        with pytest.raises((GrammarCompileError, C.UnsupportedSchemaError)):
            C.compile(tokenizer, json_schema=schema, cache=None)
        return
    assert _valid(schema, instances[index])
    assert not _accepts(tokenizer, C.compile(tokenizer, json_schema=schema, cache=None), instances[index])


def test_names_separated_again_after_all_of_merges(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the second separation (names from patterns, after merge_all_of) llguidance refuses
    hayson's shape: "circular references with sibling keys"."""
    def one_pass(schema: Any) -> int:
        return (schema_simplify.drop_shadowed_properties(schema) + schema_simplify.separate_named_from_patterns(schema)
                + schema_simplify.drop_implied_types(schema) + schema_simplify.disjoin_patterns(schema)
                + schema_simplify.merge_all_of(schema) + schema_simplify.distribute_key_conditions(schema))
    monkeypatch.setattr(schema_module, "simplify", one_pass)
    with pytest.raises(C.UnsupportedSchemaError, match="circular"):
        C.compile(tokenizer, json_schema=_HAYSON, cache=None)


def test_covered_patterns_dropped_only_under_an_equal_schema(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """The covered_patterns case is refused with every other simplification kept; a literal key
    whose schema differs from the `.*` one that covers it is kept (its key must meet both)."""
    monkeypatch.setattr(schema_simplify, "drop_covered_patterns", lambda s: 0)
    with pytest.raises((GrammarCompileError, C.UnsupportedSchemaError)):
        C.compile(tokenizer, json_schema=CASES["covered_patterns"][0], cache=None)
    node = {"patternProperties": {".*": INT, "^a$": {"minimum": 3}, "^b$": INT, "^c": STR}}
    monkeypatch.undo()
    assert schema_simplify.drop_covered_patterns(node) == 1
    assert list(node["patternProperties"]) == [".*", "^a$", "^c"]


def _deref(defs: dict[str, Any]) -> Any:
    return lambda ref: defs[ref.rsplit("/", 1)[-1]]


MEET_PAIRS = [
    ({"type": ["string", "integer"], "minLength": 2}, {"type": "string", "maxLength": 3}),
    ({"type": "number"}, {"type": "integer", "minimum": 3}),
    ({"type": "string"}, {"type": "integer"}),
    ({"type": "object", "properties": {"a": INT}, "additionalProperties": False},
     {"type": "object", "properties": {"b": STR}, "required": ["a"]}),
    ({"type": "object", "patternProperties": {"^x": INT}}, {"properties": {"xa": {"minimum": 2}, "y": STR}}),
    ({"anyOf": [INT, STR, {"type": "null"}]}, {"type": ["string", "null"], "minLength": 1}),
    # patterns on both sides: key classes (^x only, both, a$ only) and the rest
    ({"type": "object", "patternProperties": {"^x": INT}, "additionalProperties": STR},
     {"patternProperties": {"a$": {"minimum": 2}}, "additionalProperties": {"type": ["integer", "string"]}}),
    ({"patternProperties": {"^x": INT, "^y": STR}}, {"patternProperties": {"a": {"minimum": 3}}, "additionalProperties": False}),
    # overlapping patterns on each side: a key may fall in two classes, whose schemas then all apply
    ({"patternProperties": {"^x": {"type": ["integer", "string"]}, "b$": True}},
     {"patternProperties": {"c": False, "^.b": {"minimum": 3}}, "additionalProperties": False}),
    ({"type": "array", "items": {"anyOf": [INT, STR]}, "maxItems": 2}, {"type": "array", "items": STR, "minItems": 1}),
    ({"$ref": "#/$defs/s"}, {"pattern": "b", "maxLength": 4}),
]
SAMPLES = [None, True, 0, 1, 2.5, 3, 7, "", "a", "ab", "abc", "abcd", "bbbbb", [], ["a"], ["a", 1], ["a", "b", "c"], [1],
           {}, {"a": 1}, {"a": "x"}, {"b": "s"}, {"a": 1, "b": "s"}, {"a": 1, "c": 2}, {"xa": 1}, {"xa": 3},
           {"xa": 3, "y": "s"}, {"y": 1}, {"xb": "s"}, {"a": "s"}, {"a": 3}, {"ya": 4}, {"ya": "s"}, {"xb": 1, "q": "s"},
           {"xb": 1, "q": 2}, {"b": None}, {"abc": 5}, {"cb": "long"}, {"xb": 2}, {"ab": 4}, {"xbc": 1}]


@pytest.mark.parametrize("pair", range(len(MEET_PAIRS)))
def test_meet_is_the_intersection(pair: int) -> None:
    """meet(a, b) accepts exactly what allOf [a, b] accepts, on a spread of instances."""
    defs = {"s": {"type": "string", "pattern": "^a"}}
    a, b = MEET_PAIRS[pair]
    met = meet(a, b, _deref(defs))
    if "patternProperties" in a and "patternProperties" in b:
        assert "allOf" not in met and "patternProperties" in met, met
    for value in SAMPLES:
        both = _valid({"allOf": [a, b], "$defs": defs}, value)
        assert _valid({"allOf": [met], "$defs": defs}, value) == both, (a, b, met, value)

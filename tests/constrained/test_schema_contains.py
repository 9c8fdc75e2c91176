"""`contains` as Lark with JSON-schema leaves (schema_contains.py, issue 14 coverage), checked against
`jsonschema`: every instance is accepted token by token exactly when the reference validator says it
is valid. Each compiled case is refused without the route; the refused ones stay refused.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.errors import UnsupportedSchemaError

from .conftest import assert_matches_reference, encode, run_tokens

_MULT3 = {"type": "number", "multipleOf": 3}
_INNER = {"type": "array", "items": {"type": "number", "multipleOf": 11, "minimum": 100}}

CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "items_and_contains": ({"type": "array", "items": {"type": "number"}, "contains": _MULT3}, [
        [3], [1, 3], [3, 1], [1, 2, 6, 7], [1.5, 9], [0], [], [1], [1, 2, 4], ["a", 3], [3, "a"], [[3]], 3, "x"]),
    # MaskBench itemscontains1's shape: contains inside an allOf, item and contained item each arrays
    "nested_all_of": ({"type": "array", "allOf": [{"items": {"$ref": "#/definitions/inner"}},
                                                   {"contains": {"$ref": "#/definitions/has3"}}],
                       "definitions": {"inner": _INNER, "has3": {"type": "array", "contains": _MULT3}}}, [
        [[330]], [[110], [330, 110]], [[110, 330], []], [], [[]], [[110]], [[330, 5]], [[33]], [330]]),
    # no type: contains constrains arrays only
    "untyped": ({"contains": {"const": 3}}, ["x", 5, None, {"a": 1}, [3], [1, 3, 1], [], [1], [[3]]]),
    # a type list with arrays and strings
    "type_list": ({"type": ["array", "string"], "items": {"type": "integer"}, "contains": {"minimum": 5}},
                  ["s", [5], [1, 7], [], [1], 3, None, [1.5, 6]]),
    # contains reached through anyOf and through items (by $ref)
    "through_items": ({"anyOf": [{"type": "string"}, {"type": "array", "items": {"$ref": "#/$defs/c"}}],
                       "$defs": {"c": {"type": "array", "contains": {"type": "string"}}}}, [
        "s", [], [["a"]], [[1, "a"], ["b"]], [[1]], [["a"], []], [1], 2]),
    # minContains 0 (2019-09+): vacuous
    "min_contains_zero": ({"type": "array", "contains": {"const": 1}, "minContains": 0, "items": {"type": "integer"}},
                          [[], [2], [1], ["a"]]),
    # draft-07: minContains is no keyword there
    "draft7_min_contains": ({"$schema": "http://json-schema.org/draft-07/schema#", "type": "array",
                             "contains": {"const": 1}, "minContains": 2}, [[1], [2, 1], [], [2]]),
    # an object item: the contained one must also satisfy the item schema (allOf of both)
    "object_items": ({"type": "array", "minItems": 1, "items": {"type": "object", "required": ["k"]},
                      "contains": {"properties": {"k": {"const": "main"}}}}, [
        [{"k": "main"}], [{"k": "a"}, {"k": "main", "x": 1}], [{"k": "a"}], [{"x": "main"}], [], [{}, {"k": "main"}]]),
    # references resolved by the ordinary vetting: into a sibling keyword, inside an inner resource
    "ref_into_items": ({"type": "array", "contains": {"$ref": "#/items"}, "items": {"type": "integer"}},
                       [[1], [2, 3], [], ["a"], [1.5], [1, "a"]]),
    "inner_id": ({"type": "array", "contains": {"$id": "inner", "const": 1}}, [[1], [2, 1], [], [2]]),
    # two contains on one node: one item may satisfy both, or two items in either order
    "two_contains": ({"type": "array", "allOf": [{"contains": {"const": 1}}, {"contains": {"minimum": 2}}]},
                     [[1, 2], [2, 1], [1, 3, 0], [1], [2], [], [0, 0], ["a", 1, 5]]),
    # item counts beside contains, counted in the grammar's states
    "counted": ({"type": "array", "contains": {"const": 1}, "minItems": 2, "maxItems": 3, "items": {"type": "integer"}},
                [[1, 2], [2, 1], [1, 1, 1], [1], [2, 2], [1, 2, 3, 4], [2, 2, 2], [1, "a"]]),
    # "some item fails", from `not` and from a oneOf's complements (MaskBench oneof10_2's shape)
    "not_items": ({"type": "array", "not": {"items": {"type": "string"}}}, [[1], ["a", None], ["a"], [], "x"]),
    "one_of_item_types": ({"oneOf": [{"type": "array", "items": {"type": "string"}},
                                     {"type": "array", "items": {"minLength": 2}}]},
                          [["a"], ["ab"], [1], [1, "a"], [], ["a", "bc"], ["ab", 2], "x"]),
    # the complement of contains: every item fails it
    "not_contains": ({"type": "array", "not": {"contains": {"const": 1}}}, [[], [2], [2, "a"], [1], [2, 1]]),
    "one_of_contains": ({"oneOf": [{"type": "array", "contains": {"const": 1}},
                                   {"type": "array", "contains": {"const": 2}, "items": {"type": "number"}}]},
                        [[1], [2], [1, "a"], [3, 2], [1, 2], [2, 1, 3], [], [3], [2, "a"], [1, 2, "a"]]),
    "one_of_items": ({"oneOf": [{"items": {"pattern": "a"}}, {"items": {"pattern": "b"}},
                                {"items": {"pattern": "a|b|c"}}], "minItems": 2},
                     [["c", "c"], ["a", "b"], ["ab", "c"], [1, "c"], ["a", "a"], ["c"], "x", ["d", "d"], [1, 2],
                      ["b", "bc"]]),
    # contains below object properties: named keys in schema order, optional ones skippable, then others
    "in_object": ({"type": "object", "required": ["b"],
                   "properties": {"a": {"type": "string"}, "b": {"type": "array", "contains": {"const": 1}},
                                  "c": {"type": "array", "items": {"type": "array", "contains": {"const": 2}}}}}, [
        {"b": [1]}, {"a": "x", "b": [0, 1]}, {"b": [1], "c": [[2], [3, 2]]}, {"a": "x", "b": [1], "c": [], "z": 5},
        {"b": [1], "zz": {"b": 1}}, {"b": [0]}, {"a": "x"}, {"a": 1, "b": [1]}, {"b": [1], "c": [[3]]}, {}, [1]]),
    # optional keys after the required ones: schema_any_order's literal patterns (any order)
    "free_order": ({"type": "object", "required": ["a"], "properties": {
        "a": {"type": "array", "contains": {"const": 1}}, "b": {"type": "integer"}, "c": False, "d": {"type": "string"}}}, [
        {"a": [1]}, {"a": [1], "d": "x", "b": 2}, {"a": [1], "b": 2, "e": None}, {"a": [1], "c": 1}, {"a": [2]},
        {"a": [1], "b": "x"}, {"a": [1], "d": "x", "b": 2, "zz": [2]}]),
    # allOf members' properties and required merged; a closed member keeps the other's keys out
    "merged_objects": ({"allOf": [{"type": "object", "required": ["a"], "properties": {"a": {"type": "array"}}},
                                  {"required": ["b"], "properties": {"a": {"contains": {"const": 1}}, "b": True}}]},
                       [{"a": [1], "b": 0}, {"a": [0, 1], "b": None, "c": 1}, {"a": [0], "b": 0}, {"a": [1]},
                        {"b": 0}, {"a": 1, "b": 0}]),
    "closed_by_other_member": ({"allOf": [{"additionalProperties": False},
                                          {"properties": {"a": {"type": "array", "contains": {"const": 1}}}}]},
                               [{}, 5, [1], {"a": [1]}, {"a": [0]}, {"b": 1}]),
    "in_closed_object": ({"type": "object", "additionalProperties": False,
                          "properties": {"a": {"type": "array", "contains": {"type": "string"}}, "b": {"type": "null"}}},
                         [{}, {"a": ["x"]}, {"a": [1, "x"], "b": None}, {"b": None}, {"a": [1]}, {"c": 1},
                          {"a": ["x"], "c": 1}]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_contains_matches_reference(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    assert_matches_reference(tokenizer, C.compile(tokenizer, json_schema=schema), schema, instances)


def test_pretty_printed_arrays(tokenizer: Any) -> None:
    """The separators and whitespace of the JSON-schema path hold between the Lark rules too."""
    schema, _ = CASES["nested_all_of"]
    grammar = C.compile(tokenizer, json_schema=schema)
    for text, ok in [(json.dumps([[110], [330, 110]], indent=2), True), ('[ [330] ,[110]]', True),
                     ("[[330]" + " " * 21 + "]", False), ('[[330],]', False), ('[[330]][', False)]:
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == ok, text


@pytest.mark.parametrize("schema", [
    {"type": "array", "contains": {"const": 1}, "maxContains": 2},
    {"type": "array", "contains": {"const": 1}, "minContains": 2},
    {"type": "array", "contains": {"const": 1}, "maxItems": 9},
    {"type": "array", "allOf": [{"contains": {"const": 1}}, {"contains": {"const": 2}}, {"contains": {"const": 3}}]},
    {"type": "array", "contains": {"const": 1}, "uniqueItems": True},
    {"type": "object", "properties": {"a": {"type": "array", "contains": {"const": 1}}}, "minProperties": 9},
    {"oneOf": [{"type": "array", "contains": {"multipleOf": 3}}, {"type": "array", "contains": {"const": 2}}]},
])
def test_outside_the_route_still_refused(tokenizer: Any, schema: dict[str, Any]) -> None:
    with pytest.raises(UnsupportedSchemaError) as info:
        C.compile(tokenizer, json_schema=schema)
    assert info.value.keyword == "contains"

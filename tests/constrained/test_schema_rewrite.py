"""Rewrites in front of the backend (constrained/schema*.py), checked against a reference
validator: for every instance, the grammar accepts it token by token exactly when
`jsonschema` (the schema's own draft, formats asserted) says it is valid.

Each schema here was refused before its rewrite existed, so each case fails without it.
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C

from .conftest import encode, run_tokens

D4 = "http://json-schema.org/draft-04/schema#"
CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "not_type": ({"not": {"type": ["string", "object"]}}, [1, 2.5, "a", {}, [], None, True]),
    "not_const_string": ({"type": "string", "not": {"const": "ab"}}, ["ab", "a", "abc", "", "b"]),
    "not_enum_mixed": ({"not": {"enum": ["1", "3", 2, True, None]}},
                       ["1", "3", "13", "2", 2, 2.0, 1, 3, 2.5, True, False, None, [], {}]),
    "not_required": ({"type": "object", "not": {"required": ["image", "x"]}},
                     [{}, {"image": 1}, {"image": 1, "x": 2}, {"x": 1, "y": 2}]),
    "not_anyOf_required": ({"type": "object", "properties": {"a": {"type": "integer"}},
                            "not": {"anyOf": [{"required": ["build"]}, {"required": ["dockerfile"]}]}},
                           [{}, {"a": 1}, {"build": 1}, {"a": 1, "dockerfile": "x"}]),
    "not_bounds": ({"not": {"type": "number", "minimum": 3, "exclusiveMaximum": 7}},
                   [2, 3, 5, 6.9, 7, 8, "s", None]),
    "not_lengths": ({"not": {"minLength": 2, "maxLength": 3}}, ["", "a", "ab", "abc", "abcd", 5]),
    "not_properties": ({"type": "object", "not": {"properties": {"k": {"const": 1}}, "required": ["k"]}},
                       [{}, {"k": 1}, {"k": 2}, {"k": "1"}, {"j": 1}]),
    "not_ref": ({"$defs": {"s": {"type": "string"}}, "not": {"$ref": "#/$defs/s"}}, ["a", 1, None]),
    "if_then_else": ({"type": "object", "if": {"properties": {"kind": {"const": "a"}}, "required": ["kind"]},
                      "then": {"required": ["x"]}, "else": {"required": ["y"]}},
                     [{"kind": "a", "x": 1}, {"kind": "a", "y": 1}, {"kind": "b", "y": 1},
                      {"kind": "b", "x": 1}, {"y": 1}, {"x": 1}]),
    "if_then_only": ({"if": {"type": "string"}, "then": {"minLength": 2}}, ["a", "ab", 1, None]),
    "dependentRequired": ({"type": "object", "dependentRequired": {"a": ["b", "c"]}},
                          [{}, {"a": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}, {"b": 1}]),
    "dependencies_draft4": ({"$schema": D4, "type": "object",
                             "dependencies": {"a": ["b"], "c": {"properties": {"d": {"type": "string"}}, "required": ["d"]}}},
                            [{}, {"a": 1}, {"a": 1, "b": 1}, {"c": 1}, {"d": "x", "c": 1}, {"d": 2, "c": 1}]),
    "oneOf_types": ({"oneOf": [{"type": "string"}, {"type": "number"}]}, ["a", 1, 2.5, None]),
    "oneOf_discriminator": ({"oneOf": [
        {"type": "object", "properties": {"k": {"const": "a"}, "v": {"type": "integer"}}, "required": ["k"]},
        {"type": "object", "properties": {"k": {"enum": ["b", "c"]}, "v": {"type": "string"}}, "required": ["k"]}]},
        [{"k": "a", "v": 1}, {"k": "b", "v": "x"}, {"k": "a", "v": "x"}, {"k": "d"}, {}]),
    "oneOf_overlapping_required": ({"type": "object", "oneOf": [{"required": ["a"]}, {"required": ["b"]}]},
                                   [{"a": 1}, {"b": 1}, {"a": 1, "b": 2}, {}]),
    "oneOf_integer_number_refs": ({"definitions": {"n": {"type": "null"}},
                                   "oneOf": [{"type": "boolean"}, {"$ref": "#/definitions/n"}]}, [True, None, 0]),
    "uniqueItems_enum": ({"type": "array", "items": {"enum": ["x", "y", "z"]}, "uniqueItems": True, "minItems": 1},
                         [["x"], ["x", "y"], ["x", "x"], [], ["z", "y", "x"], ["y", "z", "y"]]),
    "uniqueItems_boolean": ({"type": "array", "items": {"type": "boolean"}, "uniqueItems": True},
                            [[], [True], [True, False], [False, False]]),
    "uniqueItems_max_one": ({"type": "array", "items": {"type": "string"}, "maxItems": 1, "uniqueItems": True},
                            [[], ["a"], ["a", "a"]]),
    "uniqueItems_on_non_arrays": ({"type": ["string", "object"], "uniqueItems": True}, ["a", {}, [], ["a", "a"]]),
    "minProperties_closed_keys": ({"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 2,
                                   "properties": {"a": {}, "b": {}, "c": {"type": "integer"}}, "required": ["a"]},
                                  [{}, {"a": 1}, {"a": 1, "b": 2}, {"a": 1, "b": 2, "c": 3}, {"b": 1}, {"a": 1, "c": "x"}]),
    "maxProperties_trivial": ({"type": "object", "additionalProperties": False, "maxProperties": 2,
                               "properties": {"op": {"type": "string"}, "expr": {"type": "string"}}},
                              [{}, {"op": "a", "expr": "b"}, {"op": 1}, {"x": "a"}]),
    "propertyNames_not_enum": ({"type": "object", "propertyNames": {"not": {"enum": ["1", "3"]}}},
                               [{}, {"1": 0}, {"2": 0}, {"13": 0, "2": 1}, {"3": 1}]),
    "propertyNames_pattern": ({"type": "object", "properties": {"ab": {}}, "propertyNames": {"pattern": "^a"}},
                              [{"ab": 1}, {"abcd": 1}, {"b": 1}, {"ab": 1, "ac": 2}, {"ab": 1, "c": 2}]),
    "propertyNames_length": ({"type": "object", "propertyNames": {"maxLength": 2}}, [{"ab": 1}, {"abc": 1}, {}]),
    "draft4_exclusive": ({"$schema": D4, "type": "number", "minimum": 0, "exclusiveMinimum": True,
                          "maximum": 10, "exclusiveMaximum": False}, [0, 0.5, 10, 10.5, -1]),
    "draft4_tuple": ({"$schema": D4, "type": "array", "items": [{"type": "string"}, {"type": "integer"}],
                      "additionalItems": False}, [["a", 1], ["a"], ["a", 1, 2], [1, "a"]]),
    "draft4_id_scope": ({"$schema": D4, "id": "http://example.com/root.json",
                         "properties": {"a": {"$ref": "item.json#/definitions/q"},
                                        "b": {"id": "item.json", "definitions": {"q": {"type": "integer"}}}},
                         "definitions": {"q": {"type": "string"}}}, [{"a": 1}, {"a": "s"}]),
    "id_scope_local_pointer": ({"$id": "http://example.com/root.json", "definitions": {"q": {"type": "string"}},
                                "properties": {"a": {"$id": "sub.json", "definitions": {"q": {"type": "integer"}},
                                                     "properties": {"v": {"$ref": "#/definitions/q"}}}}},
                               [{"a": {"v": 1}}, {"a": {"v": "s"}}]),
    "urn_id_local_pointer": ({"$id": "urn:example:policy:1.0", "$defs": {"q": {"type": "integer"}},  # aerleon-policies
                              "properties": {"n": {"$ref": "#/$defs/q"}, "m": {"$ref": "urn:example:policy:1.0#/$defs/q"}}},
                             [{"n": 1}, {"n": "1"}, {"m": 2, "n": 3}, {"m": "x"}]),
    "anchor": ({"$defs": {"q": {"$anchor": "num", "type": "integer"}}, "properties": {"n": {"$ref": "#num"}}},
               [{"n": 1}, {"n": "1"}]),
    "ref_into_annotation_container": ({"components": {"s": {"type": "string", "not": {"const": ""}}},
                                       "properties": {"n": {"$ref": "#/components/s"}}}, [{"n": "a"}, {"n": ""}, {"n": 1}]),
    "const_enum_objects": ({"enum": [{"a": [1, 2]}, [1, {"b": None}]]}, [{"a": [1, 2]}, [1, {"b": None}], {"a": [1]}, [1]]),
    "format_uri_reference": ({"type": "string", "format": "uri-reference"},  # see RFC3986_EXPECTED
                             ["http://a.b/c?d#e", "../x/y", "#frag", "", "a b", "http://[::1]:80/", "%zz", "//host",
                              "http://[::1:80/", "a:b:c", "ht tp://x", "mailto:x@y.z", "urn:isbn:0451", "/a%2Fb"]),
    "format_json_pointer": ({"type": "string", "format": "json-pointer"}, ["", "/a/b", "/a~1b", "a", "/~2"]),
    "format_uri_template": ({"type": "string", "format": "uri-template"},  # see RFC6570_EXPECTED
                            ["http://example.com/{id}", "/a{?x,y*}{+path:12}", "{a.b}", "é{x}", "😀/{x}", "",
                             "x y", "{}", "{a,}", "%zz", "{a:0}", "a}", "{a b}"]),
    # pattern complements (schema_pattern_complement.py)
    "not_pattern_anchored": ({"type": "string", "not": {"pattern": "^[A-Fa-f\\d]{4}$"}},
                             ["abcd", "AB12", "abc", "abcde", "abcg", "", "x1234"]),
    "not_pattern_search": ({"not": {"pattern": "a.b|^x"}}, ["a-b", "zza b", "ab", "a\nb", "xy", "yx", 3]),
    "not_pattern_whitespace": ({"type": "string", "not": {"pattern": "^\\s*$"}}, ["", "  ", "\u2028", "\u00a0 ", " a"]),
    "oneOf_pattern_overlap": ({"oneOf": [{"type": "string", "pattern": "^[a-f\\d]{3}$"}, {"type": "string"}]},
                              ["abc", "ab1", "abz", "", 5]),
    # listed values decided by the reference validator (schema_finite.py)
    "listed_not_object_values": ({"allOf": [{"enum": [{"a": 0}, {"a": 1}, [1]]}, {"not": {"enum": [{"a": False}, {"a": 1}]}}]},
                                 [{"a": 0}, {"a": 1}, [1], {"a": False}, {"a": 2}]),
    "listed_oneOf_multipleOf": ({"enum": [15, 6, 10, 30, 7], "oneOf": [{"multipleOf": 3}, {"multipleOf": 5}]},
                                [15, 6, 10, 30, 7, 9]),
    "listed_uniqueItems_arrays": ({"const": [1, 2], "uniqueItems": True, "contains": {"const": 2}}, [[1, 2], [1], [2, 2]]),
    "listed_through_ref": ({"$defs": {"n": {"not": {"pattern": "^b"}}}, "enum": ["a", "bc"], "$ref": "#/$defs/n"},
                           ["a", "bc", "b", "c"]),
    "format_ipv4": ({"type": "string", "format": "ipv4"}, ["1.2.3.4", "256.1.1.1", "1.2.3"]),
    # oneOf worked out per instance type, inside the node's context (schema_relative.py)
    "oneOf_per_type": ({"oneOf": [{"properties": {"t": {"const": "a"}}, "required": ["t"], "additionalProperties": False},
                                  {"properties": {"t": {"const": "b"}}, "required": ["t"]}]},
                       [{"t": "a"}, {"t": "b"}, {"t": "b", "x": 1}, {"t": "a", "x": 1}, {"t": "c"}, {}, "s", 1, None]),
    "oneOf_closed_keys": ({"type": "object", "oneOf": [
        {"additionalProperties": False, "properties": {"key": {"type": "string", "maxLength": 3}}},
        {"additionalProperties": False, "properties": {"keys": {"type": "array", "items": {"type": "string"}}}}]},
        [{}, {"key": "a"}, {"keys": ["a"]}, {"key": "a", "keys": []}, {"key": "abcd"}, {"keys": [1]}]),
    "oneOf_closed_keys_shared_property": ({"type": "object", "oneOf": [
        {"properties": {"id": {"type": "string"}, "opt": {"type": "string"}}, "additionalProperties": False, "required": ["id"]},
        {"properties": {"id": {"type": "string"}, "rx": {"type": "string"}}, "additionalProperties": False, "required": ["id"]},
        {"properties": {"n": {"type": "number"}}, "additionalProperties": False, "required": ["n"]}]},
        [{"id": "a"}, {"id": "a", "opt": "x"}, {"id": "a", "rx": "y"}, {"id": "a", "opt": "x", "rx": "y"}, {"n": 1}, {"n": 1, "id": "a"}]),
    "oneOf_pattern_discriminator": ({"type": "object", "required": ["type"], "oneOf": [
        {"properties": {"type": {"type": "string", "pattern": "^Abs$"}, "x": {"type": "integer"}}, "additionalProperties": False},
        {"properties": {"type": {"type": "string", "pattern": "^(Add|Sub)$"}}, "additionalProperties": False}]},
        [{"type": "Abs"}, {"type": "Add"}, {"type": "Sub"}, {"type": "Abs", "x": 1}, {"type": "Add", "x": 1}, {"type": "Abx"}]),
    "oneOf_listed_context": ({"type": "object", "properties": {"s": {"enum": ["x", "y", "z", "w"]}}, "oneOf": [
        {"properties": {"s": {"enum": ["x", "y"]}, "n": {"type": "integer"}}},
        {"properties": {"s": {"enum": ["y", "z"]}, "n": {"type": "integer", "minimum": 3}}}]},
        [{"s": "x"}, {"s": "y"}, {"s": "z"}, {"s": "w"}, {}, {"s": "y", "n": 1}, {"s": "y", "n": 5}, {"s": "z", "n": 1}]),
    "oneOf_array_lengths": ({"oneOf": [{"type": "array", "items": {"type": "number"}}, {"type": "array", "items": {"type": "string"}}]},
                            [[], [1], ["a"], [1, "a"], "a"]),
    "oneOf_in_recursive_definition": ({"$ref": "#/$defs/page", "$defs": {
        "page": {"type": "object", "additionalProperties": False, "required": ["id"],
                 "properties": {"id": {"type": "string"}, "fb": {"$ref": "#/$defs/fb"}}},
        "sampler": {"additionalProperties": False, "required": ["from"], "properties": {"from": {"type": "string"}}},
        "fb": {"oneOf": [{"type": "string"}, {"$ref": "#/$defs/sampler"}, {"$ref": "#/$defs/page"}]}}},
        [{"id": "a"}, {"id": "a", "fb": "x"}, {"id": "a", "fb": {"from": "b"}}, {"id": "a", "fb": {"id": "c", "fb": "d"}},
         {"id": "a", "fb": {"from": "b", "id": "c"}}, {"id": "a", "fb": 1}, {"id": "a", "fb": {}}]),
    "not_array_values": ({"not": {"enum": [["a", 1], []]}}, [["a", 1], [], ["a"], ["a", 2], ["b", 1], ["a", 1, 2], "x", {}]),
    "not_within_closed_keys": ({"type": "object", "additionalProperties": False,
                                "properties": {"a": {"type": "integer"}, "b": {"type": "string"}},
                                "not": {"additionalProperties": False, "properties": {"a": {}}}},
                               [{}, {"a": 1}, {"b": "x"}, {"a": 1, "b": "x"}, {"c": 1}]),
    "not_patternProperties_closed_keys": ({"type": "object", "additionalProperties": False,
                                           "properties": {"ab": {"type": "integer"}, "cd": {"type": "integer"}},
                                           "not": {"patternProperties": {"^a": {"maximum": 3}}}},
                                          [{}, {"ab": 1}, {"ab": 5}, {"cd": 5}, {"ab": 5, "cd": 1}]),
}

# jsonschema checks uri-reference only with the optional rfc3987 package: RFC 3986 by hand.
RFC3986_EXPECTED = {"a b": False, "%zz": False, "http://[::1:80/": False, "ht tp://x": False}


# and uri-template only with the optional uri_template package: RFC 6570 §2 by hand.
RFC6570_EXPECTED = {"x y": False, "{}": False, "{a,}": False, "%zz": False, "{a:0}": False, "a}": False,
                    "{a b}": False}


def _valid(schema: dict[str, Any], instance: Any) -> bool:
    if schema.get("format") == "uri-reference":
        return RFC3986_EXPECTED.get(instance, True)
    if schema.get("format") == "uri-template":
        return RFC6570_EXPECTED.get(instance, True)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_rewrite_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        text = json.dumps(instance, ensure_ascii=False)
        accepted = run_tokens(grammar.matcher(), encode(tokenizer, text))
        assert accepted == _valid(schema, instance), f"{name}: {text} accepted={accepted}"


def test_oneOf_open_key_fails_as_lark(tokenizer: Any) -> None:
    """`some open key fails` has no form in llguidance's JSON schema; it is an object rule of the
    Lark route now (tests/constrained/test_schema_some_key.py), exact on these instances."""
    schema = {"oneOf": [{"type": "object", "additionalProperties": {"type": "string"}},
                        {"type": "object", "required": ["a"]}]}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in [{}, {"a": "x"}, {"a": 1}, {"x": "s"}, {"x": 1}, {"a": "s", "b": 2}, {"a": 2, "b": "s"}, [1]]:
        text = json.dumps(instance)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == _valid(schema, instance), text


@pytest.mark.parametrize("pattern", ["(?=a)b", "a\\bc", "a$b", "(a)\\1"])
def test_pattern_complement_refused_where_not_exact(tokenizer: Any, pattern: str) -> None:
    """Lookarounds, word boundaries, inner anchors, backreferences: refused, keyword and pointer named."""
    with pytest.raises(C.UnsupportedSchemaError) as err:
        C.compile(tokenizer, json_schema={"properties": {"k": {"not": {"pattern": pattern}}}}, cache=None)
    assert err.value.keyword == "not" and err.value.path == "/properties/k"

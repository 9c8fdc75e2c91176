"""Rewrites about which keys an object has (issue 14 coverage), checked against `jsonschema`:
every instance is accepted token by token exactly when the reference validator says it is
valid (formats checked). Each case fails without its rewrite: the schema is refused, or a
listed valid instance is rejected.

- `not` of propertyNames / patternProperties whose names form a small finite set, and of
  `additionalProperties: false` alone (schema_negation.py, schema_pattern_complement.py);
- min/maxProperties next to optional named properties (schema_unique.open_count);
- `oneOf` of formats told apart by a character one needs and the other cannot hold
  (schema_formats.formats_disjoint);
- key conditions nested in allOf/anyOf distributed into whole copies (schema_key_conditions), and the
  alphabetical-order branch (schema_any_order.py);
- propertyNames met with a map whose one pattern matches every key (schema_meet.py).
"""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema as schema_module
from radixlm.constrained import schema_any_order, schema_formats, schema_meet, schema_negation, schema_relative, schema_simplify
from radixlm.constrained.errors import GrammarCompileError
from radixlm.constrained.schema_pattern_complement import pattern_words, unmatched_words

from .conftest import encode, run_tokens

INT, ARR2 = {"type": "integer"}, {"type": "array", "minItems": 2}
_PNMP = {"type": "object", "patternProperties": {"^[0-9]$": ARR2}, "additionalProperties": False,
         "not": {"anyOf": [{"propertyNames": {"not": {"enum": ["1", "3"]}}},
                           {"propertyNames": {"not": {"enum": ["2", "3"]}}}]}, "maxProperties": 2}
_CONTAINER = {"type": "object", "additionalProperties": False,
              "properties": {k: {"type": "string"} for k in ("build_args", "build_directory", "dockerfile",
                                                             "environment", "image", "ports")},
              "oneOf": [{"not": {"required": ["build_args", "dockerfile"]}, "required": ["image"]},
                        {"required": ["build_directory"]}]}
CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # Handwritten---pnmp2's shape: some key is "1" or "3", and some key is "2" or "3"
    "not_property_names_enum": (_PNMP, [
        {"1": [1, 2], "2": [3, 4]}, {"3": [1, 2]}, {"1": [1, 2]}, {}, {"1": [1], "2": [3, 4]},
        {"5": [1, 1], "2": [1, 1]}, {"A": [1, 2], "2": [3, 4]}, {"1": [1, 2], "2": [1, 1], "3": [1, 1]}]),
    # Handwritten---pNameFalse: `not: {propertyNames: false}` is a non-empty object
    "not_property_names_false": ({"type": "object", "not": {"propertyNames": False}},
                                 [{"k": "v"}, {}, {"a": 1, "b": 2}]),
    # a pattern key present with a value failing its schema (llguidance takes a key that a branch
    # requires first: {"c": 1, "b": [2]} is rejected, a known order limit, RESULTS.md)
    "not_pattern_properties_finite": ({"type": "object", "not": {"patternProperties": {"^(a|b)$": {"type": "string"}}}},
                                      [{"a": 1}, {"b": [2], "c": 1}, {"a": "x"}, {}, {"c": 1}, {"a": "x", "b": "y"}]),
    # o73941's shape: minProperties on an open object with optional named properties
    "min_properties_open": ({"type": "object", "properties": {"a": INT, "b": {"type": "boolean"}}, "minProperties": 1},
                            [{"a": 1}, {"b": True, "a": 1}, {"c": 1}, {"a": 1, "c": 2}, {}, {"a": "x"}]),
    # dss-2.0.0's shape: exactly one of several optional properties (or one other key)
    "exactly_one_property": ({"type": "object", "properties": {"a": INT, "b": INT, "c": INT},
                              "minProperties": 1, "maxProperties": 1},
                             [{"a": 1}, {"c": 1}, {"d": 1}, {}, {"a": 1, "b": 2}, {"a": 1, "d": 2}, {"b": "x"}]),
    # o58478's shape: a URI has ':' and a host name cannot
    "one_of_formats": ({"type": "string", "oneOf": [{"format": "uri"}, {"format": "hostname"}]},
                       ["http://example.com/a", "example.com", "a:b", "not a uri or host", 5]),
    # o29445's shape: oneOf of key conditions (required / not required), keys in another order
    "key_conditions_any_order": (_CONTAINER, [
        {"image": "i", "ports": "p", "environment": "e"}, {"build_directory": "d", "dockerfile": "f"},
        {"dockerfile": "f", "image": "i"}, {"image": "i", "build_args": "a", "dockerfile": "f"},
        {"image": "i", "build_directory": "d"}, {"ports": "p"},
        {"build_directory": "d", "build_args": "a", "dockerfile": "f", "image": "i"}]),
    # keys written in alphabetical order (json.dumps(sort_keys=True)), optional before required
    "alphabetical_order": ({"type": "object", "required": ["zone"], "additionalProperties": False,
                            "properties": {"zone": INT, "router": INT, "plugins": INT}},
                           [{"plugins": 1, "router": 2, "zone": 3}, {"zone": 3}, {"router": 2, "zone": 3},
                            {"plugins": 1, "router": 2}, {"plugins": 1, "router": "x", "zone": 3}]),
    # appsettings' shape: propertyNames over a map whose one pattern matches every key
    "property_names_of_open_map": ({"type": "object", "patternProperties": {".*": {"type": ["number", "string"]}},
                                    "propertyNames": {"pattern": "^[A-Za-z0-9_.-]+$"}},
                                   [{"a.b": 1, "c": "x"}, {}, {"a b": 1}, {"a": None}, {"": 1}]),
}
# (what to disable, index of a valid instance it is needed for; None: needed to compile)
_NO_NEG = ("negation", None)
NEEDS: dict[str, tuple[str, int | None]] = {
    "not_property_names_enum": _NO_NEG, "not_property_names_false": _NO_NEG,
    "not_pattern_properties_finite": _NO_NEG, "min_properties_open": ("open_count", None),
    "exactly_one_property": ("open_count", None), "one_of_formats": ("formats", None),
    "key_conditions_any_order": ("distribute", 0), "alphabetical_order": ("alphabetical", 0),
    "property_names_of_open_map": ("names_meet", None),
}


def _valid(schema: Any, instance: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


def _accepts(tokenizer: Any, grammar: Any, instance: Any) -> bool:
    return run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instance, ensure_ascii=False)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        assert _accepts(tokenizer, grammar, instance) == _valid(schema, instance), f"{name}: {instance}"
    assert any(not _valid(schema, x) for x in instances)  # each case rejects something too


def _disable(what: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if what == "negation":
        def refuse(*args: Any) -> Any:
            raise schema_negation.Unsupported("patternProperties", "disabled")
        monkeypatch.setattr(schema_negation, "_some_pattern_key", refuse)
        monkeypatch.setattr(schema_negation, "_some_additional_key", refuse)
        monkeypatch.setattr(schema_relative, "unnamed_key_present", lambda node: None)  # the same by counts
    elif what == "open_count":
        monkeypatch.setattr(schema_module, "open_count", lambda node, hoist: None)
    elif what == "formats":
        monkeypatch.setattr(schema_relative, "formats_disjoint", lambda f, g: False)
    elif what == "distribute":
        monkeypatch.setattr(schema_simplify, "distribute_key_conditions", lambda s: 0)
    elif what == "names_meet":
        monkeypatch.setattr(schema_meet, "_names_only", lambda node: None)
        monkeypatch.setattr(schema_meet, "_meet_patterns", lambda *args: None)  # the general form of it
    elif what == "alphabetical":
        monkeypatch.setattr(schema_any_order, "alphabetical_order", lambda names: None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_fails_without_the_rewrite(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema, instances = CASES[name]
    what, index = NEEDS[name]
    _disable(what, monkeypatch)
    if index is None:
        with pytest.raises((GrammarCompileError, C.UnsupportedSchemaError)):
            C.compile(tokenizer, json_schema=schema, cache=None)
        return
    assert _valid(schema, instances[index])
    assert not _accepts(tokenizer, C.compile(tokenizer, json_schema=schema, cache=None), instances[index])


def test_finite_pattern_languages() -> None:
    assert sorted(pattern_words("^(?:1|3)$")) == ["1", "3"]
    assert sorted(pattern_words("^[ab]c?$")) == ["a", "ac", "b", "bc"]
    assert sorted(unmatched_words(["^(?:|1[\\s\\S]+|3[\\s\\S]+|[^13][\\s\\S]*)$"])) == ["1", "3"]
    for infinite in ("c", "^a.$", "^a+$"):
        with pytest.raises(schema_negation.Unsupported):
            pattern_words(infinite)
    with pytest.raises(schema_negation.Unsupported):
        unmatched_words(["^a"])


def test_format_disjointness_table() -> None:
    assert schema_formats.formats_disjoint("uri", "hostname")
    assert schema_formats.formats_disjoint("ipv4", "ipv6")
    assert schema_formats.formats_disjoint("email", "uuid")
    assert not schema_formats.formats_disjoint("hostname", "ipv4")  # "1.2.3.4" may be both
    assert not schema_formats.formats_disjoint("uri", "email")

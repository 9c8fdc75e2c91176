"""Finite number sets (schema_numeric.py): bounded numbers on a grid listed and decided by the
reference validator, checked against `jsonschema` token by token. Each schema is refused
without the rewrite (the complement of multipleOf has no positive form)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema_listed
from radixlm.constrained.schema_numeric import MAX_NUMBERS, finite_numbers, non_number_types

from .conftest import encode, run_tokens

CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # Handwritten---num2's shape: a multiple of 13 in (100, 1000) with no small prime factor, not 169
    "integer_not_any_multiple": ({
        "type": "integer", "multipleOf": 13, "exclusiveMinimum": 100, "exclusiveMaximum": 1000,
        "not": {"anyOf": [{"multipleOf": 2}, {"multipleOf": 3}, {"multipleOf": 5}]},
        "$ref": "#/definitions/n169", "definitions": {"n169": {"not": {"const": 169}}}},
        [221, 247, 169, 182, 117, 1001, 13, 221.5, "221", 949, 1000]),
    # Handwritten---num4's shape: no `type`; fractional multipleOf meeting at their lcm (8721);
    # every non-number fails the `not` (a multipleOf holds for it vacuously)
    "untyped_fraction_grid": ({
        "required": ["a"], "allOf": [{"multipleOf": 6.75}, {"multipleOf": 19}, {"multipleOf": 9.5}],
        "not": {"anyOf": [{"multipleOf": 2}, {"multipleOf": 7}]}, "exclusiveMinimum": -100000, "exclusiveMaximum": -10000},
        [-26163, -43605, -17442, -61047, -8721, {"a": 1}, "x", None, -26163.5]),
    # Handwritten---allany11's shape: an anyOf of grids bounds the numbers, other anyOfs filter them
    "any_of_grids": ({
        "type": "number", "exclusiveMinimum": -300, "exclusiveMaximum": 0,
        "allOf": [{"anyOf": [{"multipleOf": 33}, {"multipleOf": 77}]},
                  {"anyOf": [{"allOf": [{"not": {"multipleOf": 6}}, {"not": {"multipleOf": 7}}]}, {"multipleOf": 42}]}]},
        [-33, -99, -66, -77, -154, -231, -297, -300, 0, -34, -33.5, "x"]),
    # other instance types kept: strings pass the `not` (an integer type fails for them)
    "other_types_kept": ({
        "type": ["integer", "string"], "minimum": 0, "maximum": 10, "maxLength": 3,
        "not": {"type": "integer", "multipleOf": 3}},
        [1, 2, 4, 10, 0, 3, 9, 11, -1, "ab", "abcd", 2.5, None]),
}


def _valid(schema: Any, instance: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        ids = encode(tokenizer, json.dumps(instance))
        assert run_tokens(grammar.matcher(), ids) == _valid(schema, instance), f"{name}: {instance}"
    assert any(_valid(schema, x) for x in instances) and any(not _valid(schema, x) for x in instances)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_without_the_rewrite(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema_listed, "split_numbers", lambda *args: None)
    with pytest.raises(C.UnsupportedSchemaError) as err:
        C.compile(tokenizer, json_schema=CASES[name][0], cache=None)
    assert err.value.keyword == "not"


def test_unbounded_or_gridless_numbers_stay_refused(tokenizer: Any) -> None:
    # (`not: {multipleOf: 3}` over integers >= 0 has no grid either, yet is written as digit rules on
    # the Lark route since cov19: test_schema_not_multiple.py; a modulus over 64 is not)
    for schema in ({"type": "integer", "minimum": 0, "not": {"multipleOf": 97}},  # no maximum
                   {"type": "number", "minimum": 0, "maximum": 9.5, "not": {"multipleOf": 3}}):  # no grid
        # (with maximum 9 it is written as digit rules since cov19: non-integers by integer part)
        with pytest.raises(C.UnsupportedSchemaError) as err:
            C.compile(tokenizer, json_schema=schema, cache=None)
        assert (err.value.keyword, err.value.path) == ("not", "#")


def _members(node: Any) -> list[Any]:
    return [node, *[m for m in node.get("allOf", ()) if isinstance(m, dict)]]


def test_candidate_sets() -> None:
    assert finite_numbers({"type": "integer", "minimum": 1, "maximum": 4}, _members) == [1, 2, 3, 4]
    assert finite_numbers({"multipleOf": 0.5, "minimum": 0, "exclusiveMaximum": 2}, _members) == [0, 0.5, 1, 1.5, 2]
    assert finite_numbers({"allOf": [{"multipleOf": 4}, {"multipleOf": 6}], "minimum": 0, "maximum": 30},
                          _members) == [0, 12, 24]
    assert finite_numbers({"anyOf": [{"multipleOf": 5}, {"multipleOf": 7}], "minimum": 1, "maximum": 15},
                          _members) == [5, 7, 10, 14, 15]
    assert finite_numbers({"type": "string", "minimum": 0, "maximum": 3}, _members) is None
    assert finite_numbers({"type": "integer", "minimum": 0}, _members) is None
    assert finite_numbers({"type": "integer", "minimum": 0, "maximum": MAX_NUMBERS}, _members) is None
    assert finite_numbers({"anyOf": [{"multipleOf": 5}, {"minimum": 2}], "minimum": 0, "maximum": 9}, _members) is None
    assert non_number_types({"type": ["integer", "string"]}, _members) == ["string"]
    assert non_number_types({"allOf": [{"type": "integer"}]}, _members) == []

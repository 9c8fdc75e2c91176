""""Not a multiple of m" on the Lark route (schema_lark_numbers.py; issue 14 coverage): complements
of an integer `multipleOf` up to 64 as remainder rules over decimal digits, with bounds beside them
met by value states for the short integers (below 100). Checked against `jsonschema` token by token; each compiled case
is refused without the change.
"""

from __future__ import annotations

from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.errors import UnsupportedSchemaError

from .conftest import assert_matches_reference, encode, run_tokens

_BIG = 12345678901234567890123  # Python's json reads it exactly: jsonschema's remainder is exact

CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # exactly one of two moduli: multiples of 3 that are no multiple of 5, and the other way round
    "one_of_moduli": ({"oneOf": [{"type": "integer", "multipleOf": 3}, {"type": "integer", "multipleOf": 5}]}, [
        3, 5, 15, 0, -3, -15, -10, 7, 30, 9, 10, 1.5, "a", 45, 99, 100, _BIG, _BIG + 1, -_BIG, 1000003]),
    # a multiple of 10 that is no multiple of 20 (remainder 10 mod 20)
    "multiple_but_not": ({"type": "integer", "multipleOf": 10, "not": {"multipleOf": 20}}, [
        10, 30, -10, 20, 0, 40, 5, 110, -30, 1010, 1020, 2.5]),
    # a leaf branch beside digit rules gets its numbers as digit rules too (llguidance lexes
    # greedily: the leaf's number lexeme would read `28` whole and cut the digit rules' `2` `8` off)
    "beside_a_number_leaf": ({"oneOf": [{"type": "integer", "exclusiveMaximum": 31.5},
                                        {"type": "integer", "multipleOf": 6}]}, [
        28, 2, 20, 29, 30, 36, 6, 42, 1.5, "s", -7, -12, 100, 0, 96]),
    # numbers: non-integers are no multiple of 4 (digit rules like the integers', as llguidance
    # lexes greedily: a fraction terminal would read `12` as the start of `12.5`); a bound of 0 picks the sign
    "one_of_number_sign": ({"oneOf": [{"type": "number", "multipleOf": 4}, {"type": "number", "minimum": 0}]}, [
        -4, -8, 4, 0, 1, 2.5, -2.5, -3, 7, 8, -12, 123, 12.25, -0.5, 100.125, 12345678901234.5, "x"]),
    # non-integers beside a bound that is an integer: met on the integer part, as digit rules
    "fractions_bounded": ({"type": "number", "minimum": -20, "not": {"multipleOf": 5}}, [
        -20.5, -19.5, 3.25, 5, -25, -20, -21, 7, 1000.5, -19, 0.5, -0.5, -100, 19.75, "s"]),
    # both sides bounded (test_schema_numeric's "no grid" case with maximum 9 before)
    "numbers_bounded": ({"type": "number", "minimum": 0, "maximum": 9, "not": {"multipleOf": 3}}, [
        0, 1, 3, 9, 2.5, 8.75, 9.5, -1, 10, 0.5, 6, 8, -0.5]),
    # MaskBench oneofitemscontains1's shape: "some item fails multipleOf 4" inside `contains`, a
    # bound of 100 beside "not a multiple of 11" (value states below 1,000, minimised)
    "items_contains_moduli": ({"type": "array", "oneOf": [
        {"allOf": [{"items": {"$ref": "#/$defs/i1"}}, {"contains": {"$ref": "#/$defs/i2"}}]},
        {"allOf": [{"items": {"$ref": "#/$defs/i2"}}, {"contains": {"$ref": "#/$defs/i1"}}]}],
        "$defs": {"i1": {"type": "array", "contains": {"type": "number", "multipleOf": 11, "minimum": 100}},
                  "i2": {"type": "array", "items": {"type": "number", "multipleOf": 4}}}}, [
        [[110]], [[132]], [[132], [110]], [[110], [132]], [[132], [110, 3]], [[132], [8]], [[132], [8.5]],
        [[132], [110.5, 110]], [[132], [110, 2.5]], [[132], [121, 13]], [[4, 8]], [], [[110], [8]], [[99]]]),
    # integers >= 0 that are no multiple of 3 (test_schema_numeric's "no grid" case before)
    "non_negative": ({"type": "integer", "minimum": 0, "not": {"multipleOf": 3}}, [
        1, 2, 3, 0, -1, -2, 4, 100, 99, 10 ** 21 + 1, 10 ** 21 + 2, 1.5, "1"]),
    # MaskBench oneOf4's shape: values under pattern keys, bounds beside the moduli (short integers
    # listed, long ones by remainder on the unbounded side)
    "one_of_bounded_patterns": ({"type": "object", "maxProperties": 1, "oneOf": [
        {"patternProperties": {"a": {"multipleOf": 10, "maximum": 20}}},
        {"patternProperties": {"a": {"multipleOf": 5, "maximum": 80}}}]}, [
        {}, {"a": 10}, {"a": 15}, {"a": 75}, {"a": 85}, {"a": 30}, {"xa": -5}, {"a": -10}, {"b": 1}, {"a": 2.5},
        {"a": -1005}, {"a": -1000}, {"ab": 25}, {"a": 20}]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_not_multiple_matches_reference(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    assert_matches_reference(tokenizer, C.compile(tokenizer, json_schema=schema, cache=None), schema, instances)


def test_integers_written_plainly(tokenizer: Any) -> None:
    """Integers have no fraction, no exponent, no leading zero and no `-0` (stricter, never looser):
    `15.0` and `1.5e1` (multiples of 3 and 5 under a float reading) and `-0` are refused."""
    schema, _ = CASES["one_of_moduli"]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for text, ok in [("3", True), ("-3", True), ("15", False), ("15.0", False), ("1.5e1", False), ("03", False),
                     ("-0", False), ("6e0", False), (str(_BIG * 3 + 3), True), (str(_BIG * 15), False)]:
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == ok, text


@pytest.mark.parametrize("schema", [
    {"type": "number", "not": {"multipleOf": 0.5}},          # a decimal modulus
    {"type": "integer", "not": {"multipleOf": 97}},          # more than 64 remainders
    {"type": "integer", "multipleOf": 9, "not": {"multipleOf": 12}},  # lcm 36 is fine, see below
    {"type": "integer", "multipleOf": 11, "not": {"multipleOf": 7}},  # lcm 77: over 64
    {"type": "number", "minimum": 5.5, "not": {"multipleOf": 3}},     # non-integers beside a bound no integer
    {"type": "integer", "minimum": 5000, "not": {"multipleOf": 3}},   # a bound past the value states
])
def test_outside_the_route(tokenizer: Any, schema: dict[str, Any]) -> None:
    if schema.get("multipleOf") == 9:  # remainders 9, 27 mod 36
        grammar = C.compile(tokenizer, json_schema=schema, cache=None)
        assert_matches_reference(tokenizer, grammar, schema, [9, 27, 36, 0, 12, 45, -9, -36, 63, 72, 10])
        return
    with pytest.raises(UnsupportedSchemaError):
        C.compile(tokenizer, json_schema=schema, cache=None)

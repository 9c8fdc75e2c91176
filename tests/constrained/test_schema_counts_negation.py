"""`oneOf` proven disjoint by key / item counts, `not` of a closed object by key counts, and `not`
inside `not` cancelled (issue 14 coverage), checked against `jsonschema`: every instance is
accepted token by token exactly when the reference validator says it is valid (formats checked).
Each case fails without its rule: the schema is refused.

- schema_disjoint.counts_disjoint: o42127's shape (an object type requiring two keys against a
  one-key map), and arrays whose length ranges do not meet;
- schema_negation.unnamed_key_present: "some key outside the named ones" when required keys are
  present, as minProperties over the optional keys present;
- schema_double_negation: GeoJSON `crs`'s shape (o76785), a `format` complemented twice;
- schema_negation._not_object: not-const / not-enum of object values;
- schema_depth.cut_deep_nesting: a complement nested past llguidance's JSON reading limit;
- schema_formats.NOT_FORMAT / FORMAT_WITHIN: not-ipv4 as a pattern, ipv4 inside hostname.
"""

from __future__ import annotations

import itertools
import re
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import (
    compiler,
    schema_depth,
    schema_disjoint,
    schema_double_negation,
    schema_formats,
    schema_negation,
    schema_relative,
    schema_unique,
)
from radixlm.constrained import schema as schema_module
from radixlm.constrained.errors import GrammarCompileError
from radixlm.constrained.schema import check_schema

from .conftest import assert_matches_reference

STR = {"type": "string"}
_REPOSITORY = {"type": "object", "required": ["type", "url"], "properties": {"type": STR, "url": STR}}
_REPOSITORIES = {"type": "object", "oneOf": [
    {"type": "object", "required": ["type", "url"], "properties": {"type": {"enum": ["vcs"]}, "url": STR}},
    {"type": "object", "required": ["type", "package"], "properties": {"type": {"enum": ["package"]}, "package": STR}}]}
_SWITCH = {"type": "object", "additionalProperties": {"const": False}, "minProperties": 1, "maxProperties": 1}
_CLOSED = {"type": "object", "required": ["a"], "properties": {"a": True, "b": True, "z": False},
           "additionalProperties": False}


def _nested(depth: int) -> dict[str, Any]:
    value: dict[str, Any] = {}
    for _ in range(depth):
        value = {"a": value}
    return value


CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # o42127's shape: a repository (two required keys, open) or a one-key switch map
    "one_of_key_counts": ({"type": "array", "items": {"oneOf": [_REPOSITORIES, _SWITCH]}}, [
        [{"type": "vcs", "url": "b"}], [{"type": "package", "package": "p"}], [{"x": False}], [{"type": False}],
        [{"type": "vcs", "url": "b", "c": False}], [{"x": True}], [{"type": "vcs"}], [{}],
        [{"x": False, "y": False}], [{"type": "vcs", "url": 1}], [{"type": "package", "url": "b"}]]),
    # arrays of at most one pattern string, or of at least two longer strings
    "one_of_item_counts": ({"oneOf": [{"type": "array", "items": {"type": "string", "pattern": "^a"}, "maxItems": 1},
                                      {"type": "array", "items": {"type": "string", "minLength": 2}, "minItems": 2}]},
                           [["a"], ["ab", "cd"], [], ["ab"], ["a", "b"], ["b"], [1], ["ab", "c"], "ab"]),
    # not a closed object: a required key missing, a value failing, a forbidden or an unnamed key
    # (its branches require `a` or `z`, which llguidance then takes first: {"c": 1, "a": 2} is rejected,
    # the known order limit, RESULTS.md)
    "not_closed_object": ({"type": "object", "not": _CLOSED}, [
        {"a": 1}, {"a": 1, "b": 2}, {"a": 1, "c": 2}, {"b": 1}, {}, {"a": 1, "b": 2, "c": 3},
        {"z": 2, "a": 1}, []]),
    # o76785's shape: `not` of an object whose `href` is `not` an IPv4 address
    "double_negation_format": ({"type": "object", "properties": {"crs": {"not": {"properties": {
        "href": {"not": {"type": "string", "format": "ipv4"}}}}}}}, [
        {"crs": {"href": "10.0.0.1"}}, {"crs": {"href": "10.0.0.1", "x": 1}}, {}, {"crs": {"href": "10.0.0"}},
        {"crs": {}}, {"crs": 5}, {"crs": {"href": 7}}, {"crs": {"href": "256.1.1.1"}}]),
    # not-const / not-enum of objects: a key missing, another value, or a key more
    "not_const_object": ({"type": "object", "not": {"const": {"a": 1, "b": [1, 2]}}}, [
        {"a": 1, "b": [1, 2]}, {"a": 1, "b": [1, 3]}, {"a": 1}, {"a": 1, "b": [1, 2], "c": 0}, {"a": 2, "b": [1, 2]},
        {}, {"a": 1.0, "b": [1, 2]}, {"a": 1, "b": [1, 2, 3]}]),
    "not_enum_objects": ({"not": {"enum": [{"a": 1}, {"b": "x"}, 3, {}]}}, [
        {"a": 1}, {"b": "x"}, {"a": 2}, {"b": "y"}, {"a": 1, "b": "x"}, 3, 4, {}, "s", {"c": None}]),
    # Handwritten---mod305's witness: the complement nests ~190 levels, past llguidance's JSON reader
    "not_const_deep": ({"not": {"const": _nested(40)}}, [_nested(40), _nested(39), _nested(41), {"a": _nested(39), "b": 1}]),
    # o51161's shape: a dotted quad is also a host name, so `oneOf` keeps host names that are no IPv4
    "one_of_hostname_ipv4": ({"type": "string", "oneOf": [{"format": "hostname"}, {"format": "ipv4"}, {"format": "ipv6"}]},
                             ["1.2.3.4", "1.2.3.04", "a.1", "example.com", "::1", "1.2.3", "256.1.1.1", "a b", "10.0.0.255"]),
    "not_ipv4": ({"type": "string", "not": {"format": "ipv4"}},
                 ["1.2.3.4", "01.2.3.4", "1.2.3", "1..2.3", "1.2.3.4.", "", "a", "255.255.255.255", "255.255.255.256"]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    assert_matches_reference(tokenizer, C.compile(tokenizer, json_schema=schema, cache=None), schema, instances)


def _disable(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    if name in ("one_of_hostname_ipv4", "not_ipv4"):
        monkeypatch.setattr(schema_negation, "NOT_FORMAT", {})
    elif name.startswith("one_of"):
        monkeypatch.setattr(schema_disjoint, "counts_disjoint", lambda *args: False)
        monkeypatch.setattr(schema_relative, "counts_disjoint", lambda *args: False)
        monkeypatch.setattr(compiler, "_contains_retry", lambda *args: None)  # "some item fails" as Lark: another way
    elif name == "not_closed_object":
        monkeypatch.setattr(schema_negation, "unnamed_key_present", lambda node: None)
        monkeypatch.setattr(schema_relative, "unnamed_key_present", lambda node: None)
        monkeypatch.setattr(compiler, "_contains_retry", lambda *args: None)  # "some key fails" as Lark: another way
    elif name in ("not_const_object", "not_enum_objects"):
        def refuse(value: Any) -> Any:
            raise schema_negation.Unsupported("enum", "disabled")
        monkeypatch.setattr(schema_negation, "_not_object", refuse)
    elif name == "not_const_deep":
        monkeypatch.setattr(schema_module, "cut_deep_nesting", lambda schema: 0)
    else:
        monkeypatch.setattr(schema_double_negation.PendingNots, "marker", lambda self, *args: None)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_without_the_rule(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    _disable(name, monkeypatch)
    with pytest.raises((GrammarCompileError, C.UnsupportedSchemaError)):
        C.compile(tokenizer, json_schema=CASES[name][0], cache=None)


def test_key_and_item_count_bounds() -> None:
    assert schema_disjoint.key_count_bounds([_REPOSITORY, {"minProperties": 1}]) == (2, None)
    assert schema_disjoint.key_count_bounds([_SWITCH, _CLOSED]) == (1, 1)
    assert schema_disjoint.key_count_bounds([_CLOSED]) == (1, 2)  # `z: false` is no room
    assert schema_disjoint.item_count_bounds([{"prefixItems": [STR, STR], "items": False}, {"minItems": 1}]) == (1, 2)
    assert schema_disjoint.counts_disjoint([_REPOSITORY], [_SWITCH], "object")
    assert not schema_disjoint.counts_disjoint([_REPOSITORY], [{"maxProperties": 2}], "object")
    assert not schema_disjoint.counts_disjoint([{"maxItems": 3}], [{"minItems": 3}], "array")


def test_unnamed_key_branches() -> None:
    branches = schema_negation.unnamed_key_present(_CLOSED)
    assert branches == [{"type": "object", "minProperties": 2, "required": ["a"], "properties": {"b": False, "z": False}},
                        {"type": "object", "minProperties": 3, "required": ["a", "b"], "properties": {"z": False}}]
    many = {"properties": {k: True for k in "abcde"}, "additionalProperties": False}
    assert schema_negation.unnamed_key_present(many) is None  # 32 sets of optional keys: not listed
    assert schema_negation.unnamed_key_present({"required": ["q"], "properties": {}}) is None


def test_nested_negations_refused_where_they_do_not_cancel() -> None:
    triple = {"not": {"not": {"not": {"type": "string", "format": "ipv4"}}}}
    with pytest.raises(C.UnsupportedSchemaError) as err:
        check_schema(triple, "llguidance")
    assert err.value.keyword == "not"
    # a marker the vetted schema still reaches (here through $defs) is reported, an unreachable one is not
    pending = schema_double_negation.PendingNots(defer=True)
    pending.depth = 1
    marker = pending.marker({"format": "ipv4"}, ("properties", "x"))
    assert pending.surviving({"$ref": "#/$defs/r0"}, {"r0": {"allOf": [marker]}})[0] == ("properties", "x")
    defs = {"r0": {"allOf": [marker]}, "r1": {"type": "string"}}
    assert pending.surviving({"$ref": "#/$defs/r1"}, defs) is None
    assert list(defs) == ["r1"]  # the unreachable definition holding a marker is gone
    assert schema_double_negation.PendingNots(defer=False).marker({}, ()) is None


def test_deep_nesting_cut_into_defs() -> None:
    chain: dict[str, Any] = {"type": "string"}
    for _ in range(60):
        chain = {"type": "array", "items": chain}
    schema = {"type": "object", "properties": {"x": chain}}
    assert schema_depth.cut_deep_nesting(schema, max_depth=20) > 0
    def depth(o: Any) -> int:
        children = list(o.values()) if isinstance(o, dict) else o if isinstance(o, list) else []
        return 1 + max((depth(c) for c in children), default=0)
    assert depth({k: v for k, v in schema.items() if k != "$defs"}) <= 22
    assert all(depth(d) <= 22 for d in schema["$defs"].values())
    inner, seen = schema["properties"]["x"], 0  # the chain is intact, only cut: follow it through $defs
    while inner != {"type": "string"}:
        inner = schema["$defs"][inner["$ref"].rsplit("/", 1)[-1]] if "$ref" in inner else inner["items"]
        seen += "type" in inner and inner["type"] == "array"
    assert seen == 59
    assert schema_depth.cut_deep_nesting({"type": "object", "properties": {"x": {"type": "string"}}}) == 0


def test_not_ipv4_pattern_is_the_exact_complement() -> None:
    """Every string of up to 8 characters over digits and dots (and a few others) against
    `jsonschema`'s ipv4 check (Python's ipaddress)."""
    not_ipv4 = re.compile(schema_formats.NOT_FORMAT["ipv4"])
    checker = jsonschema.FormatChecker()
    words = ["".join(t) for n in range(9) for t in itertools.product("0125.", repeat=n)]
    words += ["1.2.3.4", "10.20.30.40", "255.255.255.255", "256.0.0.0", "1.2.3.4a", " 1.2.3.4", "1.2.3.0400"]
    assert all((not_ipv4.match(w) is None) == checker.conforms(w, "ipv4") for w in words)
    assert ("ipv4", "hostname") in schema_formats.FORMAT_WITHIN


def test_hostname_ipv4_needs_the_inclusion(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(schema_relative, "FORMAT_WITHIN", frozenset())
    with pytest.raises(C.UnsupportedSchemaError, match="oneOf"):
        C.compile(tokenizer, json_schema=CASES["one_of_hostname_ipv4"][0], cache=None)


@pytest.mark.parametrize("schema", [
    {"type": "object", "maxProperties": 8, "properties": {f"k{i}": {"type": "integer"} for i in range(60)}},
    {"type": "object", "additionalProperties": False, "maxProperties": 8,
     "properties": {f"k{i}": {"type": "integer"} for i in range(60)}},
])
def test_key_subsets_counted_before_listing(schema: dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Key counts over many optional keys: the subsets are counted before any is listed (60 keys
    under maxProperties 8 are 2.9e9 sets: listing them took 21 GB and the OOM killer), and the
    rewrite is skipped past its cap (llguidance then refuses the counts itself)."""
    drawn = [0]

    def counted(items: Any, n: int) -> Any:
        for c in itertools.combinations(items, n):
            drawn[0] += 1
            assert drawn[0] <= 10_000, "key subsets listed past the cap"
            yield c

    monkeypatch.setattr(schema_unique, "combinations", counted)
    assert schema_unique.open_count(schema, lambda v: v) is None
    if schema.get("additionalProperties") is False:
        assert schema_unique.closed_count(schema) is None

"""Object properties in any order (constrained/schema_any_order.py), checked against `jsonschema`:
every instance, in the key order written here, is accepted token by token exactly when the
reference validator says it is valid. Before the rewrite llguidance took named properties only
in schema order, so each case with a reordered valid instance fails without it."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema as schema_module
from radixlm.constrained import schema_any_order, schema_simplify
from radixlm.constrained.schema import check_schema
from radixlm.constrained.schema_any_order import free_optional_order, lead_with_schema_key

from .conftest import encode, run_tokens

INT, STR = {"type": "integer"}, {"type": "string"}
CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    "optional_any_order": ({"type": "object", "additionalProperties": False,
                            "properties": {"a": INT, "b": STR, "c": {"type": "boolean"}}},
                           [{"c": True, "a": 1}, {"b": "x", "a": 1, "c": False}, {"b": 1, "a": 1}, {"c": True, "d": 1}, {}]),
    "required_orders": ({"type": "object", "required": ["a", "b"],
                         "properties": {"a": INT, "b": STR, "opt": {"type": "array", "items": INT}}},
                        [{"b": "x", "a": 1}, {"a": 1, "b": "x"}, {"b": "x", "a": 1, "opt": [2]}, {"b": "x"},
                         {"b": "x", "a": "y"}, {"a": 1, "b": "x", "opt": ["z"]}, {"b": "x", "a": 1, "extra": None}]),
    "three_required_nested": ({"type": "object", "properties": {"outer": {
        "type": "object", "required": ["service", "name", "permissions"], "additionalProperties": False,
        "properties": {"name": STR, "permissions": {"type": "array"}, "service": {"pattern": "^[a-z]+$"}, "region": STR}}}},
        [{"outer": {"service": "ec2", "name": "n", "permissions": []}}, {"outer": {"region": "r", "name": "n"}},
         {"outer": {"permissions": [], "service": "EC2", "name": "n"}},
         {"outer": {"permissions": [1], "service": "s3", "name": "n", "region": "eu"}}]),
    "keys_needing_escapes": ({"type": "object", "additionalProperties": False, "properties": {
        k: INT for k in ("$id", "a.b", "x-y", "@type", "[x]", "^$", "a b", "é", "(c)|d", "q?", "back\\slash", "a*")}},
        [{"a*": 1, "$id": 2, "(c)|d": 3}, {"é": 1, "a b": 2, "back\\slash": 3, "^$": 4}, {"q?": 1, "[x]": 2, "@type": 3},
         {"x-y": 1, "a.b": 2}, {"ab": 1}, {"aaa": 1}, {"c": 1}, {"d": 1}, {"q": 1}, {"backslash": 1}, {"$id": "s"}]),
    "keys_with_angle_brackets": ({"type": "object", "additionalProperties": False, "properties": {  # JsonSchemaStore---proxies
        k: STR for k in ("<ProxyName>", "a>b", "<")}},
        [{"<ProxyName>": "p", "<": "x"}, {"a>b": "v", "<ProxyName>": "q"}, {"ProxyName": "p"}, {"<ProxyName": "p"},
         {"ab": "v"}, {"<": 1}]),
    "next_to_patterns": ({"type": "object", "additionalProperties": False, "required": ["version"],
                          "patternProperties": {"^x-": {}}, "properties": {"services": {"type": "object"},
                                                                            "version": STR, "x-name": INT}},
                         [{"version": "3", "x-a": 1, "services": {}}, {"services": {}, "version": "3"},
                          {"version": "3", "x-name": "s"}, {"version": "3", "x-name": 1}, {"services": 1, "version": "3"}]),
    "in_anyOf_branches": ({"anyOf": [{"type": "object", "properties": {"k": {"const": "a"}, "v": INT, "w": INT},
                                      "required": ["k"]}, {"type": "string"}]},
                          [{"k": "a", "w": 1, "v": 2}, {"k": "a", "w": 1, "v": "x"}, {"v": 1}, "s"]),
    "recursive": ({"$ref": "#/$defs/node", "$defs": {"node": {
        "type": "object", "required": ["id", "kind"], "additionalProperties": False,
        "properties": {"kind": STR, "id": INT, "children": {"type": "array", "items": {"$ref": "#/$defs/node"}}}}}},
        [{"kind": "a", "id": 1, "children": [{"kind": "b", "id": 2}]}, {"id": 1, "kind": "a", "children": [{"id": 2, "kind": "b"}]},
         {"id": 1, "kind": "a", "children": [{"id": 2}]}]),
    # kustomization's patch: an optional key before the required one, out of schema order (every order of <= 3 keys)
    "optional_before_required": ({"type": "object", "required": ["patch"], "additionalProperties": False,
                                  "properties": {"options": {"type": "object"}, "patch": STR, "target": {"type": "object"}}},
                                 [{"target": {}, "patch": "p"}, {"target": {}, "patch": "p", "options": {}},
                                  {"patch": "p", "options": {}, "target": {}}, {"target": {}}, {"target": {}, "patch": 1},
                                  {"options": {}, "target": {}, "patch": "p", "x": 1}]),
    # o58609's shape: a `type` next to a oneOf moves into the branches, which then take other orders
    "type_pushed_into_branches": ({"type": "object", "oneOf": [
        {"additionalProperties": False, "required": ["version"], "properties": {"date": STR, "version": {"enum": ["1"]}}},
        {"additionalProperties": False, "required": ["version", "ns"],
         "properties": {"date": STR, "ns": {"type": "object"}, "version": {"enum": ["2"]}}}]},
        [{"version": "1", "date": "d"}, {"date": "d", "ns": {}, "version": "2"}, {"ns": {}, "version": "2"},
         {"version": "2"}, {"version": "1", "ns": {}}, "s", {"date": "d", "version": "3"}]),
    # JsonSchemaStore files open with "$schema", an additional key at roots with required keys
    "leading_schema_key": ({"type": "object", "required": ["name", "version"], "additionalProperties": STR,
                            "properties": {"lib": {"type": "array"}, "name": STR, "version": INT, "opt": INT}},
                           [{"$schema": "s", "name": "n", "version": 1}, {"$schema": "s", "lib": [], "name": "n", "version": 1},
                            {"name": "n", "version": 1, "$schema": "s", "opt": 2}, {"name": "n", "version": "1", "$schema": "s"},
                            {"$schema": 1, "name": "n", "version": 1}, {"$schema": "s", "name": "n"},
                            {"$schema": "s", "name": "n", "version": 1, "x": 2}, {"$schema": "s", "name": "n", "version": 1, "x": "y"}]),
    # intersected nodes keep schema order (llguidance merges them): still exact
    "merged_node_kept": ({"type": "object", "allOf": [{"properties": {"a": INT, "b": STR}}, {"required": ["a"]}]},
                         [{"a": 1, "b": "x"}, {"b": "x"}, {"a": "s"}]),
}


def _valid(schema: dict[str, Any], instance: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema).is_valid(instance)


@pytest.mark.parametrize("name", sorted(CASES))
def test_any_order_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        text = json.dumps(instance, ensure_ascii=False)
        accepted = run_tokens(grammar.matcher(), encode(tokenizer, text))
        assert accepted == _valid(schema, instance), f"{name}: {text} accepted={accepted}"


def test_reordered_instances_need_the_rewrite(tokenizer: Any) -> None:
    """The cases above are not vacuous: without the rewrite a reordered valid instance fails."""
    schema, instances = CASES["required_orders"]
    checked = check_schema(schema, "llguidance")
    assert "anyOf" in checked.schema  # two required keys: both orders listed
    from radixlm.constrained.backends.llguidance_backend import compile_json_schema
    from radixlm.constrained.vocab import TokenizerInfo

    info = TokenizerInfo.from_tokenizer(tokenizer)
    plain = compile_json_schema(info, schema, json.dumps(schema), 20)  # llguidance alone
    text = json.dumps(instances[0])
    assert not run_tokens(plain.matcher(), encode(tokenizer, text))
    assert run_tokens(C.compile(tokenizer, json_schema=schema, cache=None).matcher(), encode(tokenizer, text))


@pytest.mark.parametrize(("name", "index"), [("optional_before_required", 0), ("type_pushed_into_branches", 0)])
def test_other_orders_need_their_rewrite(tokenizer: Any, name: str, index: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without every order of a small node, or without the type moved into the branches, the
    instance at `index` (valid) is rejected."""
    schema, instances = CASES[name]
    if name == "optional_before_required":
        monkeypatch.setattr(schema_any_order, "MAX_ALL_ORDERS", 0)
    else:
        monkeypatch.setattr(schema_simplify, "push_type_into_branches", lambda s: 0)
    assert _valid(schema, instances[index])
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert not run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instances[index])))


def test_leading_schema_key_needs_its_copy(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without the copy naming `$schema` first, a document opening with it is rejected (valid);
    roots that name it, forbid other keys, count keys or are intersected get no copy."""
    schema, instances = CASES["leading_schema_key"]
    monkeypatch.setattr(schema_module, "lead_with_schema_key", lambda s: 0)
    assert _valid(schema, instances[0])
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert not run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instances[0])))
    base = {"type": "object", "required": ["a"], "properties": {"a": INT}}
    for blocked in ({"additionalProperties": False}, {"maxProperties": 3}, {"allOf": [{"required": ["b"]}]},
                    {"properties": {"a": INT, "$schema": STR}}, {"required": []}, {"patternProperties": {"^.schema": INT}}):
        node = {**base, **blocked}
        assert lead_with_schema_key(node) == 0, blocked
    node = dict(base)
    assert lead_with_schema_key(node) == 1 and [list(b["properties"]) for b in node["anyOf"]] == [["a"], ["$schema", "a"]]
    node = {"anyOf": [{"type": "string"}, {**base, "patternProperties": {"^x$": STR}}]}  # free_optional_order's forms
    assert lead_with_schema_key(node) == 1 and len(node["anyOf"]) == 3 and list(node["anyOf"][2]["properties"]) == ["$schema", "a"]


def test_duplicate_keys_only_where_every_occurrence_is_valid(tokenizer: Any) -> None:
    """A pattern key may repeat (a grammar cannot remember every key seen); each occurrence is
    checked, so the parsed object (one occurrence kept) is valid. Property counts would not
    survive a repeat, so a node with minProperties keeps its named properties."""
    free = C.compile(tokenizer, json_schema=CASES["optional_any_order"][0], cache=None)
    assert run_tokens(free.matcher(), encode(tokenizer, '{"a": 1, "a": 2}'))
    assert not run_tokens(free.matcher(), encode(tokenizer, '{"a": 1, "a": "x"}'))
    counted = {"type": "object", "additionalProperties": False, "minProperties": 2,
               "properties": {"a": INT, "b": INT}}
    grammar = C.compile(tokenizer, json_schema=counted, cache=None)
    assert not run_tokens(grammar.matcher(), encode(tokenizer, '{"a": 1, "a": 2}'))
    assert run_tokens(grammar.matcher(), encode(tokenizer, '{"a": 1, "b": 2}'))


def test_bounds() -> None:
    """Required keys are permuted up to the bound only; beyond it they stay in schema order."""
    node = {"type": "object", "required": list("abcde"), "properties": {k: INT for k in "abcdef"}}
    assert free_optional_order(node) == 1
    assert list(node["properties"]) == list("abcde") and list(node["patternProperties"]) == ["^f$"]
    node = {"type": "object", "required": list("ab"), "properties": {k: INT for k in "abc"}, "minProperties": 1}
    assert free_optional_order(node) == 0 and list(node["properties"]) == ["a", "b", "c"]  # counts: c stays named
    node = {"type": "object", "required": list("ab"), "properties": {"a": INT, "b": INT, "c": False}, "minProperties": 1}
    assert free_optional_order(node) == 1 and len(node["anyOf"]) == 3  # every key that may occur is required

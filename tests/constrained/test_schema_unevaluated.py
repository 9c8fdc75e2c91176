"""`unevaluatedProperties` with static evaluation (schema_unevaluated.py), checked against
`jsonschema` token by token; refused without the rewrite, refused where a conditional branch
evaluates keys, and an annotation before draft 2019-09."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema as schema_module
from radixlm.constrained.schema_negation import Unsupported

from .conftest import encode, run_tokens

STR, INT = {"type": "string"}, {"type": "integer"}
CASES: dict[str, tuple[dict[str, Any], list[Any]]] = {
    # JsonSchemaStore---meltano's shape: two $ref'd objects met through allOf, nothing else allowed
    "all_of_refs_closed": ({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "allOf": [{"$ref": "#/$defs/plugin"}, {"$ref": "#/$defs/extractor"}], "unevaluatedProperties": False,
        "$defs": {"plugin": {"type": "object", "required": ["name"], "properties": {"name": STR}},
                  "extractor": {"type": "object", "properties": {"catalog": STR, "limit": INT}}}},
        [{"name": "n"}, {"name": "n", "catalog": "c"}, {"name": "n", "catalog": "c", "limit": 3},
         {"name": "n", "other": 1}, {"name": "n", "limit": "x"}, {}, {"catalog": "c"}]),
    # a schema for the keys left over: names and patterns of the node itself are evaluated
    "leftover_keys_schema": ({
        "type": "object", "properties": {"a": INT}, "patternProperties": {"^x": STR},
        "unevaluatedProperties": {"type": "boolean"}},
        [{"a": 1, "xa": "s", "b": True}, {"b": True}, {"a": 1}, {"b": 1}, {"xa": 1}, {"a": 1, "c": "no"}]),
}


def _valid(schema: Any, instance: Any) -> bool:
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)
    return cls(schema, format_checker=cls.FORMAT_CHECKER).is_valid(instance)


def _accepts(tokenizer: Any, grammar: Any, instance: Any) -> bool:
    return run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instance)))


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        assert _accepts(tokenizer, grammar, instance) == _valid(schema, instance), f"{name}: {instance}"
    assert any(_valid(schema, x) for x in instances) and any(not _valid(schema, x) for x in instances)


@pytest.mark.parametrize("name", sorted(CASES))
def test_refused_without_the_rewrite(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any) -> Any:
        raise Unsupported("unevaluatedProperties", "disabled")

    monkeypatch.setattr(schema_module, "unevaluated_properties", refuse)
    with pytest.raises(C.UnsupportedSchemaError) as err:
        C.compile(tokenizer, json_schema=CASES[name][0], cache=None)
    assert (err.value.keyword, err.value.path) == ("unevaluatedProperties", "#")


def test_conditional_evaluation_is_refused(tokenizer: Any) -> None:
    schema = {"type": "object", "anyOf": [{"properties": {"a": INT}}, {"required": ["b"]}],
              "properties": {"c": INT}, "unevaluatedProperties": False}
    with pytest.raises(C.UnsupportedSchemaError) as err:
        C.compile(tokenizer, json_schema=schema, cache=None)
    assert (err.value.keyword, err.value.path) == ("unevaluatedProperties", "#")
    assert "anyOf" in err.value.reason


def test_annotation_before_2019_09(tokenizer: Any) -> None:
    schema = {"$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
              "properties": {"a": INT}, "unevaluatedProperties": False}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert _valid(schema, {"a": 1, "b": 2}) and _accepts(tokenizer, grammar, {"a": 1, "b": 2})


def test_additional_properties_makes_it_vacuous(tokenizer: Any) -> None:
    schema = {"type": "object", "allOf": [{"additionalProperties": INT}], "unevaluatedProperties": False}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in ({"a": 1}, {"a": "x"}, {}):
        assert _accepts(tokenizer, grammar, instance) == _valid(schema, instance)

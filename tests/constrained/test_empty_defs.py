"""Definitions that accept nothing (compiler._empty_defs_retry): llguidance refuses a schema with
a whole `$defs` entry unsatisfiable wherever it is referenced, even where the reference need not
be used (the items of an array that may be empty, an optional property). Written `false`, the
schema compiles and agrees with `jsonschema` on its instances; without the retry it is refused."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import compiler as compiler_module
from radixlm.constrained.errors import GrammarCompileError

from .conftest import encode, run_tokens

ROUTE = {"type": "object", "additionalProperties": False, "properties": {"a": {"type": "string"}}, "required": ["b"]}
CASES = {
    "items_of_empty_def": ({"type": "object", "$defs": {"route": ROUTE},
                            "properties": {"routes": {"type": "array", "items": {"$ref": "#/$defs/route"}},
                                           "name": {"type": "string"}}},
                           [{"routes": []}, {"routes": [{"a": "x"}]}, {"routes": [{"b": 1}]}, {"name": "n"}, {}]),
    "emptiness_spreads": ({"type": "object", "$defs": {"route": ROUTE, "holder": {
        "type": "object", "properties": {"r": {"$ref": "#/$defs/route"}, "k": {"const": [{"$ref": "#/$defs/route"}]}},
        "required": ["r"]}},
        "properties": {"h": {"$ref": "#/$defs/holder"}, "n": {"type": "integer"},
                       "any": {"anyOf": [{"$ref": "#/$defs/holder"}, {"type": "integer"}]}}},
        [{"n": 1}, {"h": {}}, {"h": {"r": {"a": "x"}}}, {"any": 3}, {"any": {"r": {}}}, {}]),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_empty_definitions_compile_exactly(tokenizer: Any, name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    schema, instances = CASES[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    validator = jsonschema.Draft202012Validator(schema)
    for instance in instances:
        text = json.dumps(instance)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == validator.is_valid(instance), text
    monkeypatch.setattr(compiler_module, "MAX_EMPTY_DEFS", 0)
    with pytest.raises(GrammarCompileError, match="Unsatisfiable"):
        C.compile(tokenizer, json_schema=schema, cache=None)


def test_root_reference_to_an_empty_definition_stays_refused(tokenizer: Any) -> None:
    """Nothing is valid: the backend's error stands (not a crash of the retry)."""
    with pytest.raises(GrammarCompileError, match="Unsatisfiable"):
        C.compile(tokenizer, json_schema={"$ref": "#/$defs/route", "$defs": {"route": ROUTE}}, cache=None)

"""ECMA identity escapes read as assertions by the backend (constrained/schema_escapes.py):
`\\<` and `\\>` are the characters `<` and `>` in a JSON Schema pattern; llguidance's regex syntax
reads them as word-start/word-end and refuses the pattern. Rewritten, the schema compiles and
agrees with `jsonschema` on its instances."""

from __future__ import annotations

import json
from typing import Any

import jsonschema

from radixlm import constrained as C
from radixlm.constrained.schema_escapes import ecma_escapes

from .conftest import encode, run_tokens


def test_ecma_escapes_spelling() -> None:
    assert ecma_escapes("^\\<ProxyName\\>$") == "^<ProxyName>$"
    assert ecma_escapes("[\\<\\>]+") == "[<>]+"
    assert ecma_escapes("a\\\\<b") == "a\\\\<b"  # an escaped backslash, then a plain `<`
    assert ecma_escapes("\\.\\d\\b") == "\\.\\d\\b"  # other escapes keep their meaning
    assert ecma_escapes(3) == 3


def test_schema_with_escaped_angle_brackets(tokenizer: Any) -> None:
    schema = {"type": "object", "additionalProperties": False,
              "properties": {"tag": {"type": "string", "pattern": "^\\<[a-z]+\\>$"}},
              "patternProperties": {"^x\\<": {"type": "integer"}}}
    instances = [{"tag": "<abc>"}, {"tag": "abc"}, {"tag": "<ab"}, {"tag": "<a>b"}, {"x<1": 2}, {"x<": "s"}, {"x1": 1}]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    validator = jsonschema.Draft202012Validator(schema)
    for instance in instances:
        text = json.dumps(instance)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == validator.is_valid(instance), text

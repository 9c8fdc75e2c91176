"""String schemas folded into one pattern (constrained/schema_string_fold.py): the folded regex
accepts exactly the strings `jsonschema` accepts (every short string over a small alphabet), and
a schema whose pattern combinations llguidance cannot decide ("Unable to determine if regex is
empty") compiles through the fold and agrees with `jsonschema` token by token."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import compiler as compiler_module
from radixlm.constrained.errors import GrammarCompileError
from radixlm.constrained.schema_string_fold import fold_string_schema

from .conftest import encode, run_tokens

D7 = "http://json-schema.org/draft-07/schema#"
SCHEMAS = {
    "oneOf": {"type": "string", "oneOf": [{"pattern": "^a"}, {"pattern": "b$"}], "maxLength": 3},
    "not_anyOf": {"type": "string", "not": {"anyOf": [{"pattern": "aa"}, {"minLength": 4}]}},
    "if_then_else": {"type": "string", "if": {"pattern": "^a"}, "then": {"maxLength": 2}, "else": {"pattern": "b"}},
    "enum_const": {"type": "string", "anyOf": [{"enum": ["ab", 3, "b"]}, {"const": ""}], "minimum": 4},
    "ref_and_object_keywords": {"type": "string", "$defs": {"x": {"pattern": "^[ab]+$", "required": ["q"]}},
                                "allOf": [{"$ref": "#/$defs/x"}, {"not": {"pattern": "bb"}}], "maxItems": 0},
    "draft7_ref_siblings_ignored": {"$schema": D7, "type": "string", "definitions": {"x": {"maxLength": 2}},
                                    "allOf": [{"$ref": "#/definitions/x", "minLength": 2}]},
    "type_excludes": {"type": "string", "anyOf": [{"type": "integer"}, {"pattern": "^b"}]},
}


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_fold_matches_reference_validator(name: str) -> None:
    schema = SCHEMAS[name]
    folded = fold_string_schema(schema)
    assert folded is not None and set(folded) == {"type", "pattern"}
    validator = jsonschema.validators.validator_for(schema)(schema)
    for n in range(6):
        for chars in itertools.product("ab", repeat=n):
            s = "".join(chars)
            assert (re.fullmatch(folded["pattern"][1:-1], s) is not None) == validator.is_valid(s), s


def test_fold_declines_what_it_cannot_read() -> None:
    assert fold_string_schema({"anyOf": [{"pattern": "a"}]}) is None  # non-strings valid too
    assert fold_string_schema({"type": "string", "format": "email"}) is None
    assert fold_string_schema({"type": "string", "$defs": {"r": {"not": {"$ref": "#/$defs/r"}}},
                               "$ref": "#/$defs/r"}) is None  # recursive


# Handwritten---allany13's shape: anyOfs of anchored patterns and their negations, a length window.
UNDECIDED = {"type": "string", "allOf": [
    {"anyOf": [{"pattern": "^a"}, {"pattern": "^b"}, {"pattern": "^c"}]},
    {"anyOf": [{"allOf": [{"not": {"pattern": "^[ab]"}}, {"not": {"pattern": "^c"}}]}, {"pattern": "x$"}, {"pattern": "z$"}]},
    {"anyOf": [{"allOf": [{"not": {"pattern": "^[abc]"}}, {"not": {"pattern": "[xyz]$"}}]},
               {"pattern": "1111111111111111111"}, {"pattern": "222222222222222222"}]},
    {"pattern": "[aA][12].*[zZ]"}, {"minLength": 10}, {"maxLength": 20}]}


def test_undecided_combination_compiles_through_the_fold(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    grammar = C.compile(tokenizer, json_schema=UNDECIDED, cache=None)
    validator = jsonschema.Draft202012Validator(UNDECIDED)
    for s in ["a" + "2" * 18 + "z", "a" + "1" * 19, "a" + "1" * 18 + "z", "b" + "2" * 18 + "z", "a2z", 5]:
        text = json.dumps(s)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == validator.is_valid(s), text
    monkeypatch.setattr(compiler_module, "fold_string_schema", lambda schema: None)
    with pytest.raises(GrammarCompileError, match="Unable to determine if regex is empty"):
        C.compile(tokenizer, json_schema=UNDECIDED, cache=None)

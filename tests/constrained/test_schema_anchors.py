"""Patterns with `^`/`$` inside groups (constrained/schema_anchors.py): the anchor-free regex
matches exactly the strings in which the pattern matches (ECMA: `$` only at the very end), over
every short string of a small alphabet; a schema with such a pattern compiles (llguidance alone
refuses it) and agrees with `jsonschema` on its instances."""

from __future__ import annotations

import itertools
import json
import re
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import schema as schema_module
from radixlm.constrained.errors import GrammarCompileError
from radixlm.constrained.schema_anchors import _sentinels, anchor_free, has_inner_anchor

from .conftest import encode, run_tokens

PATTERNS = ["^(\\/?((\\.{2})|([a-z0-9\\-]*))($|\\/))*$",  # Github_hard---o77367
            "^$[a-zA-Z0-9$_]*$",  # Github_medium---o12562: only ""
            "(^a|b$)", "x(^|y)z", "(a|$)(b|^)", "(^|/)a($|/)"]


def _ecma(p: str) -> str:
    """Python's re with ECMA's `$` (no match before a final newline)."""
    return _sentinels(p).replace("\ue000", "^").replace("\ue001", "\\Z")


@pytest.mark.parametrize("pattern", PATTERNS)
def test_anchor_free_matches_the_same_strings(pattern: str) -> None:
    assert has_inner_anchor(pattern)
    rewritten = anchor_free(pattern)
    assert not has_inner_anchor(rewritten)
    for n in range(5):
        for chars in itertools.product("ab./-xz$^", repeat=n):
            s = "".join(chars)
            assert (re.fullmatch(rewritten[1:-1], s) is not None) == (re.search(_ecma(pattern), s) is not None), s


def test_plain_patterns_are_left_alone() -> None:
    assert not has_inner_anchor("^abc$") and not has_inner_anchor("a|^b$")
    with pytest.raises(Exception):
        anchor_free("a^b")  # matches no string


def test_schema_with_inner_anchors(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    schema = {"type": "object", "properties": {"path": {"type": "string", "pattern": PATTERNS[0]}},
              "patternProperties": {"^$[a-z]*$": {"type": "integer"}}, "additionalProperties": False}
    instances = [{"path": "a/../b"}, {"path": "a/b/"}, {"path": "A"}, {"path": "a//b"}, {"": 1}, {"x": 1}, {"": "s"}]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for instance in instances:
        text = json.dumps(instance)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == jsonschema.Draft202012Validator(schema).is_valid(instance), text
    monkeypatch.setattr(schema_module, "without_inner_anchors", lambda p: p)
    with pytest.raises(GrammarCompileError):
        C.compile(tokenizer, json_schema=schema, cache=None)

"""Repeated keys must not meet `minProperties`: llguidance lets a key outside `properties` repeat,
and counts each pair, so `{"x1": 1, "x1": 2}` met `minProperties: 2` while the parsed object
(last key wins) holds one key — the fuzzer's 4:1122 walked into it. Where the grammar counts keys
toward a `minProperties` of 2 or more, no object may repeat a key (unique_paths.counts_keys,
checked beside the grammar by unique_scan / unique_check)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.compiler import grammar_from_payload
from radixlm.constrained.unique_check import UniqueGrammar
from radixlm.constrained.unique_keys import counts_keys
from radixlm.constrained.unique_paths import UniquePaths

from .conftest import encode, reference_valid, run_tokens

NAMES = {"type": "object", "propertyNames": {"enum": ["a", "b", "x1"]}, "minProperties": 2}  # 4:1122
OPTIONS = {"type": "object", "properties": {"options": {"type": "object", "minProperties": 2}}}  # o84199's shape
CONTAINS = {"type": "array", "contains": {"const": 1},  # the Lark route: `%json` leaves count repeated keys too
            "items": {"anyOf": [{"type": "integer"}, {"type": "object", "minProperties": 2}]}}
ITEMS = {"type": "array", "uniqueItems": True, "items": {"type": "object", "minProperties": 2,
                                                        "additionalProperties": {"type": "integer"}}}


def _pairs_unique(text: str) -> bool:
    seen: list[bool] = []
    json.loads(text, object_pairs_hook=lambda pairs: seen.append(len(pairs) == len({k for k, _ in pairs})) or {})
    return all(seen)


@pytest.mark.parametrize(("schema", "texts"), [
    (NAMES, ['{"x1": 1, "x1": 2}', '{"a": 1, "x1": 2}', '{"a": 1}', '{"a": 1, "b": 2, "x1": 3}',
             '{"a": 1, "c": 2}', '{"a": 1, "b": 2, "a": 3}', '{"b": 0, "a\\u0062": 1}']),
    (OPTIONS, ['{"options": {"k": 1, "k": 2}}', '{"options": {"k": 1, "kk": 2}}', '{"options": {"k": 1}}',
               '{"options": {"a\\u0062": 1, "ab": 2}}', '{"options": {"\\"": 1, "\\u0022": 2}}', "{}"]),
    (CONTAINS, ['[1, {"a": 1, "a": 2}]', '[1, {"a": 1, "b": 2}]', '[{"a": 1, "b": 2}, 1]', '[{"a": 1, "b": 2}]',
                '[1, {"a": {"x": 1}, "b": 2}]', '[{"a": 1, "b": 2}, {"a": 1, "a": 2}, 1]']),
    (ITEMS, ['[{"a": 1, "a": 1}]', '[{"a": 1, "b": 1}, {"b": 1, "a": 1}]', '[{"a": 1, "b": 1}]',
             '[{"a": 1, "b": 2}, {"a": 1, "c": 2}]', '[{"a": 1, "b": "x"}]']),
])
def test_repeated_keys_refused(tokenizer: Any, schema: dict[str, Any], texts: list[str]) -> None:
    """A text is accepted exactly when it repeats no key and its parsed value is valid."""
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert isinstance(grammar, UniqueGrammar) and grammar.paths.distinct_keys
    verdicts = []
    for text in texts:
        want = _pairs_unique(text) and reference_valid(schema, json.loads(text))
        verdicts.append(want)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == want, text
    assert any(verdicts) and not all(verdicts)


def _allowed(tokenizer: Any, matcher: Any) -> set[str]:
    row = C.allocate_token_bitmask(1, len(tokenizer))
    matcher.fill_next_token_bitmask(row, 0)
    return {tokenizer.decode([i]) for i in C.bitmask.row_to_ids(row[0])}


def test_mask_leaves_out_a_repeated_key(tokenizer: Any) -> None:
    """After `{"k": 1, "` in `options` the tokens that close the key as `k` are masked, `k` (for
    `kk`...) stays; after an escape the key's decoded text is compared. With the names listed,
    `x` is masked too once `x1` is used: it leads only to a dead end (the lookahead)."""
    grammar = C.compile(tokenizer, json_schema=OPTIONS, cache=None)
    for prefix, allowed_ones, masked in (('{"options": {"k": 1, "', ["k", "x"], ['k"', 'k":']),
                                         ('{"options": {"k": 1, "k', ["k", "1"], ['"', '":']),
                                         ('{"options": {"b": 1, "\\u0062', ["c"], ['"', '":'])):
        matcher = grammar.matcher()
        assert all(matcher.advance(t) for t in encode(tokenizer, prefix))
        allowed = _allowed(tokenizer, matcher)
        assert set(allowed_ones) <= allowed and not set(masked) & allowed, (prefix, sorted(allowed)[:40])
    matcher = C.compile(tokenizer, json_schema=NAMES, cache=None).matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, '{"x1": 1, "'))
    assert _allowed(tokenizer, matcher) == {"a", "b"}


def test_only_where_keys_are_counted(tokenizer: Any) -> None:
    """`minProperties` of 0 or 1 (one pair meets it, repeated or not) and schemas without it keep the
    backend's grammar as it is: no check, no mask cost."""
    for schema in ({"type": "object", "minProperties": 1}, {"type": "object", "additionalProperties": {"type": "string"}},
                   {"type": "array", "items": {"type": "string"}}):
        assert not counts_keys(schema)
        assert not isinstance(C.compile(tokenizer, json_schema=schema, cache=None), UniqueGrammar)
    assert counts_keys({"$defs": {"d": {"minProperties": 2}}, "$ref": "#/$defs/d"})


@pytest.mark.parametrize("schema", [OPTIONS, CONTAINS])
def test_payload_keeps_the_check(tokenizer: Any, schema: dict[str, Any]) -> None:
    """The service's caller rebuilds the grammar from its payload: the check comes with it."""
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert UniquePaths.from_payload(grammar.paths.payload()) == grammar.paths
    again = grammar_from_payload(grammar.info, "llguidance", grammar.payload())
    assert isinstance(again, UniqueGrammar) and again.paths.distinct_keys
    text = '{"options": {"k": 1, "k": 2}}' if schema is OPTIONS else '[1, {"a": 1, "a": 2}]'
    assert not run_tokens(again.matcher(), encode(tokenizer, text))


def test_only_the_counted_objects(tokenizer: Any) -> None:
    """Keys are kept distinct at the paths where `minProperties` counts them: elsewhere a repeated
    key (the parsed object keeps the last; per-key schemas hold for each) stays allowed, so an
    object whose listed names are all used does not become a dead end (the fuzzer's 6:2699 did,
    with every object checked: `{"a": .., "b": .., "x1": .., ` then only used names)."""
    schema = {"type": "object", "propertyNames": {"enum": ["a", "b"]},
              "properties": {"b": {"type": "object", "minProperties": 2}}}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert isinstance(grammar, UniqueGrammar) and grammar.paths.distinct_at
    for text, want in (('{"a": 1, "a": 2}', True), ('{"b": {"x": 1, "x": 2}}', False),
                       ('{"b": {"x": 1, "y": 2}, "a": 1, "a": 2}', True), ('{"b": {"x": 1}}', False),
                       ('{"a": {"x": 1, "x": 2}}', True)):
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == want, text
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, '{"b": {"x": 1, "y": 2}, "a": 1, "'))
    assert "a" in _allowed(tokenizer, matcher)


def test_every_object_where_paths_cannot_be_followed(tokenizer: Any) -> None:
    """A counted object under a pattern key: the path automaton does not follow pattern keys, so
    every object of the document keeps its keys distinct (stricter, never looser)."""
    schema = {"type": "object", "patternProperties": {"^p": {"type": "object", "minProperties": 2}}}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert isinstance(grammar, UniqueGrammar) and grammar.paths.distinct_keys and not grammar.paths.distinct_at
    assert not run_tokens(grammar.matcher(), encode(tokenizer, '{"p1": {"x": 1, "x": 2}}'))
    assert run_tokens(grammar.matcher(), encode(tokenizer, '{"p1": {"x": 1, "y": 2}, "q": 1}'))


def test_no_dead_end_when_the_names_run_out(tokenizer: Any) -> None:
    """4:1122 again: with its three names used, a `,` (alone or closing a string value: `",`)
    would ask for a fourth key that can only repeat one — a dead end (8 of 40 fuzzer walks before
    the names were listed, unique_keys.key_names); masked, while `}` and the valid objects stay."""
    grammar = C.compile(tokenizer, json_schema=NAMES, cache=None)
    assert grammar.paths.key_names == (("a", "b", "x1"),)
    for prefix, kept, ends in (('{"x1": 1, "b": 2, "a": 3', "}", ","), ('{"x1": 1, "b": 2, "a": "text', '"', '",')):
        matcher = grammar.matcher()
        assert all(matcher.advance(t) for t in encode(tokenizer, prefix))
        allowed = _allowed(tokenizer, matcher)
        assert kept in allowed and not any(x.strip().startswith(ends) for x in allowed), (prefix, sorted(allowed)[:30])
        assert "," in allowed or ends == ","  # a comma inside the string stays
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, '{"x1": 1, "b": 2, "'))
    assert _allowed(tokenizer, matcher) == {"a"}
    for text in ('{"x1": 1, "b": 2, "a": "t,"}', '{"a": [1, 2], "b": {"x1": 1, "x1": 2}}'):
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)), text

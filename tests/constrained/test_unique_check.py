"""`uniqueItems` over open item sets, checked beside the grammar (unique_paths.py, unique_scan.py,
unique_check.py), against `jsonschema` token by token. Every schema here is refused without the
check (a grammar cannot list the unique arrays of strings, objects or any value), and the masks
are compared with `advance` on every token that can end an item."""

from __future__ import annotations

import json
import random
import time
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import compiler
from radixlm.constrained.compiler import grammar_from_payload
from radixlm.constrained.unique_check import UniqueGrammar, token_tables
from radixlm.constrained.vocab import TokenizerInfo

from .conftest import assert_matches_reference, encode, run_tokens

STRINGS = {"type": "array", "uniqueItems": True, "items": {"type": "string"}}
CASES: dict[str, tuple[dict[str, Any], list[str]]] = {
    "strings": (STRINGS, ['["a", "b"]', '["a", "a"]', '["ab", "a", "abc", "ab"]', '["a\\u0062", "ab"]', "[]",
                          '["x"]', '["", ""]', '["", "a"]', '[ "q" , "q" ]', '["\\"", "\\""]', '["é", "\\u00e9"]']),
    "any_values": ({"type": "array", "uniqueItems": True},
                   ["[1, 1.0]", "[1, true]", "[true, true]", "[false, 0]", '[{"a": 1, "b": 2}, {"b": 2, "a": 1}]',
                    "[[1, 2], [1, 2]]", "[[1, 2], [2, 1]]", "[null, null]", '["x", "y", "x"]', "[10, 1, 100]",
                    "[1e2, 100]", "[[], []]", "[{}, {}]", "[[], {}]", '[{"a": [1, 1]}]', "[0.5, 0.50]", "[-0, 0]"]),
    # a map of unique lists, and objects whose own lists are unique, inside a unique list
    "nested": ({"type": "object", "additionalProperties": STRINGS,
                "properties": {"rows": {"type": "array", "uniqueItems": True, "items": {
                    "type": "object", "properties": {"name": {"type": "string"}, "tags": STRINGS}}}}},
               ['{"x": ["a", "b"], "y": ["a"]}', '{"x": ["a", "a"]}', '{"rows": [{"name": "a"}, {"name": "b"}]}',
                '{"rows": [{"name": "a"}, {"name": "a"}]}', '{"rows": [{"tags": ["a", "a"]}]}',
                '{"rows": [{"name": "a", "tags": ["x"]}, {"tags": ["x"], "name": "a"}]}',
                '{"rows": [{"name": "a", "tags": ["x"]}, {"name": "a", "tags": ["y"]}]}']),
    # recursion through $ref; tuple items then unique rest
    "recursive": ({"$defs": {"node": {"type": "object", "properties": {
                       "id": {"type": "string"}, "kids": {"type": "array", "uniqueItems": True, "items": {"$ref": "#/$defs/node"}}}}},
                   "$ref": "#/$defs/node"},
                  ['{"kids": [{"id": "a"}, {"id": "b"}]}', '{"kids": [{"id": "a"}, {"id": "a"}]}',
                   '{"kids": [{"kids": [{"id": "x"}, {"id": "x"}]}]}', '{"kids": [{"kids": []}, {"kids": []}]}']),
    "tuple": ({"type": "array", "prefixItems": [{"type": "integer"}], "items": {"type": ["string", "integer"]},
               "uniqueItems": True}, ['[1, "a", 2]', '[1, "a", 1]', '[1, "1"]', '[1, "a", "a"]', "[1]"]),
    # both alternatives of an anyOf ask for unique arrays (of different items)
    "alternatives": ({"anyOf": [{"type": "array", "uniqueItems": True, "items": {"type": "string"}},
                                {"type": "array", "uniqueItems": True, "items": {"type": "number"}, "maxItems": 3},
                                {"type": "string"}]},
                     ['["a", "a"]', "[1, 2]", "[1, 1]", '"s"', '["a", 1]']),
    # a 60-value enum: 10^80 unique arrays, too many to list (this used to hang the vetting)
    "large_enum": ({"type": "array", "uniqueItems": True, "items": {"enum": [f"v{i}" for i in range(60)]}},
                   ['["v1", "v2"]', '["v1", "v1"]', '["v1", "v59", "v1"]', '["v60"]']),
}


def _valid(schema: Any, instance: Any) -> bool:
    return jsonschema.Draft202012Validator(schema).is_valid(instance)


def _info(tokenizer: Any) -> TokenizerInfo:
    return TokenizerInfo.from_tokenizer(tokenizer)


def _check_masks(info: TokenizerInfo, matcher: Any, rng: random.Random) -> None:
    """The mask allows exactly the tokens `advance` takes: on every token the grammar alone allows
    that can end a value (a quote, a bracket, a literal, a number's end: where our check may remove
    it) and on a sample of the other tokens the grammar allows."""
    bitmask = C.allocate_token_bitmask(2, info.vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    matcher.inner.fill_next_token_bitmask(bitmask, 1)
    allowed, grammar_allows = set(C.bitmask.row_to_ids(bitmask[0])), sorted(C.bitmask.row_to_ids(bitmask[1]))
    t = token_tables(info)
    special = set(t.quoted.tolist()) | set(t.structural.tolist()) | set(t.literal.tolist())
    ending = [tid for tid in grammar_allows if tid in special or (t.number_end[tid] and len(grammar_allows) < 400)]
    for tid in ending + rng.sample(grammar_allows, min(20, len(grammar_allows))):
        took = matcher.advance(tid)
        assert took == (tid in allowed), (info.token_bytes[tid], took)
        if took:
            matcher.rollback(1)


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_reference_validator(tokenizer: Any, name: str) -> None:
    schema, texts = CASES[name]
    start = time.perf_counter()
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert time.perf_counter() - start < 30  # large_enum: counted, not listed
    assert isinstance(grammar, UniqueGrammar)
    info, rng = _info(tokenizer), random.Random(0)
    verdicts = []
    for text in texts:
        want = _valid(schema, json.loads(text))
        verdicts.append(want)
        assert run_tokens(grammar.matcher(), encode(tokenizer, text)) == want, text
        matcher = grammar.matcher()  # the same walk with the masks checked at every step
        for tid in encode(tokenizer, text):
            _check_masks(info, matcher, rng)
            if not matcher.advance(tid):
                break
    assert any(verdicts) and not all(verdicts)


# Alternatives that disagree at one path: whether `["a", "a"]` is valid depends on a sibling, which
# the path check cannot see. Repeated items there are refused for every alternative (stricter than
# the schema, never looser). Each was refused ("some alternatives ask for unique items and others
# do not") before. Instances: (value, whether it is one of the valid ones refused for that reason).
DISAGREE: dict[str, tuple[dict[str, Any], list[tuple[Any, bool]]]] = {
    "anyOf_on_a_tag": ({"type": "object", "anyOf": [
        {"properties": {"kind": {"const": 1}, "tags": STRINGS}}, {"properties": {"kind": {"const": 2}}}]},
        [({"kind": 1, "tags": ["a", "b"]}, False), ({"kind": 1, "tags": ["a", "a"]}, False),
         ({"kind": 2, "tags": ["a", "a"]}, True), ({"kind": 2, "tags": "x"}, False), ({"kind": 3}, False),
         ({"tags": ["a", "b", "a"]}, True), ({"kind": 1, "tags": [1]}, False)]),
    # chrome-manifest's shape: `if` a version `then` a unique list, `else` anything there
    "if_then_else": ({"type": "object", "required": ["v"], "properties": {"v": {"enum": [2, 3]}},
                      "if": {"properties": {"v": {"const": 3}}},
                      "then": {"properties": {"hosts": STRINGS}}, "else": {"properties": {"old": {"type": "boolean"}}}},
                     [({"v": 3, "hosts": ["a", "b"]}, False), ({"v": 3, "hosts": ["a", "a"]}, False),
                      ({"v": 2, "hosts": ["a", "a"]}, True), ({"v": 2, "hosts": [1, 1]}, True),
                      ({"v": 2, "old": True, "hosts": ["b"]}, False), ({"v": 3, "hosts": [1]}, False),
                      ({"v": 2, "old": 1}, False)]),
    # grunt-task's shape: a map whose values are one of two object forms, one with a unique `src`
    "map_of_two_forms": ({"type": "object", "additionalProperties": {"anyOf": [
        {"properties": {"files": {"type": "array", "items": {"type": "string"}}}},
        {"type": "object", "required": ["src"], "properties": {"src": {**STRINGS, "minItems": 1}}}]}},
        [({"t": {"src": ["a", "b"]}}, False), ({"t": {"src": ["a", "a"]}}, True),
         ({"t": {"src": ["a", "a"], "files": 1}}, False), ({"t": {"src": [], "files": 1}}, False),
         ({"t": {"files": ["x", "x"]}, "u": {"src": ["q"]}}, False), ({"t": 5}, False)]),
}


@pytest.mark.parametrize("name", sorted(DISAGREE))
def test_stricter_where_alternatives_disagree(tokenizer: Any, name: str) -> None:
    """Every accepted instance is valid (`jsonschema`); every valid one is accepted but those with
    repeated items at the path where only some alternatives ask for unique ones."""
    schema, cases = DISAGREE[name]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert isinstance(grammar, UniqueGrammar)
    verdicts = set()
    for value, refused_valid in cases:
        want = _valid(schema, value)
        verdicts.add(want)
        assert refused_valid <= want, value  # the list says which valid ones are refused
        got = run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(value)))
        assert got == (want and not refused_valid), value
    assert verdicts == {True, False}


def test_refused_under_not(tokenizer: Any) -> None:
    with pytest.raises(C.UnsupportedSchemaError):  # its complement has no form
        C.compile(tokenizer, json_schema={"type": "array", "not": STRINGS}, cache=None)


def test_listed_enum_arrays_too_large_checked_beside(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """jscsrc's shape: unique arrays of a 6-value enum are listed (1,957 arrays), which llguidance
    finds too large; the retry checks them beside the grammar instead. Without it: refused."""
    ops = {"type": ["array", "boolean", "null"], "items": {"enum": ["++", "--", "+", "-", "~", "!"]},
           "uniqueItems": True}
    schema = {"type": "object", "properties": {"ops": ops}}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert isinstance(grammar, UniqueGrammar)
    instances = [{"ops": ["+", "-"]}, {"ops": ["+", "+"]}, {"ops": None}, {"ops": True}, {"ops": ["*"]},
                 {"ops": ["!", "~", "-", "+", "--", "++"]}, {"ops": ["~", "--", "~"]}]
    assert_matches_reference(tokenizer, grammar, schema, instances)
    listed_only = compiler.check_schema
    monkeypatch.setattr(compiler, "check_schema", lambda *args, **kw: listed_only(*args, **{**kw, "unique_beside": False}))
    with pytest.raises(C.GrammarCompileError, match="too large"):
        C.compile(tokenizer, json_schema=schema, cache=None)


def test_rollback_copy_and_payload(tokenizer: Any) -> None:
    schema = CASES["nested"][0]
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    ids = encode(tokenizer, '{"x": ["ab", "cd"], "y": ["ab"]}')
    m = grammar.matcher()
    for tid in ids[:7]:
        assert m.advance(tid)
    fork = m.copy()
    m.rollback(4)
    for tid in ids[3:]:
        assert m.advance(tid)
    assert m.is_accepting()
    assert all(fork.advance(t) for t in ids[7:]) and fork.is_accepting()
    m.rollback(m.num_tokens)  # back to the start: nothing of the earlier items is remembered
    assert run_tokens(m, encode(tokenizer, '{"x": ["cd", "ab"]}'))
    rebuilt = grammar_from_payload(_info(tokenizer), "llguidance", grammar.payload())
    assert isinstance(rebuilt, UniqueGrammar)
    assert not run_tokens(rebuilt.matcher(), encode(tokenizer, '{"y": ["q", "q"]}'))
    assert run_tokens(rebuilt.matcher(), encode(tokenizer, '{"y": ["q", "r"]}'))


@pytest.mark.parametrize("threads", [0, 2])
def test_batch_fill_matches_row_fill(tokenizer: Any, threads: int) -> None:
    """Rows of unique-checked matchers filled as a batch (MaskWorkers: llguidance's batch call,
    then our removals) equal their one-by-one masks; a plain row in the same batch is untouched."""
    from radixlm.constrained.mask_workers import MaskWorkers

    info = _info(tokenizer)
    grammar = C.compile(tokenizer, json_schema=STRINGS, cache=None)
    plain = C.compile(tokenizer, json_schema={"type": "array", "items": {"type": "string"}}, cache=None)
    rows = [grammar.matcher(), grammar.matcher(), plain.matcher()]
    for m, text in zip(rows, ['["a", "a', '["x", "y"', '["a", "a']):
        assert all(m.advance(t) for t in encode(tokenizer, text))
    workers = MaskWorkers(threads)
    try:
        batch = C.allocate_token_bitmask(3, info.vocab_size)
        workers.fill([(m, i) for i, m in enumerate(rows)], batch)
    finally:
        workers.close()
    one = C.allocate_token_bitmask(3, info.vocab_size)
    for i, m in enumerate(rows):
        m.fill_next_token_bitmask(one, i)
    assert (batch == one).all()
    quote = encode(tokenizer, '"')[0]
    assert not C.bitmask.row_to_ids(batch[0]).count(quote) and quote in C.bitmask.row_to_ids(batch[2])


def test_through_the_grammar_runtime(tokenizer: Any, default_model_dir: Any) -> None:
    """The scheduler's grammar path (batched commit, masks started in the background, taken at
    sampling time) with unique-checked rows: masks equal row fills; a repeated item fails the row."""
    from types import SimpleNamespace

    import torch

    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from radixlm.runtime.server_args import ServerArgs

    runtime = GrammarRuntime(ServerArgs(grammar_mask_threads=2), tokenizer, str(default_model_dir), len(tokenizer))
    try:
        grammar = C.compile(tokenizer, json_schema=STRINGS)
        doc = encode(tokenizer, '["a", "b", "a"]')
        reqs = []
        for i in range(2, 6):
            m = grammar.matcher()
            assert all(m.advance(t) for t in doc[:i])
            reqs.append(SimpleNamespace(rid=f"r{i}", grammar=m, finished=False, output_ids=doc[:i],
                                        sent_output_len=i, forced_tokens=0, params=SimpleNamespace(max_new_tokens=64)))
        runtime.advance_many(reqs, [doc[i] for i in range(2, 6)])
        got = runtime.bitmask(reqs, torch.device("cpu"))
        runtime._settle()
        want = torch.full_like(got, -1)
        for i, r in enumerate(reqs):
            r.grammar.fill_next_token_bitmask(want, i)
        assert torch.equal(got, want)
        prefix = encode(tokenizer, '["a", "b", "a')  # the closing quote repeats "a"
        m = grammar.matcher()
        assert all(m.advance(t) for t in prefix)
        last = SimpleNamespace(rid="last", grammar=m, finished=False, output_ids=prefix, sent_output_len=len(prefix),
                               forced_tokens=0, params=SimpleNamespace(max_new_tokens=64))
        runtime.advance_many([last], [encode(tokenizer, '"')[0]])
        assert runtime.is_terminated(last) and last.grammar_failed
    finally:
        runtime.close()


DEAD_END = {"type": "array", "items": {"anyOf": [{"enum": [{"b": False}, {"b": {}}, "0", None]}, {"const": "a"}]},
            "minItems": 1, "maxItems": 4, "uniqueItems": True}  # benchmarks/schema_fuzz.py's 1:1275


def _allowed_texts(tokenizer: Any, matcher: Any) -> list[str]:
    import torch

    row = torch.zeros((1, (len(tokenizer) + 31) // 32 + 8), dtype=torch.int32)
    matcher.fill_next_token_bitmask(row, 0)
    return [tokenizer.decode([i]) for i in range(len(tokenizer)) if (int(row[0, i >> 5]) >> (i & 31)) & 1]


def test_token_entering_a_dead_end_masked(tokenizer: Any) -> None:
    """After `["0","` the token `0` leaves `"` alone, which repeats "0": a dead end (no token
    allowed) one step on. The lookahead masks it; `a` stays, and the documents stay valid."""
    grammar = C.compile(tokenizer, json_schema=DEAD_END, cache=None)
    assert isinstance(grammar, UniqueGrammar)
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, '["0","'))
    allowed = _allowed_texts(tokenizer, matcher)
    assert "a" in allowed and "0" not in allowed, allowed
    assert_matches_reference(tokenizer, grammar, DEAD_END, [["0", "a"], ["0", "0"], ["a", None, "0"], []])


def test_string_opening_into_a_dead_end_masked(tokenizer: Any) -> None:
    """After `["0","a",null,` both strings are used: `"` (alone or after whitespace) leads two steps
    on to a dead end (`0` / `a`, then only a repeating `"`), so it is masked; `{` stays."""
    grammar = C.compile(tokenizer, json_schema=DEAD_END, cache=None)
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, '["0","a",null,'))
    allowed = _allowed_texts(tokenizer, matcher)
    assert "{" in allowed and not any(x.strip() == '"' for x in allowed), allowed
    assert all(matcher.advance(t) for t in encode(tokenizer, '{"b":{}}]')) and matcher.is_accepting()


LAST_EMPTY = {"type": "array", "items": {"const": []}, "maxItems": 2, "uniqueItems": True}  # the fuzzer's 1:2730


def test_whitespace_only_row_is_a_dead_end(tokenizer: Any) -> None:
    """After `[[],[` the only way on, `]`, repeats `[]`: whitespace alone is left, which only
    postpones the dead end, so the row is empty; one step back `[` (alone or after a gap) is
    masked, and two steps back the `,` that leads there, so no walk enters it (20 of 40 of the
    fuzzer's walks did, through whitespace)."""
    grammar = C.compile(tokenizer, json_schema=LAST_EMPTY, cache=None)
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, "[[], ["))
    assert _allowed_texts(tokenizer, matcher) == []
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, "[[],"))
    assert not any(x.strip() for x in _allowed_texts(tokenizer, matcher))
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, "[[]"))
    allowed = _allowed_texts(tokenizer, matcher)
    assert "]" in allowed and not any("," in x for x in allowed), allowed
    assert_matches_reference(tokenizer, grammar, LAST_EMPTY, [[[]], [], [[], []], [[1]]])


def test_whitespace_inside_an_item_stays(tokenizer: Any) -> None:
    """Only between JSON tokens: inside a string item whitespace is text, and after a number it
    ends the item (kept where the number is new)."""
    schema = {"type": "array", "items": {"type": ["string", "integer"]}, "uniqueItems": True}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    for prefix, expect in (('["a", "', " "), ("[1, 2", " ")):
        matcher = grammar.matcher()
        assert all(matcher.advance(t) for t in encode(tokenizer, prefix))
        assert expect in _allowed_texts(tokenizer, matcher), prefix


NUMBER_ITEMS = {"type": "array", "minItems": 1, "uniqueItems": True, "items": {"oneOf": [  # the fuzzer's 4:2511
    {"type": "array", "items": {"type": "number", "exclusiveMaximum": -2.5}, "maxItems": 1, "uniqueItems": True},
    {"allOf": [{"enum": [7]}]}]}}


def test_whitespace_that_ends_a_number_into_a_dead_end(tokenizer: Any) -> None:
    """After `[[-9], [-9` a gap ends the number, and then only `]` (repeating `[-9]`) could go on:
    every whitespace token is masked (one probe, `" "`, stands for all), the digits stay."""
    grammar = C.compile(tokenizer, json_schema=NUMBER_ITEMS, cache=None)
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, "[[-9], [-9"))
    allowed = _allowed_texts(tokenizer, matcher)
    assert "5" in allowed and "." in allowed and not any(x[:1].isspace() for x in allowed), allowed
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, "[[-9], [-8"))
    assert " " in _allowed_texts(tokenizer, matcher)
    assert_matches_reference(tokenizer, grammar, NUMBER_ITEMS, [[[-9], [-9.5]], [[-9], [-9]], [7, [-3]], [[-9 ], 7]])

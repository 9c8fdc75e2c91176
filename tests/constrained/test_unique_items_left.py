"""Dead ends of unique arrays over listed items, seen from the items (unique_items_left.py): the
loose match never says no to a spelling of the value (so no document is lost), and the masks
keep walks out of the fuzzer's dead ends (seeds 1, 4, 5) while every valid array stays."""

from __future__ import annotations

import json
import random
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.unique_check import UniqueGrammar
from radixlm.constrained.unique_items_left import can_become

from .conftest import encode, reference_valid, run_tokens

VALUES = [None, True, False, 0, -3, 7, 2.5, "", "a", "xyz", "é\"\\", [], ["xyz"], [0, [True, 7]], {}, {"b": True},
          {"id": "", "n": 1}, {"a": {"name": None, "x1": -3}, "x1": ["0", 1]}]


def _spell(value: Any, rng: random.Random, loose: bool = True) -> str:
    """One of the many texts of `value`: whitespace anywhere between tokens; `loose`: keys in any
    order, integers also as `7.0` / `7e0`, strings escaped or not (the grammar takes fewer)."""
    ws = lambda: rng.choice(["", "", " ", "\n  ", "\t"])  # noqa: E731
    if isinstance(value, list):
        return "[" + ws() + ("," + ws()).join(_spell(v, rng, loose) + ws() for v in value) + "]"
    if isinstance(value, dict):
        keys = list(value)
        if loose:
            rng.shuffle(keys)
        return "{" + ws() + ",".join(ws() + json.dumps(k, ensure_ascii=loose and rng.random() < 0.5) + ws() + ":"
                                      + ws() + _spell(value[k], rng, loose) + ws() for k in keys) + "}"
    if not loose:
        return json.dumps(value, ensure_ascii=False)
    if type(value) is int:
        return rng.choice([str(value), f"{value}.0", f"{value}e0", f"{value * 10}e-1"])
    return json.dumps(value, ensure_ascii=rng.random() < 0.5)


def test_every_prefix_of_every_spelling_can_become_its_value() -> None:
    rng = random.Random(0)
    for value in VALUES:
        for _ in range(20):
            text = _spell(value, rng)
            for cut in range(len(text) + 1):
                assert can_become(text[:cut], value), (value, text[:cut])


def test_other_values_cannot() -> None:
    """A whole spelling of another value (JSON Schema equality: 1 == 1.0, true != 1) is no start of it
    (a number ended by what follows it: at the text's end it may go on)."""
    rng = random.Random(1)
    for value in VALUES:
        for other in VALUES:
            if reference_valid({"const": value}, other):
                continue
            assert not can_become(_spell(other, rng) + " ", value), (other, value)
    assert not can_become('{"id": "x', {"id": "", "n": 1}) and not can_become('[0, [tr', [0, [False, 7]])
    assert can_become('{"n": 1.0, "i', {"id": "", "n": 1})


LISTED = {  # the fuzzer's schemas whose walks reached dead ends after the two-step lookahead
    "4:2834": {"type": "array", "items": {"const": ["xyz"]}, "uniqueItems": True},
    "1:1554": {"type": "array", "items": {"oneOf": [{"const": {}}, {"enum": [{"id": ""}, "", 0]}]},
               "minItems": 2, "maxItems": 3, "uniqueItems": True},
    "5:385": {"type": "array", "items": {"enum": [-3, 1, [0, [True, 7]]]}, "uniqueItems": True},
    "4:752": {"type": "array", "items": {"anyOf": [{"enum": [{}]}]}, "uniqueItems": True},
}


def _allowed(tokenizer: Any, matcher: Any) -> list[str]:
    row = C.allocate_token_bitmask(1, len(tokenizer))
    matcher.fill_next_token_bitmask(row, 0)
    return [tokenizer.decode([i]) for i in C.bitmask.row_to_ids(row[0])]


@pytest.mark.parametrize(("name", "prefix", "banned", "kept"), [
    ("4:2834", '[["xyz"]', ",", "]"),      # a second item can only repeat the first: five tokens on
    ("4:2834", '[["xyz"], ', None, None),  # already there: nothing
    ("1:1554", '[{}, {"id": ""}, ', "{", '"'),
    ("5:385", "[-3, [0, [true, 7]], ", "[", "1"),
    ("4:752", "[", "{},", "{}"),           # `{},` ends the one item and asks for another
])
def test_dead_end_masked(tokenizer: Any, name: str, prefix: str, banned: str | None, kept: str | None) -> None:
    grammar = C.compile(tokenizer, json_schema=LISTED[name], cache=None)
    assert isinstance(grammar, UniqueGrammar)
    matcher = grammar.matcher()
    assert all(matcher.advance(t) for t in encode(tokenizer, prefix))
    allowed = _allowed(tokenizer, matcher)
    if banned is None:
        assert allowed == []
    else:
        assert kept in allowed and not any(x.strip().startswith(banned) for x in allowed), allowed


@pytest.mark.parametrize("name", sorted(LISTED))
def test_no_valid_array_lost(tokenizer: Any, name: str) -> None:
    """Every duplicate-free arrangement of the listed items (any spelling) the schema accepts is
    accepted token by token, with the masks checked on the way: no dead end on its path."""
    schema, rng = LISTED[name], random.Random(name)
    values = schema["items"].get("const", None)
    pool = [values] if values is not None else [v for b in schema["items"].get("oneOf", schema["items"].get("anyOf", [schema["items"]]))
                                                for v in b.get("enum", [b.get("const")])]
    grammar, checked = C.compile(tokenizer, json_schema=schema, cache=None), 0
    for _ in range(25):
        items = rng.sample(pool, rng.randint(0, len(pool)))
        if not reference_valid(schema, items):
            continue
        text = "[" + ",".join(" " * rng.randint(0, 2) + _spell(v, rng, loose=False) for v in items) + "]"
        matcher, ids = grammar.matcher(), encode(tokenizer, text)
        for tid in ids:
            row = C.allocate_token_bitmask(1, len(tokenizer))
            matcher.fill_next_token_bitmask(row, 0)
            assert tid in set(C.bitmask.row_to_ids(row[0])), (text, tokenizer.decode([tid]))
            assert matcher.advance(tid)
        assert matcher.is_accepting(), text
        checked += 1
    assert checked >= 5
    assert not run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(pool[:1] * 2)))

"""if/then chains on one tag as one case split (schema_if_chains.py, the compiler's retry for a
schema the backend finds too large), checked against `jsonschema` token by token. Without the
split the same schema does not compile ("schema too large": 2^12 branches)."""

from __future__ import annotations

import json
from typing import Any

import jsonschema
import pytest

from radixlm import constrained as C
from radixlm.constrained import compiler
from radixlm.constrained.schema_if_chains import split_if_chain

from .conftest import encode, run_tokens

N = 12
# minecraft-item-modifier's shape: the tag picks which fields are required; one member names the
# tag in `required` and has an `else`, one pins a second key too, one says `type: object`
CHAIN: dict[str, Any] = {"type": ["object", "integer"], "allOf": [
    {"if": {"properties": {"kind": {"const": f"k{i}"}}}, "then": {"properties": {f"v{i}": {"type": "integer"}},
                                                                   "required": [f"v{i}"]}}
    for i in range(N - 3)] + [
    {"if": {"properties": {"kind": {"const": "r"}}, "required": ["kind"]}, "then": {"required": ["r"]},
     "else": {"properties": {"r": {"type": "string"}}}},
    {"if": {"properties": {"kind": {"enum": ["p"]}, "mode": {"const": "x"}}}, "then": {"required": ["px"]}},
    {"if": {"type": "object", "properties": {"kind": {"const": "k0"}}}, "then": {"required": ["k0x"]}},
    {"description": "not part of the chain", "properties": {"extra": {"type": "boolean"}}}]}
INSTANCES: list[Any] = [
    {"kind": "k3", "v3": 1}, {"kind": "k3"}, {"kind": "k3", "v3": "x"}, {"kind": "k0", "v0": 1},
    {"kind": "k0", "v0": 1, "k0x": 2}, {"kind": "r", "r": 1}, {"kind": "r"}, {"kind": "k1", "v1": 1, "r": 2},
    {"kind": "k1", "v1": 1, "r": "s"}, {"kind": "p", "mode": "x", "px": 1}, {"kind": "p", "mode": "x"},
    {"kind": "p", "mode": "y"}, {"kind": "zzz"}, {"kind": 5}, {"kind": "zzz", "extra": 1}, {}, {"r": "s"}, 7, "s",
    {"mode": "x", **{f"v{i}": i for i in range(N - 3)}}, {"mode": "x", "px": 0, **{f"v{i}": i for i in range(N - 3)}},
]


def _valid(instance: Any) -> bool:
    return jsonschema.Draft202012Validator(CHAIN).is_valid(instance)


def test_matches_reference_validator(tokenizer: Any) -> None:
    grammar = C.compile(tokenizer, json_schema=CHAIN, cache=None)
    for instance in INSTANCES:
        accepted = run_tokens(grammar.matcher(), encode(tokenizer, json.dumps(instance)))
        assert accepted == _valid(instance), instance
    assert sum(map(_valid, INSTANCES)) >= 5 and sum(not _valid(x) for x in INSTANCES) >= 5


def test_too_large_without_the_split(tokenizer: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_retry(build: Any, checked: Any, *args: Any) -> Any:
        return build(checked)

    monkeypatch.setattr(compiler, "_too_large_retry", no_retry)
    with pytest.raises(C.GrammarCompileError, match="too large"):
        C.compile(tokenizer, json_schema=CHAIN, cache=None)


def test_split_shape() -> None:
    split = split_if_chain(CHAIN)
    assert split is not None
    cases = split["allOf"][-1]["anyOf"]
    assert len(cases) == 3 + len({f"k{i}" for i in range(N - 3)} | {"r", "p"})  # non-object, absent, each tag, other
    assert split["allOf"][0] == CHAIN["allOf"][-1]  # the member outside the chain stays as it is
    short = {"allOf": CHAIN["allOf"][:3]}
    assert split_if_chain(short) is None  # fewer than MIN_CHAIN conditions: written as it is

"""A fixed sample of benchmarks/schema_fuzz.py's random schemas, checked against `jsonschema`:
compile() refuses with UnsupportedSchemaError/GrammarCompileError or compiles; random walks over
the masks end in valid documents; no invalid candidate is accepted. The long runs are the benchmark."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.vocab import TokenizerInfo

from .conftest import assert_matches_reference

_PATH = Path(__file__).resolve().parents[2] / "benchmarks" / "schema_fuzz.py"
_spec = importlib.util.spec_from_file_location("bench_schema_fuzz", _PATH)
fuzz = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fuzz)

SAMPLE = [f"0:{i}" for i in range(80)]


@pytest.fixture(scope="module")
def info(tokenizer: Any) -> TokenizerInfo:
    return TokenizerInfo.from_tokenizer(tokenizer)


def test_fuzz_sample_sound(tokenizer: Any, info: TokenizerInfo) -> None:
    rows = [fuzz.check(info, tokenizer, name, walks=3, candidates=12) for name in SAMPLE]
    bad = [r for r in rows if r["status"] == "crash" or r.get("walk_invalid") or r.get("invalid_accepted")]
    assert not bad, bad[:2]
    summary = fuzz.summarize(rows)
    assert summary["compiled"] >= 50 and summary["walks_finished"] >= 120, summary
    assert summary["instances_invalid"] >= 200 and summary["instances_valid"] >= 200, summary
    assert all(r["reason"] and r["path"][:1] in "#/" for r in rows if r["status"] == "refused")


def test_generated_schemas_are_schemas() -> None:
    """Every generated document is a schema of its own draft (a typo in the generator would test nothing)."""
    import jsonschema

    for name in SAMPLE + [f"1:{i}" for i in range(200)]:
        schema = fuzz.gen_schema(fuzz.random.Random(name))
        jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator).check_schema(schema)


# What the fuzzer found (benchmarks/schema_fuzz.py, seed 1), each shape reduced by hand.

GAPS = [{"type": "number", "exclusiveMinimum": 0, "maximum": 0.5},
        {"type": "number", "exclusiveMinimum": 3, "exclusiveMaximum": 3.25},
        {"type": "number", "minimum": -1.5, "exclusiveMaximum": -1},
        {"allOf": [{"type": "number", "exclusiveMinimum": 0}, {"maximum": 0.5}]},
        {"oneOf": [{"type": "number"}, {"type": "number", "minimum": 0.5}, {"type": "number", "maximum": 0}]}]


GAP_PROBES = [0, 1, -1, 3, -2, 0.5, -0.5, 0.25, 0.49, 0.51, 0.0001, 3.1, 3.25, 3.2499, -1.5, -1.25, -1.51, -0.9,
              0.5000000000001, 0.000123, "0.3", None]


@pytest.mark.parametrize("schema", GAPS + [
    {"type": ["number", "string"], "exclusiveMinimum": 0, "maximum": 0.5},
    {"type": "object", "properties": {"p": {"type": "number", "exclusiveMinimum": 0, "maximum": 0.5}},
     "required": ["p"]},
    {"anyOf": [{"type": "number", "exclusiveMinimum": 0, "maximum": 0.25}, {"type": "integer", "minimum": 3}]}])
def test_exclusive_integer_bound_without_integer_inside_exact(tokenizer: Any, schema: Any) -> None:
    """llguidance accepted `0` for (0, 0.5] and `-1` for [-1.5, -1): such ranges now compile to
    schema_number_gap's terminal and accept exactly jsonschema's numbers (at most 15 significant digits)."""
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    probes = GAP_PROBES + [{"p": x} for x in GAP_PROBES[:12]] if "properties" in schema else GAP_PROBES
    assert_matches_reference(tokenizer, grammar, schema, probes)


def test_integer_gap_on_integers_only_refused_or_empty(tokenizer: Any) -> None:
    """`type: integer` on (0, 0.5] holds nothing: never compiled into a grammar that takes `0`."""
    schema = {"type": "integer", "exclusiveMinimum": 0, "maximum": 0.5}
    try:  # beside null, so the grammar has something to accept
        schema = {"anyOf": [schema, {"type": "null"}]}
        grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    except (C.UnsupportedSchemaError, C.GrammarCompileError):
        return
    assert_matches_reference(tokenizer, grammar, schema, [0, 1, 0.5, None])


@pytest.mark.parametrize("schema", [{"type": "number", "exclusiveMinimum": 0, "exclusiveMaximum": 1},
                                    {"type": "number", "exclusiveMinimum": 0, "maximum": 1},
                                    {"type": "number", "minimum": -0.5, "exclusiveMaximum": 0},
                                    {"type": "number", "exclusiveMinimum": -1, "maximum": -0.5},
                                    {"type": ["boolean", "null"], "exclusiveMinimum": 0, "maximum": 0.5}])
def test_exclusive_integer_bounds_llguidance_gets_right_stay(tokenizer: Any, schema: Any) -> None:
    """Ranges with an integer inside, bounds toward zero, and bounds on a node that takes no number
    (vacuous: the fuzzer's `{"type": ["boolean", "null"], "exclusiveMinimum": 100, ...}`) compile."""
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert_matches_reference(tokenizer, grammar, schema, [0, 1, -1, 0.5, -0.5, 0.75, -0.75, 2, True, None])


def test_closed_key_set_with_unmeetable_count_rejects_objects_only(tokenizer: Any) -> None:
    """`additionalProperties: false` with `minProperties: 1` and no named key: no object fits, but a
    non-object does (the node has no `type`); it was rewritten to `false`, so oneOf took `null` twice
    as once (and accepted it)."""
    schema = {"oneOf": [{"const": None}, {"additionalProperties": False, "minProperties": 1}]}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert_matches_reference(tokenizer, grammar, schema, [None, 3, "a", {}, {"a": 1}, [], True])


@pytest.mark.parametrize("defs", [{"d0": {"$ref": "#/$defs/d0"}}, {"d0": {"allOf": [{"$ref": "#/$defs/d0"}]}},
                                  {"d0": {"anyOf": [{"$ref": "#/$defs/d0"}, {"type": "integer"}]}}])
def test_reference_cycle_on_the_same_instance_refused(tokenizer: Any, defs: Any) -> None:
    """Such a cycle never finishes validating (jsonschema: RecursionError); compiled, the matcher
    allowed the end token in a state it did not call accepting."""
    with pytest.raises(C.UnsupportedSchemaError) as exc:
        C.compile(tokenizer, json_schema={"$ref": "#/$defs/d0", "$defs": defs}, cache=None)
    assert exc.value.keyword == "$ref"
    tree = {"$ref": "#/$defs/t", "$defs": {"t": {"anyOf": [{"type": "integer"},
                                                           {"type": "array", "items": {"$ref": "#/$defs/t"}}]}}}
    assert_matches_reference(tokenizer, C.compile(tokenizer, json_schema=tree, cache=None), tree, [[1, [2]], "x"])

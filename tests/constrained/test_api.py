"""Public API contract: arguments, errors, EOS, rollback/copy, jump-forward, bitmasks, cache."""

from __future__ import annotations

import json
from typing import Any

import pytest
import torch

from radixlm import constrained as C
from radixlm.constrained.mask_workers import MaskWorkers

from .conftest import encode, run_tokens

BACKENDS = C.available_backends()
JSON_BACKENDS = [b for b in BACKENDS if b != "xgrammar"]  # xgrammar's JSON path is off (README)
SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "kind"], "additionalProperties": False}


def test_exactly_one_spec(tokenizer: Any) -> None:
    with pytest.raises(ValueError, match="exactly one"):
        C.compile(tokenizer)
    with pytest.raises(ValueError, match="exactly one"):
        C.compile(tokenizer, regex="a", choices=["a"])
    with pytest.raises(ValueError, match="unknown grammar backend"):
        C.compile(tokenizer, regex="a", backend="nope")


def test_errors_are_typed_and_positioned(tokenizer: Any) -> None:
    assert issubclass(C.UnsupportedSchemaError, ValueError) and issubclass(C.GrammarCompileError, ValueError)
    with pytest.raises(C.UnsupportedSchemaError) as info:  # the complement of uniqueItems has no form
        C.compile(tokenizer, json_schema={"type": "object", "properties": {"tags": {"not": {"uniqueItems": True}}}})
    assert info.value.keyword == "not" and info.value.path == "/properties/tags"
    with pytest.raises(C.UnsupportedSchemaError) as info:  # a validation keyword we cannot enforce
        C.compile(tokenizer, json_schema={"type": "object", "properties": {"a": {"contains": {"const": 1},
                                                                               "maxContains": 2}}})
    assert info.value.keyword == "contains" and info.value.path == "/properties/a"
    with pytest.raises(C.GrammarCompileError, match="char 9"):
        C.compile(tokenizer, json_schema='{"type": }')
    with pytest.raises(C.GrammarCompileError):
        C.compile(tokenizer, regex="(ab")
    with pytest.raises(C.GrammarCompileError, match="position 2"):
        C.compile(tokenizer, regex="ab(", backend="outlines")
    with pytest.raises(C.UnsupportedSchemaError, match="format"):
        C.compile(tokenizer, json_schema={"type": "string", "format": "iri"})
    with pytest.raises(C.UnsupportedSchemaError, match="https"):
        C.compile(tokenizer, json_schema={"$ref": "https://example.com/s.json"})


def test_keywords_outside_the_vocabulary_are_annotations(tokenizer: Any) -> None:
    """JSON Schema: unknown keywords (typos, vendor keys, draft-04 `id` later on) and unknown
    format values constrain nothing; the validation keywords next to them still do."""
    schema = {"type": "string", "maxLenght": 3, "readonly": True, "x-kind": {"type": "integer"},
              "id": "thing", "_format": "date", "format": "int32", "maxLength": 5}
    grammar = C.compile(tokenizer, json_schema=schema, cache=None)
    assert run_tokens(grammar.matcher(), encode(tokenizer, '"abcd"'))
    assert not run_tokens(grammar.matcher(), encode(tokenizer, '"abcdef"'))
    assert not run_tokens(grammar.matcher(), encode(tokenizer, "1"))


def test_lenient_drops_unsupported_keywords(tokenizer: Any) -> None:
    schema = {"type": "array", "items": {"type": "integer"}, "contains": {"const": 5}, "maxItems": 3}
    grammar = C.compile(tokenizer, json_schema=schema, lenient=True)
    assert run_tokens(grammar.matcher(), encode(tokenizer, "[1, 1]"))  # `contains` not enforced
    assert not run_tokens(grammar.matcher(), encode(tokenizer, "[1, 2, 3, 4]"))  # the rest still is


def test_json_string_and_dict_share_cache(tokenizer: Any) -> None:
    a = C.compile(tokenizer, json_schema=SCHEMA)
    b = C.compile(tokenizer, json_schema=json.dumps(SCHEMA))
    assert a is b
    cache = C.GrammarCache(capacity=2)
    g1 = C.compile(tokenizer, regex="a+", cache=cache)
    C.compile(tokenizer, regex="b+", cache=cache)
    C.compile(tokenizer, regex="c+", cache=cache)
    assert len(cache) == 2 and C.compile(tokenizer, regex="a+", cache=cache) is not g1


@pytest.mark.parametrize("backend", JSON_BACKENDS)
def test_eos_only_in_accepting_states(tokenizer: Any, backend: str) -> None:
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend=backend)
    ends = grammar.info.end_token_ids
    assert tokenizer.eos_token_id in ends
    m = grammar.matcher()
    ids = encode(tokenizer, '{"name": "Rex", "kind": "dog"}')
    for tid in ids:
        allowed = set(m.allowed_token_ids())
        assert not allowed & set(ends) and not m.is_accepting()
        assert not m.advance(tokenizer.eos_token_id)
        assert tid in allowed and m.advance(tid)
    assert m.is_accepting() and m.is_terminated()
    assert set(m.allowed_token_ids()) == set(ends)  # only end tokens after the closing brace
    specials = {t for t in range(grammar.info.vocab_size) if grammar.info.token_bytes[t] is None} - set(ends)
    assert specials and not specials & set(grammar.matcher().allowed_token_ids())
    assert m.advance(ends[-1]) and m.allowed_token_ids() == [] and not m.advance(ids[0])
    m.rollback(1)
    assert m.is_accepting() and set(m.allowed_token_ids()) == set(ends)


@pytest.mark.parametrize("backend", BACKENDS)
def test_advance_rejects_without_changing_state(tokenizer: Any, backend: str) -> None:
    grammar = C.compile(tokenizer, regex=r"[0-9]{2}-[a-z]+", backend=backend)
    m = grammar.matcher()
    assert m.advance(encode(tokenizer, "4")[0])
    before = m.allowed_token_ids()
    assert not m.advance(encode(tokenizer, "x")[0])
    assert m.allowed_token_ids() == before and m.num_tokens == 1


@pytest.mark.parametrize("backend", JSON_BACKENDS)
def test_rollback_and_copy(tokenizer: Any, backend: str) -> None:
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend=backend)
    ids = encode(tokenizer, '{"name": "Rex", "kind": "cat"}')
    m = grammar.matcher()
    masks = []
    for tid in ids:
        masks.append(m.allowed_token_ids())
        assert m.advance(tid)
    fork = m.copy()
    m.rollback(4)
    assert m.num_tokens == len(ids) - 4 and m.allowed_token_ids() == masks[-4]
    assert fork.is_accepting() and fork.num_tokens == len(ids)  # the copy is independent
    for tid in ids[-4:]:
        assert m.advance(tid)
    assert m.is_accepting()
    m.rollback(m.num_tokens)
    assert m.allowed_token_ids() == masks[0]
    with pytest.raises(ValueError):
        m.rollback(1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_prefix_for_jump_forward(tokenizer: Any, backend: str) -> None:
    grammar = C.compile(tokenizer, regex=r'\{"id": [0-9]+, "status": "(active|archived)"\}', backend=backend)
    m = grammar.matcher()
    assert m.forced_prefix() == '{"id": '
    for tid in encode(tokenizer, '{"id": 42'):
        assert m.advance(tid)
    assert m.forced_prefix() == ""  # more digits or the comma
    assert m.advance(encode(tokenizer, ",")[0])
    assert m.forced_prefix() == ' "status": "a'  # both enum values start with "a"
    for tid in encode(tokenizer, ' "status": "ar'):
        assert m.advance(tid)
    assert m.forced_prefix() == 'chived"}'
    for tid in encode(tokenizer, 'chived"}'):
        assert m.advance(tid)
    assert m.forced_prefix() == "" and m.is_terminated()


@pytest.mark.parametrize("backend", BACKENDS)
def test_forced_prefix_utf8_boundaries(tokenizer: Any, backend: str) -> None:
    grammar = C.compile(tokenizer, choices=["é-x", "è-y"], backend=backend)
    m = grammar.matcher()
    assert m.forced_prefix() == ""  # only the shared first byte of é/è is forced: not a character
    assert all(m.advance(t) for t in encode(tokenizer, "é"))
    assert m.forced_prefix() == "-x"


def test_bitmask_fill_wider_model_vocab(tokenizer: Any) -> None:
    grammar = C.compile(tokenizer, choices=["yes", "no"])
    model_vocab = grammar.info.vocab_size + 100  # padded embedding
    bitmask = C.allocate_token_bitmask(3, model_vocab)
    m = grammar.matcher()
    m.fill_next_token_bitmask(bitmask, 1)
    logits = torch.zeros(3, model_vocab)
    C.apply_token_bitmask_(logits, bitmask)
    allowed = torch.isfinite(logits[1]).nonzero().flatten().tolist()
    assert allowed == m.allowed_token_ids() and all(t < grammar.info.vocab_size for t in allowed)
    assert torch.isfinite(logits[0]).all() and torch.isfinite(logits[2]).all()  # untouched rows


WORKERS = [None, (0, "native"), (1, "native"), (3, "native"), (3, "threads")]  # None: one by one


@pytest.mark.parametrize("backend", JSON_BACKENDS)
@pytest.mark.parametrize("extra_vocab", [0, 100])
@pytest.mark.parametrize("workers", WORKERS)
def test_batched_fill_equals_row_by_row(tokenizer: Any, backend: str, extra_vocab: int,
                                        workers: tuple[int, str] | None) -> None:
    """The batched fill (serial, or parallel over threads / llguidance's executor) writes exactly
    what per-row fills write, leaves other rows alone, and clears rows of ended matchers."""
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend=backend)
    texts = ['{"name": "a', '{', '{"name": "ab", "kind": "', '{"name": "x", "kind": "cat"}', '{"name": "x", "kind": "dog"}']
    matchers = []
    for text in texts:
        m = grammar.matcher()
        for tid in encode(tokenizer, text):
            assert m.advance(tid)
        matchers.append(m)
    eos = next(iter(grammar.info.end_token_ids))
    assert matchers[-1].advance(eos)  # ended: its row must be all-zero
    width = grammar.info.vocab_size + extra_vocab
    rows = [0, 2, 3, 5, 6]  # rows 1 and 4 belong to unconstrained requests
    expected = C.allocate_token_bitmask(7, width)
    for m, row in zip(matchers, rows):
        m.fill_next_token_bitmask(expected, row)
    got = C.allocate_token_bitmask(7, width)
    pool = MaskWorkers(*workers) if workers is not None else None
    try:
        C.fill_next_token_bitmasks(list(zip(matchers, rows)), got, pool)
        assert torch.equal(got, expected)
        assert (got[6] == 0).all() and (got[1] == -1).all() and (got[4] == -1).all()
        if pool is not None:  # in the background: the same rows once the future is done
            again = C.allocate_token_bitmask(7, width)
            pool.start_fill(list(zip(matchers, rows)), again).result()
            assert torch.equal(again, expected)
            with pytest.raises(IndexError):
                pool.fill([(matchers[0], 7)], got)
    finally:
        if pool is not None:
            pool.close()


@pytest.mark.parametrize("backend", JSON_BACKENDS)
@pytest.mark.parametrize("workers", WORKERS[1:])
def test_batched_advance_equals_one_by_one(tokenizer: Any, backend: str, workers: tuple[int, str]) -> None:
    """Committing a batch of tokens at once (llguidance: in parallel) leaves every matcher where
    one-by-one advances leave it: same verdicts, token counts, end state and next masks."""
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend=backend)
    doc = encode(tokenizer, '{"name": "ab", "kind": "cat"}')
    eos = next(iter(grammar.info.end_token_ids))
    walks = [doc + [eos], doc[:3] + [eos], doc[1:] + [eos]]  # valid, an end token too early, invalid start
    one = [grammar.matcher() for _ in walks]
    many = [grammar.matcher() for _ in walks]
    pool = MaskWorkers(*workers)
    try:
        refused: set[int] = set()  # a refused token may leave the batched matcher unusable
        for step in range(len(walks[0])):
            live = [i for i, w in enumerate(walks) if step < len(w) and i not in refused]
            tokens = [walks[i][step] for i in live]
            expected = [one[i].advance(t) for i, t in zip(live, tokens)]
            got = pool.advance([many[i] for i in live], tokens)
            assert got == expected, step
            for i, ok in zip(live, got):
                if not ok:
                    refused.add(i)
                else:
                    assert many[i].num_tokens == one[i].num_tokens
                    assert many[i].is_accepting() == one[i].is_accepting()
                    assert many[i].allowed_token_ids() == one[i].allowed_token_ids()
        assert many[0].is_terminated() and many[0].num_tokens == len(walks[0])
        assert refused == {1, 2}
    finally:
        pool.close()


def test_apply_token_bitmask_matches_reference() -> None:
    gen = torch.Generator().manual_seed(0)
    batch, vocab = 4, 1000
    allowed = torch.rand(batch, vocab, generator=gen) < 0.3
    bitmask = torch.zeros(batch, (vocab + 31) // 32, dtype=torch.int32)
    for b in range(batch):
        bitmask[b] = C.bitmask.ids_to_row(allowed[b].nonzero().flatten().tolist(), bitmask.shape[1])
    logits = torch.randn(batch, vocab + 40, generator=gen)  # model vocab wider than the bitmask
    expected = logits.clone()
    expected[:, :vocab][~allowed] = float("-inf")
    expected[:, vocab:] = float("-inf")  # zero bits up to 32*W, then past the bitmask
    C.apply_token_bitmask_(logits, bitmask)
    assert torch.equal(logits, expected)
    half = torch.randn(batch, vocab, dtype=torch.float16)
    C.apply_token_bitmask_(half, bitmask)
    assert torch.equal(torch.isfinite(half), allowed)
    with pytest.raises(ValueError):
        C.apply_token_bitmask_(torch.zeros(2, vocab), bitmask)


def test_xgrammar_json_schema_is_refused(tokenizer: Any) -> None:
    if "xgrammar" not in BACKENDS:
        pytest.skip("xgrammar not installed")
    with pytest.raises(C.UnsupportedSchemaError, match="not sound"):
        C.compile(tokenizer, json_schema={"type": "string"}, backend="xgrammar")


def test_available_backends_and_default() -> None:
    assert C.default_backend() in C.available_backends()
    assert C.DEFAULT_BACKEND == "llguidance" and "outlines" in C.available_backends()

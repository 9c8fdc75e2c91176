"""Matcher families (llguidance): deep copies of one template share its lexer cache, so rows
filled in parallel come from one template per mask thread. A family changes where a matcher's
caches live, never what it allows: masks and verdicts equal family 0's, and batched calls that
regroup rows by family write and report every row in its own place."""
from __future__ import annotations

from typing import Any

import pytest

from radixlm import constrained as C
from radixlm.constrained.backends.llguidance_backend import by_family
from radixlm.constrained.mask_workers import MaskWorkers

from .conftest import encode

SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                           "tags": {"type": "array", "items": {"type": "string"}}},
          "required": ["name", "tags"], "additionalProperties": False}


def test_by_family_groups_stably() -> None:
    assert by_family(["a", "b", "c", "d", "e"], [2, 0, 2, 1, 0]) == ["b", "e", "d", "a", "c"]
    assert by_family(["a", "b"], [1, 1]) == ["a", "b"]
    assert by_family([], []) == []


def test_families_allow_the_same_tokens(tokenizer: Any) -> None:
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend="llguidance", cache=None)
    doc = encode(tokenizer, '{"name": "Ada", "tags": ["x", "yz"]}')
    matchers = [grammar.matcher(f) for f in (0, 1, 2, 5)]
    assert [m.family for m in matchers] == [0, 1, 2, 5]
    assert len(grammar._families) == 6  # templates are built on first use
    assert grammar._warmed == 6  # ... each with its start mask computed (copies inherit its caches)
    import llguidance

    from radixlm.constrained.backends.llguidance_backend import LLGuidanceMatcher, _lltokenizer, parser_limits

    apart = LLGuidanceMatcher(grammar, llguidance.LLMatcher(_lltokenizer(grammar.info), grammar.ll_grammar,
                                                            log_level=0, limits=parser_limits()), 0, False)
    assert matchers[0].allowed_token_ids() == apart.allowed_token_ids()  # (a template that computed no mask)
    for tid in doc:
        expected = matchers[0].allowed_token_ids()
        for m in matchers[1:]:
            assert m.allowed_token_ids() == expected
        assert all(m.advance(tid) for m in matchers)
    assert all(m.is_accepting() for m in matchers)
    assert matchers[3].copy().family == 5
    with pytest.raises(ValueError, match="family"):
        grammar.matcher(-1)


@pytest.mark.parametrize("workers", [(0, "native"), (3, "native"), (3, "threads")])
def test_batched_fill_and_advance_over_mixed_families(tokenizer: Any, workers: tuple[int, str]) -> None:
    """Rows interleave families (the executor gets them regrouped): every mask lands in its own
    row and every commit verdict belongs to its own row, refused tokens included."""
    grammar = C.compile(tokenizer, json_schema=SCHEMA, backend="llguidance", cache=None)
    doc = encode(tokenizer, '{"name": "Ada", "tags": ["x", "yz"]}')
    starts = [0, 3, 5, 1, 7, 2, 4, 6]
    rows = [grammar.matcher(i % 3) for i in range(len(starts))]
    twins = [grammar.matcher(0) for _ in starts]  # one by one, one family
    for m, t, k in zip(rows, twins, starts):
        for tid in doc[:k]:
            assert m.advance(tid) and t.advance(tid)
    pool = MaskWorkers(*workers)
    try:
        for _ in range(3):
            expected = C.allocate_token_bitmask(len(rows), grammar.info.vocab_size)
            for i, t in enumerate(twins):
                t.fill_next_token_bitmask(expected, i)
            got = C.allocate_token_bitmask(len(rows), grammar.info.vocab_size)
            pool.fill([(m, i) for i, m in enumerate(rows)], got)
            assert got.equal(expected)
            # Row 4 (family 1) gets a token its state refuses, the others their document's next.
            tokens = [doc[min(k, len(doc) - 1)] for k in starts]
            tokens[4] = encode(tokenizer, "}")[0] if starts[4] < len(doc) - 1 else tokens[4]
            verdicts = pool.advance(rows, tokens)
            assert verdicts == [t.advance(tok) for t, tok in zip(twins, tokens)]
            assert verdicts[4] is False and all(v for i, v in enumerate(verdicts) if i != 4)
            rows[4], twins[4] = grammar.matcher(1), grammar.matcher(0)  # the refused request is replaced
            starts = [min(k + 1, len(doc) - 1) if i != 4 else 0 for i, k in enumerate(starts)]
    finally:
        pool.close()


def test_runtime_deals_families_round_robin(tokenizer: Any, tokenizer_dir: Any) -> None:
    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from radixlm.runtime.server_args import ServerArgs

    for threads, expected in ((0, {0}), (1, {0}), (3, {0, 1, 2})):
        rt = GrammarRuntime(ServerArgs(grammar_mask_threads=threads), tokenizer, str(tokenizer_dir), len(tokenizer))
        try:
            assert {rt._family() for _ in range(6)} == expected
        finally:
            rt.close()

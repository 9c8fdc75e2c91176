"""Per-state mask tables (constrained/state_table.py): the table's mask of a row equals llguidance's
mask at that row's own path, for every step of random and greedy walks (a table row is filled by
whichever walk reached its state first, so later walks check that the DFA's states refine
llguidance's); the mirrored lexical rules accept exactly what llguidance accepts; schemas outside
the mirrored subset get no table; a DFA that disagrees with llguidance turns its table off."""
from __future__ import annotations

import json
import random
import re
from typing import Any

import numpy as np
import pytest
import torch

from radixlm import constrained as C
from radixlm.constrained.byte_automaton import DEAD, LazyDfa, alt, byte_set, literal, nfa_states, rep, seq, utf8_char
from radixlm.constrained.mask_workers import MaskWorkers
from radixlm.constrained.regular_schema import schema_expression
from radixlm.constrained.state_table import MAX_NFA_STATES, NONE_ROW, StateTable
from radixlm.constrained.table_grammar import TableGrammar, TableMatcher

from .conftest import encode

ITEM_F = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}
NESTED = {"type": "object", "properties": {
    "user": {"type": "object", "properties": {"first": {"type": "string", "minLength": 2, "maxLength": 5},
                                              "ok": {"type": "null"}},
             "required": ["first", "ok"], "additionalProperties": False},
    "points": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 3},
    "note": {"type": "string"}}, "required": ["user", "points", "note"], "additionalProperties": False}
REFS = {"$defs": {"pair": {"type": "array", "items": {"$ref": "#/$defs/flag"}, "minItems": 1, "maxItems": 2},
                  "flag": {"type": "boolean"}},
        "anyOf": [{"$ref": "#/$defs/pair"}, {"type": "string", "maxLength": 3}]}
REGULAR = {"item_f": ITEM_F, "nested": NESTED, "refs": REFS}


def table_grammar(tokenizer: Any, schema: Any) -> tuple[C.Grammar, TableGrammar]:
    grammar = C.compile(tokenizer, json_schema=schema, backend="llguidance", cache=None)
    wrapped = TableGrammar.wrap(grammar)
    assert wrapped is not None
    return grammar, wrapped


def allowed(row: torch.Tensor, vocab: int) -> np.ndarray:
    return np.flatnonzero(np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab])


def walk_and_compare(grammar: C.Grammar, table: TableGrammar, rng: np.random.Generator, longest: bool,
                     max_steps: int = 400) -> int:
    """One document drawn token by token; at every step the table's mask must equal llguidance's
    mask at the same path. Returns the steps taken."""
    vocab = grammar.info.vocab_size
    mine, ref = table.matcher(), grammar.matcher()
    got = C.allocate_token_bitmask(1, vocab)
    want = C.allocate_token_bitmask(1, vocab)
    lengths = np.array([len(b) if b else 0 for b in grammar.info.token_bytes])
    for step in range(max_steps):
        mine.fill_next_token_bitmask(got, 0)
        ref.fill_next_token_bitmask(want, 0)
        assert torch.equal(got, want), f"masks differ after {step} tokens"
        ids = allowed(want[0], vocab)
        if ref.is_terminated() or (ref.is_accepting() and rng.random() < 0.5):
            return step
        score = rng.standard_normal(len(ids)) + rng.gumbel(size=len(ids))
        if longest:
            score = score + lengths[ids]  # long tokens: deep into bounded strings quickly
        tid = int(ids[np.argmax(score)])
        assert mine.advance(tid) and ref.advance(tid)
        assert mine.is_accepting() == ref.is_accepting() and mine.is_terminated() == ref.is_terminated()
    return max_steps


@pytest.mark.parametrize("name", sorted(REGULAR))
def test_table_masks_equal_llguidance_along_walks(tokenizer: Any, name: str) -> None:
    grammar, table = table_grammar(tokenizer, REGULAR[name])
    rng = np.random.default_rng(len(name))
    steps = sum(walk_and_compare(grammar, table, rng, longest=i % 2 == 1) for i in range(16))
    assert steps > 30
    assert not table.table.broken
    assert table.table.dfa.num_states > 10


def test_documents_with_escapes_and_unicode_share_states(tokenizer: Any) -> None:
    """Hand-picked paths through escapes, surrogate pairs, multi-byte characters split across
    tokens and whitespace runs, each checked step by step against llguidance."""
    grammar, table = table_grammar(tokenizer, ITEM_F)
    docs = ['{"id": -0, "name": "\\u00e9\\ud83d\\ude00 é😀\\n\\"", "tags": [], "active": true}',
            '{ "active" :false,"id":12,"name":"","tags":[ "a" , "\\\\\\t" ,"日本語" ] }',
            '{"id":7,\n\n  "name":"abcdefghijklmnopqrstuvwx","tags":["abcdefghijkl","b","c","d"],"active":true}']
    vocab = grammar.info.vocab_size
    got = C.allocate_token_bitmask(1, vocab)
    want = C.allocate_token_bitmask(1, vocab)
    for doc in docs:
        mine, ref = table.matcher(), grammar.matcher()
        for tid in [*encode(tokenizer, doc), tokenizer.eos_token_id]:
            mine.fill_next_token_bitmask(got, 0)
            ref.fill_next_token_bitmask(want, 0)
            assert torch.equal(got, want), doc
            assert mine.advance(tid) and ref.advance(tid), doc
        mine.fill_next_token_bitmask(got, 0)
        assert mine.table_row() == NONE_ROW and not got.any()


def _accepts_llguidance(grammar: C.Grammar, data: bytes) -> bool:
    single = grammar.info.single_byte_tokens
    m = grammar.matcher()
    return all(b in single and m.advance(single[b]) for b in data) and m.is_accepting()


def test_lexical_rules_accept_what_llguidance_accepts(tokenizer: Any) -> None:
    """String characters (every code point below U+0800 and samples above), escapes, integers and
    whitespace bounds: the DFA's verdict on whole documents equals llguidance's."""
    schema = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 2}, "n": {"type": "integer"}},
              "required": ["s", "n"], "additionalProperties": False}
    grammar, table = table_grammar(tokenizer, schema)
    dfa = table.table.dfa
    points = [*range(0x800), 0xD7FF, 0xE000, 0xFFFD, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF]
    texts = ['{"s":"' + chr(c) + '","n":1}' for c in points]
    texts += ['{"s":"\\' + chr(c) + '","n":1}' for c in range(0x20, 0x7F)]
    texts += ['{"s":"\\u' + h + '","n":1}' for h in ("0000", "00e9", "D7FF", "d800", "DBFF", "dc00", "E000", "ffff")]
    texts += ['{"s":"\\ud83d\\ude00\\uD83D\\uDE00","n":1}', '{"s":"\\ud83dx","n":1}', '{"s":"abc","n":1}']
    texts += ['{"s":"","n":' + n + '}' for n in ("0", "-0", "01", "-", "12345678901234567890", "1.5", "1e3", "+1")]
    texts += ['{' + " " * k + '"s":"","n":1}' for k in (20, 21)] + [' {"s":"","n":1}', '{"s":"","n":1} ']
    texts += ['{"n":1,"s":""}', '{"s" :\t"" ,\r\n"n": 1}']
    for text in texts:
        data = text.encode("utf-8", "surrogatepass")
        end = dfa.walk(0, data)
        mine = end != DEAD and dfa.accepting[end]
        assert mine == _accepts_llguidance(grammar, data), text


@pytest.mark.parametrize("schema", [
    {"type": "object", "properties": {"a": {"type": "integer"}}, "additionalProperties": False},  # optional
    {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]},  # additional allowed
    {"type": "string", "pattern": "^a+$"},
    {"type": "number"},
    {"type": "integer", "minimum": 3},
    {"enum": ["a", "b"]},
    {"type": ["string", "null"]},
    {"$defs": {"t": {"type": "array", "items": {"$ref": "#/$defs/t"}}}, "$ref": "#/$defs/t"},
    {"type": "array", "items": {"type": "boolean"}, "maxItems": 1000},
    {"type": "object", "properties": {"é": {"type": "null"}}, "required": ["é"], "additionalProperties": False},
])
def test_schemas_outside_the_mirrored_subset_get_no_table(tokenizer: Any, schema: Any) -> None:
    grammar = C.compile(tokenizer, json_schema=schema, backend="llguidance", cache=None)
    assert TableGrammar.wrap(grammar) is None


def test_nfa_states_counts_what_the_build_makes() -> None:
    char = utf8_char([0x22, 0x5C])
    digits = byte_set(range(0x30, 0x3A))
    for expr in (digits, literal(b"null"), alt(literal(b"true"), literal(b"false")), rep(char, 0, None),
                 rep(char, 2, 7), seq(rep(digits, 1, 3), rep(alt(char, digits), 0, None)),
                 rep(seq(literal(b"["), rep(char, 0, 4), literal(b"]")), 1, 5)):
        assert nfa_states(expr) == len(LazyDfa(expr)._eps)


def test_grammars_whose_nfa_is_too_large_get_no_table(tokenizer: Any) -> None:
    """The NFA is built on the scheduler's thread when a grammar's first request arrives: a bounded
    string of 3,000 characters (~195k NFA states, about a second of Python) gets no table; the
    request keeps llguidance's own masks."""
    small = C.compile(tokenizer, json_schema={"type": "string", "maxLength": 50}, backend="llguidance", cache=None)
    assert TableGrammar.wrap(small) is not None
    schema = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3000}}, "required": ["a"],
              "additionalProperties": False}
    large = C.compile(tokenizer, json_schema=schema, backend="llguidance", cache=None)
    assert nfa_states(schema_expression(large.ll_grammar)) > MAX_NFA_STATES
    assert TableGrammar.wrap(large) is None


def test_regex_grammars_and_other_options_get_no_table(tokenizer: Any) -> None:
    assert TableGrammar.wrap(C.compile(tokenizer, regex="[ab]{3}", backend="llguidance")) is None
    grammar = C.compile(tokenizer, json_schema=ITEM_F, backend="llguidance", cache=None, whitespace_max=4)
    assert schema_expression(grammar.ll_grammar) is not None  # other whitespace bounds are mirrored
    spec = json.loads(grammar.ll_grammar)
    spec["grammars"][0]["json_schema"]["x-guidance"]["whitespace_flexible"] = False
    assert schema_expression(json.dumps(spec)) is None


def test_rollback_copy_and_forced_text_follow_llguidance(tokenizer: Any) -> None:
    grammar, table = table_grammar(tokenizer, ITEM_F)
    doc = encode(tokenizer, '{"id": 42, "name": "Ada", "tags": ["x"], "active": true}')
    mine, ref = table.matcher(), grammar.matcher()
    for tid in doc[:9]:
        assert mine.advance(tid) and ref.advance(tid)
    twin, ref_twin = mine.copy(), ref.copy()
    mine.rollback(4)
    ref.rollback(4)
    assert mine.num_tokens == ref.num_tokens == 5 and len(mine.states) == 6
    assert mine.allowed_token_ids() == ref.allowed_token_ids()
    assert mine.forced_bytes() == ref.forced_bytes()
    for tid in doc[5:]:
        assert mine.advance(tid) and ref.advance(tid)
    for tid in doc[9:]:
        assert twin.advance(tid) and ref_twin.advance(tid)
        assert twin.allowed_token_ids() == ref_twin.allowed_token_ids()
    assert mine.is_accepting() and mine.advance(tokenizer.eos_token_id) and mine.table_row() == NONE_ROW
    assert mine.allowed_token_ids() == []
    mine.rollback(1)
    assert not mine.ended and mine.allowed_token_ids() == ref.allowed_token_ids()
    assert not mine.advance(encode(tokenizer, "x")[0])  # refused: state unchanged
    assert mine.num_tokens == len(doc) and mine.allowed_token_ids() == ref.allowed_token_ids()


def test_a_dfa_that_disagrees_turns_the_table_off(tokenizer: Any) -> None:
    """Integers limited to the digits 0-4 in the DFA: llguidance accepts a 7, the DFA refuses it, the
    table turns itself off and masks come from llguidance from then on (still exact)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = C.compile(tokenizer, json_schema=schema, backend="llguidance", cache=None)
    wrong = seq(literal(b'{"n":'), rep(byte_set(b"01234"), 1, None), literal(b"}"))
    table = TableGrammar(grammar, StateTable(LazyDfa(wrong), grammar))
    mine, ref = table.matcher(), grammar.matcher()
    for tid in encode(tokenizer, '{"n":27'):
        assert mine.advance(tid) and ref.advance(tid)
    assert table.table.broken and mine.table_row() == -1
    assert mine.allowed_token_ids() == ref.allowed_token_ids()


def test_lazy_dfa_matches_python_re() -> None:
    expr = seq(literal(b"a"), alt(rep(byte_set(b"bc"), 1, 3), literal(b"d")), rep(literal(b"e"), 0, None))
    pattern = re.compile(rb"a(?:[bc]{1,3}|d)e*")
    dfa = LazyDfa(expr)
    rng = random.Random(0)
    for _ in range(2000):
        data = bytes(rng.choice(b"abcdex") for _ in range(rng.randrange(0, 8)))
        end = dfa.walk(0, data)
        assert (end != DEAD and dfa.accepting[end]) == bool(pattern.fullmatch(data)), data
        viable = any(pattern.fullmatch(data + bytes(rest)) for rest in ([], b"e", b"b", b"bb", b"d", b"a"))
        if viable:
            assert end != DEAD, data
    with pytest.raises(OverflowError):
        LazyDfa(rep(byte_set(b"ab"), 0, 50), max_states=10).walk(0, b"a" * 20)


def test_table_rows_filled_once_per_state(tokenizer: Any) -> None:
    grammar, table = table_grammar(tokenizer, ITEM_F)
    doc = encode(tokenizer, '{"id": 1, "name": "a", "tags": [], "active": true}')
    rows = [table.matcher() for _ in range(5)]
    bitmask = C.allocate_token_bitmask(5, grammar.info.vocab_size)
    for tid in doc:
        missing = table.table.missing(rows)
        assert len(missing) <= 1  # five rows at one state: one fill
        TableMatcher.prepare_fill([(m, i) for i, m in enumerate(rows)], bitmask, MaskWorkers(0))()
        assert all(torch.equal(bitmask[i], bitmask[0]) for i in range(5))
        for m in rows:
            assert m.advance(tid)


def test_lazy_commits_skip_llguidance_and_stay_exact(tokenizer: Any) -> None:
    """Once a state's row is filled, later rows reaching it take the token on the DFA alone (no
    llguidance commit); their masks and is_terminated still equal llguidance's at every step, and
    llguidance catches up (same token count, same state) wherever its own state is asked for."""
    grammar, table = table_grammar(tokenizer, ITEM_F)
    doc = encode(tokenizer, '{"id": 42, "name": "Ada", "tags": ["x", "y"], "active": true}')
    vocab = grammar.info.vocab_size
    got, want = C.allocate_token_bitmask(1, vocab), C.allocate_token_bitmask(1, vocab)
    first = table.matcher()
    for tid in doc:  # fills every row along the document (each advance reaches an unfilled row)
        first.fill_next_token_bitmask(got, 0)
        assert first.advance(tid) and not first.lag
    first.fill_next_token_bitmask(got, 0)
    mine, ref = table.matcher(), grammar.matcher()
    for step, tid in enumerate(doc):
        mine.fill_next_token_bitmask(got, 0)
        ref.fill_next_token_bitmask(want, 0)
        assert torch.equal(got, want), step
        assert mine.is_terminated() == ref.is_terminated()
        assert TableMatcher.advance_rows([mine], [tid], MaskWorkers(0)) == [True] and ref.advance(tid)
        assert len(mine.lag) == step + 1 and mine.num_tokens == ref.num_tokens  # llguidance not called
    assert mine.is_terminated() == ref.is_terminated() and mine.table_row() >= 0
    twin = mine.copy()  # llguidance's matcher not made yet: the copy's is made on its own first need too
    assert mine._inner is None and twin._inner is None and twin.lag == mine.lag and twin.states == mine.states
    assert mine.is_accepting() == ref.is_accepting() and not mine.lag and mine._inner.num_tokens == len(doc)
    assert twin.advance(tokenizer.eos_token_id) and twin.table_row() == NONE_ROW
    lazy = table.matcher()
    for tid in doc[:6]:
        assert lazy.advance(tid)
    lazy.rollback(2)  # within the lag: llguidance never saw those tokens
    assert lazy.lag == doc[:4] and lazy.num_tokens == 4 and len(lazy.states) == 5
    assert lazy.forced_bytes() == _after(grammar, doc[:4]).forced_bytes()
    assert lazy.is_accepting() == _after(grammar, doc[:4]).is_accepting() and not lazy.lag


def _after(grammar: C.Grammar, tokens: list[int]) -> Any:
    m = grammar.matcher()
    for tid in tokens:
        assert m.advance(tid)
    return m


def test_a_lagging_token_llguidance_refuses_fails_the_row(tokenizer: Any) -> None:
    """A DFA that accepts more than llguidance (letters among an integer's digits): a row whose state
    was filled by a valid path takes the bad token lazily; when llguidance catches up it refuses it,
    the table turns off and the row's next commit fails (the scheduler stops that request)."""
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"], "additionalProperties": False}
    grammar = C.compile(tokenizer, json_schema=schema, backend="llguidance", cache=None)
    wrong = seq(literal(b'{"n":'), rep(byte_set(b"0123456789a"), 1, None), literal(b"}"))
    table = TableGrammar(grammar, StateTable(LazyDfa(wrong), grammar))
    single = grammar.info.single_byte_tokens
    prefix = [single[b] for b in b'{"n":1']
    bitmask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
    filler = table.matcher()
    for tid in [*prefix, single[ord("1")]]:  # '{"n":11': the digit loop's state gets its row
        filler.fill_next_token_bitmask(bitmask, 0)
        assert filler.advance(tid)
    filler.fill_next_token_bitmask(bitmask, 0)
    bad = table.matcher()
    for tid in prefix:
        bad.fill_next_token_bitmask(bitmask, 0)
        assert bad.advance(tid)
    table.table.next_state(bad.state, single[ord("a")])  # the DFA's move, cached as a commit would find it
    assert bad.advance(single[ord("a")]) and bad.lag == [*prefix, single[ord("a")]]  # all on the DFA alone
    assert not bad.is_accepting()  # llguidance catches up: refuses the 'a'
    assert table.table.broken and bad.refused and bad.num_tokens == len(prefix)
    assert not bad.advance(single[ord("2")])
    assert TableMatcher.advance_rows([bad], [single[ord("2")]], MaskWorkers(0)) == [False]


def test_forced_text_of_lazy_rows_equals_llguidance(tokenizer: Any) -> None:
    """Forced bytes / prefix of a lagging row equal llguidance's at every step; where the DFA says no
    byte is forced (most states) they are answered without llguidance catching up."""
    grammar, table = table_grammar(tokenizer, ITEM_F)
    docs = ['{"id": 42, "name": "Ada", "tags": ["x", "y"], "active": true}',
            '{"active": false, "id": -7, "name": "", "tags": []}']
    bitmask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
    for doc in docs:  # fill the rows along both documents
        m = table.matcher()
        for tid in encode(tokenizer, doc):
            m.fill_next_token_bitmask(bitmask, 0)
            assert m.advance(tid)
    answered_lazily = 0
    for doc in docs:
        mine, ref = table.matcher(), grammar.matcher()
        for tid in encode(tokenizer, doc):
            assert mine.advance(tid) and ref.advance(tid)
            lagging = bool(mine.lag)
            assert mine.forced_bytes() == ref.forced_bytes() and mine.forced_prefix() == ref.forced_prefix()
            answered_lazily += lagging and bool(mine.lag)
    assert answered_lazily > 20


def test_backend_matchers_are_made_on_first_need(tokenizer: Any) -> None:
    """A table grammar's matchers make their llguidance matcher only when a row needs the backend's own
    state (here: acceptance), in their family: rows walking filled states (item (f)'s rows once the table
    is complete) make none, and their masks and termination still equal llguidance's at every step."""
    grammar, table = table_grammar(tokenizer, ITEM_F)
    made: list[int] = []
    plain = grammar.matcher
    grammar.prepare_families(2)

    def counting(family: int = 0) -> Any:
        made.append(family)
        return plain(family)

    grammar.matcher = counting  # type: ignore[method-assign]
    doc = encode(tokenizer, '{"id": 42, "name": "Ada", "tags": ["x", "y"], "active": true}')
    bitmask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
    first = table.matcher()
    for tid in doc:  # fills every row along the document
        first.fill_next_token_bitmask(bitmask, 0)
        assert first.advance(tid)
    first.fill_next_token_bitmask(bitmask, 0)
    assert made == [0]
    rows = [table.matcher(i % 2) for i in range(6)]
    assert made == [0] and all(m._inner is None and m.num_tokens == 0 for m in rows)
    vocab = grammar.info.vocab_size
    got, want = C.allocate_token_bitmask(6, vocab), C.allocate_token_bitmask(1, vocab)
    ref = grammar.matcher()
    del made[:]
    for tid in doc:
        TableMatcher.prepare_fill([(m, i) for i, m in enumerate(rows)], got, MaskWorkers(0))()
        ref.fill_next_token_bitmask(want, 0)  # llguidance's own mask at the same path
        assert all(torch.equal(got[i], want[0]) for i in range(6))
        assert all(m.is_terminated() == ref.is_terminated() and m.forced_bytes() == ref.forced_bytes() for m in rows)
        assert TableMatcher.advance_rows(rows, [tid] * 6, MaskWorkers(0)) == [True] * 6 and ref.advance(tid)
    twin = rows[1].copy()
    assert made == [] and twin._inner is None and twin.family == 1
    assert rows[1].is_accepting() == ref.is_accepting() and made == [1]  # made now, in its family, caught up
    assert rows[1]._inner.family == 1 and rows[1]._inner.num_tokens == len(doc) and not rows[1].lag
    assert twin.advance(tokenizer.eos_token_id) and made == [1, 1] and twin.table_row() == NONE_ROW
    rows[2].rollback(len(doc))  # all lagging: back to the start, still without a backend matcher
    assert rows[2]._inner is None and rows[2].states == [0] and made == [1, 1]

"""Tables completed ahead of use (constrained/table_completion.py): every DFA state's row, computed by
walking the DFA with single-byte tokens in one matcher, filed into a table whose lazy DFA numbered its
states in another order, equals llguidance's mask along random walks of real (multi-byte) tokens,
without one fill on the way (the background process inside the scheduler: tests/runtime/
test_grammar_tables.py). The walk's DFA moves, renamed the same way, spare the target's DFA every subset
step and equal the moves it would compute itself."""
from __future__ import annotations

from typing import Any

import numpy as np
import pytest

from radixlm import constrained as C
from radixlm.constrained.byte_automaton import DEAD, UNKNOWN
from radixlm.constrained.forced_tokens import ForcedPairs, file_pairs
from radixlm.constrained.state_table import FIRST_STATE_ROW
from radixlm.constrained.table_completion import DfaMoves, RowChunk, file_moves, file_rows, walk_states

from .conftest import encode
from .test_state_table import REFS, allowed, table_grammar, walk_and_compare

SMALL = {"type": "object", "properties": {"a": {"type": "string", "maxLength": 3},
                                          "b": {"type": "array", "items": {"type": "integer"}, "maxItems": 2}},
         "required": ["a", "b"], "additionalProperties": False}
PREFIX = {"small": '{"a": "x', "refs": "[true"}  # a few states the target's lazy DFA numbers first
FORCED_AFTER = {"small": '{"a": "x", "', "refs": "[true"}  # (small: the next key is forced there)


def fresh_dfa(grammar: C.Grammar) -> Any:
    """A fresh lazy DFA of `grammar`'s table expression."""
    from radixlm.constrained.table_grammar import TableGrammar

    wrapped = TableGrammar.wrap(grammar)
    assert wrapped is not None
    return wrapped.table.dfa


def _count_subset_steps(dfa: Any) -> list[int]:
    """Count the DFA's own subset steps (epsilon closures of new target sets) from now on."""
    taken: list[int] = []
    inner = dfa._close

    def counting(states: Any) -> Any:
        taken.append(len(states))
        return inner(states)

    dfa._close = counting
    return taken


def _no_fills(table: Any) -> list[int]:
    """Count the rows the table fills itself from now on (there should be none)."""
    filled: list[int] = []
    inner = table.fill_missing

    def counting(items: Any, workers: Any) -> Any:
        filled.extend(row for _, row in items)
        return inner(items, workers)

    table.fill_missing = counting
    return filled


@pytest.mark.parametrize("name", sorted(PREFIX))
def test_completed_rows_equal_llguidance_along_walks(tokenizer: Any, name: str) -> None:
    schema = SMALL if name == "small" else REFS
    grammar, source = table_grammar(tokenizer, schema)
    *chunks, moves, pairs = walk_states(source, chunk=64)
    assert isinstance(moves, DfaMoves) and isinstance(pairs, ForcedPairs) and all(isinstance(c, RowChunk) for c in chunks)
    states = sum(len(c.sets) for c in chunks)
    assert len(chunks) > 1 and states == source.table.dfa.num_states  # every state the DFA has
    _, target = table_grammar(tokenizer, schema)
    m = target.matcher()  # the target's lazy DFA numbers a few states first, in its own order
    for tid in encode(tokenizer, PREFIX[name]):
        assert m.advance(tid)
    m.fill_next_token_bitmask(C.allocate_token_bitmask(1, grammar.info.vocab_size), 0)  # one row filled here
    renamed: dict[int, int] = {}
    filed = sum(file_rows(target.table, c, renamed) for c in chunks)
    assert filed == states - 1  # every state's row but that one
    assert sum(file_moves(target.table, moves, renamed, slice_states=5)) == states
    # forced pairs: from a state with few allowed tokens, each token named leads to a state whose mask (llguidance's,
    # filed above) allows exactly the token it is paired with
    assert file_pairs(target.table, pairs, renamed) == len(pairs.pairs) > 0
    for q in renamed.values():  # each filed state's single token (or -1) came with its row
        ids = allowed(target.table.rows[q + FIRST_STATE_ROW], grammar.info.vocab_size).tolist()
        assert target.table._single[q] == (ids[0] if len(ids) == 1 else -1)
    for q, by_token in target.table.forced_after.items():
        for x, forced in by_token.items():
            nxt = target.table.next_state(q, x)
            assert allowed(target.table.rows[nxt + FIRST_STATE_ROW], grammar.info.vocab_size).tolist() == [forced]
    dfa = target.table.dfa
    reference, _ = table_grammar(tokenizer, schema)  # a third DFA, built by its own subset steps
    ref = fresh_dfa(reference)
    for q, row in enumerate(dfa.move_table()):
        assert UNKNOWN not in row  # every state's every move was given
        for cls, nxt in enumerate(row):
            want = ref.step(ref.intern(dfa.nfa_set(q)), ref.class_example(cls))
            assert (nxt == DEAD) == (want == DEAD) and (nxt == DEAD or dfa.nfa_set(nxt) == ref.nfa_set(want))
    steps_taken = _count_subset_steps(dfa)
    filled = _no_fills(target.table)
    rng = np.random.default_rng(3)
    steps = sum(walk_and_compare(grammar, target, rng, longest=i % 2 == 1) for i in range(12))
    assert steps > 30 and not filled and not target.table.broken and not steps_taken
    assert file_rows(target.table, chunks[0]) == 0  # rows filled already stay
    assert set(target.table.forced) >= set(range(states))  # each state's forced bytes came with its row
    lagging, ref_matcher = target.matcher(), grammar.matcher()
    for tid in encode(tokenizer, FORCED_AFTER[name]):
        assert lagging.advance(tid) and ref_matcher.advance(tid)
    lag = list(lagging.lag)
    assert lag and lagging.forced_bytes() == ref_matcher.forced_bytes() and lagging.lag == lag  # no catch-up
    assert name != "small" or ref_matcher.forced_bytes() == b'b"'


def test_rows_of_another_automaton_are_not_filed(tokenizer: Any) -> None:
    _, source = table_grammar(tokenizer, REFS)
    chunk = next(walk_states(source))
    _, target = table_grammar(tokenizer, SMALL)
    other = RowChunk(chunk.nfa_states + 1, chunk.sets, chunk.rows, chunk.terminated, chunk.ids)
    assert file_rows(target.table, other) == 0
    assert sum(file_moves(target.table, DfaMoves(chunk.nfa_states + 1, np.zeros((1, 1), np.int32)), {0: 0})) == 0
    assert not any(target.table.ready[FIRST_STATE_ROW:])

"""Forced runs of a state table (constrained/forced_tokens.py) as forced-row rides and guesses take them
(runtime/forced_rows.py): a run may end the document with its last token, and a guess takes the whole run
a sampled token leads to, each of its tokens the only one llguidance's mask allows there."""
from __future__ import annotations

import json
from typing import Any

from radixlm.constrained.compiler import WHITESPACE_MAX
from radixlm.constrained.forced_tokens import _forced_walk, forced_run, guess_runs, note_move, single_token

from .conftest import encode
from .test_state_table import allowed, table_grammar

SCHEMA = {"type": "object", "properties": {"flag": {"type": "boolean"}, "name": {"type": "string", "maxLength": 4}},
          "required": ["flag", "name"], "additionalProperties": False}
ITEM_F = {"type": "object", "properties": {  # gpu_suite item (f)'s schema
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def _walk(wrapped: Any, tokens: list[int]) -> Any:
    m = wrapped.matcher()
    for t in tokens:
        assert m.advance(t)
    return m


def _only(m: Any, vocab: int) -> int:
    """The one token the matcher's llguidance mask allows (-1: not one)."""
    import torch

    row = torch.zeros((1, (vocab + 31) // 32), dtype=torch.int32)
    m.inner.fill_next_token_bitmask(row, 0)
    ids = allowed(row[0], vocab)
    return int(ids[0]) if len(ids) == 1 else -1


def test_a_run_may_end_the_document_with_its_last_token(tokenizer) -> None:
    """Once the whitespace budget is spent after the last value, the closing brace is the only token left and
    reaches a state that ends the grammar: the run is that token, marked as ending the row (without it, the
    run stopped before the brace and the row needed a step to learn that it ended)."""
    import torch

    grammar, wrapped = table_grammar(tokenizer, json.dumps(SCHEMA))
    text = '{"flag": true, "name": "ab"' + " " * WHITESPACE_MAX
    m = _walk(wrapped, encode(tokenizer, text))
    m.sync()
    table = wrapped.table
    m.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
    brace = encode(tokenizer, "}")[0]
    assert _only(m, grammar.info.vocab_size) == brace
    assert single_token(table, m.state) == brace
    end = _walk(wrapped, encode(tokenizer, text) + [brace])  # (the row after it filled, as a completed table has it)
    end.sync()
    end.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
    assert forced_run(table, m.state, 4) == ([brace], True)
    assert m.advance(brace) and m.is_terminated()


def test_a_guess_takes_the_whole_run_its_token_leads_to(tokenizer) -> None:
    """Inside a fixed key, a token spelling its first piece can leave the rest forced one token at a time
    (item (f)'s `"ac` -> `t`, `ive`): the guess's run for that token at the state before it is every
    token forced after it, each the only one llguidance's mask allows where it stands."""
    import torch

    grammar, wrapped = table_grammar(tokenizer, json.dumps(ITEM_F))
    vocab, table = grammar.info.vocab_size, wrapped.table
    prefix = encode(tokenizer, '{"')
    start = _walk(wrapped, prefix)
    start.sync()
    start.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
    state = start.state
    paths = {}
    for first in allowed(table.rows[state + 2], vocab).tolist():
        m, path = _walk(wrapped, prefix + [first]), []
        while len(path) < 8:  # fill the rows the run crosses, as rows standing there would
            m.sync()
            m.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
            nxt = _only(m, vocab)
            if nxt < 0 or m.is_terminated():
                break
            path.append(nxt)
            assert m.advance(nxt)
        if path:
            paths[first] = tuple(path)
            note_move(table, state, first, table.next_state(state, first))
            grown = guess_runs(table, state, table.forced_after[state], 64, 8)  # (a pair more: its run added)
            assert grown is not None and grown.runs == paths
    assert max(map(len, paths.values())) >= 2  # a key's rest forced in two tokens or more
    runs = guess_runs(table, state, table.forced_after[state], 64, 8)
    assert runs is not None and runs.runs == paths
    assert runs.width == max(map(len, paths.values())) and sorted(runs.keys.tolist()) == sorted(paths)
    for key, values in zip(runs.keys.tolist(), runs.values.tolist()):
        assert tuple(values[: len(paths[key])]) == paths[key] and not any(values[len(paths[key]):])
    assert guess_runs(table, state, table.forced_after[state], 64, 8) is runs  # (made once per pairs known)


def test_each_states_forced_run_is_walked_once_and_cut_to_each_limit(tokenizer) -> None:
    """The forced rows ask a state's run once per row and step (rides), and once per learned pair (guesses):
    `forced_run` keeps each state's run (`StateTable.runs_from`) once its walk is final and answers every limit
    from it as a walk with that limit would; a walk that stopped at a row not filled yet is not kept."""
    import torch

    grammar, wrapped = table_grammar(tokenizer, json.dumps(SCHEMA))
    table = wrapped.table
    text = '{"flag": true, "name": "ab"' + " " * WHITESPACE_MAX
    ids = encode(tokenizer, text)
    states = []
    for k in range(len(ids) + 1):
        m = _walk(wrapped, ids[:k])
        m.sync()
        m.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
        states.append(m.state)
    brace = encode(tokenizer, "}")[0]
    assert forced_run(table, states[-1], 4) == ([], False)  # (the brace's state not filled yet)
    assert states[-1] not in table.runs_from
    end = _walk(wrapped, ids + [brace])
    end.sync()
    end.fill_next_token_bitmask(torch.zeros((1, table.words), dtype=torch.int32), 0)
    for state in states:
        for limit in (0, 1, 2, 5, 40):
            assert forced_run(table, state, limit) == tuple(_forced_walk(table, state, limit)[:2])
    assert table.runs_from[states[-1]] == ((brace,), True)
    table.runs_from[states[-1]] = ((7, 8, 9), False)  # (kept: answered from what is kept, cut to the limit)
    assert forced_run(table, states[-1], 2) == ([7, 8], False) and forced_run(table, states[-1], 3) == ([7, 8, 9], False)


def test_a_guess_s_pick_entries_lay_out_each_pair_s_run_token_by_token() -> None:
    """`GuessRuns.entries`: pair by pair, token by token up to the guess's width (0 past a run's end), made
    once per width; the device adds each entry's token where its key matches the sampled token."""
    from radixlm.constrained.forced_tokens import GuessRuns

    runs = GuessRuns(2, {11: (5, 6, 7), 12: (8,)}, 3, 4)
    entries = runs.entries(2)
    assert entries.tolist() == [[11, 11, 12, 12], [5, 6, 8, 0], [0, 1, 0, 1]]  # key, token, place
    assert runs.entries(2) is entries and runs.entries(3)[1].tolist() == [5, 6, 7, 8, 0, 0]

"""The one-pass commit of rows sharing a state table (runtime/grammar_tables.DeviceTables.commit) and the
upload of filed rows (DeviceTables.refresh): masks equal llguidance's own at every step, moves not known
yet and rows of another kind take their matchers' own commit, and the gather after a commit of the same
requests takes the commit's rows without scanning the batch again."""
from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from radixlm import constrained as C
from radixlm.runtime.grammar_runtime import GrammarRuntime
from radixlm.runtime.grammar_tables import DeviceTables
from radixlm.runtime.server_args import ServerArgs
from tests.runtime.test_grammar_tables import ITEM_F

DOCS = ['{"id": 42, "name": "Ada Lovelace", "tags": ["x", "y"], "active": true}',
        '{"id": -7, "name": "Bo", "tags": [], "active": false}',
        '{"id": 123456, "name": "a \\"quoted\\" name", "tags": ["t1"], "active": true}']


@pytest.fixture(scope="module")
def tok(default_model_dir: Any) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def _runtime(tok: Any, default_model_dir: Any) -> tuple[GrammarRuntime, Any]:
    grammar = C.compile(tok, json_schema=ITEM_F, backend="llguidance", cache=None)
    rt = GrammarRuntime(ServerArgs(grammar_mask_threads=0, grammar_state_table="lazy"), tok, str(default_model_dir),
                        grammar.info.vocab_size)
    return rt, grammar


def _walk(rt: GrammarRuntime, grammar: Any, tok: Any, plain_row: bool = False) -> tuple[int, int, int]:
    """Every doc decoded at once, one row each (plus, with `plain_row`, a row of the grammar without a
    table): after each commit the runtime's masks equal fresh llguidance matchers' masks, and termination
    agrees. Returns (commits, commits that took the one-pass path for every row, commits after which a
    row finished: the next masks are another batch's)."""
    table_grammar = rt._with_table(grammar)
    docs = [tok(d, add_special_tokens=False)["input_ids"] for d in DOCS]
    if plain_row:
        docs.append(max(docs, key=len))  # (alive at every step)
    reqs = [SimpleNamespace(rid=f"r{i}", grammar=(grammar if plain_row and i == len(docs) - 1 else table_grammar).matcher(),
                            finished=False) for i in range(len(docs))]
    refs = [grammar.matcher() for _ in docs]
    cpu = torch.device("cpu")
    commits = fast = changed = 0
    for step in range(max(len(d) for d in docs)):
        live = [i for i, d in enumerate(docs) if step < len(d)]
        rs, toks = [reqs[i] for i in live], [docs[i][step] for i in live]
        for i, t in zip(live, toks):
            assert refs[i].advance(t)
        rt.advance_many(rs, toks)
        commits += 1
        fast += rt._step is not None
        assert [rt.is_terminated(r) for r in rs] == [refs[i].is_terminated() for i in live]
        going = [i for i in live if not refs[i].is_terminated()]
        if len(going) < len(live):
            changed += 1
            rt.forget(reqs[live[0]])  # (the scheduler drops finished rows before the next step)
            rs = [reqs[i] for i in going]
        if not rs:
            break
        got = rt.bitmask(rs, cpu)
        want = C.allocate_token_bitmask(len(rs), grammar.info.vocab_size)
        C.fill_next_token_bitmasks([(refs[i], j) for j, i in enumerate(going)], want)
        assert torch.equal(got, want), step
    return commits, fast, changed


def test_one_pass_commit_masks_equal_llguidance_and_skip_the_scan(tok, default_model_dir, monkeypatch) -> None:
    rt, grammar = _runtime(tok, default_model_dir)
    scans: list[int] = []
    real_scan = DeviceTables.scan
    monkeypatch.setattr(DeviceTables, "scan", staticmethod(lambda reqs: (scans.append(len(reqs)), real_scan(reqs))[1]))
    try:
        commits, _, _ = _walk(rt, grammar, tok)  # first walk: moves and rows met for the first time (matchers' commit)
        assert commits > 10 and scans
        scans.clear()
        commits, fast, changed = _walk(rt, grammar, tok)  # the same walks again: every move known, every row filled
        assert fast == commits  # the one-pass commit took every step
        assert len(scans) <= changed < commits  # ... and the gather scanned only a batch it had not committed
    finally:
        rt.close()


def test_rows_of_another_kind_take_the_matchers_commit(tok, default_model_dir) -> None:
    """A row without a table beside table rows: the one pass commits the table rows, the matchers' own
    batched commit the other, and the masks (the host path: no single table) equal llguidance's."""
    rt, grammar = _runtime(tok, default_model_dir)
    try:
        _walk(rt, grammar, tok)
        commits, fast, _ = _walk(rt, grammar, tok, plain_row=True)
        assert commits > 10 and fast == 0  # no gather rows to hand over: the batch is not one table's
    finally:
        rt.close()


def test_moves_not_cached_are_walked_and_rows_not_filled_go_to_the_matcher(tok, default_model_dir) -> None:
    """A (state, token) move not cached is walked on the DFA in the pass (and cached); a token whose next
    state has no filled row goes to TableMatcher's own commit (the backend takes the lagging tokens), and
    that row is named for the fill before the next gather."""
    rt, grammar = _runtime(tok, default_model_dir)
    try:
        table_grammar = rt._with_table(grammar)
        table = table_grammar.table
        doc = tok(DOCS[0], add_special_tokens=False)["input_ids"]
        seen = table_grammar.matcher()
        mask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
        for t in doc[:3]:  # the moves cached and the rows filled along the doc's first tokens
            seen.fill_next_token_bitmask(mask, 0)
            assert seen.advance(t)
        seen.fill_next_token_bitmask(mask, 0)
        s1, s2, s3 = seen.states[1:4]
        reqs = [SimpleNamespace(rid=r, grammar=table_grammar.matcher(), finished=False) for r in "abc"]
        assert reqs[1].grammar.advance(doc[0])
        for t in doc[:3]:
            assert reqs[2].grammar.advance(t)
        assert reqs[2].grammar.lag == doc[:3]  # (lazy: rows filled)
        table._next.pop(s1 * table.vocab + doc[1])  # row b's move: no longer cached
        step = rt._tables.commit(reqs, [doc[0], doc[1], doc[3]], rt.workers)
        assert step is not None and step.ok == [True] * 3 and step.done == [False] * 3
        assert s1 * table.vocab + doc[1] in table._next  # b's move walked and cached again
        assert [r.grammar.lag for r in reqs[:2]] == [[doc[0]], [doc[0], doc[1]]]  # a, b: the backend not called
        s4 = reqs[2].grammar.states[-1]
        assert [r.grammar.states for r in reqs] == [[0, s1], [0, s1, s2], [0, s1, s2, s3, s4]]
        assert reqs[2].grammar.lag == [] and not table.ready[s4 + 2]  # c: the backend took its tokens
        assert step.rows == [s1 + 2, s2 + 2, s4 + 2] and [row for _, row in step.missing] == [s4 + 2]
    finally:
        rt.close()


def test_filed_rows_reach_the_device_copy_when_filed(tok) -> None:
    """`refresh` (after a completion's rows are filed) brings each device copy up to date, grown
    tables included, so that the next gather has nothing to upload."""
    from radixlm.constrained.table_grammar import TableGrammar

    table = TableGrammar.wrap(C.compile(tok, json_schema=ITEM_F, backend="llguidance", cache=None)).table
    tables = DeviceTables()
    device = torch.device("cpu")  # `_synced`'s copies, as on a GPU
    copy = tables._synced(table, device)
    assert not table.fresh
    for rows in ([5, 9, 7], [table.rows.shape[0] + 40, 11]):  # the second grows the table
        table.row_of(max(rows) - 2)
        table.rows[rows] = torch.randint(-2**31, 2**31 - 1, (len(rows), table.words), dtype=torch.int32)
        table.fresh += rows
        tables.refresh()
        assert not table.fresh
        copy = tables._device[id(table)][1]
        assert copy.shape == table.rows.shape and torch.equal(copy[rows], table.rows[rows])


def test_forced_bytes_are_recorded_per_state_without_a_catch_up(tok) -> None:
    """The scheduler's jump pre-check asks every live row for its forced bytes once few rows run: a
    lagging row at a DFA state whose row was filled, or where a row was caught up before, is answered
    from the record (no catch-up of its lag), equal to llguidance's; the jump's text still comes from
    llguidance."""
    from radixlm.constrained.table_grammar import TableGrammar

    grammar = C.compile(tok, json_schema=ITEM_F, backend="llguidance", cache=None)
    table_grammar = TableGrammar.wrap(grammar)
    texts = ['{"id": 42, "', '{"id": 7, "']
    paths = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    mask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
    for path in paths:  # every state on the way gets its row: the rows below move lazily
        filler = table_grammar.matcher()
        for t in path:
            filler.fill_next_token_bitmask(mask, 0)
            assert filler.advance(t)
        filler.fill_next_token_bitmask(mask, 0)
    recorded_at_fill = dict(table_grammar.table.forced)  # each row filled recorded its forced bytes
    table_grammar.table.forced.clear()  # (from here on: recorded by the first catch-up at a state)
    first, second = table_grammar.matcher(), table_grammar.matcher()
    for m, path in ((first, paths[0]), (second, paths[1])):
        for t in path:
            assert m.advance(t)
        assert m.lag == path  # lazy all the way
    assert first.states[-1] == second.states[-1]  # one DFA state after either id
    ref = grammar.matcher()
    for t in paths[1]:
        assert ref.advance(t)
    want = ref.forced_bytes()
    assert want == b'name"'  # (the next key is forced there)
    assert recorded_at_fill[first.states[-1]] == want
    assert first.forced_bytes() == want and first.lag == []  # the first to ask is caught up, the answer recorded
    assert second.forced_bytes() == want and second.lag == paths[1]  # ... the next one is not
    assert second.forced_prefix() == ref.forced_prefix() and second.lag == []  # the jump's text: llguidance's own

"""GrammarRuntime's batched path: the commit advances every matcher at once, the next masks are
computed in the background, and the masks sampling takes equal row-by-row fills in every case
(same requests, a reordered batch, unconstrained / finished / never-committed rows, a request
whose state jump-forward changed after its mask was started)."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from radixlm import constrained as C
from radixlm.runtime.grammar_runtime import GrammarRuntime
from radixlm.runtime.server_args import ServerArgs

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "kind": {"enum": ["cat", "dog"]}},
          "required": ["name", "kind"], "additionalProperties": False}


@pytest.fixture(scope="module")
def tokenizer(default_model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(default_model_dir))


def _req(rid: str, grammar, prefix: list[int]) -> SimpleNamespace:
    m = grammar.matcher() if grammar is not None else None
    for t in prefix:
        assert m.advance(t)
    return SimpleNamespace(rid=rid, grammar=m, finished=False, output_ids=list(prefix), sent_output_len=len(prefix),
                           forced_tokens=0, params=SimpleNamespace(max_new_tokens=64))


def _expected(reqs: list[SimpleNamespace], width: int) -> torch.Tensor:
    rows = torch.full((len(reqs), width), -1, dtype=torch.int32)
    for i, r in enumerate(reqs):
        if r.grammar is not None and not r.finished:
            r.grammar.fill_next_token_bitmask(rows, i)
    return rows


@pytest.mark.parametrize("threads", [0, 1, 3])
def test_masks_taken_after_a_batched_commit_equal_row_by_row(tokenizer, default_model_dir, threads: int) -> None:
    runtime = GrammarRuntime(ServerArgs(grammar_mask_threads=threads), tokenizer, str(default_model_dir),
                             len(tokenizer))
    try:
        grammar = C.compile(tokenizer, json_schema=json.dumps(SCHEMA))
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        doc = enc('{"name": "ab", "kind": "cat"}')
        reqs = [_req(f"r{i}", grammar, doc[:i]) for i in range(1, 6)]
        tokens = [doc[i] for i in range(1, 6)]
        runtime.advance_many(reqs, tokens)
        for r, t in zip(reqs, tokens):
            r.output_ids.append(t)
        assert not any(runtime.is_terminated(r) for r in reqs)
        # The same batch in the same order: the prefetched rows as they are.
        got = runtime.bitmask(reqs, torch.device("cpu"))
        runtime._settle()
        assert torch.equal(got, _expected(reqs, runtime.width))
        # Committed again, then a different batch: reordered, one finished, one unconstrained, one
        # never committed (just prefilled), one whose state jump-forward changed meanwhile.
        tokens = [doc[i] for i in range(2, 7)]
        runtime.advance_many(reqs, tokens)
        for r, t in zip(reqs, tokens):
            r.output_ids.append(t)
        reqs[1].finished = True
        jumped = reqs[4]  # after '{"name": "ab"': ', "kind": "' is forced
        assert runtime.jump_forward(jumped, allow_retokenize=False) > 0
        fresh = _req("fresh", grammar, doc[:3])
        plain = _req("plain", None, [])
        batch = [reqs[3], plain, reqs[1], fresh, reqs[0], jumped, reqs[2]]
        got = runtime.bitmask(batch, torch.device("cpu"))
        runtime._settle()
        assert torch.equal(got, _expected(batch, runtime.width))
        assert (got[1] == -1).all() and (got[2] == -1).all()
        # An end token ends a request; a refused token marks it failed; both count as terminated.
        ended = _req("ended", grammar, doc)
        bad = _req("bad", grammar, doc[:2])
        runtime.advance_many([ended, bad], [next(iter(grammar.info.end_token_ids)), enc("}")[0]])
        assert runtime.is_terminated(ended) and runtime.is_terminated(bad) and bad.grammar_failed
    finally:
        runtime.close()


def test_mask_threads_option() -> None:
    from radixlm.runtime.cli import build_serve_parser, parse_server_args

    parser = build_serve_parser("radixlm serve")
    assert parse_server_args(parser, ["--grammar-mask-threads", "4"]).grammar_mask_threads == 4
    assert parse_server_args(parser, []).grammar_mask_threads is None  # 8 beside a GPU, else inline
    with pytest.raises(ValueError, match="grammar_mask_threads"):
        ServerArgs(grammar_mask_threads=-1)


def test_a_grammar_dead_end_fails_the_request_instead_of_a_normal_stop(tokenizer, default_model_dir) -> None:
    """At a dead end (no token fits: uniqueItems with every allowed item used) the draw yields a token the grammar
    refuses — here one is fed directly. The request must fail (500 with the reason), not end as a `stop` whose
    document is incomplete."""
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.request import Req
    from radixlm.runtime.result_processor import GRAMMAR_DEAD_END, ResultProcessor
    from radixlm.runtime.sampling_params import SamplingParams

    runtime = GrammarRuntime(ServerArgs(), tokenizer, str(default_model_dir), len(tokenizer))
    proc = ResultProcessor.__new__(ResultProcessor)
    proc.eos_ids, proc.tokenizer, proc.context_len = frozenset({0}), tokenizer, 8192
    schema = {"type": "array", "items": {"type": "string"}, "uniqueItems": True}
    try:
        grammar = C.compile(tokenizer, json_schema=json.dumps(schema))
        enc = lambda s: tokenizer.encode(s, add_special_tokens=False)  # noqa: E731
        reqs = []
        for rid, text in (("dead", '["a", "b", "a'), ("fine", '["a", "b"')):
            req = Req.from_wire(TokenizedGenerateReq(rid=rid, input_ids=[1, 2], params=SamplingParams()), seed=1)
            req.grammar = grammar.matcher()
            req.output_ids = enc(text)
            assert all(req.grammar.advance(t) for t in req.output_ids)
            reqs.append(req)
        last = [enc('"')[0], enc("]")[0]]  # '"' repeats "a" (refused); ']' ends the document
        runtime.advance_many(reqs, last)
        for req, tok in zip(reqs, last):
            req.output_ids.append(tok)
        dead = proc.check_finish(reqs[0], last[0], runtime)
        assert dead.kind == "abort" and dead.status_code == 500 and dead.message == GRAMMAR_DEAD_END
        fine = proc.check_finish(reqs[1], last[1], runtime)
        assert fine.kind == "stop" and fine.status_code is None
    finally:
        runtime.close()

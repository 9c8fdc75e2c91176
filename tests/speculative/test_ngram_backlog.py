"""NGRAM indexes built in bounded pieces: per prefill chunk in the scheduler, and at most STEP_TOKENS of a
backlog a step (a 30,000-token prompt indexed in one step held the scheduler's loop 65 ms, stall1 2026-12-05);
the index built in pieces equals the one built at once, so every draft made is the same."""
from __future__ import annotations

import random

import pytest

from radixlm.runtime.speculative import ngram
from radixlm.runtime.speculative.ngram import SMALL_SYNC, NgramDrafter, NgramIndex
from tests.runtime.helpers import greedy_req, make_scheduler, run_to_completion


def _text(seed: int, blocks: int) -> list[int]:
    rng = random.Random(seed)
    block = [rng.randrange(60) for _ in range(40)]
    return [t for _ in range(blocks) for t in block[: rng.randrange(20, 40)] + [rng.randrange(60)]]


@pytest.mark.parametrize("occurrences", [1, 4])
def test_index_built_in_pieces_equals_the_index_built_at_once(occurrences: int) -> None:
    prompt, output = _text(occurrences, 40), _text(9, 3)
    whole, pieces = NgramIndex(occurrences=occurrences), NgramIndex(occurrences=occurrences)
    whole.sync(prompt, output)
    done = []
    while len(pieces.tokens) < len(prompt) + len(output):
        done.append(pieces.sync(prompt, output, 97))
    assert set(done[:-1]) == {97} and sum(done) == len(prompt) + len(output)
    assert (pieces.tokens, pieces.follow, pieces.older) == (whole.tokens, whole.follow, whole.older)
    assert pieces.sync(prompt, output, 97) == 0


def test_a_long_prompt_is_indexed_a_bounded_piece_a_step_and_drafts_as_if_indexed_at_once() -> None:
    prompt = _text(1, 300)  # ~9,000 tokens
    out = prompt[100:140]
    bounded, once = NgramDrafter(), NgramDrafter()
    steps = 0
    while True:
        bounded.step_tokens = ngram.STEP_TOKENS  # (the SpecDecoder's begin_step)
        before = len(bounded.indexes[1].tokens) if 1 in bounded.indexes else 0
        draft = bounded.propose(1, prompt, out, 6)
        indexed = len(bounded.indexes[1].tokens) - before
        assert indexed <= ngram.STEP_TOKENS  # the old sync indexed the whole prompt in the first step
        steps += 1
        if indexed < ngram.STEP_TOKENS:
            break
        assert draft == []  # a partial index drafts nothing (it would find other matches)
    assert steps == (len(prompt) + len(out)) // ngram.STEP_TOKENS + 1
    assert draft and draft == once.propose(1, prompt, out, 6)
    for n in range(41, 60):  # from then on, every step's few tokens are indexed and the drafts agree
        bounded.step_tokens = 0  # (none of the step's budget left: a verify run's tokens still go in)
        assert bounded.propose(1, prompt, prompt[100:100 + n], 6) == once.propose(1, prompt, prompt[100:100 + n], 6)
    assert bounded.indexes[1].follow == once.indexes[1].follow
    bounded.step_tokens = 0
    assert bounded.propose(1, prompt, prompt[100:160 + SMALL_SYNC + 1], 6) == []  # a backlog past SMALL_SYNC waits


def test_the_scheduler_indexes_each_prefill_chunk_as_it_runs(tiny_model_dir, monkeypatch) -> None:
    """A 600-token prompt prefilled in chunks of 64: after each prefill step the request's index holds the
    prompt up to the chunk's end, so its first decode step indexes only its first token; outputs equal
    speculation off."""
    model = tiny_model_dir("llama")
    prompt = _text(3, 20)[:600]
    ref = run_to_completion(make_scheduler(model, chunked_prefill_size=64), [greedy_req("a", prompt, 12)])
    sched = make_scheduler(model, chunked_prefill_size=64, speculative_algorithm="NGRAM")
    synced: list[tuple[int, int]] = []
    real = NgramIndex.sync

    def sync(self, prompt, output, limit=None):
        n = real(self, prompt, output) if limit is None else real(self, prompt, output, limit)
        synced.append((len(prompt) + len(output), n))
        return n

    monkeypatch.setattr(NgramIndex, "sync", sync)
    got = run_to_completion(sched, [greedy_req("a", prompt, 12)])
    assert got["a"]["output_ids"] == ref["a"]["output_ids"]
    chunks = [(end, n) for end, n in synced if n]
    ends = [end for end, _ in chunks[: len(prompt) // 64 + 1]]
    assert ends == [*range(64, len(prompt), 64), len(prompt)]  # the old code indexed nothing before decoding
    assert max(n for _, n in chunks) == 64

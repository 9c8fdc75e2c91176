"""NGRAM drafting's per-request parts (longest match, draft depth) and the CPU kernel-regime cap
that keeps verify steps exact (row_regimes.py)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from radixlm.runtime.quantization import int4_cpu
from radixlm.runtime.quantization.gguf_blocks import AffinePlanes
from radixlm.runtime.speculative.draft_budget import grant
from radixlm.runtime.speculative.ngram import LONG_MATCH, NGRAM_LENGTHS, START_DEPTH, DraftDepth, NgramDrafter, NgramIndex, draft_length
from radixlm.runtime.speculative.row_regimes import kernel_thresholds, max_step_rows


def test_ngram_prefers_the_longest_match_over_a_later_shorter_one() -> None:
    idx = NgramIndex()
    head = [10, 11, 12, 13, 14, 15]
    # 6-gram head at 0..5 followed by 20, 21; its last 4 tokens recur later followed by 30, 31.
    idx.sync(head + [20, 21, 9, 9] + head[2:] + [30, 31, 9], head)
    draft, match = idx.lookup(2)
    assert (draft, match) == ([20, 21], 6)
    idx.sync([1, 2, 3], [4, 1, 2])
    assert idx.lookup(5) == ([3, 4, 1, 2, 3], 2)  # runs into the current token: the loop goes on with period 4


def test_ngram_index_is_incremental() -> None:
    prompt = list(range(100, 140))
    idx = NgramIndex()
    idx.sync(prompt, [])
    before = dict(idx.follow)
    idx.sync(prompt, [7])
    added = {k: v for k, v in idx.follow.items() if before.get(k) != v}
    # only the n-grams ending at the previous last token got their next token (their only occurrence)
    assert added and all(v == len(prompt) for v in added.values())
    assert set(added) == {NgramIndex.key(prompt[-n:]) for n in NGRAM_LENGTHS}


def test_draft_depth_grows_on_full_acceptance_and_falls_on_rejection() -> None:
    d = DraftDepth()
    assert d.depth == START_DEPTH
    d.record(2, 2)
    d.record(4, 4)
    assert d.depth == START_DEPTH + 4
    d.record(6, 1)
    assert d.depth == 2
    d.record(0, 0)  # no drafts: unchanged
    assert d.depth == 2
    assert draft_length(LONG_MATCH, 8, 6) == 6
    assert draft_length(2, 8, 6) == 2  # a short match drafts at most what it matched
    assert draft_length(3, 1, 6) == 1


def test_drafter_drafts_longer_while_a_copy_is_accepted() -> None:
    text = list(range(200, 260))
    drafter = NgramDrafter()
    out: list[int] = text[:LONG_MATCH]
    lengths = []
    while len(out) < 40:
        draft = drafter.propose(1, text + [5], out, 8)
        assert draft == text[len(out) : len(out) + len(draft)]
        lengths.append(len(draft))
        drafter.on_verified(1, len(draft), len(draft))
        out += draft + [text[len(out) + len(draft)]]
    assert lengths[0] == START_DEPTH and lengths[-1] == 8 and lengths == sorted(lengths)
    drafter.forget(1)
    assert not drafter.indexes and not drafter.depths


def test_grant_respects_the_step_limit() -> None:
    assert sum(grant([6], [0.95], 0.01)) == 6
    assert grant([6], [0.95], 0.01, limit=3) == [3]
    assert sum(grant([4, 4, 4], [0.9, 0.9, 0.9], 0.01, limit=5)) == 5
    assert grant([4], [0.9], 0.01, limit=0) == [0]


class _Linear(torch.nn.Module):
    def __init__(self, weight: int4_cpu.Int4PackedWeight) -> None:
        super().__init__()
        self.quantized = weight


def _weight(seed: int = 0) -> int4_cpu.Int4PackedWeight:
    rng = np.random.default_rng(seed)
    n, k = 96, 128
    planes = AffinePlanes(codes=rng.integers(0, 16, (1, n, k), dtype=np.uint8),
                          scales=rng.uniform(0.01, 0.05, (1, n, k // 32)).astype(np.float32),
                          zeros=rng.uniform(-0.05, 0.05, (1, n, k // 32)).astype(np.float32))
    return int4_cpu.Int4PackedWeight(planes, "Q4_1")


@pytest.mark.skipif(not int4_cpu.int4_cpu_kernel_available(), reason="torch without the CPU int4 kernel")
def test_kernel_regimes_of_a_4bit_model_bound_the_verify_rows() -> None:
    w = _weight()
    model = torch.nn.Sequential(_Linear(w))
    thresholds = kernel_thresholds(model)
    assert thresholds and thresholds[0] <= int4_cpu.DEQUANT_MIN_ROWS
    assert kernel_thresholds(torch.nn.Sequential(torch.nn.Linear(4, 4))) == ()
    first = thresholds[0]
    assert max_step_rows(thresholds, 1) == first - 1
    assert max_step_rows(thresholds, first - 1) == first - 1  # a full regime: no drafts fit
    assert max_step_rows((8,), 8) is None and max_step_rows((), 1) is None
    # within a regime a row's result does not depend on the other rows (what the cap relies on)
    x = torch.randn(first + 4, w.in_features)
    ref = w.linear(x[:1])
    for rows in range(2, first):
        assert torch.equal(w.linear(x[:rows])[:1], ref), rows
    if int4_cpu.native_bf16_matmul():  # dense copies: another kernel from the threshold up, rounding differently
        w.keep_dense()
        assert kernel_thresholds(model)[0] == int4_cpu.DENSE_MIN_ROWS
        assert not torch.equal(w.linear(x[: int4_cpu.DENSE_MIN_ROWS])[:1], ref)


@pytest.mark.parametrize("occurrences", [1, 4])
def test_ngram_index_step_by_step_equals_one_sync(occurrences: int) -> None:
    """A decode step's few new tokens take the one-key-at-a-time path, a prompt the shifted-slice zip:
    syncing token by token (and in uneven runs) must index exactly what one sync of everything does."""
    import random

    rng = random.Random(occurrences)
    for _ in range(60):
        prompt = [rng.randrange(5) for _ in range(rng.randrange(1, 40))]
        output = [rng.randrange(5) for _ in range(rng.randrange(1, 70))]
        steps = NgramIndex(occurrences=occurrences)
        pos = 0
        while pos < len(output):
            pos = min(len(output), pos + rng.choice([1, 1, 2, 4, 9, 20]))
            steps.sync(prompt, output[:pos])
        whole = NgramIndex(occurrences=occurrences)
        whole.sync(prompt, output)
        assert (steps.follow, steps.older) == (whole.follow, whole.older)


@pytest.mark.parametrize("occurrences", [1, 4])
def test_warm_indexes_a_backlog_and_drafts_stay_the_same(occurrences: int) -> None:
    """NgramDrafter.warm (called while an overlapped step runs) indexes a prompt ahead of the first
    drafting step, skips a decode step's few tokens, and changes no draft."""
    import random

    rng = random.Random(occurrences)
    block = [rng.randrange(50) for _ in range(24)]
    prompt, output = block * 4, block[:5]
    warmed, cold = NgramDrafter(occurrences), NgramDrafter(occurrences)
    assert warmed.warm(1, prompt, output) == len(prompt) + len(output)
    assert warmed.warm(1, prompt, output + [3, 4]) == 0  # two new tokens: left to propose
    assert len(warmed.indexes[1].tokens) == len(prompt) + len(output)
    for n in range(6, 30):
        out = (block * 2)[:n]
        assert warmed.propose(1, prompt, out, 4) == cold.propose(1, prompt, out, 4)
        tree_w = warmed.propose_tree(1, prompt, out, 3, 6, 2)
        tree_c = cold.propose_tree(1, prompt, out, 3, 6, 2)
        assert (tree_w.tokens, tree_w.parents) == (tree_c.tokens, tree_c.parents)
    assert (warmed.indexes[1].follow, warmed.indexes[1].older) == (cold.indexes[1].follow, cold.indexes[1].older)


def test_warm_stops_at_its_time_cap_after_one_request(monkeypatch) -> None:
    """SpecDecoder.warm indexes up to WARM_TOKENS a step but no longer than WARM_S (host time under a large
    batch's forward is short): with no time left it still indexes one request a step, so the backlog shrinks."""
    from radixlm.runtime.request import Req
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.speculative import spec_decoder

    spec = object.__new__(spec_decoder.SpecDecoder)  # warm reads only the drafter, the draft model and the payoff
    spec.model, spec.drafter, spec.payoff, spec.lazy_warm = None, NgramDrafter(1), None, True  # (no payoff: every step)
    reqs = [Req(str(i), [i + 1, 7, 8, 9] * 20, SamplingParams(), 0) for i in range(4)]  # 80 tokens each
    monkeypatch.setattr(spec_decoder, "WARM_S", 60.0)  # (a loaded machine must not stop it early here)
    spec.warm(reqs)
    assert len(spec.drafter.indexes) == 4  # 256 tokens: within WARM_TOKENS and the time cap
    monkeypatch.setattr(spec_decoder, "WARM_S", 0.0)
    spec.drafter = NgramDrafter(1)
    for step in range(1, 5):
        spec.warm(reqs)
        assert len(spec.drafter.indexes) == step  # one request a step, none skipped
    assert all(len(index.tokens) == 80 for index in spec.drafter.indexes.values())
    # outputs: left to `propose` while a request is at most WARM_MIN_BEHIND tokens behind, then caught up
    monkeypatch.setattr(spec_decoder, "WARM_S", 60.0)
    reqs[0].output_ids.extend([5] * spec_decoder.WARM_MIN_BEHIND)
    reqs[1].output_ids.extend([5] * (spec_decoder.WARM_MIN_BEHIND + 1))
    spec.warm(reqs)
    assert [len(spec.drafter.indexes[id(r)].tokens) for r in reqs] == [80, 80 + spec_decoder.WARM_MIN_BEHIND + 1, 80, 80]


def test_index_keeps_nothing_the_cyclic_collector_tracks() -> None:
    """A 512-token prompt indexed: its ~3,500 keys are ints, not tuples the collector tracks (64 prompts
    indexed while decoding at batch 64 triggered ~65 extra collections a run on the H200)."""
    import gc
    import random

    rng = random.Random(0)
    prompt = [rng.randrange(1000, 120000) for _ in range(64)] * 8
    idx = NgramIndex()
    gc.disable()
    try:
        before = gc.get_count()[0]
        idx.sync(prompt, [])
        grown = gc.get_count()[0] - before
    finally:
        gc.enable()
    assert len(idx.follow) > 400 and not any(gc.is_tracked(k) for k in idx.follow)
    assert grown < 50
    assert idx.lookup(4) == (prompt[:4], 16)  # the block repeats: its start follows its end

"""Batch 1 on a GPU: fewer plain steps (spec9). With spec_decoder.SHORT_MATCH_ROWS a request whose text ends in no
n-gram of 2+ tokens seen before drafts after a single matching token; with COPY_SOURCE_ROWS one with no match at all
goes on copying from its last chain's source (copy_source.py). Off by default until the GPU A/B; outputs equal
speculation off either way."""
from __future__ import annotations

import pytest

from radixlm.benchmarks.spec_ceiling import GPU_BATCH1_ARMS, gpu_batch1_arms, overlap_steps, priced_batch1
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.speculative import spec_decoder
from radixlm.runtime.speculative.copy_source import CopySources
from radixlm.runtime.speculative.ngram import NGRAM_LENGTHS, SHORT_LENGTHS, NgramDrafter, NgramIndex
from tests.runtime.helpers import make_scheduler, run_to_completion
from tests.speculative.test_payoff_replay import block_prompts, requests, timed_run, vocab_of
from tests.speculative.test_spec_scheduler import assert_same, copy_prompts, run_checked
from tests.speculative.test_verify_ahead import loop_prompts


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def test_a_single_matching_token_drafts_only_where_allowed() -> None:
    """Text ending in a token seen once before, not its 2-gram: the default drafter finds nothing; a `short` drafter
    with min_match 1 drafts what followed that token (one draft: a short match drafts at most what it matched, its
    depth floored or not); a drafter not built `short` indexes no single tokens (its index costs what it did)."""
    prompt = [5, 6, 7, 8, 9, 10, 11, 12]
    out = [40, 7]  # (40, 7) occurred nowhere; 7 did, followed by 8
    plain = NgramDrafter()
    plain.min_match = 1  # (not built short: no 1-grams to find)
    assert plain.propose(1, prompt, out, 4) == []
    assert plain.indexes[1].lengths == NGRAM_LENGTHS
    short = NgramDrafter(short=True)
    assert short.propose(1, prompt, out, 4) == []  # min_match 2 (a step outside SHORT_MATCH_ROWS)
    short.min_match = 1
    assert short.propose(1, prompt, out, 4) == [8]
    short.min_depth = 4
    assert short.propose(1, prompt, out, 4) == [8]
    assert short.indexes[1].lengths == SHORT_LENGTHS
    short.deep_short = True  # (SHORT_DEPTH_ROWS: a short match drafts as deep as a long one)
    assert short.propose(1, prompt, out, 4) == [8, 9, 10, 11]
    assert short.guess_after(1, prompt, [40], [7], 5) == [8, 9, 10, 11, 12]
    short.deep_short = False
    # a longer match still wins, and the ahead paths (verify_ahead.py) read single tokens as propose does
    assert short.propose(2, prompt, [9, 10], 4) == [11, 12]  # (a 2-token match: two drafts)
    assert short.guess_after(1, prompt, [40], [7], 3) == [8, 9]
    assert short.propose_after(1, prompt, [40], [7], 1, 4) == [8]
    idx = NgramIndex(lengths=SHORT_LENGTHS)
    idx.sync(prompt, out)
    assert idx.lookup(3, min_match=1) == ([8, 9, 10], 1) and idx.lookup(3) == ([], 0)


def test_copy_source_goes_on_after_a_substitution() -> None:
    """A chain copied from position s, its third draft replaced by the target (a substitution): no n-gram matches
    the new text's end, and the resumed chain reads the source from the position after the replaced token; a
    resumed chain with nothing accepted ends the copy."""
    src = list(range(100, 130))
    prompt = [1, 2] + src + [3, 4]
    drafter = NgramDrafter()
    drafter.min_depth, drafter.follow_source = 4, True
    out = src[:5]  # copying src: a 5-token match
    draft = drafter.propose(1, prompt, out, 4)
    assert draft == src[5:9]
    drafter.on_verified(1, 4, 2)  # src[5], src[6] accepted; the target emitted 77 for src[7]
    out = out + src[5:7] + [77]
    assert drafter.propose(1, prompt, out, 4) == src[8:12]  # (without the source: nothing matches (src[6], 77))
    off = NgramDrafter()
    off.min_depth = 4
    assert off.propose(1, prompt, out, 4) == []
    # the resumed chain rejected at once (the text went elsewhere): the copy is over
    drafter.on_verified(1, 4, 0)
    assert drafter.propose(1, prompt, out + [78], 4) == []
    # a loop: past the source's end, positions wrap with the chain's period
    sources = CopySources()
    sources.drafted(7, start=10, end=13, resumed=False)  # period 3
    assert [sources.resume(7, total) for total in (13, 14, 15, 16, 17)] == [-1, 11, 12, 10, 11]
    sources.verified(7, 0)
    assert sources.resume(7, 14) == 11  # one miss of a matched chain keeps it ...
    sources.verified(7, 0)
    assert sources.resume(7, 14) == -1  # ... two in a row end it
    drafter.forget(1)
    assert not drafter.sources.sources


def test_spec_decoder_sets_the_drafter_per_step(tiny, monkeypatch) -> None:
    """Off by default; on, only for chains with the overlap schedule and steps of up to SHORT_MATCH_ROWS /
    COPY_SOURCE_ROWS / SHORT_DEPTH_ROWS rows."""
    assert spec_decoder.SHORT_MATCH_ROWS == spec_decoder.COPY_SOURCE_ROWS == spec_decoder.SHORT_DEPTH_ROWS == 0
    spec = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True).spec
    spec.begin_step(0.0, 0, 1)
    d = spec.drafter
    assert (d.min_match, d.follow_source, d.deep_short, d.lengths) == (2, False, False, NGRAM_LENGTHS)
    for name in ("SHORT_MATCH_ROWS", "COPY_SOURCE_ROWS", "SHORT_DEPTH_ROWS"):
        monkeypatch.setattr(spec_decoder, name, 1)
    spec = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True).spec
    assert spec.drafter.lengths == SHORT_LENGTHS
    spec.begin_step(0.0, 0, 1)
    d = spec.drafter
    assert (d.min_match, d.follow_source, d.deep_short) == (1, True, True)
    spec.begin_step(0.0, 0, 2)
    assert (d.min_match, d.follow_source, d.deep_short) == (2, False, False)
    cpu = make_scheduler(tiny, speculative_algorithm="NGRAM").spec  # no overlap (the CPU): never
    cpu.begin_step(0.0, 0, 1)
    assert (cpu.drafter.min_match, cpu.drafter.follow_source, cpu.drafter.deep_short) == (2, False, False)


@pytest.mark.parametrize("rows", [(1, 0), (1, 1)])
def test_batch_1_fewer_plain_steps_same_outputs(tiny, monkeypatch, rows) -> None:
    """Batch 1 with the overlap schedule (as on a GPU) on the repeated block the tiny model loops on: with single-token
    matches (and copy sources) fewer decode steps run without drafts than with the defaults, outputs equal
    speculation off, and no KV is left held."""
    reqs = requests(block_prompts(vocab_of(tiny), 3, seed=6), 96)
    _, ref, _ = timed_run(tiny, reqs, False, one_at_a_time=True, overlap=True)
    plain = {}
    for short, source in ((0, 0), rows):
        monkeypatch.setattr(spec_decoder, "SHORT_MATCH_ROWS", short)
        monkeypatch.setattr(spec_decoder, "COPY_SOURCE_ROWS", source)
        _, got, sched = timed_run(tiny, reqs, True, one_at_a_time=True, overlap=True)
        assert got == ref
        assert sched.kv_pool.available() + sched.cache.evictable_size() == sched.kv_pool.size
        plain[short, source] = sched.stats["decode_steps"] - sched.spec.verify_steps
    assert plain[rows] < plain[0, 0], plain


def test_replay_accounts_for_every_token() -> None:
    """spec_ceiling's batch-1 replay: plain steps and verify steps emit exactly the output after its first token; a
    text that revisits single tokens gets fewer plain steps with them."""
    prompt = list(range(1000, 1064)) * 2
    hubs = [7, 8, 9]
    output = []
    for i in range(60):  # hub tokens, each followed by the same token, between fresh ones
        output += [hubs[i % 3], 50 + hubs[i % 3], 2000 + i]
    arms = gpu_batch1_arms([(prompt, output)])
    for name, arm in arms.items():
        run = arm["runs"][0]
        steps = overlap_steps(prompt, output, 4, *GPU_BATCH1_ARMS[name])
        assert run["plain_steps"] + run["verify_steps"] + run["accepted"] == len(output) - 1
        assert sum(a + 1 if d else 1 for d, a in steps) == len(output) - 1
    assert arms["short"]["runs"][0]["plain_steps"] < arms["default"]["runs"][0]["plain_steps"]
    assert priced_batch1([(0, 0)] * 9, 10)["speedup"] < 1.0  # spec on's plain steps and prefill cost more than off's


def test_benchmark_arms_run_the_settings(tiny) -> None:
    """speculative.py --short-ab's arms (compare's variants "short", "source", "shortsrc") each run spec on with their
    drafter settings beside the default, outputs identical to spec off."""
    from radixlm.benchmarks.speculative import SHORT_ARMS, compare

    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_total_tokens=16384)
    sched.spec.payoff = None  # (every step may draft: the arms' drafters decide)
    cell = compare(sched, block_prompts(vocab_of(tiny), 2, seed=6), 1, 64, True, 1, variants=SHORT_ARMS)
    assert cell["identical"] and all(cell[f"identical_{name}"] for name in SHORT_ARMS), cell
    verify = {name: sum(r["verify_steps"] for r in cell[key]) for name, key in
              (("default", "spec_runs"), ("short", "spec_runs_short"), ("shortsrc", "spec_runs_shortsrc"))}
    assert verify["shortsrc"] > verify["default"], verify  # more of the steps verify drafts


@pytest.mark.parametrize("running", [1, 2])
def test_kv_exact_and_tree_clean_with_both_on(tiny, monkeypatch, running) -> None:
    """All three on, the overlap schedule (verify steps launched ahead), loop and copy prompts, greedy and seeded sampling,
    one or two rows at a time: outputs equal speculation off, the KV pool's accounting holds after every step and
    the radix tree only ever holds prefixes of prompt + output (run_checked)."""
    for name in ("SHORT_MATCH_ROWS", "COPY_SOURCE_ROWS", "SHORT_DEPTH_ROWS"):
        monkeypatch.setattr(spec_decoder, name, 1)
    prompts = loop_prompts(3) + copy_prompts(tiny, 2) + block_prompts(vocab_of(tiny), 1, seed=6)
    reqs = [TokenizedGenerateReq(rid=f"q{i}", input_ids=ids, params=SamplingParams(
        max_new_tokens=30 + 3 * i, temperature=0.0 if i % 3 else 0.5, seed=3 + i)) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True,
                           max_running_requests=running, speculative_num_steps=4)
    assert sched.spec.short_match_rows == sched.spec.copy_source_rows == sched.spec.short_depth_rows == 1
    assert_same(run_checked(sched, reqs), ref)
    assert sched.spec.verify_steps > 0 and sched.ahead is None

"""Cascade attention's planner (groups from the radix tree, the cost rule) and the scheduler using it.

The scheduler test runs a tiny random model on the CPU with the torch backend, which computes the
cascade arithmetic itself (prefix once per group, log-sum-exp merge): greedy outputs must equal
those of plain decode attention. tests/kernels/test_kernels_cascade.py does the same with the
Triton kernels (under the interpreter there, which must be on before triton is imported).
"""
from __future__ import annotations

import random

import pytest
import torch

from radixlm.kernels.cascade_layout import CascadeShape
from radixlm.radix.radix_cache import RadixCache
from radixlm.runtime.cascade import ALWAYS, CascadeCostRule, CascadePlanner
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion

SHAPE = CascadeShape(rows_per_task=4, max_tasks=16, target_tasks=8, block_n=16)


def planner(rule: CascadeCostRule = ALWAYS) -> CascadePlanner:
    return CascadePlanner(SHAPE, kv_bytes_per_token=4096, row_bytes=65536, rule=rule)


def tree_nodes(seqs: list[list[int]]) -> list[object]:
    """Insert each sequence into a radix tree, then return the node covering each (as a request's last_node)."""
    tree = RadixCache(free_slots=lambda _: None)
    slot = 1
    for s in seqs:
        tree.insert(s, torch.arange(slot, slot + len(s)))
        slot += len(s)
    return [tree.match_prefix(s).last_node for s in seqs]


def test_groups_follow_the_shared_prefix():
    p = list(range(100, 400))  # 300 shared tokens
    seqs = [p + [1, 2, 3], p + [4, 5], p + [6], list(range(1000, 1050))]
    nodes = tree_nodes(seqs)
    groups = planner().groups(nodes, [len(s) + 1 for s in seqs])
    assert [(g.rows, g.prefix_len) for g in groups] == [((0, 1, 2), 300)]


def test_deeper_smaller_groups_win_when_they_save_more():
    root = list(range(100, 110))  # 10 tokens shared by all four
    a, b = root + list(range(200, 500)), root + list(range(600, 900))  # two 310-token prefixes
    seqs = [a + [1], a + [2], b + [3], b + [4]]
    groups = planner().groups(tree_nodes(seqs), [len(s) + 1 for s in seqs])
    assert sorted((g.rows, g.prefix_len) for g in groups) == [((0, 1), 310), ((2, 3), 310)]
    # one group at the 10-token root would save 3 x 10 = 30 < 2 x 310


def test_prefix_never_covers_a_rows_new_token_and_none_nodes_are_alone():
    p = list(range(100, 140))
    seqs = [p + [1], p + [2]]
    nodes = tree_nodes(seqs) + [None]
    groups = planner().groups(nodes, [30, 50, 10])  # row 0 has only 30 tokens of KV: prefix capped at 29
    assert [(g.rows, g.prefix_len) for g in groups] == [((0, 1), 29)]


def test_cost_rule_declines_small_savings():
    p = list(range(100, 164))  # 64 shared tokens
    seqs = [p + [1], p + [2]]
    nodes = tree_nodes(seqs)
    lens = [len(s) + 1 for s in seqs]
    assert planner(ALWAYS).plan(nodes, [5, 6], lens) is not None
    strict = CascadeCostRule()  # the default rule: 64 saved token reads do not pay for a launch
    assert planner(strict).plan(nodes, [5, 6], lens) is None
    big = list(range(100, 4196))
    many = [big + [i] for i in range(32)]
    layout = planner(strict).plan(tree_nodes(many), list(range(32)), [len(s) + 1 for s in many])
    assert layout is not None and layout.groups[0].rows == tuple(range(32))


# H200, Llama-8B heads (Hq 32, Hkv 8, D 128), bf16, CUDA-graph replays (benchmarks/cascade_attention.py,
# 2026-12-02): (batch, rows per group, shared prefix, own suffix, cascade speedup over plain decode).
H200_TABLE = [
    (64, 32, 1024, 64, 1.39), (64, 32, 1024, 256, 1.24), (64, 32, 1024, 512, 1.15), (64, 32, 512, 64, 1.02),
    (64, 32, 512, 256, 0.97), (64, 32, 512, 512, 0.97), (64, 32, 128, 64, 0.69), (64, 32, 128, 256, 0.82),
    (64, 32, 128, 512, 0.85), (64, 8, 1024, 64, 1.15), (64, 8, 1024, 256, 1.09), (64, 8, 1024, 512, 1.03),
    (64, 8, 512, 64, 1.01), (64, 8, 512, 256, 0.95), (64, 8, 512, 512, 0.93), (64, 8, 128, 64, 0.7),
    (64, 8, 128, 256, 0.83), (64, 8, 128, 512, 0.85), (64, 2, 1024, 64, 0.77), (64, 2, 1024, 256, 0.79),
    (64, 2, 1024, 512, 0.8), (64, 2, 512, 64, 0.7), (64, 2, 512, 256, 0.73), (64, 2, 512, 512, 0.76),
    (64, 2, 128, 64, 0.68), (64, 2, 128, 256, 0.78), (64, 2, 128, 512, 0.82), (512, 32, 1024, 96, 1.74),
    (256, 32, 1024, 96, 1.63), (64, 64, 512, 128, 1.04), (16, 8, 1024, 64, 0.97), (8, 2, 512, 64, 0.66),
    (128, 2, 1024, 64, 0.78), (256, 4, 256, 128, 0.71),
]
H200_SHAPE = CascadeShape(rows_per_task=16, max_tasks=2 * 66, target_tasks=66, block_n=64)  # 132 SMs, 8 KV heads


def table_batch(bsz: int, g: int, prefix: int, suffix: int) -> tuple[list[object], list[int]]:
    """Rows in groups of g sharing `prefix` tokens, each with its own `suffix`: tree nodes and seq lens."""
    seqs = []
    for r in range(bsz):
        base = 1_000_000 * (r // g + 1)
        seqs.append(list(range(base, base + prefix)) + list(range(base + 500_000 + r * 1000, base + 500_000 + r * 1000 + suffix)))
    return tree_nodes(seqs), [len(s) + 1 for s in seqs]


def test_default_rule_never_picks_a_losing_h200_shape():
    """The default rule on every row of the H200 kernel table: cascade only where it measured faster
    (plain where it won narrowly is allowed), and cascade on the large-batch shapes that won big."""
    h200 = CascadePlanner(H200_SHAPE, kv_bytes_per_token=2 * 8 * 128 * 2, row_bytes=3 * 2 * 32 * 128 * 4, rule=CascadeCostRule())
    chosen = []
    for bsz, g, prefix, suffix, speedup in H200_TABLE:
        nodes, lens = table_batch(bsz, g, prefix, suffix)
        layout = h200.plan(nodes, list(range(bsz)), lens)
        if layout is not None:
            assert speedup >= 1.0, f"cascade chosen where it measured {speedup}x: {(bsz, g, prefix, suffix)}"
            chosen.append((bsz, g))
    assert (512, 32) in chosen and (256, 32) in chosen


def test_default_rule_forms_no_group_below_eight_rows():
    nodes, lens = table_batch(512, 4, 1024, 64)  # 128 groups of 4: many saved bytes, but small groups lost
    default = CascadePlanner(H200_SHAPE, kv_bytes_per_token=4096, row_bytes=98304, rule=CascadeCostRule())
    assert default.groups(nodes, lens) == [] and default.plan(nodes, list(range(512)), lens) is None
    assert planner(ALWAYS).groups(nodes, lens)  # the test rule still groups them


def test_cascade_attention_is_auto_by_default():
    from radixlm.runtime.server_args import ServerArgs

    assert ServerArgs(model_path="x").cascade_attention == "auto"


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


def shared_workload(seed: int, vocab: int, groups: int = 3, max_new: tuple[int, int] = (4, 10)) -> list:
    """`groups` sets of 2-4 requests sharing a 40-90 token prefix, and one request alone."""
    rng = random.Random(seed)
    reqs = []
    for g in range(groups):
        prefix = [rng.randrange(3, vocab) for _ in range(rng.randint(40, 90))]
        for i in range(rng.randint(2, 4)):
            ids = prefix + [rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))]
            reqs.append(greedy_req(f"g{g}-{i}", ids, rng.randint(*max_new)))
    reqs.append(greedy_req("alone", [rng.randrange(3, vocab) for _ in range(30)], 6))
    return reqs


def test_scheduler_cascade_equals_plain(model_dir):
    """Torch backend: the reference's cascade arithmetic (tests/kernels runs the Triton kernels so)."""
    torch.set_num_threads(1)
    plain = make_scheduler(model_dir, cascade_attention="off")
    want = run_to_completion(plain, shared_workload(3, plain.runner.vocab_size))
    sched = make_scheduler(model_dir, cascade_attention="on")
    assert sched.runner.cascade is not None
    sched.runner.cascade.rule = ALWAYS  # the tiny model's prefixes are far below the GPU rule's threshold
    got = run_to_completion(sched, shared_workload(3, plain.runner.vocab_size))
    assert sched.stats["cascade_decode_steps"] > 0
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in want.items()}
    assert_pool_idle(sched)


def test_cascade_off_without_radix_cache(model_dir):
    sched = make_scheduler(model_dir, cascade_attention="on", disable_radix_cache=True)
    assert sched.runner.cascade is None


def test_unshared_prompts_take_the_fast_exit_and_shared_leaves_group():
    seqs = [list(range(i * 100, i * 100 + 50)) for i in range(1, 6)]
    nodes = tree_nodes(seqs)
    assert planner().plan(nodes, list(range(5)), [60] * 5) is None
    same = [nodes[0], nodes[0], nodes[1]]  # n > 1 samples: two rows on one node (no parent below the root)
    layout = planner().plan(same, [7, 8, 9], [60, 60, 60])
    assert layout is not None and [(g.rows, g.prefix_len) for g in layout.groups] == [((0, 1), 50)]


def test_cascade_with_speculative_verify_rows(model_dir):
    """NGRAM verify rows (one decode row per draft token, each ending at its token) group with
    their request's prefix like plain rows: greedy outputs equal plain decoding without speculation."""
    torch.set_num_threads(1)
    rng = random.Random(5)
    reqs = []
    for g in range(2):
        motif = [rng.randrange(3, 200) for _ in range(8)]
        prefix = motif * 8  # repetitive: the n-gram drafter finds continuations
        for i in range(3):
            reqs.append(greedy_req(f"g{g}-{i}", prefix + motif[: 2 + i], 12))
    want = run_to_completion(make_scheduler(model_dir, cascade_attention="off"), reqs)
    sched = make_scheduler(model_dir, cascade_attention="on", speculative_algorithm="NGRAM")
    sched.runner.cascade.rule = ALWAYS
    got = run_to_completion(sched, reqs)
    assert sched.stats["cascade_decode_steps"] > 0 and sched.info()["spec_accepted_tokens"] > 0
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in want.items()}
    assert_pool_idle(sched)

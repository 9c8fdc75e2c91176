"""Cascade (shared-prefix) decode attention against its torch reference and plain decode attention."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels.attention_ref import cascade_decode_attention_ref, decode_attention_ref
from radixlm.kernels.cascade_layout import CascadeGroup, CascadeShape, build_cascade_layout, empty_layout

HEAD_DIM = 32
NUM_KV_HEADS = 2


def shared_pool(make_pool, seq_lens: list[int], groups: list[tuple[list[int], int]], group: int, dtype, device):
    """A pool whose grouped rows point at their group leader's slots for the first prefix_len positions."""
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, dtype, device)
    for rows, prefix in groups:
        lead = pool.rows[rows[0]]
        for r in rows[1:]:
            pool.req_to_token[pool.rows[r], :prefix] = pool.req_to_token[lead, :prefix]
    q = torch.randn(len(seq_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=device)
    return pool, q


CASES = [
    # (GQA group, dtype, seq_lens, groups [(rows, prefix_len)], decode splits)
    (4, torch.float32, [40, 37, 50, 12, 33], [([0, 1, 2], 30)], 2),  # one group, an ungrouped row
    (4, torch.float32, [40, 37, 50, 12, 33, 21], [([0, 2], 36), ([1, 4, 5], 20)], 1),  # two groups
    (3, torch.float32, [70, 65, 66, 9], [([0, 1, 2], 64)], 3),  # suffixes of 1-6 tokens, prefix in 4 blocks
    (3, torch.float32, [70, 65, 66, 9], [([0, 1, 2], 64)], 1),  # the same with the merge in the suffix pass
    (1, torch.float32, [20] * 9, [(list(range(9)), 19)], 2),  # 9 rows > rows per task: two items
    (4, torch.bfloat16, [40, 37, 50, 12], [([0, 1, 3], 11)], 2),
]


@pytest.mark.parametrize(("group", "dtype", "seq_lens", "groups", "splits"), CASES)
def test_cascade_matches_refs(device, make_pool, assert_close, group, dtype, seq_lens, groups, splits):
    from radixlm.kernels.decode_attention import decode_attention

    pool, q = shared_pool(make_pool, seq_lens, groups, group, dtype, device)
    idx = torch.tensor(pool.rows, device=device)
    lens = torch.tensor(seq_lens, device=device)
    scale = HEAD_DIM**-0.5
    shape = CascadeShape(rows_per_task=16 // group, max_tasks=12, target_tasks=6, block_n=16)
    layout = build_cascade_layout([CascadeGroup(tuple(r), p) for r, p in groups], pool.rows, shape, min_split=16)
    assert len(layout.groups) == len(groups)
    out = torch.full(q.shape, float("nan"), dtype=dtype, device=device)
    decode_attention(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale,
                     num_kv_splits=splits, out=out, cascade=layout.to(device))
    ref = cascade_decode_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens,
                                       scale, groups)
    plain = decode_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale)
    assert_close(ref, plain, dtype)  # the reference's cascade arithmetic is the same function
    assert_close(out, ref, dtype)
    assert_close(out, plain, dtype)


def test_empty_layout_is_plain_decode(device, make_pool, assert_close):
    """A layout with no groups (what CUDA graphs are captured with) gives plain decode attention."""
    from radixlm.kernels.decode_attention import decode_attention

    seq_lens = [17, 3, 40]
    pool, q = shared_pool(make_pool, seq_lens, [], 2, torch.float32, device)
    idx = torch.tensor(pool.rows, device=device)
    lens = torch.tensor(seq_lens, device=device)
    shape = CascadeShape(rows_per_task=8, max_tasks=4, target_tasks=2, block_n=16)
    out = decode_attention(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, 0.2, num_kv_splits=2,
                           cascade=empty_layout(len(seq_lens), shape, device))
    assert_close(out, decode_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, 0.2),
                 torch.float32)


def test_layout_splits_long_prefixes_and_respects_capacity():
    shape = CascadeShape(rows_per_task=4, max_tasks=6, target_tasks=4, block_n=16)
    rows = list(range(20))
    groups = [CascadeGroup((0, 1, 2, 3, 4), 1000), CascadeGroup((5, 6), 40), CascadeGroup(tuple(range(7, 20)), 64)]
    layout = build_cascade_layout(groups, [100 + r for r in rows], shape, min_split=16)
    # group 0: 2 items; group 1: 1 item; group 2 would need 4 more items (> 6 tasks): left out
    assert [g.rows for g in layout.groups] == [groups[0].rows, groups[1].rows]
    tasks = layout.tasks.tolist()
    used = [t for t in tasks if t[1] > 0]
    assert len(used) <= shape.max_tasks
    for g in layout.groups:  # every grouped row's prefix is covered exactly once per item, in whole tasks
        for r in g.rows:
            assert layout.kv_start[r] == g.prefix_len
            mine = [t for t in used if r in layout.rows[t[0]: t[0] + t[1]].tolist()]
            assert sorted((t[2], t[3]) for t in mine)[0][0] == 0
            assert sum(t[3] - t[2] for t in mine) == g.prefix_len
            assert sorted(t[4] for t in mine) == list(range(int(layout.prefix_splits[r])))
            assert all(t[5] == 100 + g.rows[0] for t in mine)
    assert int(layout.prefix_splits[7]) == 0 and int(layout.kv_start[7]) == 0


def test_h200_layouts_balance_for_two_programs_per_sm(monkeypatch):
    """On the H200 (132 SMs, Llama-8B heads) the measured best prefix splits at (e)'s decode shape:
    one per group at 512 rows (32 tasks, 256 programs), two at 256 rows (32 tasks); room stays 132 tasks."""
    from types import SimpleNamespace

    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device: SimpleNamespace(multi_processor_count=132))
    shape = CascadeShape.for_device(32, 8, torch.device("cuda"))
    assert (shape.rows_per_task, shape.target_tasks, shape.max_tasks) == (16, 33, 132)
    for bsz, splits in ((512, 1), (256, 2)):
        groups = [CascadeGroup(tuple(range(i, i + 32)), 1024) for i in range(0, bsz, 32)]
        layout = build_cascade_layout(groups, list(range(bsz)), shape)
        assert int(layout.prefix_splits.max()) == splits == int(layout.prefix_splits.min())
        assert int((layout.tasks[:, 1] > 0).sum()) == 32


def test_scheduler_with_triton_cascade_equals_plain(tiny_model_dir):
    """The scheduler's decode steps through the Triton kernels with cascade layouts built from its
    radix tree (packed to the device as int64, as on a GPU): greedy outputs equal plain decoding."""
    import dataclasses

    from radixlm.kernels.api import decode_attention_triton
    from radixlm.runtime.cascade import ALWAYS
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion
    from tests.runtime.test_cascade import shared_workload

    def triton_decode(sched):  # Triton decode attention in an otherwise torch model (fast on a CPU)
        ops = dataclasses.replace(sched.runner.attn_backend.ops, decode_attention=decode_attention_triton)
        sched.runner.attn_backend.ops = sched.runner.model.ops = ops
        return sched

    model_dir = tiny_model_dir("llama")
    torch.set_num_threads(1)
    # Two groups and a lone row, 2-4 decode steps: the interpreter runs every kernel program in Python
    # (three groups and 3-9 steps took 28 s on a 2-core CI machine for the same branches).
    plain = triton_decode(make_scheduler(model_dir, cascade_attention="off"))
    want = run_to_completion(plain, shared_workload(4, plain.runner.vocab_size, groups=2, max_new=(3, 5)))
    sched = triton_decode(make_scheduler(model_dir, cascade_attention="on"))
    sched.runner.cascade.rule = ALWAYS
    got = run_to_completion(sched, shared_workload(4, plain.runner.vocab_size, groups=2, max_new=(3, 5)))
    assert sched.stats["cascade_decode_steps"] > 0
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in want.items()}
    assert_pool_idle(sched)


@pytest.mark.parametrize("splits", [2, 1])  # 1: the merge inside the suffix pass weighs V-scaled partials
def test_cascade_over_fp8_pool(device, make_pool, assert_close, splits):
    """An FP8 pool's scales fold into the prefix stage as into decode: cascade equals plain decode."""
    from radixlm.kernels import ops_ref
    from radixlm.kernels.decode_attention import decode_attention

    seq_lens, groups = [40, 37, 50, 12], [([0, 1, 2], 30)]
    pool, q = shared_pool(make_pool, seq_lens, groups, 2, torch.float32, device)
    slots = torch.arange(pool.k_buffer.shape[0], device=device)
    k8 = torch.empty(pool.k_buffer.shape, dtype=torch.float8_e4m3fn, device=device)
    v8 = torch.empty_like(k8)
    ops_ref.store_kv_ref(k8, v8, slots, pool.k_buffer, pool.v_buffer, 0.5, 0.25)
    idx, lens = torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device)
    shape = CascadeShape(rows_per_task=8, max_tasks=8, target_tasks=4, block_n=16)
    layout = build_cascade_layout([CascadeGroup((0, 1, 2), 30)], pool.rows, shape, min_split=16).to(device)
    got = decode_attention(q, k8, v8, pool.req_to_token, idx, lens, 0.2, num_kv_splits=splits, k_scale=0.5, v_scale=0.25,
                           cascade=layout)
    plain = decode_attention_ref(q, k8, v8, pool.req_to_token, idx, lens, 0.2, k_scale=0.5, v_scale=0.25)
    ref = cascade_decode_attention_ref(q, k8, v8, pool.req_to_token, pool.rows, seq_lens, 0.2, groups,
                                       k_scale=0.5, v_scale=0.25)
    assert_close(ref, plain, torch.float32)
    assert_close(got, plain, torch.float32)

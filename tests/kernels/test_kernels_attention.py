"""Triton paged attention against the torch references (small shapes: the CPU interpreter is slow)."""
from __future__ import annotations

import pytest
import torch

from radixlm.kernels.attention_ref import decode_attention_ref, extend_attention_ref

HEAD_DIM = 64
NUM_KV_HEADS = 2


def _poisoned(shape: tuple[int, ...], dtype: torch.dtype, device: str) -> torch.Tensor:
    return torch.full(shape, float("nan"), dtype=dtype, device=device)


@pytest.mark.parametrize(
    ("group", "dtype", "splits", "seq_lens"),
    [
        (1, torch.float32, 1, [37, 1, 16]),
        (3, torch.float32, 3, [37, 1, 16]),
        (3, torch.float32, 4, [40, 9]),  # one split of the long request is empty
        (3, torch.float32, None, [33]),  # default split count
        (4, torch.float32, 2, [1, 40, 25]),  # Llama's group size
        (3, torch.bfloat16, 2, [29, 40, 3]),
        (3, torch.bfloat16, 1, [12, 40]),  # one split: stage 1 writes the output itself
    ],
)
def test_decode_matches_ref(device, make_pool, assert_close, group, dtype, splits, seq_lens):
    from radixlm.kernels.decode_attention import decode_attention

    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, dtype, device)
    bsz = len(seq_lens)
    q = torch.randn(bsz, NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=device)
    idx = torch.tensor(pool.rows, device=device)
    lens = torch.tensor(seq_lens, device=device)
    scale = HEAD_DIM**-0.5
    out = _poisoned(tuple(q.shape), dtype, device)
    got = decode_attention(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale, num_kv_splits=splits, out=out
    )
    assert got is out
    ref = decode_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, scale)
    assert_close(out, ref, dtype)


def test_decode_head_dim_80_masked(device, make_pool, assert_close):
    """A head_dim that is not a power of two runs through masked 128-wide tiles."""
    from radixlm.kernels.decode_attention import decode_attention

    seq_lens, d = [21, 6], 80
    pool = make_pool(seq_lens, 1, d, torch.float32, device)
    q = torch.randn(2, 3, d, device=device)
    idx = torch.tensor(pool.rows, device=device)
    lens = torch.tensor(seq_lens, device=device)
    got = decode_attention(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, 0.1, num_kv_splits=2)
    ref = decode_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, 0.1)
    assert_close(got, ref, torch.float32)


@pytest.mark.parametrize(
    ("group", "dtype", "prefix_lens", "extend_lens"),
    [
        (1, torch.float32, [0, 0], [33, 7]),  # plain causal prefill
        (3, torch.float32, [0, 23, 5], [20, 17, 1]),  # cached prefixes, uneven, one single-token extend
        (4, torch.float32, [8, 31], [32, 1]),  # Llama's group size; decode-like single token
        (3, torch.bfloat16, [16, 0], [24, 9]),
    ],
)
def test_extend_matches_ref(device, make_pool, assert_close, group, dtype, prefix_lens, extend_lens):
    from radixlm.kernels.extend_attention import extend_attention

    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, dtype, device)
    num_tokens = sum(extend_lens)
    q = torch.randn(num_tokens, NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=device)
    starts = torch.tensor([sum(extend_lens[:i]) for i in range(len(extend_lens))], device=device)
    scale = HEAD_DIM**-0.5
    out = _poisoned(tuple(q.shape), dtype, device)
    extend_attention(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
        torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device),
        torch.tensor(extend_lens, device=device), starts, scale,
        max_extend_len=max(extend_lens) + 16,  # a loose bound: surplus query blocks must do nothing
        out=out,
    )
    ref = extend_attention_ref(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens, extend_lens, scale
    )
    assert_close(out, ref, dtype)


@pytest.mark.parametrize(
    ("group", "dtype", "prefix_lens", "extend_lens", "heads"),
    [
        (4, torch.float32, [40, 23, 0], [8, 5, 8], 2),  # 2 heads x 8 tokens fill the interpreter's 16 rows
        (4, torch.float32, [37, 0, 50], [4, 3, 1], 4),  # short questions after long cached prefixes
        (2, torch.bfloat16, [33, 18], [6, 2], 2),  # a group of 2: at most 2 heads a tile
        (3, torch.float32, [20, 9], [4, 2], 1),  # 3 heads share no power-of-two tile: one head a tile
    ],
)
def test_extend_packs_the_heads_of_short_extensions(device, make_pool, assert_close, group, dtype, prefix_lens,
                                                    extend_lens, heads):
    """Every extension at most half a tile: the tile holds tokens of several q heads of a GQA group
    (rows: token-major, head-minor), equal to the reference and to one head a tile."""
    from radixlm.kernels import extend_attention as EA

    assert EA.heads_per_tile(16, max(extend_lens), group) == heads
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, dtype, device)
    q = torch.randn(sum(extend_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=device)
    starts = torch.tensor([sum(extend_lens[:i]) for i in range(len(extend_lens))], device=device)
    scale = HEAD_DIM**-0.5
    outs = []
    for pack in (True, False):
        EA.PACK_HEADS = pack
        try:
            out = _poisoned(tuple(q.shape), dtype, device)
            EA.extend_attention(
                q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
                torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device),
                torch.tensor(extend_lens, device=device), starts, scale, max_extend_len=max(extend_lens), out=out)
        finally:
            EA.PACK_HEADS = True
        outs.append(out)
    ref = extend_attention_ref(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens, extend_lens, scale
    )
    assert_close(outs[0], ref, dtype)
    assert_close(outs[0], outs[1], dtype)


def test_packed_heads_with_a_draft_tree(device, make_pool, assert_close):
    """A short draft tree (a verify row in a mixed batch) in a packed tile: its rows keep their
    token's ancestor mask."""
    from radixlm.kernels import extend_attention as EA
    from radixlm.runtime.speculative.draft_tree import DraftTree

    trees = [None, DraftTree([1, 2, 3, 4, 5], [-1, -1, 0, 1, 2])]
    prefix_lens, extend_lens, group = [19, 26], [7, 6], 4
    assert EA.heads_per_tile(16, max(extend_lens), group) == 2
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, torch.float32, device)
    q = torch.randn(sum(extend_lens), NUM_KV_HEADS * group, HEAD_DIM, device=device)
    mask = trees[1].ancestor_mask()
    out = _poisoned(tuple(q.shape), torch.float32, device)
    EA.extend_attention(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
        torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device),
        torch.tensor(extend_lens, device=device), torch.tensor([0, extend_lens[0]], device=device), HEAD_DIM**-0.5,
        max_extend_len=max(extend_lens), out=out, tree_start=torch.tensor([-1, 0], dtype=torch.int64, device=device),
        tree_mask=mask.view(-1).to(torch.int8).to(device))
    ref = extend_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens,
                               extend_lens, HEAD_DIM**-0.5, tree_masks=[None, mask])
    assert_close(out, ref, torch.float32)


def test_heads_per_tile_rule():
    from radixlm.kernels.extend_attention import heads_per_tile

    assert [heads_per_tile(128, n, 4) for n in (1, 32, 33, 64, 65, 128, 1088)] == [4, 4, 2, 2, 1, 1, 1]
    assert heads_per_tile(128, 16, 8) == 8 and heads_per_tile(128, 16, 1) == 1 and heads_per_tile(128, 16, 6) == 2


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_extend_with_draft_tree_masks_matches_ref_and_decode_rows(device, make_pool, assert_close, dtype):
    """Draft trees in an extend batch (speculative decoding, mixed batch): a tree's new tokens see the
    prefix, their ancestors and themselves. Triton == the torch reference; and the reference equals
    what each node computes as a decode row over the prefix + its path (the lanes of a decode step)."""
    from radixlm.kernels.extend_attention import extend_attention
    from radixlm.runtime.speculative.draft_tree import DraftTree

    # request 0: a plain causal extend; 1: a random tree of 20 nodes (crosses the interpreter's
    # 16-token blocks); 2: two branches of two; 3: a chain given as a tree
    rng = torch.Generator().manual_seed(3)
    parents1 = [-1] + [int(torch.randint(-1, i, (1,), generator=rng)) for i in range(1, 20)]
    trees = [None, DraftTree(list(range(20)), parents1), DraftTree([1, 2, 3, 4], [-1, -1, 0, 0]),
             DraftTree.chain([7, 8, 9])]
    prefix_lens = [9, 21, 5, 30]
    extend_lens = [12] + [len(t) + 1 for t in trees[1:]]  # type: ignore[arg-type]
    seq_lens = [p + e for p, e in zip(prefix_lens, extend_lens)]
    group = 2
    pool = make_pool(seq_lens, NUM_KV_HEADS, HEAD_DIM, dtype, device)
    q = torch.randn(sum(extend_lens), NUM_KV_HEADS * group, HEAD_DIM, dtype=dtype, device=device)
    starts = [sum(extend_lens[:i]) for i in range(len(extend_lens))]
    masks = [t.ancestor_mask() if t is not None else None for t in trees]
    tree_start, flat, at = [], [], 0
    for m in masks:
        tree_start.append(at if m is not None else -1)
        if m is not None:
            flat.append(m.view(-1))
            at += m.numel()
    scale = HEAD_DIM**-0.5
    out = _poisoned(tuple(q.shape), dtype, device)
    extend_attention(
        q, pool.k_buffer, pool.v_buffer, pool.req_to_token,
        torch.tensor(pool.rows, device=device), torch.tensor(seq_lens, device=device),
        torch.tensor(extend_lens, device=device), torch.tensor(starts, device=device), scale,
        max_extend_len=max(extend_lens), out=out,
        tree_start=torch.tensor(tree_start, dtype=torch.int64, device=device),
        tree_mask=torch.cat(flat).to(torch.int8).to(device),
    )
    ref = extend_attention_ref(q, pool.k_buffer, pool.v_buffer, pool.req_to_token, pool.rows, seq_lens,
                               extend_lens, scale, tree_masks=masks)
    assert_close(out, ref, dtype)
    # each tree token as a decode row over prefix + its path (lane rows built in spare req_to_token rows)
    r2t = pool.req_to_token.clone()
    for b in (1, 2, 3):
        tree, prefix, row = trees[b], prefix_lens[b], pool.rows[b]
        assert tree is not None
        for node in range(-1, len(tree)):
            path = tree.path(node) if node >= 0 else []
            lane = torch.cat([r2t[row, : prefix + 1], r2t[row, [prefix + 1 + n for n in path]]]) if path else \
                r2t[row, : prefix + 1]
            scratch = r2t.clone()
            scratch[row, : lane.numel()] = lane
            dec = decode_attention_ref(q[starts[b] + node + 1 : starts[b] + node + 2], pool.k_buffer, pool.v_buffer,
                                       scratch, torch.tensor([row], device=device),
                                       torch.tensor([lane.numel()], device=device), scale)
            assert_close(dec, ref[starts[b] + node + 1 : starts[b] + node + 2], dtype)

"""SGMV shrink/expand: the Triton kernels (under TRITON_INTERPRET=1 on a CPU, or on CUDA) against the
torch reference, on small shapes with ragged segments, base-model rows and unused segments; the
one-launch decode kernel (sgmv_fused) too, and where each --lora-kernels value puts the update."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, segment_host, shrink_ref


@pytest.fixture(autouse=True)
def needs_triton() -> None:
    """Interpreted on a CPU: tests/conftest.py sets TRITON_INTERPRET for the session, before triton's import."""
    pytest.importorskip("triton")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_segments_group_tokens_by_slot() -> None:
    order, start, length, slot, host = segment_host(torch.tensor([2, -1, 0, 2, 0, -1, 1]), 4)
    assert order.tolist() == [2, 4, 6, 0, 3]
    assert host == [(0, 0, 2), (1, 2, 1), (2, 3, 2)]
    assert slot.tolist() == [0, 1, 2, -1] and length.tolist() == [2, 1, 2, 0] and start.tolist()[:3] == [0, 2, 3]
    with pytest.raises(ValueError, match="max-loras-per-batch"):
        segment_host(torch.tensor([0, 1, 2]), 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rank,offsets", [(8, [0, 32, 48, 64]), (16, [0, 40]), (4, [0, 24, 48])])
def test_triton_shrink_expand_match_reference(dtype, rank: int, offsets: list[int]) -> None:
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    dev = _device()
    g = torch.Generator().manual_seed(rank)
    slots, k, t = 3, 520, 37  # k > 512: the shrink splits the reduction in two
    pieces = len(offsets) - 1
    a = torch.randn(slots, pieces * rank, k, generator=g).to(dtype)
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dtype)
    x = torch.randn(t, k, generator=g).to(dtype)
    token_slots = torch.randint(-1, slots, (t,), generator=g)
    token_slots[:20] = 1  # one segment longer than a row block
    seg = LoRASegments.build(token_slots, 5, dev)
    y_ref = shrink_ref(x.to(dev), a.to(dev), seg)
    parts = sgmv_shrink(x.to(dev), a.to(dev), seg)
    assert parts.shape == (1, t, pieces * rank), "k = 520: two partial sums over K, added in the launch"
    used = (token_slots >= 0).to(dev)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=5e-2, rtol=2e-2)
    torch.testing.assert_close(parts.sum(0)[used].float(), y_ref[used].float(), **tol)
    out0 = torch.randn(t, offsets[-1], generator=g).to(dtype).to(dev)
    out_ref, out = out0.clone(), out0.clone()
    expand_ref(y_ref, b.to(dev), offsets, rank, out_ref, seg)
    widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
    offsets_dev = torch.tensor(offsets, dtype=torch.int32, device=dev)
    sgmv_expand(y_ref, b.to(dev), offsets_dev, widest, rank, out, seg)
    torch.testing.assert_close(out, out_ref, **tol)
    assert torch.equal(out[~used], out0[~used]), "base-model rows are untouched"
    # The shrink's partial sums straight into the expand (the serving path; y stays float32, so the
    # reference is the float32 one): same result, and the same bits on a second run (fixed
    # reduction order, no atomics).
    exact = out0.float().clone()
    expand_ref(shrink_ref(x.float().to(dev), a.float().to(dev), seg), b.float().to(dev), offsets, rank, exact, seg)
    fused, again = out0.clone(), out0.clone()
    for o in (fused, again):
        sgmv_expand(sgmv_shrink(x.to(dev), a.to(dev), seg), b.to(dev), offsets_dev, widest, rank, o, seg)
    torch.testing.assert_close(fused, exact.to(dtype), **tol)
    assert torch.equal(fused, again)
    assert (out_ref[used] - out0[used]).abs().max() > 1.0, "the update is not empty"


@pytest.mark.parametrize("t,override", [(600, {}), (45, {"block_m": 32, "expand_n": 64, "split_k": 3}),
                                        (9, {"block_m": 16, "expand_n": 16}),
                                        (45, {"block_m": 16, "expand_n": 16, "expand_steps": 2}),
                                        (600, {"expand_n": 16, "expand_steps": 3})])
def test_work_items_cover_every_row_of_many_segments(t: int, override: dict) -> None:
    """Up to 16 segments of ragged lengths (some empty, one slot unused in the middle), base rows,
    more rows than segments or fewer, prefill-sized row blocks (T > 512) and the sweep's overrides:
    every adapter row is updated once, base rows never, and the grid is the bound, not slots x blocks. With
    `expand_steps` each expand program loops over that many column blocks (slices of 24 and 16 columns in
    blocks of 16: a program's second or third block past its slice's end writes nothing)."""
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, tiles, work_items

    dev = _device()
    g = torch.Generator().manual_seed(t)
    slots, k, rank, offsets = 16, 96, 8, [0, 24, 40]
    a = torch.randn(slots, 2 * rank, k, generator=g)
    b = torch.randn(slots, offsets[-1], rank, generator=g)
    x = torch.randn(t, k, generator=g)
    token_slots = torch.randint(-1, slots, (t,), generator=g)
    token_slots[token_slots == 7] = 3  # slot 7 unused: a gap in the slots, not in the segments
    seg = LoRASegments.build(token_slots, slots, dev)
    tile = tiles(t, k, 2 * rank, **override)
    assert tile.block_m == override.get("block_m", 16 if t <= 512 else 32)
    assert tile.expand_steps == override.get("expand_steps", 1)
    used_blocks = sum(-(-n // tile.block_m) for _, _, n in seg.host)
    assert used_blocks <= work_items(t, slots, tile.block_m) < slots * (-(-t // tile.block_m)) or t < 16
    y = sgmv_shrink(x.to(dev), a.to(dev), seg, tile)
    assert y.shape[0] == tile.split_k
    out0 = torch.randn(t, offsets[-1], generator=g).to(dev)
    out, ref = out0.clone(), out0.clone()
    sgmv_expand(y, b.to(dev), torch.tensor(offsets, dtype=torch.int32, device=dev), 24, rank, out, seg, tile)
    expand_ref(shrink_ref(x.to(dev), a.to(dev), seg), b.to(dev), offsets, rank, ref, seg)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    used = (token_slots >= 0).to(dev)
    assert torch.equal(out[~used], out0[~used])


# ------------------------------------------------------------ the one-launch kernel, --lora-kernels
def _case(seed: int, t: int, k: int, rank: int, offsets: list[int], slots: int, dtype: torch.dtype):
    g = torch.Generator().manual_seed(seed)
    pieces = len(offsets) - 1
    a = torch.randn(slots, pieces * rank, k, generator=g).to(dtype)
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dtype)
    x = torch.randn(t, k, generator=g).to(dtype)
    token_slots = torch.randint(-1, slots, (t,), generator=g)
    token_slots[0] = slots - 1
    out0 = torch.randn(t, offsets[-1], generator=g).to(dtype)
    return a, b, x, token_slots, out0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,rank,offsets,span", [
    (1, 16, [0, 64, 80, 96], 32),     # batch 1, q/k/v-like parts of unequal width, two spans for q
    (7, 8, [0, 40, 80], 128),         # gate/up-like: one span covers a part (masked past its end)
    (20, 4, [0, 48], 16),             # more rows than a row block (16): two work items for a segment
])
def test_fused_matches_reference(dtype, t: int, rank: int, offsets: list[int], span: int) -> None:
    from radixlm.runtime.lora.sgmv_fused import fused_tiles, sgmv_fused
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    dev = _device()
    k, slots = 300, 4  # K not a multiple of the reduction block: the last step is masked
    a, b, x, token_slots, out0 = (v.to(dev) for v in _case(t * 31 + rank, t, k, rank, offsets, slots, dtype))
    if t >= 20:
        token_slots[:18] = 2  # one segment longer than a row block
    seg = LoRASegments.build(token_slots.cpu(), slots + 2, dev)  # unused segments past the adapters
    offs = torch.tensor(offsets, dtype=torch.int32, device=dev)
    widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
    tile = fused_tiles(t, block_k=128, span=span, block_n=16)  # several inner column steps per span
    out = out0.clone()
    sgmv_fused(x, a, b, offs, widest, rank, out, seg, tile)
    exact = out0.double().clone()
    expand_ref(shrink_ref(x.double(), a.double(), seg), b.double(), offsets, rank, exact, seg)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(out.double(), exact.to(dtype).double(), **tol)
    used = token_slots >= 0
    assert torch.equal(out[~used], out0[~used]), "base-model rows are untouched"
    assert (exact[used] - out0[used].double()).abs().max() > 1.0, "the update is not empty"
    two = out0.clone()
    sgmv_expand(sgmv_shrink(x, a, seg), b, offs, widest, rank, two, seg)
    torch.testing.assert_close(out, two, **tol)
    again = out0.clone()
    sgmv_fused(x, a, b, offs, widest, rank, again, seg, tile)
    assert torch.equal(out, again), "no atomics: the same bits on every run"


def test_fused_reads_segments_from_the_device_buffers() -> None:
    """CUDA-graph contract: the kernel reads order/start/length/slot from the tensors at run time,
    so new segments written into the same buffers (what `_fill_graph` does before a replay) change
    which slot each row uses, with the same launch arguments; slot -1 segments add nothing."""
    from radixlm.runtime.lora.sgmv import segment_host
    from radixlm.runtime.lora.sgmv_fused import sgmv_fused

    dev = _device()
    t, k, rank, offsets, slots = 3, 64, 8, [0, 32], 3
    a, b, x, _, out0 = (v.to(dev) if isinstance(v, torch.Tensor) else v
                        for v in _case(5, t, k, rank, offsets, slots, torch.float32))
    buf = torch.zeros(t + 3 * slots, dtype=torch.int32, device=dev)
    buf[t + 2 * slots:] = -1
    seg = LoRASegments(buf[:t], buf[t:t + slots], buf[t + slots:t + 2 * slots], buf[t + 2 * slots:], t, [])
    offs = torch.tensor(offsets, dtype=torch.int32, device=dev)
    out = out0.clone()
    sgmv_fused(x, a, b, offs, 32, rank, out, seg)
    assert torch.equal(out, out0), "every segment unused: nothing added"
    for per_row in ([2, -1, 0], [0, 0, 1]):
        order, start, length, slot, _ = segment_host(torch.tensor(per_row), slots)
        buf[:order.numel()] = order.to(dev)
        buf[t:] = torch.cat([start, length, slot]).to(dev)
        out = out0.clone()
        sgmv_fused(x, a, b, offs, 32, rank, out, seg)
        want = out0.clone()
        expand_ref(shrink_ref(x, a, LoRASegments.build(torch.tensor(per_row), slots, dev)), b, offsets, rank,
                   want, LoRASegments.build(torch.tensor(per_row), slots, dev))
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_decode_sizes_take_one_launch_and_larger_batches_two() -> None:
    from radixlm.runtime.lora.sgmv_fused import FUSED_MAX_TOKENS, use_fused

    assert use_fused(1) and use_fused(FUSED_MAX_TOKENS) and not use_fused(FUSED_MAX_TOKENS + 1)


@pytest.mark.parametrize("kernels", ["overlap", "overlap-delta", "fused", "serial"])
def test_projection_update_lands_in_the_output_or_the_residual(kernels: str, monkeypatch) -> None:
    """LoRAProjection.begin/finish around a base GEMM: every --lora-kernels value gives residual +
    output == residual + base + update; with overlap and a residual passed (o_proj / down_proj) the
    update is added to the residual and the output is the base GEMM's alone (no launch after it).
    overlap-delta: overlap at decode sizes, where a projection without a residual (qkv, gate_up) gets
    its update in a delta buffer on the side stream, then added to the output."""
    from radixlm.runtime.lora import projection
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

    dev = _device()
    t, k, rank, offsets, slots = 5, 96, 8, [0, 48], 3
    a, b, x, token_slots, base = (v.to(dev) for v in _case(9, t, k, rank, offsets, slots, torch.float32))
    monkeypatch.setattr(projection, "DELTA_MAX_TOKENS", t if kernels == "overlap-delta" else 0)
    kernels = kernels.split("-")[0]
    batch = BatchAdapters()
    batch.segments = LoRASegments.build(token_slots.cpu(), slots, dev)
    proj = LoRAProjection(a, b, offsets, rank, batch, use_triton=True, kernels=kernels)
    residual0 = torch.randn(t, offsets[-1], generator=torch.Generator().manual_seed(1)).to(dev)
    want = residual0 + base.clone()
    expand_ref(shrink_ref(x, a, batch.segments), b, offsets, rank, want, batch.segments)
    residual = residual0.clone()
    pending = proj.begin(x, into=residual)
    out = proj.finish(pending, base.clone())
    torch.testing.assert_close(residual + out, want, atol=1e-4, rtol=1e-4)
    assert pending is not None and pending.added == (kernels == "overlap")
    assert torch.equal(out, base) == (kernels == "overlap"), "overlap: the output is the GEMM's alone"
    # no residual to take the update (qkv, gate_up): it lands in the output, base-model rows untouched
    used = token_slots.to(dev) >= 0
    empty = torch.empty
    with monkeypatch.context() as m:  # buffers holding stale values, as reused memory does
        m.setattr(torch, "empty", lambda *args, **kw: empty(*args, **kw).fill_(7.0))
        pending = proj.begin(x)
    assert (pending.delta is not None) == (projection.DELTA_MAX_TOKENS > 0 and kernels == "overlap")
    out = proj.finish(pending, base.clone())
    torch.testing.assert_close(out, want - residual0, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[~used], base[~used])
    batch.segments = None
    assert proj.begin(x, into=residual) is None, "no adapter row: no LoRA work at all"


def test_expand_write_mode_sets_segment_rows_only() -> None:
    """sgmv_expand(accumulate=False) writes the update itself into the rows of a segment (what the
    delta buffer needs) and leaves other rows as they were."""
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand

    dev = _device()
    t, rank, offsets, slots = 9, 8, [0, 24, 40], 3
    a, b, x, token_slots, out0 = (v.to(dev) for v in _case(4, t, 32, rank, offsets, slots, torch.float32))
    seg = LoRASegments.build(token_slots, slots, dev)
    y = shrink_ref(x, a, seg)
    want = torch.zeros_like(out0)
    expand_ref(y, b, offsets, rank, want, seg)
    out = out0.clone()
    sgmv_expand(y, b, torch.tensor(offsets, dtype=torch.int32, device=dev), 24, rank, out, seg, accumulate=False)
    used = token_slots.to(dev) >= 0
    torch.testing.assert_close(out[used], want[used], atol=1e-4, rtol=1e-4)
    assert torch.equal(out[~used], out0[~used]) and bool((~used).any())


def test_prefill_sized_shrink_splits_k_and_adds_its_partial_sums_once(monkeypatch) -> None:
    """From REDUCE_MIN_TOKENS rows the shrink splits K as decode does (not capped by the row count)
    and returns its partial sums added, [1, T, n·R]: the expand then reads one y."""
    from radixlm.runtime.lora import sgmv_triton
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, tiles

    assert tiles(1100, 14336, 16).split_k > 1, "1,100 rows: K = 14,336 split (42 row blocks alone)"
    assert tiles(1000, 14336, 16).split_k <= 2, "below the threshold the expand re-reads splits: capped"
    assert tiles(8192, 4096, 48).expand_n == 256 and tiles(8192, 4096, 48).block_m == 32
    monkeypatch.setattr(sgmv_triton, "REDUCE_MIN_TOKENS", 16)
    dev = _device()
    t, k, rank, offsets, slots = 37, 1040, 8, [0, 32, 48], 3
    a, b, x, token_slots, out0 = (v.to(dev) for v in _case(6, t, k, rank, offsets, slots, torch.float32))
    seg = LoRASegments.build(token_slots, slots, dev)
    tile = tiles(t, k, a.shape[1], split_k=4)
    y = sgmv_shrink(x, a, seg, tile)
    assert y.shape == (1, t, a.shape[1]), "the partial sums come back added"
    used = token_slots.to(dev) >= 0
    torch.testing.assert_close(y[0][used], shrink_ref(x, a, seg)[used], atol=1e-4, rtol=1e-4)
    want, out = out0.clone(), out0.clone()
    expand_ref(shrink_ref(x, a, seg), b, offsets, rank, want, seg)
    sgmv_expand(y, b, torch.tensor(offsets, dtype=torch.int32, device=dev), 32, rank, out, seg, tile)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    # the layer's path (overlap: shrink, then expand into the output) at that size: the same update
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

    batch = BatchAdapters()
    batch.segments = seg
    proj = LoRAProjection(a, b, offsets, rank, batch, use_triton=True, kernels="overlap")
    pending = proj.begin(x)
    assert pending is not None and pending.y is not None and pending.y.shape[0] == 1
    torch.testing.assert_close(proj.finish(pending, out0.clone()), want, atol=1e-4, rtol=1e-4)


def test_expand_reads_each_rows_slot_from_a_stacked_shrink() -> None:
    """per_slot: y holds every slot's rank columns side by side (x·Aᵀ for all slots, as a base GEMM
    over [W; A of every slot] leaves them in its output's tail); each row's update uses its own
    slot's columns, written into a strided output (the head of that same GEMM output)."""
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand

    dev = _device()
    t, k, rank, offsets, slots = 11, 40, 8, [0, 24, 40], 3
    a, b, x, token_slots, out0 = (v.to(dev) for v in _case(7, t, k, rank, offsets, slots, torch.float32))
    seg = LoRASegments.build(token_slots, slots, dev)
    n = offsets[-1]
    w = torch.randn(n, k, generator=torch.Generator().manual_seed(8)).to(dev)
    stacked = x @ torch.cat([w, a.reshape(-1, k)]).t()  # [T, N + slots·n·R]
    want = x @ w.t()
    expand_ref(shrink_ref(x, a, seg), b, offsets, rank, want, seg)
    sgmv_expand(stacked[:, n:], b, torch.tensor(offsets, dtype=torch.int32, device=dev), 24, rank, stacked[:, :n],
                seg, per_slot=True)
    torch.testing.assert_close(stacked[:, :n], want, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("t", [1, 9, 37])
def test_in_launch_sum_of_split_partials_equals_the_expands_sum(t: int, monkeypatch) -> None:
    """With the in-launch sum (INLINE_REDUCE_MIN_TOKENS) the shrink returns one y, [1, T, n·R], equal
    bit for bit to the partial sums added in the expand's order, so the update is the same bits
    whichever path ran; its counters are left zeroed for the next launch."""
    from radixlm.runtime.lora import sgmv_triton
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, split_counters, tiles

    dev = _device()
    k, rank, offsets, slots = 1040, 8, [0, 32, 48], 3
    a, b, x, token_slots, out0 = (v.to(dev) for v in _case(9 + t, t, k, rank, offsets, slots, torch.float32))
    seg = LoRASegments.build(token_slots, slots, dev)
    tile = tiles(t, k, a.shape[1], split_k=4)
    monkeypatch.setattr(sgmv_triton, "INLINE_REDUCE_MIN_TOKENS", 1 << 30)
    parts = sgmv_shrink(x, a, seg, tile)
    assert parts.shape[0] == tile.split_k > 1
    monkeypatch.setattr(sgmv_triton, "INLINE_REDUCE_MIN_TOKENS", 1)
    counters = split_counters(dev)
    y = sgmv_shrink(x, a, seg, tile)
    assert y.shape == (1, t, a.shape[1]), "one y: the partial sums added in the launch"
    used = token_slots.to(dev) >= 0
    summed = parts[0].clone()
    for split in range(1, parts.shape[0]):
        summed += parts[split]
    assert torch.equal(y[0][used], summed[used])
    torch.testing.assert_close(y[0][used], shrink_ref(x, a, seg)[used], atol=1e-4, rtol=1e-4)
    assert int(counters.abs().sum()) == 0, "every tile's counter is reset by its last split"
    offsets_dev = torch.tensor(offsets, dtype=torch.int32, device=dev)
    one, four = out0.clone(), out0.clone()
    sgmv_expand(y, b, offsets_dev, 32, rank, one, seg, tile)
    sgmv_expand(parts, b, offsets_dev, 32, rank, four, seg, tile)
    assert torch.equal(one, four)


@pytest.mark.parametrize("seed", range(4))
def test_graph_segments_row_is_segment_host_in_the_graph_buffers_layout(seed: int) -> None:
    """The decode step's plain-Python segments equal the tensor version's, laid out as the graphs'
    buffer holds them (order padded | start | length | slot, unused segments length 0 and slot -1; each row's
    slot after them where the expand by rows reads it, test_lora_rows_expand.py)."""
    from radixlm.runtime.lora.sgmv import graph_segments_row

    g = torch.Generator().manual_seed(seed)
    rows, segments, max_rows = int(torch.randint(1, 40, (1,), generator=g)), 5, 48
    per_req = torch.randint(-1, segments, (rows,), generator=g)
    order, start, length, slot, _ = segment_host(per_req, segments)
    want = torch.zeros(max_rows + 3 * segments, dtype=torch.int32)
    want[:order.numel()] = order
    want[max_rows:] = torch.cat([start, length, slot])
    assert graph_segments_row(per_req.tolist(), segments, max_rows, row_slots=False) == want.tolist()
    with pytest.raises(ValueError, match="max-loras-per-batch"):
        graph_segments_row([0, 1, 2], 2, 4)


def _stacked_case(t: int, seed: int, w_seed: int, pdl: bool = False):
    """A stacked projection (k 96, rank 8, parts of 48 and 16 columns, 3 slots) over T rows of random adapters;
    (projection, x, W, the reference output x·Wᵀ + update, each row's slot)."""
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

    dev = _device()
    k, rank, offsets, slots = 96, 8, [0, 48, 64], 3
    a, b, x, token_slots, _ = (v.to(dev) for v in _case(seed, t, k, rank, offsets, slots, torch.float32))
    w = torch.randn(offsets[-1], k, generator=torch.Generator().manual_seed(w_seed)).to(dev)
    stacked = torch.cat([w, a.reshape(-1, k)])
    batch = BatchAdapters()
    batch.segments = LoRASegments.build(token_slots.cpu(), slots, dev)
    proj = LoRAProjection(stacked[offsets[-1]:].view(a.shape), b, offsets, rank, batch, use_triton=True,
                          kernels="stacked", stacked=stacked, pdl=pdl)
    want = x @ w.t()
    expand_ref(shrink_ref(x, a, batch.segments), b, offsets, rank, want, batch.segments)
    return proj, x, w, want, token_slots


@pytest.mark.parametrize("t", [1, 6, 9])
def test_stacked_projection_runs_the_base_gemm_from_its_minimum_rows(t: int, monkeypatch) -> None:
    """--lora-kernels stacked: from STACKED_MIN_TOKENS to STACKED_MAX_TOKENS rows `begin` runs the base
    GEMM over [W; every slot's A] itself (pending.out: the layer skips its own) and the update lands in
    the output or the residual; below it the overlap path runs over the same A (the stacked tail), above
    it (prefill) shrink and expand run in line in `finish`, into the output. Either way residual +
    output == residual + base + update, and base-model rows get no update."""
    from radixlm.runtime.lora import projection

    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 4)
    monkeypatch.setattr(projection, "STACKED_MAX_TOKENS", 8)
    dev = _device()
    proj, x, w, want, token_slots = _stacked_case(t, 11 + t, 2)
    offsets = proj.offsets
    used = token_slots.to(dev) >= 0
    for into in (None, torch.zeros(t, offsets[-1], device=dev)):
        pending = proj.begin(x, into=into)
        assert (pending.out is not None) == (4 <= t <= 8)
        if t > 8:  # in line: nothing launched before the GEMM, nothing added to the residual
            assert pending.y is None and pending.delta is None and not pending.added
        out = proj.finish(pending, pending.out if pending.out is not None else x @ w.t())
        total = out if into is None else out + into
        torch.testing.assert_close(total, want, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out[~used], (x @ w.t())[~used], atol=1e-5, rtol=1e-5)


def test_down_projection_reads_silu_mul_in_its_shrink_as_its_gemv_does(monkeypatch) -> None:
    """Batch 1 on a GPU: down_proj's M = 1 GEMV takes silu(gate) * up in its loads, and with an adapter row the
    side-stream shrink reads [gate | up] the same way (RowParallelLinear.forward_silu_mul): the same bits as
    the activation kernel followed by the layer's unfused path, output and residual; a base-only forward is
    the GEMV alone; paths that read the activation themselves decline. A single adapter row's delta buffer
    (qkv / gate_up) is written whole by the expand, with no memset (stale memory here)."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.kernels.small_m import SmallMConfig
    from radixlm.runtime.dense_gemv import DenseGemv
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection
    from radixlm.runtime.parallel.layers import RowParallelLinear

    dev, dt = _device(), torch.bfloat16
    k, n, rank, slots = 320, 40, 8, 3  # k: two K splits of the shrink at one row (in-launch sum)
    g = torch.Generator().manual_seed(21)
    layer = RowParallelLinear(k, n).to(dev)
    layer.weight.data = (torch.randn(n, k, generator=g) * k**-0.5).to(dt).to(dev)
    layer.gemv = DenseGemv(layer.weight, SmallMConfig("fma", 8, 128, 1, 4, 2))
    a = (torch.randn(slots, rank, k, generator=g) * k**-0.5).to(dt).to(dev)
    b = torch.randn(slots, n, rank, generator=g).to(dt).to(dev)
    batch = BatchAdapters()
    seg = LoRASegments.build(torch.tensor([2]), slots, dev)
    batch.segments = seg
    layer.lora = LoRAProjection(a, b, [0, n], rank, batch, use_triton=True, kernels="stacked")
    gate_up = (torch.randn(1, 2 * k, generator=g) * 3).to(dt).to(dev)
    act = silu_and_mul(gate_up)
    r0 = torch.randn(1, n, generator=g).to(dt).to(dev)
    want_res = r0.clone()
    want = layer(act, lora_into=want_res)
    res = r0.clone()
    out = layer.forward_silu_mul(gate_up, lora_into=res)
    assert torch.equal(out, want) and torch.equal(res, want_res)
    exact = r0.double() + act.double() @ layer.weight.double().T
    expand_ref(shrink_ref(act.double(), a.double(), seg), b.double(), [0, n], rank, exact, seg)
    torch.testing.assert_close((res.double() + out.double()), exact, atol=0.05, rtol=0.02)
    assert (res.double() - r0.double()).abs().max() > 0.5, "the update is not empty"
    # the delta path at one row: stale memory in the delta buffer, overwritten whole by the expand
    proj = LoRAProjection(a, b, [0, n], rank, batch, use_triton=True, kernels="overlap")
    empty = torch.empty
    with monkeypatch.context() as m:
        m.setattr(torch, "empty", lambda *args, **kw: empty(*args, **kw).fill_(float("nan")))
        pending = proj.begin(act)
    assert pending.delta is not None
    base = layer.gemv(act, None)
    torch.testing.assert_close(proj.finish(pending, base.clone()).double(), (want_res - r0 + base).double(),
                               atol=0.05, rtol=0.02)
    layer.lora.kernels = "serial"  # the update after the GEMM from the activation tensor: not taken
    assert layer.forward_silu_mul(gate_up, lora_into=res) is None
    batch.segments = None  # no adapter row: the GEMV alone, nothing added to the residual
    res = r0.clone()
    assert torch.equal(layer.forward_silu_mul(gate_up, lora_into=res), layer.gemv(act, None))
    assert torch.equal(res, r0)


@pytest.mark.parametrize("silu_mul", [False, True])
def test_one_row_stacked_product_takes_the_layers_gemv_config(silu_mul: bool, monkeypatch) -> None:
    """Stacked from one row (projection.STACKED_MIN_TOKENS = 1): the row's product over [W; every slot's A] is the
    layer's M = 1 GEMV config run on the stacked weight (for down_proj with silu(gate) * up in its loads), whose
    head is the layer's own GEMV result bit for bit, and the per-slot expand adds the row's adapter update."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.kernels.small_m import SmallMConfig
    from radixlm.runtime.dense_gemv import DenseGemv
    from radixlm.runtime.lora import projection
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection
    from radixlm.runtime.parallel.layers import RowParallelLinear

    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 1)
    dev, dt = _device(), torch.bfloat16
    k, n, rank, slots = 320, 40, 8, 3
    g = torch.Generator().manual_seed(5 + silu_mul)
    a = (torch.randn(slots, rank, k, generator=g) * k**-0.5).to(dt).to(dev)
    b = torch.randn(slots, n, rank, generator=g).to(dt).to(dev)
    layer = RowParallelLinear(k, n).to(dev)
    stacked = torch.cat([(torch.randn(n, k, generator=g) * k**-0.5).to(dt).to(dev), a.reshape(-1, k)])
    layer.weight.data = stacked[:n]
    cfg = SmallMConfig("fma", 8, 128, 1, 4, 2)
    layer.gemv = DenseGemv(layer.weight, cfg)
    batch = BatchAdapters()
    seg = LoRASegments.build(torch.tensor([1]), slots, dev)
    batch.segments = seg
    layer.lora = LoRAProjection(stacked[n:].view(a.shape), b, [0, n], rank, batch, use_triton=True, kernels="stacked",
                                stacked=stacked, gemv=DenseGemv(stacked, cfg), layer=layer)
    x = (torch.randn(1, 2 * k if silu_mul else k, generator=g) * 3).to(dt).to(dev)
    act = silu_and_mul(x) if silu_mul else x
    assert layer.lora.reads_silu_mul(x)
    r0 = torch.randn(1, n, generator=g).to(dt).to(dev)
    res = r0.clone()
    want = layer.gemv(act, None)
    layer.gemv = DenseGemv(torch.zeros_like(layer.weight), cfg)  # not run: the stacked product gives the head
    out = layer.forward_silu_mul(x, lora_into=res) if silu_mul else layer(x, lora_into=res)
    assert torch.equal(out, want), "the head: the layer's GEMV, bit for bit, computed once"
    exact = r0.double() + act.double() @ stacked[:n].double().T
    expand_ref(shrink_ref(act.double(), a.double(), seg), b.double(), [0, n], rank, exact, seg)
    torch.testing.assert_close(res.double() + out.double(), exact, atol=0.05, rtol=0.02)
    assert (res.double() - r0.double()).abs().max() > 0.5, "the update is not empty"
    layer.lora.gemv = None  # without the stacked GEMV: torch's product over the stacked weight, no silu in loads
    assert not layer.lora.reads_silu_mul(x) and (silu_mul or layer(x) is not None)


def test_start_up_warm_up_runs_one_scratch_forward_per_prefill_size_class(tiny_model_dir, tmp_path, monkeypatch) -> None:
    """runtime/lora/warmup.py: the smallest row count of each size class (stacked or not, row block, expand
    tile), found by doubling and bisection, equals a scan of every row count; the warm-up runs layer 0's
    projections at those sizes through the serving path (here the interpreter, small thresholds) and leaves the
    batch without segments and the slots untouched."""
    from radixlm.runtime.lora import projection
    from radixlm.runtime.lora.warmup import prefill_sizes, size_class, warm_up_prefill_kernels
    from radixlm.runtime.model_runner import ModelRunner
    from radixlm.runtime.server_args import ServerArgs
    from tests.fixtures.lora_adapters import make_peft_adapter

    scan: dict[tuple, int] = {}
    for t in range(projection.STACKED_MIN_TOKENS, 4200):
        scan.setdefault(size_class(t, 4096, 48), t)
    assert prefill_sizes(4096, 48, 4199) == sorted(scan.values()) == [8, 513, 1025, 4097]
    model_dir = tiny_model_dir("llama")
    adapter = make_peft_adapter(model_dir, tmp_path / "a", seed=3, r=4)
    args = ServerArgs(model_path=str(model_dir), max_total_tokens=4096, device="cpu", lora_paths=(f"a={adapter}",),
                      attention_backend="triton").resolve()
    runner = ModelRunner(args, model_dir)
    lora_pool = runner.lora.pool
    before = lora_pool.buffer.clone()
    monkeypatch.setattr(projection, "STACKED_MAX_TOKENS", 16)
    assert warm_up_prefill_kernels(lora_pool, 40) == [8, 17]  # the stacked product, then shrink + expand after
    assert lora_pool.batch.segments is None and torch.equal(lora_pool.buffer, before)


@pytest.mark.parametrize("t", [5, 6, 9])
def test_stacked_expand_takes_pdl_with_its_prologue_from_the_set_rows(t: int, monkeypatch) -> None:
    """From STACKED_PDL_MIN_TOKENS rows (where the layer's PDL is on) the stacked path's expand launches with PDL,
    reading its segments and rows before the wait (`pdl_prologue`); below, none (batch 1 keeps its own PDL form).
    Off the GPU the launch has no PDL (the interpreter has no griddepcontrol) and the kernel's column loop runs
    as on it: the update is the reference's either way."""
    from radixlm.runtime.lora import projection, sgmv_triton

    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 4)
    monkeypatch.setattr(projection, "STACKED_PDL_MIN_TOKENS", 6)
    monkeypatch.setattr(sgmv_triton, "EXPAND_STEPS", ((6, 2),))
    calls: list[dict] = []
    real = sgmv_triton.sgmv_expand

    def expand(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(sgmv_triton, "sgmv_expand", expand)
    proj, x, _, want, _ = _stacked_case(t, 21 + t, 3, pdl=True)
    pending = proj.begin(x)
    out = proj.finish(pending, pending.out)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert [(c["pdl"], c["pdl_prologue"]) for c in calls] == [(t >= 6, t >= 6)]
    assert sgmv_triton.tiles(t, 0, 2 * proj.rank).expand_steps == (2 if t >= 6 else 1)

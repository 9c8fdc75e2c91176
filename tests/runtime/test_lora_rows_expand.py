"""The stacked path's expand by rows (runtime/lora/sgmv_rows.py) against the torch reference and the segment
expand, under TRITON_INTERPRET=1 on a CPU (or on CUDA): each row's own slot's columns of the stacked GEMM's
tail, base and padding rows untouched, several row blocks, strided outputs; the segments' row slots in the
eager and graph layouts; and LoRAProjection taking it within ROWS_EXPAND_MAX_TOKENS."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, graph_segments_row, segment_host, shrink_ref


@pytest.fixture(autouse=True)
def needs_triton() -> None:
    pytest.importorskip("triton")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _stacked(seed: int, t: int, k: int, rank: int, offsets: list[int], slots: int, dtype: torch.dtype):
    """x, A, B, W, each row's slot (some -1), and the stacked GEMM's output x·[W; every slot's A]ᵀ."""
    dev = _device()
    g = torch.Generator().manual_seed(seed)
    parts = len(offsets) - 1
    a = (torch.randn(slots, parts * rank, k, generator=g) * k**-0.5).to(dtype).to(dev)
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dtype).to(dev)
    x = torch.randn(t, k, generator=g).to(dtype).to(dev)
    w = (torch.randn(offsets[-1], k, generator=g) * k**-0.5).to(dtype).to(dev)
    token_slots = torch.randint(-1, slots, (t,), generator=g)
    token_slots[0] = slots - 1
    full = (x.float() @ torch.cat([w, a.reshape(-1, k)]).float().t()).to(dtype)
    return x, a, b, w, token_slots, full


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t,rank,offsets,slots", [
    (9, 8, [0, 48, 64, 80], 3),      # q/k/v-like parts of unequal width, rank below the dot's 16
    (150, 16, [0, 64, 128], 4),      # gate/up-like, two row blocks of 128
    (3, 16, [0, 96], 8),             # one part (o / down), 8 slots, fewer rows than slots
])
def test_expand_by_rows_matches_the_reference_and_the_segment_expand(dtype, t: int, rank: int, offsets: list[int],
                                                                     slots: int) -> None:
    from radixlm.runtime.lora.sgmv_rows import expand_rows_ref, sgmv_expand_rows
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand

    dev = _device()
    x, a, b, w, token_slots, full = _stacked(t + rank, t, 64, rank, offsets, slots, dtype)
    n = offsets[-1]
    seg = LoRASegments.build(token_slots, slots, dev)
    assert torch.equal(seg.row_slot.cpu(), token_slots.to(torch.int32))
    y = full[:, n:]
    base = full[:, :n].clone()
    want = base.clone()
    expand_rows_ref(y, b, offsets, rank, want, token_slots)
    # the reference through the segment code's reference: the same update
    exact = base.float().clone()
    expand_ref(shrink_ref(x.float(), a.float(), seg), b.float(), offsets, rank, exact, seg)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(want.float(), exact, **tol)
    used = token_slots.to(dev) >= 0
    assert (want[used].float() - base[used].float()).abs().max() > 0.5, "the update is not empty"
    sgmv_expand_rows(y, b, offsets, rank, full[:, :n], seg.row_slot)  # in place, the strided head
    torch.testing.assert_close(full[:, :n], want, **tol)
    assert torch.equal(full[:, :n][~used], base[~used]), "rows of no slot are not written"
    segment = base.clone()
    sgmv_expand(y, b, torch.tensor(offsets, dtype=torch.int32, device=dev), max(hi - lo for lo, hi in
                zip(offsets, offsets[1:])), rank, segment, seg, per_slot=True)
    torch.testing.assert_close(full[:, :n], segment, **tol)


def test_expand_by_rows_reads_the_graph_buffers_row_slots() -> None:
    """CUDA-graph contract: the row slots are read at run time from a buffer longer than the batch, padded
    with -1 (graph rows past the real batch: untouched); rewriting it changes each row's slot, same launch."""
    from radixlm.runtime.lora.sgmv_rows import expand_rows_ref, sgmv_expand_rows

    dev = _device()
    t, rank, offsets, slots = 5, 8, [0, 32], 3
    _, _, b, _, _, full = _stacked(3, t, 48, rank, offsets, slots, torch.float32)
    row_slot = torch.full((16,), -1, dtype=torch.int32, device=dev)
    y, out0 = full[:, 32:], full[:, :32].clone()
    out = out0.clone()
    sgmv_expand_rows(y, b, offsets, rank, out, row_slot)
    assert torch.equal(out, out0), "every row unused: nothing added"
    for per_row in ([2, -1, 0, 0, 1], [1, 1, 1, -1, -1]):
        row_slot[:t] = torch.tensor(per_row, dtype=torch.int32)
        out, want = out0.clone(), out0.clone()
        sgmv_expand_rows(y, b, offsets, rank, out, row_slot)
        expand_rows_ref(y, b, offsets, rank, want, torch.tensor(per_row))
        torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)


def test_shapes_outside_the_kernel_are_refused() -> None:
    from radixlm.runtime.lora.sgmv_rows import block_n, rows_expand_fits, sgmv_expand_rows

    assert block_n([4096, 1024, 1024], 64) == 64 and block_n([4096, 1024]) == 32 and block_n([40, 24]) == 0 and block_n([48, 16]) == 16
    assert rows_expand_fits([0, 48, 64, 80], 16) and not rows_expand_fits([0, 40, 64], 8)
    assert not rows_expand_fits([0, 16, 32, 48, 64], 8) and not rows_expand_fits([0, 64], 128)
    assert rows_expand_fits([0, 64], 16, 8) and not rows_expand_fits([0, 64], 16, 9), "slots' loads are unrolled"
    with pytest.raises(ValueError, match="expand by rows"):
        sgmv_expand_rows(torch.zeros(2, 24), torch.zeros(3, 40, 8), [0, 40], 8, torch.zeros(2, 40),
                         torch.zeros(2, dtype=torch.int32))


@pytest.mark.parametrize("seed", range(3))
def test_graph_segments_row_ends_with_each_rows_slot(seed: int) -> None:
    """The graphs' buffer layout: order padded | start | length | slot | each row's slot padded with -1 (left out
    where the expand by rows is off: the host builds and copies a shorter row)."""
    g = torch.Generator().manual_seed(seed)
    rows, segments, max_rows = int(torch.randint(1, 40, (1,), generator=g)), 5, 48
    per_req = torch.randint(-1, segments, (rows,), generator=g)
    order, start, length, slot, _ = segment_host(per_req, segments)
    want = torch.full((2 * max_rows + 3 * segments,), -1, dtype=torch.int32)
    want[:max_rows] = 0
    want[:order.numel()] = order
    want[max_rows:max_rows + 3 * segments] = torch.cat([start, length, slot])
    want[max_rows + 3 * segments:][:rows] = per_req
    assert graph_segments_row(per_req.tolist(), segments, max_rows) == want.tolist()
    assert graph_segments_row(per_req.tolist(), segments, max_rows, row_slots=False) == want[:max_rows + 3 * segments].tolist()


@pytest.mark.parametrize("t", [2, 9])
def test_stacked_projection_expands_by_rows_up_to_the_limit(t: int, monkeypatch) -> None:
    """LoRAProjection (--lora-kernels stacked) within ROWS_EXPAND_MAX_TOKENS: the expand by rows, not the segment
    expand; output (or the residual) == base + update; past the limit the segment expand, the same sums."""
    from radixlm.runtime.lora import projection, sgmv_triton
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

    dev = _device()
    rank, offsets, slots, k = 8, [0, 48, 64], 3, 96
    x, a, b, w, token_slots, _ = _stacked(11 + t, t, k, rank, offsets, slots, torch.float32)
    stacked = torch.cat([w, a.reshape(-1, k)])
    batch = BatchAdapters()
    batch.segments = LoRASegments.build(token_slots, slots, dev)
    proj = LoRAProjection(stacked[64:].view(a.shape), b, offsets, rank, batch, use_triton=True, kernels="stacked",
                          stacked=stacked)
    assert proj.rows_fit
    want = x @ w.t()
    expand_ref(shrink_ref(x, a, batch.segments), b, offsets, rank, want, batch.segments)
    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 2)
    segment_calls = []
    real = sgmv_triton.sgmv_expand
    monkeypatch.setattr(sgmv_triton, "sgmv_expand", lambda *a_, **kw: segment_calls.append(1) or real(*a_, **kw))
    for limit, segment in ((16, 0), (1, 1)):
        monkeypatch.setattr(projection, "ROWS_EXPAND_MAX_TOKENS", limit)
        segment_calls.clear()
        for into in (None, torch.zeros(t, offsets[-1], device=dev)):
            pending = proj.begin(x, into=into)
            out = proj.finish(pending, pending.out)
            torch.testing.assert_close(out if into is None else out + into, want, atol=1e-4, rtol=1e-4)
        assert len(segment_calls) == 2 * segment


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("t", [9, 150])
def test_expand_by_rows_with_silu_mul_is_the_expand_then_the_activation(dtype, t: int) -> None:
    """gate_up's expand by rows computing silu(gate) * up in the same launch: the same bits as the expand by rows
    into [gate | up] followed by ops.silu_and_mul, base rows included (their activation of the base product)."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.runtime.lora.sgmv_rows import sgmv_expand_rows, sgmv_expand_rows_silu_mul

    dev = _device()
    rank, offsets, slots = 16, [0, 64, 128], 4
    _, _, b, _, token_slots, full = _stacked(t, t, 64, rank, offsets, slots, dtype)
    seg = LoRASegments.build(token_slots, slots, dev)
    act = sgmv_expand_rows_silu_mul(full[:, 128:], b, offsets, rank, full[:, :128], seg.row_slot)
    gate_up = full[:, :128].clone()
    sgmv_expand_rows(full[:, 128:], b, offsets, rank, gate_up, seg.row_slot)
    assert torch.equal(act, silu_and_mul(gate_up))
    assert not torch.equal(act, silu_and_mul(full[:, :128])), "the update is in it"
    with pytest.raises(ValueError, match="SiLU"):
        sgmv_expand_rows_silu_mul(full[:, 128:], b[:, :96], [0, 64, 96], rank, full[:, :96], seg.row_slot)
    with pytest.raises(ValueError, match="own slot"):
        sgmv_expand_rows_silu_mul(full[:, 128:], b, offsets, rank, full[:, :128], seg.row_slot, own_slot=True)


def test_gate_up_layer_returns_the_activation_where_its_expand_computes_it(monkeypatch) -> None:
    """ColumnParallelLinear.forward_then_silu_mul with an active stacked LoRA projection: with ROWS_SILU_MUL the
    activation of forward(x) from one launch after the stacked GEMM (the same bits as forward then silu_and_mul);
    off, or outside the rows' range, None (the caller runs both)."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.runtime.lora import projection

    layer, x, a, b, w, batch = _gate_up_layer(5, 12)
    rank, offsets = 8, [0, 32, 64]
    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 2)
    monkeypatch.setattr(projection, "ROWS_EXPAND_MAX_TOKENS", 64)
    assert layer.forward_then_silu_mul(x) is None, "ROWS_SILU_MUL off"
    monkeypatch.setattr(projection, "ROWS_SILU_MUL", True)
    act = layer.forward_then_silu_mul(x)
    want = silu_and_mul(layer(x))
    assert act is not None and torch.equal(act, want)
    exact = x @ w.t()
    expand_ref(shrink_ref(x, a, batch.segments), b, offsets, rank, exact, batch.segments)
    torch.testing.assert_close(act, silu_and_mul(exact), atol=1e-4, rtol=1e-4)
    monkeypatch.setattr(projection, "ROWS_EXPAND_MAX_TOKENS", 11)  # (12 rows)
    assert layer.forward_then_silu_mul(x) is None, "past the rows' range"
    batch.segments = None
    assert layer.forward_then_silu_mul(x) is None, "no adapter row: the layer's own paths"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_expand_by_rows_reads_each_rows_own_slot_y(dtype) -> None:
    """own_slot: y [T, n·R] holds each row's own slot's ranks (the in-line shrink's, past the stacked range); the
    update equals the segment expand's over the same y, and with SiLU-and-mul the expand then the activation."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.runtime.lora.sgmv_rows import sgmv_expand_rows, sgmv_expand_rows_silu_mul
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    dev = _device()
    t, rank, offsets, slots = 140, 16, [0, 64, 128], 4
    x, a, b, w, token_slots, _ = _stacked(31, t, 64, rank, offsets, slots, dtype)
    seg = LoRASegments.build(token_slots, slots, dev)
    y = sgmv_shrink(x, a, seg)[0]
    base = (x.float() @ w.float().t()).to(dtype)
    rows, segment = base.clone(), base.clone()
    sgmv_expand_rows(y, b, offsets, rank, rows, seg.row_slot, own_slot=True)
    sgmv_expand(y, b, torch.tensor(offsets, dtype=torch.int32, device=dev), 64, rank, segment, seg)
    tol = dict(atol=1e-4, rtol=1e-4) if dtype == torch.float32 else dict(atol=6e-2, rtol=2e-2)
    torch.testing.assert_close(rows, segment, **tol)
    used = token_slots.to(dev) >= 0
    assert torch.equal(rows[~used], base[~used]) and not torch.equal(rows[used], base[used])
    act = sgmv_expand_rows_silu_mul(y, b, offsets, rank, base, seg.row_slot, own_slot=True)
    assert torch.equal(act, silu_and_mul(rows))


def test_prefill_sized_gate_up_takes_its_activation_from_the_expand(monkeypatch) -> None:
    """Past the stacked range (prefill) with PREFILL_SILU_MUL: the layer's own product, the in-line shrink, then one
    launch adding each row's update and computing silu(gate) * up — the same bits as forward then silu_and_mul; off
    (or on the overlap path) None."""
    from radixlm.kernels.ops import silu_and_mul
    from radixlm.runtime.lora import projection

    layer, x, a, b, w, batch = _gate_up_layer(6, 20)
    rank, offsets = 8, [0, 32, 64]
    monkeypatch.setattr(projection, "STACKED_MAX_TOKENS", 8)  # 20 rows: past the stacked range, as a prefill
    assert layer.forward_then_silu_mul(x) is None, "PREFILL_SILU_MUL off"
    monkeypatch.setattr(projection, "PREFILL_SILU_MUL", True)
    act = layer.forward_then_silu_mul(x)
    assert act is not None and torch.equal(act, silu_and_mul(layer(x)))
    exact = x @ w.t()
    expand_ref(shrink_ref(x, a, batch.segments), b, offsets, rank, exact, batch.segments)
    torch.testing.assert_close(act, silu_and_mul(exact), atol=1e-4, rtol=1e-4)
    layer.lora.kernels = "overlap"
    assert layer.forward_then_silu_mul(x) is None


def _gate_up_layer(seed: int, t: int):
    """A [gate | up] ColumnParallelLinear (k 48, parts of 32, rank 8, 3 slots) with a stacked LoRA projection over T
    rows of random adapters: (layer, x, A, B, W, its BatchAdapters)."""
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection
    from radixlm.runtime.parallel.layers import ColumnParallelLinear

    dev = _device()
    rank, offsets, slots, k = 8, [0, 32, 64], 3, 48
    x, a, b, w, token_slots, _ = _stacked(seed, t, k, rank, offsets, slots, torch.float32)
    layer = ColumnParallelLinear(k, 64, bias=False).to(dev)
    stacked = torch.cat([w, a.reshape(-1, k)])
    layer.weight.data = stacked[:64]
    batch = BatchAdapters()
    batch.segments = LoRASegments.build(token_slots, slots, dev)
    layer.lora = LoRAProjection(stacked[64:].view(a.shape), b, offsets, rank, batch, use_triton=True,
                                kernels="stacked", stacked=stacked)
    return layer, x, a, b, w, batch

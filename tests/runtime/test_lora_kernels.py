"""SGMV shrink/expand: the Triton kernels (under TRITON_INTERPRET=1 on a CPU, or on CUDA) against the
torch reference, on small shapes with ragged segments, base-model rows and unused segments."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, segment_host, shrink_ref


@pytest.fixture(autouse=True)
def interpret(monkeypatch):
    if not torch.cuda.is_available():
        monkeypatch.setenv("TRITON_INTERPRET", "1")
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
    assert parts.shape == (2, t, pieces * rank), "k = 520: two partial sums over K, no atomics"
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
                                        (9, {"block_m": 16, "expand_n": 16})])
def test_work_items_cover_every_row_of_many_segments(t: int, override: dict) -> None:
    """Up to 16 segments of ragged lengths (some empty, one slot unused in the middle), base rows,
    more rows than segments or fewer, prefill-sized row blocks (T > 512) and the sweep's overrides:
    every adapter row is updated once, base rows never, and the grid is the bound, not slots x blocks."""
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

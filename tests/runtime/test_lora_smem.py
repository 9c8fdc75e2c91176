"""The LoRA kernels' tile rules against the device's shared memory (runtime/lora/smem.py): the H200
crash (the one-launch kernel in float32 at rank 16 asked for 263,168 B of 232,448) cannot recur for
any token count, rank, dtype or device limit; the tiles the rules pick run right (Triton's
interpreter on a CPU, CUDA when present)."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, shrink_ref

H200 = 232448  # max_shared_mem of the H200 (what the crash reported as the hardware limit)
RANKS = [1, 4, 8, 16, 32, 48, 64, 100, 128, 256, 320, 512, 1024, 4096]


@pytest.fixture(autouse=True)
def needs_triton() -> None:
    """Interpreted on a CPU: tests/conftest.py sets TRITON_INTERPRET for the session, before triton's import."""
    pytest.importorskip("triton")


def _device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def test_the_crashing_shape_now_fits() -> None:
    """check_kernels' case on the H200: float32, T = 1 and 29, rank 16 (K tiles of 1,024 asked for 2 x
    (16 + 16) x 1,024 x 4 + 1,024 = 263,168 B). The bound covers that figure, and the rule halves the
    K step; bf16 at rank 16 (the serving default) keeps its tiles."""
    from radixlm.runtime.lora.sgmv_fused import FusedTiles, fused_smem, fused_tiles

    crashed = FusedTiles(block_m=16, block_k=1024, block_n=512, span=512)
    assert fused_smem(crashed, 16, 4) >= 263168 > H200
    for t in (1, 29):
        tile = fused_tiles(t, rank=16, elt=4, smem=H200)
        assert tile is not None and tile.block_k == 512 and fused_smem(tile, 16, 4) <= H200
        assert fused_tiles(t, rank=16, elt=2, smem=H200) == crashed


@pytest.mark.parametrize("smem", [H200, 101376, 49152])  # sm_90; sm_86 / sm_89 (99 KB); 48 KB
@pytest.mark.parametrize("elt", [2, 4])
def test_every_rank_and_size_fits_the_device(smem: int, elt: int) -> None:
    """Over ranks 1..4,096 (--max-lora-rank has no upper bound), decode to prefill token counts and
    every projection's n·R: the shrink, expand and one-launch tiles stay under the device's limit;
    the one-launch kernel is offered only up to FUSED_MAX_RANK and the expand loops over the rank."""
    from radixlm.runtime.lora.sgmv_fused import FUSED_MAX_RANK, fused_smem, fused_tile_for, fused_tiles, use_fused
    from radixlm.runtime.lora.sgmv_triton import EXPAND_MAX_BLOCK_R, expand_block_r, expand_smem, shrink_smem, tiles

    for rank in RANKS:
        assert expand_block_r(rank) <= EXPAND_MAX_BLOCK_R and expand_block_r(rank) * -(-rank // expand_block_r(rank)) >= rank
        for t in (1, 8, 32, 64, 256, 1100, 8192):
            for k, pieces in ((4096, 3), (4096, 2), (4096, 1), (14336, 1)):
                tile = tiles(t, k, pieces * rank, elt=elt, smem=smem)
                assert shrink_smem(tile.block_m, tile.shrink_n, tile.block_k, elt, tile.stages) <= smem
                assert expand_smem(tile.block_m, tile.expand_n, elt) <= smem
                assert tile.block_k >= 16 and tile.shrink_n >= 16 and tile.expand_n >= 16
            fused = fused_tiles(t, rank=rank, elt=elt, smem=smem)
            assert fused is None or fused_smem(fused, rank, elt) <= smem
            assert use_fused(t, rank) == (t <= 32 and rank <= FUSED_MAX_RANK)
    x = torch.zeros(1, 64, dtype=torch.float32)
    assert fused_tile_for(x, FUSED_MAX_RANK + 1) is None and fused_tile_for(x, 16) is not None


def test_fused_kernel_at_the_rules_float32_tile_matches_the_reference() -> None:
    """The one-launch kernel with the tile the rule picks for float32 at rank 16 (K step 512) over a K
    of 1,300 (three steps, the last one masked), checked against the float64 reference."""
    from radixlm.runtime.lora.sgmv_fused import fused_tiles, sgmv_fused

    dev = _device()
    g = torch.Generator().manual_seed(21)
    t, k, rank, offsets, slots = 3, 1300, 16, [0, 40, 56, 72], 4
    a = torch.randn(slots, 3 * rank, k, generator=g).to(dev) / k**0.5
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dev)
    x = torch.randn(t, k, generator=g).to(dev)
    seg = LoRASegments.build(torch.tensor([1, -1, 3]), slots, dev)
    tile = fused_tiles(t, rank=rank, elt=4, smem=H200)
    assert tile is not None and tile.block_k == 512
    out0 = torch.randn(t, offsets[-1], generator=g).to(dev)
    out = out0.clone()
    sgmv_fused(x, a, b, torch.tensor(offsets, dtype=torch.int32, device=dev), 40, rank, out, seg, tile)
    want = out0.double()
    expand_ref(shrink_ref(x.double(), a.double(), seg), b.double(), offsets, rank, want, seg)
    torch.testing.assert_close(out.double(), want, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[1], out0[1]), "the base row is untouched"


@pytest.mark.parametrize("rank", [80, 130])
def test_expand_loops_over_ranks_above_its_rank_step(rank: int) -> None:
    """Ranks above EXPAND_MAX_BLOCK_R (64) take several rank steps in one launch (80: two, the second
    masked past 80; 130: three): shrink + expand equal the reference, base rows untouched; and the
    layer's path (LoRAProjection, overlap) at such a rank gives the same update."""
    from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    dev = _device()
    g = torch.Generator().manual_seed(rank)
    t, k, offsets, slots = 6, 96, [0, 48, 80], 3
    a = (torch.randn(slots, 2 * rank, k, generator=g) / k**0.5).to(dev)
    b = torch.randn(slots, offsets[-1], rank, generator=g).to(dev)
    x = torch.randn(t, k, generator=g).to(dev)
    token_slots = torch.tensor([2, 0, -1, 2, 1, 0])
    seg = LoRASegments.build(token_slots, slots, dev)
    out0 = torch.randn(t, offsets[-1], generator=g).to(dev)
    want = out0.clone()
    expand_ref(shrink_ref(x, a, seg), b, offsets, rank, want, seg)
    out = out0.clone()
    sgmv_expand(sgmv_shrink(x, a, seg), b, torch.tensor(offsets, dtype=torch.int32, device=dev), 48, rank, out, seg)
    torch.testing.assert_close(out, want, atol=1e-4, rtol=1e-4)
    assert torch.equal(out[2], out0[2])
    assert (want - out0).abs().max() > 0.5, "the update is not empty"
    batch = BatchAdapters()
    batch.segments = seg
    proj = LoRAProjection(a, b, offsets, rank, batch, use_triton=True, kernels="fused")  # rank > 64: two launches
    torch.testing.assert_close(proj.finish(proj.begin(x), out0.clone()), want, atol=1e-4, rtol=1e-4)

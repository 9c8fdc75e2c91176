"""Large products in row blocks (runtime/dense_row_blocks.py): the same output, only for rows above the block, only
for weights larger than twice the L2, and the flag's values."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime import dense_row_blocks
from radixlm.runtime.dense_row_blocks import RowBlocks, attach_row_blocks, blocked_weight, resolve_rows
from radixlm.runtime.parallel.layers import ColumnParallelLinear, RowParallelLinear
from radixlm.runtime.server_args import ServerArgs


def _ints(*shape: int, seed: int = 0) -> torch.Tensor:
    """Small integers as float32: every product and sum is exact, whatever order a kernel adds in."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-4, 5, shape, generator=g).float()


@pytest.mark.parametrize("rows", [1, 3, 7, 10, 64])
def test_blocks_give_the_one_product(rows):
    w, x = _ints(6, 8), _ints(10, 8, seed=1)
    assert torch.equal(RowBlocks(w, rows)(x, None), x @ w.t())


def test_blocks_write_each_block_into_its_rows(monkeypatch):
    w, x = _ints(6, 8), _ints(10, 8, seed=1)
    seen = []
    real_mm = torch.mm

    def mm(a, b, out):
        seen.append((a.shape[0], out.data_ptr()))
        return real_mm(a, b, out=out)

    monkeypatch.setattr(dense_row_blocks.torch, "mm", mm)
    out = RowBlocks(w, 4)(x, None)
    assert [n for n, _ in seen] == [4, 4, 2]
    assert [ptr for _, ptr in seen] == [out[i].data_ptr() for i in (0, 4, 8)]  # no copy of a block's result


def test_covers_only_more_rows_than_a_block_and_refuses_a_bias():
    blocks = RowBlocks(_ints(6, 8), 4)
    assert not blocks.covers(_ints(4, 8)) and blocks.covers(_ints(5, 8))
    assert not blocks.covers(_ints(2, 5, 8))
    with pytest.raises(ValueError, match="bias"):
        blocks(_ints(5, 8), torch.zeros(6))
    with pytest.raises(ValueError, match="at least one"):
        RowBlocks(_ints(6, 8), 0)


class Counted(RowBlocks):
    calls = 0

    def __call__(self, x, bias):
        Counted.calls += 1
        return super().__call__(x, bias)


def test_linear_layers_take_the_blocks_above_their_row_count():
    torch.manual_seed(0)
    col, row = ColumnParallelLinear(8, 6, bias=False), RowParallelLinear(8, 6)
    with torch.no_grad():
        for layer in (col, row):
            layer.weight.copy_(_ints(6, 8))
        small, large = _ints(4, 8, seed=2), _ints(9, 8, seed=3)
        plain = {id(layer): (layer(small), layer(large)) for layer in (col, row)}
        col.row_blocks, row.row_blocks = Counted(col.weight, 4), Counted(row.weight, 4)
        Counted.calls = 0
        for layer in (col, row):
            assert torch.equal(layer(small), plain[id(layer)][0])
        assert Counted.calls == 0  # 4 rows: one product, as before
        for layer in (col, row):
            assert torch.equal(layer(large), plain[id(layer)][1])
        assert Counted.calls == 2


def test_only_weights_larger_than_twice_the_l2_are_blocked():
    l2 = 50 * 2**20
    gate_up = torch.empty(28672, 4096, dtype=torch.bfloat16, device="meta")
    down = torch.empty(4096, 14336, dtype=torch.bfloat16, device="meta")
    qkv = torch.empty(6144, 4096, dtype=torch.bfloat16, device="meta")
    lm_head = torch.empty(128256, 4096, dtype=torch.bfloat16, device="meta")
    assert blocked_weight(gate_up, l2) and blocked_weight(down, l2) and blocked_weight(lm_head, l2)
    assert not blocked_weight(qkv, l2)


def test_attach_leaves_cpu_weights_and_takes_a_stale_kernel_away():
    layer = ColumnParallelLinear(8, 6, bias=False)
    layer.row_blocks = RowBlocks(layer.weight, 2)
    assert attach_row_blocks(torch.nn.Sequential(layer), 2, 0) == []  # (a CPU weight: torch's product)
    assert layer.row_blocks is None


def test_flag_auto_and_off():
    assert ServerArgs().gemm_row_block is None
    assert resolve_rows(None) == dense_row_blocks.AUTO_ROWS
    assert resolve_rows(0) == 0 and resolve_rows(2048) == 2048
    with pytest.raises(ValueError, match="gemm_row_block"):
        ServerArgs(gemm_row_block=-1).resolve()


def test_a_model_prefills_through_row_blocks_as_through_one_product(tiny_model_dir):
    """The model's own forward (inference mode, parameters as weights) with every linear in row blocks: prompts
    longer than a block prefill and decode to the same greedy tokens (a GPU attaches blocks only to bf16 / fp16
    weights larger than twice the L2; here they are set by hand)."""
    from tests.runtime.helpers import greedy_req, make_scheduler, run_to_completion

    model_dir = tiny_model_dir("llama")
    reqs = lambda: [greedy_req("a", list(range(3, 60)), 6), greedy_req("b", list(range(100, 140)), 6)]  # noqa: E731
    expected = run_to_completion(make_scheduler(model_dir), reqs())
    sched = make_scheduler(model_dir)
    blocked = []
    for name, module in sched.runner.model.named_modules():
        if isinstance(module, (ColumnParallelLinear, RowParallelLinear)) and module.bias is None:
            module.row_blocks = Counted(module.weight, 16)
            blocked.append(name)
    Counted.calls = 0
    got = run_to_completion(sched, reqs())
    assert blocked and Counted.calls > 0  # the prefill's 97 rows went through the blocks
    assert {k: v["output_ids"] for k, v in got.items()} == {k: v["output_ids"] for k, v in expected.items()}

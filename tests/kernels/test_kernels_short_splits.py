"""The decode attention's short-context split plan (kernels/decode_attention.short_context_splits) and the
graph runner's choice of it: up to SHORT_SPLITS blocks of context, SHORT_SPLITS splits compute the same
partials as the default's larger count (so the same output), and the runner replays the short-context graph
only for steps whose longest context fits it."""
from __future__ import annotations

import torch

from radixlm.kernels import decode_attention as da
from radixlm.kernels.attention_ref import decode_attention_ref

HEAD_DIM = 64


def test_plan_only_where_the_default_splits_more(monkeypatch) -> None:
    cpu = torch.device("cpu")
    monkeypatch.setattr(da, "default_num_kv_splits", lambda batch, heads, device: 32)
    assert da.short_context_splits(1, 8, cpu) == (da.SHORT_SPLITS, da.SHORT_SPLITS * 16)  # interpreter blocks: 16
    monkeypatch.setattr(da, "default_num_kv_splits", lambda batch, heads, device: da.SHORT_SPLITS)
    assert da.short_context_splits(8, 8, cpu) is None


def test_short_plan_gives_the_default_plans_output(device, make_pool, assert_close) -> None:
    """Contexts of at most SHORT_SPLITS blocks (16 positions a block under the interpreter): the same output
    with SHORT_SPLITS splits as with 32 (the same one-block partials, merged); longer ones stay correct."""
    longest = da.SHORT_SPLITS * (16 if device == "cpu" else da.GPU_CONFIG["block_n"])
    for seq_lens in ([longest, 1, 17], [longest + 5, 40]):
        pool = make_pool(seq_lens, 2, HEAD_DIM, torch.float32, device)
        q = torch.randn(len(seq_lens), 8, HEAD_DIM, device=device)
        idx = torch.tensor(pool.rows, device=device)
        lens = torch.tensor(seq_lens, device=device)
        args = (q, pool.k_buffer, pool.v_buffer, pool.req_to_token, idx, lens, HEAD_DIM**-0.5)
        short = da.decode_attention(*args, num_kv_splits=da.SHORT_SPLITS)
        assert_close(short, decode_attention_ref(*args), torch.float32)
        if max(seq_lens) <= longest:
            torch.testing.assert_close(short, da.decode_attention(*args, num_kv_splits=32), rtol=1e-6, atol=1e-6)


class _Graph:
    def __init__(self, name: str, log: list[str]) -> None:
        self.name, self.log = name, log

    def replay(self) -> None:
        self.log.append(self.name)


def test_runner_replays_the_short_graph_while_the_longest_context_fits() -> None:
    from types import SimpleNamespace

    from radixlm.runtime.cuda_graph_runner import CudaGraphRunner
    from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode

    log: list[str] = []
    runner = object.__new__(CudaGraphRunner)  # the replay path alone: no device, no capture
    runner.buckets, runner.pad_row = [1, 2], 0
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens"):
        setattr(runner, name, torch.zeros(2, dtype=torch.int64))
    runner.graphs = {(b, False, False): _Graph(f"plain{b}", log) for b in (1, 2)}
    runner.outputs = {(b, False, False): torch.full((b, 4), float(b)) for b in (1, 2)}
    runner.short_graphs = {(1, False): _Graph("short1", log)}
    runner.short_outputs = {(1, False): torch.full((1, 4), -1.0)}
    runner.aux_outputs, runner.short_aux_outputs, runner.short_max_len = {}, {}, 1024
    runner.runner = SimpleNamespace(model=SimpleNamespace(compute_logits=lambda hidden: hidden))

    def step(seq_lens: list[int]) -> torch.Tensor:
        n = len(seq_lens)
        ids = torch.zeros(n, dtype=torch.int64)
        return runner.replay(ForwardBatch(
            mode=ForwardMode.DECODE, input_ids=ids, positions=ids, out_cache_loc=ids, req_pool_indices=ids,
            seq_lens=torch.tensor(seq_lens), req_pool_indices_cpu=[0] * n, seq_lens_cpu=seq_lens,
            extend_seq_lens_cpu=[1] * n, extend_seq_lens=ids, extend_start_loc=ids, logits_indices=ids))

    assert step([1024]).eq(-1).all() and log == ["short1"]
    assert step([1025]).eq(1).all() and log[-1] == "plain1"
    assert step([5, 9]).eq(2).all() and log[-1] == "plain2"  # no short graph for this bucket

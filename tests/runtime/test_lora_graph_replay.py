"""A LoRA decode run as a CUDA graph replays it, emulated on a CPU (Triton kernels interpreted)."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from tests.fixtures.lora_adapters import make_peft_adapter, peft_model
from tests.runtime.test_lora_model import _forward, _prompts, _reference, _runner


@pytest.mark.parametrize("kernels", ["overlap", "fused", "stacked", "stacked-rows", "stacked-rows-silu"])
def test_decode_graph_replay_serves_the_adapters(tiny_model_dir, tmp_path, monkeypatch, kernels: str) -> None:
    """Under CUDA graphs a decode's LoRA kernels read fixed segment buffers, and a replay re-runs every
    device op recorded in the capture region (CudaGraphRunner._run: `use_graph_segments(bs)`, then the
    model). The H200 float32 swap check served no adapter in any graph-replayed decode step (every step
    after the prefill at batch <= the largest bucket): that region reset the buffers' slots to -1 after
    `prepare` had filled them. Emulated on a CPU with the Triton kernels interpreted: prefill, then the
    same decode step eagerly and as a replay of the capture region; both must equal the reference.
    `kernels`: --lora-kernels (overlap runs shrink then expand here: no side stream on a CPU; fused
    runs the one-launch kernel, the prefill too: 21 rows <= FUSED_MAX_TOKENS; stacked runs the base
    GEMM over the weight with every slot's A under it, then the expand reading each row's slot; stacked-rows
    the expand by rows, reading the graph buffer's row slots, sgmv_rows.py; -silu with gate_up's activation
    computed by its expand, ROWS_SILU_MUL)."""
    pytest.importorskip("triton")  # interpreted on a CPU: tests/conftest.py sets TRITON_INTERPRET for the session
    from radixlm.runtime.lora import projection

    monkeypatch.setattr(projection, "STACKED_MIN_TOKENS", 1)  # stacked: the 3-row decode step takes the stacked path too
    monkeypatch.setattr(projection, "ROWS_EXPAND_MAX_TOKENS", 64 if kernels.startswith("stacked-rows") else 0)
    monkeypatch.setattr(projection, "ROWS_SILU_MUL", kernels.endswith("-silu"))
    kernels = kernels.split("-")[0]
    model_dir = tiny_model_dir("llama")
    paths = {n: make_peft_adapter(model_dir, tmp_path / n, seed=s, r=4) for n, s in (("a", 11), ("b", 12))}
    runner = _runner(model_dir, paths, max_loras_per_batch=3, lora_kernels=kernels)
    lora = runner.lora
    assert (lora.pool.projections[(0, "gate_up_proj")].stacked is not None) == (kernels == "stacked")
    rows = monkeypatch_rows_expand(monkeypatch) if projection.ROWS_EXPAND_MAX_TOKENS else None
    for proj in lora.pool.projections.values():
        proj.use_triton = True  # the graph path's kernels (the torch reference needs host segments)
        proj.kernels = kernels
        if rows is not None:
            from radixlm.runtime.lora.sgmv_rows import rows_expand_fits

            proj.rows_fit = rows_expand_fits(proj.offsets, proj.rank, proj.b.shape[0])
    names = ["b", None, "a"]
    prompts = _prompts(runner.vocab_size, (7, 5, 9), seed=6)
    eager = _forward(runner, prompts, names)
    bs = len(names)
    lora.enable_graphs(8)
    lora._graph_buf[:8].fill_(7)  # stale rows: only the segments' lengths bound what the kernels read
    before = lora._graph_buf.clone()
    lora.use_graph_segments(bs)  # the capture: records, writes nothing
    assert torch.equal(lora._graph_buf, before), "binding the graph's segments must issue no device write"
    # the replay: prefill again (KV for the decode), then the decode step run as the capture region runs it
    runner.forward_local = _replaying(runner, bs)  # type: ignore[method-assign]
    replayed = _forward(runner, prompts, names)
    for name, ids, got, want in zip(names, prompts, replayed, eager):
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
        model = peft_model(model_dir, paths[name], merged=False) if name else None
        if model is not None:
            torch.testing.assert_close(got[-1], _reference(model, ids)[-1], atol=2e-4, rtol=2e-4)
    if rows is not None:  # every projection of the four forwards (prefill and decode, eager and replayed) expanded
        # by rows (gate_up's with the activation when -silu), the replayed decode's from the graph buffer
        n = sum(not (projection.ROWS_SILU_MUL and name == "gate_up_proj") for _, name in lora.pool.projections)
        assert len(rows) == 4 * n
        graph_buf = lora._graph_buf.untyped_storage().data_ptr()
        assert [r.untyped_storage().data_ptr() == graph_buf for r in rows] == [False] * (3 * n) + [True] * n


def monkeypatch_rows_expand(monkeypatch) -> list:
    """Record each call of the expand by rows (its row-slot buffer), calling through; with ROWS_SILU_MUL gate_up's
    expand with the activation must run instead of its plain one (a call of it recorded nowhere else fails)."""
    from radixlm.runtime.lora import projection, sgmv_rows

    calls: list = []
    real, real_silu = sgmv_rows.sgmv_expand_rows, sgmv_rows.sgmv_expand_rows_silu_mul

    def recorded(*args, **kwargs):
        calls.append(args[5])
        return real(*args, **kwargs)

    def recorded_silu(*args, **kwargs):
        assert projection.ROWS_SILU_MUL
        silu_calls.append(args[5])
        return real_silu(*args, **kwargs)

    silu_calls: list = []
    monkeypatch.setattr(sgmv_rows, "sgmv_expand_rows", recorded)
    monkeypatch.setattr(sgmv_rows, "sgmv_expand_rows_silu_mul", recorded_silu)
    return calls


def _replaying(runner: ModelRunner, bs: int):
    """runner.forward_local with decode steps of `bs` rows run as a graph replay would: `prepare` fills
    the segment buffers, then the capture region's ops (CudaGraphRunner._run) run over them."""
    eager = runner.forward_local

    def forward(batch: ForwardBatch) -> torch.Tensor:
        if batch.mode is not ForwardMode.DECODE:
            return eager(batch)
        assert batch.batch_size == bs and runner.lora.prepare(batch, graph=True)
        runner.attn_backend.begin_forward(batch)
        runner.lora.use_graph_segments(bs)
        return runner.model.compute_logits(runner.model(batch, runner.attn_backend))

    return forward

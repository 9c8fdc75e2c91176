"""The two-half decode forward (runtime/two_stream_decode.py) on one stream: the one-batch forward's hidden
states and KV writes row for row (to float32 rounding), and the interleaved order the two streams rely on."""
from __future__ import annotations

import random

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.two_stream_decode import TwoStreamDecode, first_half_rows, half_metadata, split_batch
from tests.runtime.helpers import make_scheduler


def _decode_batch(runner, rows: int, seed: int = 0) -> ForwardBatch:
    """`rows` requests with random prompts prefilled through the runner, then their decode batch."""
    rng = random.Random(seed)
    pool, table = runner.kv_pool, runner.req_to_token_pool
    ids, positions, slots, reqs, lens, chunks = [], [], [], [], [], []
    for _ in range(rows):
        n = rng.randint(3, 20)
        row = table.alloc()
        s = pool.alloc(n)
        table.write(row, 0, s)
        ids += [rng.randrange(3, 200) for _ in range(n)]
        positions += list(range(n))
        slots.append(s)
        reqs.append(row)
        lens.append(n)
        chunks.append(n)
    cpu = torch.device("cpu")
    prefill = ForwardBatch.for_rows(ForwardMode.EXTEND, ids, positions, torch.cat(slots), reqs, lens, chunks, cpu)
    runner.attn_backend.begin_forward(prefill)
    runner.model(prefill, runner.attn_backend)
    new = pool.alloc(rows)
    for row, n, s in zip(reqs, lens, new.tolist()):
        table.write(row, n, torch.tensor([s]))
    return ForwardBatch.for_rows(ForwardMode.DECODE, [rng.randrange(3, 200) for _ in range(rows)], lens, new, reqs,
                                 [n + 1 for n in lens], [1] * rows, cpu)


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_two_halves_equal_the_one_batch_forward(tiny_model_dir, kind: str) -> None:
    sched = make_scheduler(tiny_model_dir(kind), disable_cpu_decode_stack=True)
    runner, attn = sched.runner, sched.runner.attn_backend
    batch = _decode_batch(runner, 10)
    attn.begin_forward(batch)
    whole = runner.model(batch, attn)
    k_whole = runner.kv_pool.k_buffer[1][batch.out_cache_loc].clone()
    runner.kv_pool.k_buffer[1][batch.out_cache_loc] = 0  # the halves must write the new K again
    halves = split_batch(batch, first_half_rows(10))
    assert [h.batch_size for h in halves] == [8, 2]
    two = TwoStreamDecode(runner.model, attn, halves, tuple(half_metadata(attn, h) for h in halves), None).run()
    torch.testing.assert_close(two, whole, rtol=0, atol=1e-6)
    # (a GEMM over fewer rows may round a last bit differently on the CPU)
    torch.testing.assert_close(runner.kv_pool.k_buffer[1][batch.out_cache_loc], k_whole, rtol=0, atol=1e-6)


def test_halves_interleave_attention_with_the_other_halfs_gemms(tiny_model_dir) -> None:
    """Per layer: B's projections come between A's attention and A's output, and A's next projections between
    B's attention and B's output — what lets each attention run beside the other half's GEMMs."""
    sched = make_scheduler(tiny_model_dir("llama"), disable_cpu_decode_stack=True)
    runner, attn = sched.runner, sched.runner.attn_backend
    batch = _decode_batch(runner, 6, seed=1)
    halves = split_batch(batch, 4)
    order: list[str] = []
    for n, layer in enumerate(runner.model.layers):
        for name in ("project", "output"):
            fn = getattr(layer.self_attn, name)

            def logged(*a, _fn=fn, _tag=f"{name}{n}", **k):
                order.append(f"{_tag}{'AB'[a[0].shape[0] != 4]}")
                return _fn(*a, **k)

            setattr(layer.self_attn, name, logged)
    forward = attn.forward

    def attend(q, *a, **k):
        order.append(f"attn{'AB'[q.shape[0] != 4]}")
        return forward(q, *a, **k)

    attn.forward = attend
    TwoStreamDecode(runner.model, attn, halves, tuple(half_metadata(attn, h) for h in halves), None).run()
    assert order == ["project0A", "attnA", "project0B", "attnB", "output0A", "project1A", "attnA", "output0B",
                     "project1B", "attnB", "output1A", "output1B"]


class _Graph:
    def __init__(self, log: list[str], name: str) -> None:
        self.log, self.name = log, name

    def replay(self) -> None:
        self.log.append(self.name)


def _bare_graph_runner(runner, bs: int):
    """A CudaGraphRunner's state without capturing (no CUDA here): static buffers on the CPU."""
    from radixlm.runtime.cuda_graph_runner import CudaGraphRunner

    gr = CudaGraphRunner.__new__(CudaGraphRunner)
    gr.runner, gr.pad_row, gr.buckets, gr.max_bs = runner, runner.req_to_token_pool.pad_row, [bs], bs
    gr.input_ids = torch.zeros(bs, dtype=torch.int64)
    gr.positions = torch.zeros(bs, dtype=torch.int64)
    gr.out_cache_loc = torch.zeros(bs, dtype=torch.int64)
    gr.req_pool_indices = torch.full((bs,), gr.pad_row, dtype=torch.int64)
    gr.seq_lens = torch.ones(bs, dtype=torch.int32)
    gr.logits_indices = torch.arange(bs)
    gr.attn_stream = None
    gr.graphs, gr.outputs, gr.aux_outputs, gr.short_graphs = {}, {}, {}, {}
    gr.two_stream_graphs, gr.two_stream_outputs, gr.use_two_streams = {}, {}, True
    return gr


def test_graph_runner_runs_and_replays_the_two_stream_forward(tiny_model_dir) -> None:
    """The runner's two-stream forward over its static buffers equals the plain one; replay takes the two-stream
    graph of a captured bucket while `use_two_streams`, the one-stream graph otherwise."""
    sched = make_scheduler(tiny_model_dir("llama"), disable_cpu_decode_stack=True)
    runner, attn = sched.runner, sched.runner.attn_backend
    batch = _decode_batch(runner, 12, seed=2)
    gr = _bare_graph_runner(runner, 16)
    for name in ("input_ids", "positions", "out_cache_loc", "req_pool_indices", "seq_lens"):
        getattr(gr, name)[:12].copy_(getattr(batch, name))
    padded = gr._batch(16)
    attn.begin_forward(padded)
    whole = runner.model(padded, attn)
    with torch.inference_mode():  # as the runner captures
        two = gr._run_two_streams(16)
    torch.testing.assert_close(two, whole, rtol=0, atol=1e-6)
    log: list[str] = []
    gr.graphs[16, False, False] = _Graph(log, "one")
    gr.outputs[16, False, False] = whole
    gr.two_stream_graphs[16] = _Graph(log, "two")
    gr.two_stream_outputs[16] = two
    with torch.inference_mode():  # as the runner replays
        logits = gr.replay(batch)
        gr.use_two_streams = False
        gr.replay(batch)
    assert log == ["two", "one"]
    assert logits.shape[0] == 12 and torch.equal(gr.req_pool_indices[12:], torch.full((4,), gr.pad_row))


def test_two_streams_only_where_they_apply() -> None:
    """Captured with --decode-two-streams on, on CUDA, without LoRA, EAGLE-3's hidden states or several ranks."""
    from types import SimpleNamespace

    from radixlm.runtime.cuda_graph_runner import CudaGraphRunner

    def wanted(flag="on", device="cuda", lora=None, aux=()) -> bool:
        gr = CudaGraphRunner.__new__(CudaGraphRunner)
        gr.runner = SimpleNamespace(args=SimpleNamespace(decode_two_streams=flag), device=torch.device(device),
                                    lora=lora, model=SimpleNamespace(aux_layers=aux))
        return gr._two_streams_wanted()

    assert wanted()
    assert not wanted(flag="off")
    assert not wanted(device="cpu")
    assert not wanted(lora=object())
    assert not wanted(aux=(1, 2))


def test_gemm_sm_carveout_is_set_inside_and_restored() -> None:
    from radixlm.runtime.two_stream_decode import gemm_sm_carveout

    before = torch._C._get_sm_carveout_experimental()
    with gemm_sm_carveout(24):
        assert torch._C._get_sm_carveout_experimental() == 24
    assert torch._C._get_sm_carveout_experimental() == before
    with gemm_sm_carveout(None):
        assert torch._C._get_sm_carveout_experimental() == before
    with pytest.raises(RuntimeError), gemm_sm_carveout(8):
        raise RuntimeError("a failed capture")
    assert torch._C._get_sm_carveout_experimental() == before

"""The one-call CPU decode stack (`runtime/cpu_decode_step.py`) on the default model (GGUF Q4_1 kept
4-bit): built where it applies, its decode logits equal to the per-op layers' bit for bit (it runs the
same C kernels in the same order), and not built where it does not apply."""
from __future__ import annotations

import dataclasses
import shutil
from pathlib import Path

import pytest
import torch

from radixlm.runtime.cpu_decode_step import CpuDecodeStack
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.model_source import resolve_model_path
from radixlm.runtime.quantization.int4_cpu import int4_cpu_kernel_available
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs
from tests.runtime.test_model_logits import _forward_all_positions

pytestmark = [pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler: no decode stack"),
              pytest.mark.skipif(not int4_cpu_kernel_available(), reason="torch lacks the packed int4 CPU matmul")]


@pytest.fixture(scope="module")
def runner() -> ModelRunner:
    folder = Path(resolve_model_path(None))
    return ModelRunner(ServerArgs(model_path=str(folder), max_total_tokens=4096, device="cpu", cpu_threads=2,
                                  quantization="gguf").resolve(), folder)


def test_stack_logits_equal_the_per_op_layers(runner: ModelRunner) -> None:
    stack = runner.model.decode_stack
    assert isinstance(stack, CpuDecodeStack)
    prompts = [[1, 504, 3458, 314, 253, 1345, 30, 2], list(range(100, 141)), [7, 9, 11]]
    with_stack = _forward_all_positions(runner, prompts, chunks=[16, 64])  # last position: a 3-row decode step
    calls = []
    forward = stack.forward
    stack.forward = lambda *a: calls.append(1) or forward(*a)  # type: ignore[method-assign]
    _forward_all_positions(runner, prompts, chunks=[64])
    assert calls, "the decode step did not go through the stack"
    runner.model.decode_stack = None
    try:
        per_op = _forward_all_positions(runner, prompts, chunks=[16, 64])
    finally:
        runner.model.decode_stack = stack
    for a, b in zip(with_stack, per_op):
        assert torch.equal(a[-1], b[-1])  # the decode step
        assert torch.equal(a[:-1], b[:-1])  # the prefill (the stack does not apply)


def test_not_built_where_it_does_not_apply(runner: ModelRunner) -> None:
    kv, r2t = runner.kv_pool, runner.req_to_token_pool
    layer = runner.model.layers[0].mlp.down_proj
    saved = layer.quantized
    layer.quantized = None  # a layer without the 4-bit GEMV layout
    try:
        assert CpuDecodeStack.build(runner.model, kv, r2t, 0.125) is None
    finally:
        layer.quantized = saved
    assert CpuDecodeStack.build(runner.model, kv, r2t, 0.125) is not None
    runner.model.aux_layers = (1,)  # EAGLE-3 reads hidden states inside the stack
    try:
        assert CpuDecodeStack.build(runner.model, kv, r2t, 0.125) is None
    finally:
        runner.model.aux_layers = ()


def test_flag_keeps_the_per_op_path(runner: ModelRunner) -> None:
    args, stack = runner.args, runner.model.decode_stack
    runner.args = dataclasses.replace(args, disable_cpu_decode_stack=True)
    try:
        runner._make_attention_backend()
        assert runner.model.decode_stack is None
    finally:
        runner.args, runner.model.decode_stack = args, stack


def _prefilled(runner: ModelRunner, rid: str, prompt: list[int], room: int) -> Req:
    req = Req(rid, list(prompt), SamplingParams(), 0)
    req.req_pool_idx = runner.req_to_token_pool.alloc()
    req.slots = runner.kv_pool.alloc(len(prompt) + room)
    batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
    batch.add(req, req.slots[: len(prompt) - 1], prefix_len=0)
    fb, writes = batch.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(writes)
    runner.forward(fb)
    req.kv_len = len(prompt) - 1  # the last prompt token is the first decode input
    return req


def test_verify_rows_go_through_the_stack_with_the_logits_of_plain_decode_steps(runner: ModelRunner) -> None:
    """A verify step (each request's last token plus its drafts, one decode row per token: 2 requests, 1 + 6
    and 1 + 4 rows) runs as one stack call, and every row's logits are bit for bit those of the plain
    one-token decode steps that would compute that position: speculation cannot change a greedy output."""
    stack = runner.model.decode_stack
    assert isinstance(stack, CpuDecodeStack)
    prompts = [[1, 504, 3458, 314, 253, 1345, 30, 2, 77], list(range(100, 131))]
    drafts = [[11, 12, 13, 14, 15, 16], [901, 902, 903, 904]]
    verify = [_prefilled(runner, f"v{i}", p, 8) for i, p in enumerate(prompts)]
    plain = [_prefilled(runner, f"p{i}", p, 8) for i, p in enumerate(prompts)]
    calls = []
    forward = stack.forward
    stack.forward = lambda *a: calls.append(a[1].shape[0]) or forward(*a)  # type: ignore[method-assign]
    try:
        batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
        slots = torch.cat([r.slots[r.kv_len : r.kv_len + 1 + len(d)] for r, d in zip(verify, drafts)])
        batch.set_decode_rows(verify, slots, drafts, [None, None])
        fb, writes = batch.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(writes)
        got = runner.forward(fb)
        assert calls == [sum(1 + len(d) for d in drafts)], "the verify step did not go through the stack"
        rows = iter(got)
        for req, draft in zip(plain, drafts):
            for j, token in enumerate([req.input_ids[-1], *draft]):
                step = ScheduledBatch(ForwardMode.DECODE, [], [], [])
                req.output_ids = [token] if j else []
                if j:
                    req.input_ids = req.input_ids + req.output_ids
                    req.output_ids = []
                step.set_decode_rows([req], req.slots[req.kv_len : req.kv_len + 1], [[]], [None])
                fb, writes = step.to_forward_batch(runner.device)
                runner.req_to_token_pool.commit(writes)
                assert torch.equal(runner.forward(fb)[0], next(rows)), (req.rid, j)
                req.kv_len += 1
    finally:
        stack.forward = forward  # type: ignore[method-assign]

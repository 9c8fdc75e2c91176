"""--decode-l2-prefetch (runtime/decode_prefetch.py): which weight is warmed after which GEMM, the plan's
parsing, where the switch applies, and that a forward with the hooks in place gives the same logits."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.decode_prefetch import MB, DecodeL2Prefetch, PrefetchPlan, build
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs


def _runner(tiny_model_dir, **flags) -> ModelRunner:
    model_dir = tiny_model_dir("llama")
    return ModelRunner(ServerArgs(model_path=str(model_dir), max_total_tokens=1024, device="cpu", **flags).resolve(),
                       model_dir)


def test_plan_parses_overrides_and_refuses_unknown_fields() -> None:
    plan = PrefetchPlan.parse("after_qkv=32, mode=line,programs=64")
    assert (plan.after_qkv, plan.mode, plan.programs, plan.after_o) == (32.0, "line", 64, PrefetchPlan().after_o)
    assert PrefetchPlan.parse("") == PrefetchPlan()
    with pytest.raises(ValueError, match="after_lm_head"):
        PrefetchPlan.parse("after_lm_head=4")


def test_each_gemm_warms_its_successor_capped_at_its_size(tiny_model_dir) -> None:
    model = _runner(tiny_model_dir).model
    layers = model.layers
    pf = DecodeL2Prefetch(model, PrefetchPlan(after_qkv=48, after_o=1e-4, after_gate_up=0, after_down=8))
    nbytes = lambda w: w.numel() * w.element_size()  # noqa: E731
    for i, targets in enumerate(pf.targets):
        attn, mlp = layers[i].self_attn, layers[i].mlp
        assert targets["qkv"][0] is attn.o_proj.weight and targets["qkv"][1] == nbytes(attn.o_proj.weight)
        assert targets["o"][0] is mlp.gate_up_proj.weight and targets["o"][1] == min(int(1e-4 * MB),
                                                                                     nbytes(mlp.gate_up_proj.weight))
        assert "gate_up" not in targets  # 0 MB: nothing
        head = model.lm_head if model.lm_head is not None else model.embed_tokens
        successor = layers[i + 1].self_attn.qkv_proj if i + 1 < len(layers) else head  # the last: the LM head
        assert targets["down"][0] is successor.weight
        assert targets["down"][1] == min(8 * MB, nbytes(successor.weight))
    mlp = layers[0].mlp
    mlp.gate_up_proj.quantized = object()  # a quantized layer streams its codes, not this weight
    try:
        assert "o" not in DecodeL2Prefetch(model, PrefetchPlan()).targets[0]
    finally:
        mlp.gate_up_proj.quantized = None


def test_switch_applies_on_cuda_only(tiny_model_dir) -> None:
    runner = _runner(tiny_model_dir, decode_l2_prefetch="on", decode_pdl="on")
    assert runner.model.l2_prefetch is None  # no L2 to warm on the CPU
    assert build(runner.model, "on", torch.device("cpu"), torch.bfloat16) is None
    assert build(runner.model, "off", torch.device("cuda"), torch.bfloat16) is None
    assert build(runner.model, "on", torch.device("cuda"), torch.float32) is None  # 4-byte GEMMs: not measured


class _Recording(DecodeL2Prefetch):
    """The real prefetcher, also noting the order of its calls."""

    calls: list[tuple[int, str]]

    def after(self, layer: int, gemm: str) -> None:
        self.calls.append((layer, gemm))
        super().after(layer, gemm)


def test_decode_with_the_hooks_gives_the_same_logits(tiny_model_dir) -> None:
    runner = _runner(tiny_model_dir, disable_cpu_decode_stack=True)  # the per-layer path the GPU runs
    model = runner.model
    plan = PrefetchPlan(max_bs=2)
    pf = _Recording(model, plan)
    pf.calls = []

    def decode(rows: int, with_hooks: bool) -> torch.Tensor:
        reqs = []
        for i in range(rows):
            req = Req(f"{with_hooks}{i}", [5 + i, 9, 11], SamplingParams(), 0)
            req.req_pool_idx = runner.req_to_token_pool.alloc()
            req.slots = runner.kv_pool.alloc(4)
            req.output_ids = [3]
            reqs.append(req)
        batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
        for req in reqs:
            batch.add(req, req.slots[:3], prefix_len=0)
        fb, writes = batch.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(writes)
        runner.forward(fb)
        batch = ScheduledBatch(ForwardMode.DECODE, reqs, [1] * rows, [3] * rows, new_slots=[r.slots[3:] for r in reqs])
        fb, writes = batch.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(writes)
        model.l2_prefetch = pf if with_hooks else None
        assert pf.applies(fb) == (rows <= plan.max_bs)
        out = runner.forward(fb)
        model.l2_prefetch = None
        return out

    for rows in (1, 3):
        assert torch.equal(decode(rows, False), decode(rows, True))
    # batch 1 hooked each GEMM of each layer in order; batch 3 (> max_bs) none
    assert pf.calls == [(i, gemm) for i in range(len(model.layers)) for gemm in ("qkv", "o", "gate_up", "down")]

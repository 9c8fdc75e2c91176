"""The model on the Triton kernels (the CPU interpreter without CUDA) against transformers: the fused
decode layer (rotary + q/k norm + KV store in one launch, one-launch decode attention, the fused
tail) and the unfused kernels (--disable-decode-fusion) give the same logits, prefill, chunked
prefill on a cached prefix and decode. Here, not in tests/runtime, because the interpreter must be
chosen before triton is imported (this directory's conftest does that)."""
from __future__ import annotations

import pytest
import torch

from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.server_args import ServerArgs
from tests.runtime.test_model_logits import _forward_all_positions, _reference_logits


@pytest.mark.parametrize("kind", ["llama3", "qwen2", "qwen3"])  # plain, qkv bias, q/k norm
@pytest.mark.parametrize("fused", [True, False], ids=["fused", "unfused"])
def test_triton_bundle_logits_match_transformers(tiny_model_dir, device, kind: str, fused: bool) -> None:
    model_dir = tiny_model_dir(kind)
    args = ServerArgs(model_path=str(model_dir), max_total_tokens=512, device=device, dtype="float32",
                      attention_backend="triton", disable_cuda_graph=True, disable_decode_fusion=not fused)
    runner = ModelRunner(args.resolve(), model_dir)
    assert runner.model.ops.name == ("triton" if fused else "triton-unfused")
    assert (runner.model.ops.rotary_store_kv is not None) == fused
    g = torch.Generator().manual_seed(2)
    prompts = [torch.randint(0, runner.vocab_size, (n,), generator=g).tolist() for n in (3, 21, 40)]
    ours = _forward_all_positions(runner, prompts, chunks=[16, 64])
    for o, r in zip(ours, _reference_logits(model_dir, prompts)):
        torch.testing.assert_close(o.cpu(), r, atol=2e-4, rtol=1e-4)

"""Our model code against transformers' on the same weights: prefill, chunked prefill on a cached
prefix, and decode, batched with ragged lengths."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.model_runner import ModelRunner
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.server_args import ServerArgs


def _forward_all_positions(runner: ModelRunner, prompts: list[list[int]], chunks: list[int]) -> list[torch.Tensor]:
    """Feed each prompt in `chunks`-sized extend steps (all prompts batched per step), then one decode
    step per prompt with its last token repeated; returns logits at every position."""
    reqs = []
    for i, ids in enumerate(prompts):
        req = Req(str(i), list(ids), SamplingParams(), 0)
        req.req_pool_idx = runner.req_to_token_pool.alloc()
        req.slots = runner.kv_pool.alloc(len(ids) + 1)
        reqs.append(req)
    logits: list[list[torch.Tensor]] = [[] for _ in prompts]
    done = [0] * len(prompts)
    for chunk in chunks:
        batch = ScheduledBatch(ForwardMode.EXTEND, [], [], [])
        for i, req in enumerate(reqs):
            n = min(chunk, len(req.input_ids) - done[i])
            if n > 0:
                batch.add(req, req.slots[done[i] : done[i] + n], prefix_len=done[i])
        if not batch.reqs:
            break
        fb, slot_writes = batch.to_forward_batch(runner.device)
        runner.req_to_token_pool.commit(slot_writes)
        fb.logits_indices = torch.arange(fb.num_tokens)
        out = runner.forward(fb)
        start = 0
        for req, p, n in zip(batch.reqs, batch.prefix_lens, batch.extend_lens):
            i = int(req.rid)
            logits[i].append(out[start : start + n])
            start += n
            done[i] = p + n
    # one decode step: re-feed the first token at position len (checks the decode path)
    for req in reqs:
        req.output_ids = [req.input_ids[0]]
    batch = ScheduledBatch(ForwardMode.DECODE, reqs, [1] * len(reqs), [len(r.input_ids) for r in reqs],
                           new_slots=[r.slots[len(r.input_ids) :] for r in reqs])
    fb, slot_writes = batch.to_forward_batch(runner.device)
    runner.req_to_token_pool.commit(slot_writes)
    dec = runner.forward(fb)
    return [torch.cat(logits[i] + [dec[i : i + 1]]) for i in range(len(prompts))]


def _reference_logits(model_dir: Path, prompts: list[list[int]], hf_model=None) -> list[torch.Tensor]:
    from transformers import AutoModelForCausalLM

    model = hf_model or AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    outs = []
    with torch.no_grad():
        for ids in prompts:
            full = torch.tensor([ids + [ids[0]]])
            outs.append(model(full).logits[0].float())
    return outs


@pytest.mark.parametrize("kind", ["llama", "llama3", "mistral", "qwen2", "qwen3", "tied"])
def test_logits_match_transformers(tiny_model_dir, kind: str) -> None:
    model_dir = tiny_model_dir(kind)
    runner = ModelRunner(ServerArgs(model_path=str(model_dir), max_total_tokens=2048, device="cpu").resolve(), model_dir)
    g = torch.Generator().manual_seed(1)
    vocab = runner.vocab_size
    prompts = [torch.randint(0, vocab, (n,), generator=g).tolist() for n in (3, 17, 40, 300)]
    ours = _forward_all_positions(runner, prompts, chunks=[8, 8, 64, 1000])
    ref = _reference_logits(model_dir, prompts)
    for o, r in zip(ours, ref):
        assert o.shape == r.shape
        torch.testing.assert_close(o, r, atol=2e-4, rtol=1e-4)


def test_default_model_logits_match_transformers_gguf(default_model_dir: Path, gguf_reference_model) -> None:
    """Against transformers loading the GGUF file itself (tests/conftest.py), so a conversion bug cannot hide."""
    hf = gguf_reference_model
    runner = ModelRunner(ServerArgs(dtype="float32", max_total_tokens=2048, device="cpu").resolve(), default_model_dir)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    # Not '"Hello " * 40': on that repetitive prompt activations reach ~500 by layer 2 and bfloat16
    # rounding alone (the float32 model with its weights rounded to bfloat16) already misses this bound
    # 4x; the quantized path's bfloat16 matmul inputs reach 43% argmax agreement there. A stated limit of
    # the opt-in path (docs/architecture.md), measured by benchmarks/cpu.py on chat prompts instead.
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fib(n):\n    return")]
    ours = _forward_all_positions(runner, prompts, chunks=[5, 100])
    ref = _reference_logits(default_model_dir, prompts, hf_model=hf)
    for o, r in zip(ours, ref):
        scale = r.abs().max().item()
        assert (o - r).abs().max().item() < 1e-4 * scale + 1e-3


def test_quantized_default_model_close_to_float32(default_model_dir: Path) -> None:
    """--quantization gguf (GGUF blocks kept 4-bit, bfloat16 matmul inputs) against the same weights in
    float32: logits within 3% of their range on average per position, and the same argmax at
    >= 90% of positions (random-ish text has near ties; the benchmark reports chat-prompt agreement)."""
    from transformers import AutoTokenizer

    quant = ModelRunner(ServerArgs(quantization="auto", max_total_tokens=2048, device="cpu").resolve(), default_model_dir)
    if quant.quantization != "gguf":
        pytest.skip("no packed int4 CPU matmul in this torch")
    fp32 = ModelRunner(ServerArgs(dtype="float32", max_total_tokens=2048, device="cpu").resolve(), default_model_dir)
    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    # Not '"Hello " * 40': on that repetitive prompt activations reach ~500 by layer 2 and bfloat16
    # rounding alone (the float32 model with its weights rounded to bfloat16) already misses this bound
    # 4x; the quantized path's bfloat16 matmul inputs reach 43% argmax agreement there. A stated limit of
    # the opt-in path (docs/architecture.md), measured by benchmarks/cpu.py on chat prompts instead.
    prompts = [tok.encode(t) for t in ("The capital of France is", "def fib(n):\n    return")]
    for q, r in zip(_forward_all_positions(quant, prompts, chunks=[5, 100]),
                    _forward_all_positions(fp32, prompts, chunks=[5, 100])):
        scale = (r.amax(-1) - r.amin(-1)).mean().item()
        assert (q - r).abs().mean(-1).max().item() < 0.03 * scale
        assert (q.argmax(-1) == r.argmax(-1)).float().mean().item() >= 0.9

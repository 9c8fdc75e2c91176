"""Tensor parallelism on gloo: TP=2 on tiny Llama / Qwen2 (4 heads, 2 KV heads) and TP=3 on the
default model (9 heads, 3 KV heads) give TP=1's greedy outputs; a TP size that does not split the
heads is refused up front; a rank that dies fails its requests with a clear error, not a hang."""
from __future__ import annotations

import os
import signal
import time

import pytest

import radixlm
from radixlm.runtime.model_config import ModelConfig
from radixlm.runtime.parallel.layers import TPLayout, check_model_parallel
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.tokenizer_manager import SchedulerDiedError
from tests.parallel.helpers import ENGINE_OPTIONS, assert_same_or_near_tie, greedy, random_prompts, reference

MAX_NEW = 10


@pytest.fixture(scope="module")
def llama_tp2(tiny_model_dir):
    # Chunked prefill and the radix cache on: rank 0 re-points req_to_token rows the others must follow.
    with radixlm.Engine(str(tiny_model_dir("llama")), tp_size=2, chunked_prefill_size=32, **ENGINE_OPTIONS) as e:
        yield e


def test_tp2_matches_tp1_llama(llama_tp2, tiny_model_dir) -> None:
    prompts = random_prompts(6, 390, seed=1)
    prompts[0] = random_prompts(1, 390, seed=9, max_len=1)[0] * 40 + prompts[0]
    shared = [prompts[0] + p[:10] for p in prompts[1:4]]  # prompts[0] is cached once it ran
    refs = reference(tiny_model_dir("llama"), prompts + shared, MAX_NEW)
    assert_same_or_near_tie(greedy(llama_tp2, prompts, MAX_NEW), refs[: len(prompts)])
    outs = llama_tp2.generate(input_ids=shared, sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW,
                                                                 "ignore_eos": True})
    assert_same_or_near_tie([o["output_ids"] for o in outs], refs[len(prompts):])
    assert all(o["meta_info"]["cached_tokens"] >= 40 for o in outs)
    info = llama_tp2.get_server_info()
    assert info["kv_locked_tokens"] == 0 and info["max_total_num_tokens"] == ENGINE_OPTIONS["max_total_tokens"]


def test_tp2_matches_tp1_qwen2_and_n2_without_radix_cache(tiny_model_dir) -> None:
    """Qwen2 has qkv biases (sliced per rank). Without the radix cache, n > 1 copies the prompt KV
    on rank 0 between steps: the other rank must replay the copy."""
    model_dir = tiny_model_dir("qwen2")
    prompts = random_prompts(4, 390, seed=2)
    refs = reference(model_dir, prompts, MAX_NEW)
    with radixlm.Engine(str(model_dir), tp_size=2, disable_radix_cache=True, **ENGINE_OPTIONS) as e:
        assert_same_or_near_tie(greedy(e, prompts, MAX_NEW), refs)
        pair = e.generate(input_ids=prompts[0], sampling_params={"temperature": 0, "max_new_tokens": MAX_NEW,
                                                                  "ignore_eos": True, "n": 2})
    assert_same_or_near_tie([o["output_ids"] for o in pair], [refs[0], refs[0]])


def test_tp3_matches_tp1_default_model(default_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    texts = ["The capital of France is", "def fibonacci(n):", "Once upon a time, a robot"]
    prompts = [tok.encode(t) for t in texts]
    refs = reference(default_model_dir, prompts, 8)
    with radixlm.Engine(str(default_model_dir), tp_size=3, **ENGINE_OPTIONS) as e:
        assert_same_or_near_tie(greedy(e, prompts, 8), refs)


def test_tp_size_that_does_not_split_the_heads_is_refused(default_model_dir, tiny_model_dir) -> None:
    start = time.monotonic()
    with pytest.raises(ValueError, match=r"tp_size: 2 does not divide this model's 9 attention heads"):
        radixlm.Engine(str(default_model_dir), tp_size=2, **ENGINE_OPTIONS)
    assert time.monotonic() - start < 30  # refused before any process starts
    cfg = ModelConfig.from_pretrained(tiny_model_dir("llama"))  # 4 heads, 2 KV heads
    with pytest.raises(ValueError, match="tp_size: 3"):
        check_model_parallel(cfg, 3, 1)
    with pytest.raises(ValueError, match="pp_size"):
        check_model_parallel(cfg, 1, 3)  # 2 layers


def test_parallel_server_args_are_checked() -> None:
    for bad, field in [({"tp_size": 0}, "tp_size"), ({"pp_size": 0}, "pp_size"), ({"nnodes": 2}, "dist_init_addr"),
                       ({"nnodes": 2, "dist_init_addr": "h:1", "tp_size": 3}, "nnodes"),
                       ({"node_rank": 1}, "node_rank"), ({"dist_init_addr": "nohost"}, "dist_init_addr"),
                       ({"load_balance_method": "random"}, "load_balance_method"),
                       ({"nnodes": 2, "dist_init_addr": "h:1", "tp_size": 2, "dp_size": 2}, "dp_size")]:
        with pytest.raises(ValueError, match=field):
            ServerArgs(**bad)


def test_replicated_kv_heads_layout(tiny_model_dir) -> None:
    """4 heads / 2 KV heads at TP=4: one query head per rank, each rank a copy of the KV head it reads."""
    import torch

    cfg = ModelConfig.from_pretrained(tiny_model_dir("llama"))
    d = cfg.head_dim
    k_proj = torch.arange(cfg.num_kv_heads * d, dtype=torch.float32)[:, None].repeat(1, 3)
    seen = []
    for rank in range(4):
        layout = TPLayout(rank=rank, size=4, head_dim=d, heads=1, kv_heads=1, kv_head_start=rank * 2 // 4,
                          intermediate=cfg.intermediate_size // 4, vocab_shard=-(-cfg.vocab_size // 4),
                          vocab_size=cfg.vocab_size)
        part = layout.shard("layers.0.self_attn.k_proj.weight", k_proj)
        seen.append(int(part[0, 0]) // d)
        emb = layout.shard("embed_tokens.weight", torch.ones(cfg.vocab_size, 2))
        assert emb.shape == (layout.vocab_shard, 2)
    assert seen == [0, 0, 1, 1]  # query heads 0,1 read KV head 0; heads 2,3 read KV head 1


def test_a_dead_rank_fails_requests_clearly(llama_tp2) -> None:
    """Last in the module: it kills the shared TP=2 engine's rank 1 mid-generation."""
    tm = llama_tp2.tokenizer_manager
    procs = tm.replicas[0].procs
    stream = llama_tp2.generate(input_ids=[5, 6, 7], sampling_params={"temperature": 0, "max_new_tokens": 400,
                                                                       "ignore_eos": True}, stream=True)
    next(stream)
    os.kill(procs[1].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(SchedulerDiedError, match=r"rank 1 of 2 exited \(code -9\)"):
        for _ in stream:
            pass
    assert time.monotonic() - start < 30
    with pytest.raises(SchedulerDiedError, match="rank 1 of 2"):
        llama_tp2.generate(input_ids=[1, 2], sampling_params={"max_new_tokens": 2})
    deadline = time.monotonic() + 10
    while any(p.is_alive() for p in procs) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(p.is_alive() for p in procs)

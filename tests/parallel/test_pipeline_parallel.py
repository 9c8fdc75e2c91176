"""Pipeline parallelism: PP=2 gives PP=1's greedy outputs, with and without micro-batches in flight;
a step split into token ranges computes the same logits as the whole step."""
from __future__ import annotations

import torch

import radixlm
from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.parallel.layers import stage_layers
from radixlm.runtime.parallel.worker import split_batch
from tests.parallel.helpers import ENGINE_OPTIONS, assert_same_or_near_tie, greedy, random_prompts, reference
from tests.runtime.helpers import greedy_req, make_scheduler

MAX_NEW = 10


def test_pp2_matches_pp1_with_micro_batches(tiny_model_dir) -> None:
    model_dir = tiny_model_dir("llama")
    prompts = random_prompts(6, 390, seed=3)
    refs = reference(model_dir, prompts, MAX_NEW)
    # Parts of >= 2 tokens: every prefill and every decode step of 4+ requests runs as 2 micro-batches.
    with radixlm.Engine(str(model_dir), pp_size=2, chunked_prefill_size=48, pp_micro_batch_tokens=2,
                        **ENGINE_OPTIONS) as e:
        assert_same_or_near_tie(greedy(e, prompts, MAX_NEW), refs)
        assert_same_or_near_tie([greedy(e, [prompts[1]], MAX_NEW)[0]], [refs[1]])  # one request: no split
        assert e.get_server_info()["kv_locked_tokens"] == 0


def test_split_batch_computes_the_same_logits(tiny_model_dir) -> None:
    sched = make_scheduler(tiny_model_dir("llama"))
    runner = sched.runner
    prompts = random_prompts(3, 390, seed=4, max_len=30)
    for i, ids in enumerate(prompts):
        sched.handle(greedy_req(f"r{i}", ids + [7] * 5, 4))
    batch = sched._schedule_prefill()
    assert batch is not None and len(batch.reqs) == 3
    fb, slot_writes = batch.to_forward_batch(sched.device)
    sched.req_to_token_pool.commit(slot_writes)
    # Parts first: the later parts must read the KV the earlier ones stored (requests cut in two).
    parts = split_batch(fb, 3)
    assert sum(p.num_tokens for p in parts) == fb.num_tokens and len(parts) == 3
    split_logits = torch.cat([runner.forward_local(p) for p in parts])
    whole = runner.forward_local(fb)
    torch.testing.assert_close(split_logits, whole, rtol=1e-4, atol=1e-4)
    sched.process_results(batch, whole)
    decode = sched._schedule_decode()
    assert decode is not None and decode.mode is ForwardMode.DECODE
    dfb, slot_writes = decode.to_forward_batch(sched.device)
    sched.req_to_token_pool.commit(slot_writes)
    split_logits = torch.cat([runner.forward_local(p) for p in split_batch(dfb, 2)])
    torch.testing.assert_close(split_logits, runner.forward_local(dfb), rtol=1e-4, atol=1e-4)


def test_stage_layers_cover_every_layer_once() -> None:
    for layers in (2, 7, 30, 32):
        for stages in range(1, min(layers, 8) + 1):
            ranges = [stage_layers(layers, s, stages) for s in range(stages)]
            assert ranges[0][0] == 0 and ranges[-1][1] == layers
            assert all(a[1] == b[0] for a, b in zip(ranges, ranges[1:]))
            assert max(e - s for s, e in ranges) - min(e - s for s, e in ranges) <= 1

"""Data parallelism: the cache-aware router (unit), and two replicas behind one Engine: prefix-sharing
requests land on the same replica, unrelated ones spread, outputs merge back, and a replica that is
killed fails only its own requests while the other keeps serving."""
from __future__ import annotations

import os
import signal
import time

import pytest

import radixlm
from radixlm.runtime.parallel.router import Router
from radixlm.runtime.tokenizer_manager import SchedulerDiedError
from tests.parallel.helpers import ENGINE_OPTIONS, assert_same_or_near_tie, random_prompts, reference

GREEDY = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}


# ------------------------------------------------------------------------------ router (no processes)
def test_cache_aware_router_follows_prefixes_and_spreads_the_rest() -> None:
    router = Router("cache_aware", [10_000, 10_000])
    system = list(range(100, 164))
    first = router.select(system + [1, 2], None, [0, 0])
    assert all(router.select(system + [i, i + 1], None, [0, 0]) == first for i in range(3, 30, 2))
    other = router.select(list(range(500, 540)), None, [0, 0])
    assert other != first  # equal loads, no match: the emptier tree
    # Unrelated prompts arriving together go to the least loaded replica.
    loads = [0, 0]
    for i in range(8):
        choice = router.select([1000 + 50 * i + j for j in range(30)], None, loads)
        loads[choice] += 1
    assert loads == [4, 4]


def test_cache_aware_router_spills_an_overloaded_replica_and_skips_dead_ones() -> None:
    router = Router("cache_aware", [10_000, 10_000], balance_abs=4)
    system = list(range(100, 164))
    home = router.select(system, None, [0, 0])
    loads = [0, 0]
    loads[home] = 3
    assert router.select(system + [2], None, loads) == home  # within the balance threshold: the cache wins
    loads[home] = 10
    assert router.select(system + [1], None, loads) != home  # 10 in flight vs 0: the cache is not worth it
    assert router.match_len(1 - home, system) == len(system)  # now both hold the prefix: the less loaded wins
    assert router.select(system + [3], None, [5, 5][:home] + [6] + [5, 5][home + 1:]) == 1 - home
    dead = [None, None]
    dead[1 - home] = 0
    assert router.select(system + [3], None, dead) == 1 - home
    with pytest.raises(RuntimeError):
        router.select(system, None, [None, None])


def test_round_robin_and_shortest_queue() -> None:
    rr = Router("round_robin", [100, 100, 100])
    assert [rr.select([1, 2, 3], None, [0, 0, 0]) for _ in range(6)] == [0, 1, 2, 0, 1, 2]
    sq = Router("shortest_queue", [100, 100, 100])
    assert sq.select([1], None, [3, 1, 2]) == 1
    assert sq.select([1], None, [3, None, 2]) == 2


def test_router_tree_is_trimmed_to_the_replica_pool() -> None:
    router = Router("cache_aware", [100, 100])
    for i in range(20):
        router.select([10_000 * i + j for j in range(30)], None, [0, 0])
    assert all(t.cached_size() <= 100 for t in router.trees)
    assert router.match_len(0, [1, 2, 3]) == 0


# ------------------------------------------------------------------------------ two replicas
@pytest.fixture(scope="module")
def dp2(tiny_model_dir):
    with radixlm.Engine(str(tiny_model_dir("llama")), dp_size=2, **{**ENGINE_OPTIONS, "context_length": 2048}) as e:
        yield e


def per_replica_prompt_tokens(engine) -> list[int]:
    info = engine.get_server_info()
    return [r["prompt_tokens"] for r in sorted(info["dp_replicas"], key=lambda r: r["dp_rank"])]


def test_outputs_merge_back_and_equal_one_replica(dp2, tiny_model_dir) -> None:
    prompts = random_prompts(6, 390, seed=5)
    refs = reference(tiny_model_dir("llama"), prompts, 8)
    outs = dp2.generate(input_ids=prompts, sampling_params={**GREEDY, "max_new_tokens": 8})
    assert_same_or_near_tie([o["output_ids"] for o in outs], refs)
    assert min(per_replica_prompt_tokens(dp2)) > 0  # a batch of unrelated prompts uses both replicas


def test_prefix_sharing_requests_go_to_the_same_replica(dp2) -> None:
    system = [11 + (i * 7) % 370 for i in range(80)]
    before = per_replica_prompt_tokens(dp2)
    outs = [dp2.generate(input_ids=system + [20 + i, 30 + i], sampling_params=GREEDY) for i in range(4)]
    grown = [a - b for a, b in zip(per_replica_prompt_tokens(dp2), before)]
    assert sorted(grown) == [0, 4 * 82]  # all four on one replica
    assert all(o["meta_info"]["cached_tokens"] >= 80 for o in outs[1:])  # its prefix cache hit


def test_unrelated_requests_spread(dp2) -> None:
    before = per_replica_prompt_tokens(dp2)
    for ids in random_prompts(6, 390, seed=7, max_len=40):
        dp2.generate(input_ids=ids, sampling_params=GREEDY)
    grown = [a - b for a, b in zip(per_replica_prompt_tokens(dp2), before)]
    assert min(grown) > 0, grown


def test_killing_a_replica_fails_only_its_requests(dp2) -> None:
    """Last in the module: it kills one of the shared engine's replicas."""
    tm = dp2.tokenizer_manager
    long = {"temperature": 0, "max_new_tokens": 1500, "ignore_eos": True}
    streams = []
    for i, ids in enumerate(random_prompts(2, 390, seed=8, max_len=20)):
        stream = dp2.generate(input_ids=ids, sampling_params=long, stream=True, rid=f"long-{i}")
        next(stream)  # submitted and running
        streams.append(stream)
    replicas = [tm.states[f"long-{i}"].replica for i in range(2)]
    assert sorted(replicas) == [0, 1]
    victim = tm.replicas[replicas[1]]
    os.kill(victim.procs[0].pid, signal.SIGKILL)
    start = time.monotonic()
    with pytest.raises(SchedulerDiedError, match=f"data-parallel replica {victim.index} failed.*exit code -9"):
        for _ in streams[1]:
            pass
    assert time.monotonic() - start < 30
    last = None
    for last in streams[0]:
        pass
    assert last is not None and last["meta_info"]["completion_tokens"] == 1500  # the other replica finished
    for ids in random_prompts(4, 390, seed=9):  # and keeps serving everything
        assert len(dp2.generate(input_ids=ids, sampling_params=GREEDY)["output_ids"]) == 4
    info = dp2.get_server_info()
    assert info["dp_dead_replicas"] == [victim.index] and len(info["dp_replicas"]) == 1
    assert tm.dead is None

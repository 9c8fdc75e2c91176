"""The radix prefix cache inside the scheduler, driven in-process on a tiny random model.

Greedy (and seeded) outputs are the same with and without the cache under heavy prefix sharing;
the KV accounting `free + evictable + locked + owned by running requests == total` holds after every
step of a randomized workload that evicts, retracts and aborts; generated tokens are reused by the
next turn; namespaces stay apart; input logprobs over a cached prefix are unchanged; flush is refused
while anything runs; LPM puts the longest cached prefix first.
"""
from __future__ import annotations

import random

import pytest
import torch

from radixlm.runtime.io_struct import AbortReq, ControlReq, FinishReason, TokenizedGenerateReq
from radixlm.runtime.request import Req
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.schedule_policy import order_waiting
from radixlm.runtime.scheduler import Scheduler
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion

# Token ranges: prefixes meant to be shared come from SHARED, the rest from FRESH, so two
# prompts never share a token by accident where a test expects no hit.
SHARED = (3, 200)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny model's ops are too small to split; on shared cores a second thread only waits."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.fixture(scope="module")
def vocab(model_dir) -> int:
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(str(model_dir)))


def shared_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(*SHARED) for _ in range(n)]


def fresh_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    return [rng.randrange(SHARED[1], vocab) for _ in range(n)]


def make_req(rid: str, ids: list[int], max_new: int, *, extra_key: str | None = None, logprob_start_len: int = -1,
             top_logprobs_num: int = 0, **params) -> TokenizedGenerateReq:
    params.setdefault("temperature", 0.0)
    return TokenizedGenerateReq(
        rid=rid, input_ids=ids, params=SamplingParams(max_new_tokens=max_new, ignore_eos=True, **params),
        return_logprob=logprob_start_len >= 0, logprob_start_len=logprob_start_len,
        top_logprobs_num=top_logprobs_num, extra_key=extra_key,
    )


def partial_reqs(sched: Scheduler) -> list[Req]:
    """Requests whose KV covers only part of their tokens (mid chunked prefill, or jump-forward)."""
    return list(sched.partial)


def active_reqs(sched: Scheduler) -> list[Req]:
    """Requests that hold a request row and KV: running ones and those mid prefill."""
    return sched.running + partial_reqs(sched)


def tree_slots(sched: Scheduler) -> torch.Tensor:
    tree = getattr(sched.cache, "tree", None)
    if tree is None:
        return torch.empty(0, dtype=torch.int64)
    values = [n.value for n in tree._iter_nodes() if n.parent is not None]
    return torch.cat(values) if values else torch.empty(0, dtype=torch.int64)


def assert_kv_accounting(sched: Scheduler) -> None:
    """free + evictable + locked + owned-by-requests == total, in counts and slot by slot."""
    info = sched.info()
    active = active_reqs(sched)
    own = [sched.req_to_token[r.req_pool_idx, r.cache_protected_len : r.kv_len].to(torch.int64) for r in active]
    in_use_by_requests = sum(r.kv_len - r.cache_protected_len for r in active)
    total = info["max_total_num_tokens"]
    assert (info["kv_free_tokens"] + info["kv_evictable_tokens"] + info["kv_locked_tokens"] + in_use_by_requests
            == total), (info, in_use_by_requests)
    # Slot level: every slot is exactly one of free, in the tree, or owned by one running request.
    pool = sched.kv_pool
    in_tree = tree_slots(sched)
    every = torch.cat([pool._free[: pool._num_free], in_tree, *own])
    assert torch.equal(every.sort().values, torch.arange(1, total + 1)), "a KV slot is leaked or owned twice"
    tree_set = set(in_tree.tolist())
    for r in active:
        protected = sched.req_to_token[r.req_pool_idx, : r.cache_protected_len].tolist()
        assert tree_set.issuperset(protected), f"{r.rid} reads KV the tree no longer holds"
    for r in sched.waiting:
        assert r.req_pool_idx is None and r.last_node is None and r.kv_len == 0, f"waiting {r.rid} holds KV"
    used_rows = {r.req_pool_idx for r in active}
    assert len(used_rows) == len(active)
    assert sched.req_to_token_pool.available() + len(active) == sched.req_to_token_pool.capacity


def state_of(sched: Scheduler, rid: str, results: dict[str, dict]) -> set[str]:
    """Where the request (all of an n > 1 group) is: waiting, partial, running or finished."""
    states = set()
    for name, queue in (("waiting", sched.waiting), ("partial", partial_reqs(sched)), ("running", sched.running)):
        if any(rid in (r.rid, r.group_rid) for r in queue):
            states.add(name)
    if any(rid in (k, k.rsplit("-", 1)[0]) and r["finished_reason"] for k, r in results.items()):
        states.add("finished")
    return states


def flush_and_assert_all_free(sched: Scheduler) -> None:
    assert sched.idle
    info = sched.info()
    assert info["kv_locked_tokens"] == 0
    assert info["kv_used_tokens"] == info["kv_cached_tokens"] == info["kv_evictable_tokens"]
    resp = sched.handle(ControlReq("flush_cache", 7))
    assert resp is not None and resp.ok and resp.request_id == 7
    info = sched.info()
    assert info["kv_free_tokens"] == info["max_total_num_tokens"]
    assert info["kv_cached_tokens"] == info["kv_used_tokens"] == 0
    assert sched.req_to_token_pool.available() == sched.req_to_token_pool.capacity


# ------------------------------------------------------------------------------------------ outputs


def test_outputs_same_with_and_without_cache_across_chunk_boundaries_and_n(model_dir, vocab) -> None:
    rng = random.Random(1)
    chunk = 32
    bases = [shared_ids(rng, 130) for _ in range(3)]
    prompts = []
    for i in range(27):
        # Shared heads ending before, on and just after chunk boundaries, and inside a later chunk.
        cut = [0, 1, chunk - 1, chunk, chunk + 1, 2 * chunk + 5, 3 * chunk, 100, 130][i % 9]
        prompts.append(bases[i % 3][:cut] + fresh_ids(rng, rng.randint(1, 45), vocab))
    prompts += [bases[0][:64], bases[0][:65], list(prompts[4]), bases[1]]  # prefix of others, duplicate, whole base
    max_new = 10
    n_greedy = bases[2][:70] + fresh_ids(rng, 9, vocab)
    n_sampled = bases[0][:90] + fresh_ids(rng, 7, vocab)

    def workload(tag: str) -> list[TokenizedGenerateReq]:
        reqs = [make_req(f"{tag}{i}", ids, max_new) for i, ids in enumerate(prompts)]
        reqs.append(make_req(f"{tag}n-greedy", n_greedy, max_new, n=3))
        reqs.append(make_req(f"{tag}n-sampled", n_sampled, max_new, n=3, temperature=0.9, seed=11))
        return reqs

    def rids(tag: str) -> list[str]:
        return ([f"{tag}{i}" for i in range(len(prompts))] + [f"{tag}n-greedy-{k}" for k in range(3)]
                + [f"{tag}n-sampled-{k}" for k in range(3)])

    ref_sched = make_scheduler(model_dir, chunked_prefill_size=chunk, disable_radix_cache=True)
    ref = run_to_completion(ref_sched, workload("w"))
    assert sum(r["cached_tokens"] for r in ref.values()) == 0
    assert ref["wn-greedy-0"]["output_ids"] == ref["wn-greedy-1"]["output_ids"] == ref["wn-greedy-2"]["output_ids"]
    assert len({tuple(ref[f"wn-sampled-{k}"]["output_ids"]) for k in range(3)}) > 1  # followers sample apart

    sched = make_scheduler(model_dir, chunked_prefill_size=chunk)
    first = run_to_completion(sched, workload("w"))
    for rid in rids("w"):
        assert first[rid]["output_ids"] == ref[rid]["output_ids"], rid
    # Requests admitted while others of their group were mid-prefill reuse those chunks.
    assert sum(r["cached_tokens"] for r in first.values()) > 1500
    # Second wave: every prompt is in the tree (only the last token is computed again).
    again = run_to_completion(sched, workload("v"))
    for rid_w, rid_v in zip(rids("w"), rids("v")):
        assert again[rid_v]["output_ids"] == ref[rid_w]["output_ids"], rid_v
        assert again[rid_v]["cached_tokens"] == again[rid_v]["prompt_tokens"] - 1, rid_v
    flush_and_assert_all_free(sched)


# ------------------------------------------------------------------------------------------ accounting


@pytest.mark.parametrize(
    "seed,policy,disable,overlap",
    [(0, "lpm", False, False), (1, "fcfs", False, False), (2, "dfs-weight", False, False), (3, "lpm", True, False),
     (4, "fcfs", True, False), (8, "lpm", False, True), (6, "dfs-weight", False, True), (7, "lpm", True, True)],
)
def test_kv_accounting_after_every_step_of_a_random_workload(model_dir, vocab, seed, policy, disable, overlap) -> None:
    rng = random.Random(seed)
    pool = 320
    sched = make_scheduler(model_dir, max_total_tokens=pool, chunked_prefill_size=40, schedule_policy=policy,
                           disable_radix_cache=disable, max_running_requests=10,
                           schedule_conservativeness=0.3,  # admit eagerly: decode runs short and retracts
                           disable_overlap_schedule=not overlap, enable_overlap_schedule_on_cpu=overlap)
    evicted: list[int] = []
    real_evict = sched.cache.evict

    def counting_evict(n: int) -> int:
        evicted.append(real_evict(n))
        return evicted[-1]

    sched.cache.evict = counting_evict  # type: ignore[method-assign]

    heads = [shared_ids(rng, rng.randint(20, 70)) for _ in range(4)]
    pending: list[TokenizedGenerateReq] = []
    expected_rids: dict[str, str] = {}  # rid of each output stream -> rid the client sent
    for i in range(40):
        head = rng.choice(heads)[: rng.randint(0, 70)]
        ids = head + fresh_ids(rng, rng.randint(1, 40), vocab)
        n = 2 if rng.random() < 0.15 else 1
        pending.append(make_req(f"r{i}", ids, rng.randint(1, 36), n=n, extra_key="ns" if rng.random() < 0.1 else None))
        for k in range(n):
            expected_rids[f"r{i}-{k}" if n > 1 else f"r{i}"] = f"r{i}"
    pending.reverse()
    sent: list[TokenizedGenerateReq] = []
    aborted: set[str] = set()
    abort_states: set[str] = set()
    results: dict[str, dict] = {}

    def collect() -> None:
        for out in sched.pop_outputs():
            merge(results, out)

    steps = 0
    while pending or not sched.idle:
        for _ in range(rng.choice([0, 0, 1, 1, 2, 3])):
            if pending:
                sent.append(pending.pop())
                sched.handle(sent[-1])
        # Abort something waiting, mid chunked prefill, decoding, or already finished: each kind
        # once as soon as it exists, then at random.
        where = {"finished": [r.rid for r in sent if "finished" in state_of(sched, r.rid, results)]}
        for name, queue in (("waiting", sched.waiting), ("partial", partial_reqs(sched)), ("running", sched.running)):
            where[name] = [r.group_rid or r.rid for r in queue if (r.group_rid or r.rid) not in aborted]
        kinds = [k for k, v in where.items() if v and (k not in abort_states or rng.random() < 0.03)]
        if kinds:
            kind = rng.choice(kinds)
            victim = rng.choice(where[kind])
            if victim not in aborted:
                aborted.add(victim)
                abort_states.add(kind)
                sched.handle(AbortReq(victim))
                collect()
                assert_kv_accounting(sched)
        sched.step()
        steps += 1
        assert steps < 5000, "scheduler made no progress"
        collect()
        assert_kv_accounting(sched)

    assert set(results) == set(expected_rids)
    assert sched.stats["retractions"] > 0
    if not disable:
        assert sum(evicted) > 0
    completed = []
    for rid, res in results.items():
        reason = res["finished_reason"]
        client_rid = expected_rids[rid]
        if reason["type"] == "abort":
            assert client_rid in aborted and reason["message"] == "aborted by client", (rid, reason)
        else:
            req = next(r for r in sent if r.rid == client_rid)
            assert reason == {"type": "length", "length": req.params.max_new_tokens}, (rid, reason)
            completed.append(rid)
    assert len(completed) > 20
    assert {"waiting", "partial", "running", "finished"} <= abort_states, abort_states
    flush_and_assert_all_free(sched)

    # What finished is what a roomy, cache-less scheduler computes (greedy: retraction, eviction
    # and recomputation from the cache change nothing).
    roomy = make_scheduler(model_dir, disable_radix_cache=True)
    ref = run_to_completion(roomy, [r for r in sent if any(expected_rids[c] == r.rid for c in completed)])
    for rid in completed:
        assert results[rid]["output_ids"] == ref[rid]["output_ids"], rid


# ------------------------------------------------------------------------------------------ reuse


def test_a_prompt_is_shared_as_soon_as_it_is_prefilled(model_dir, vocab) -> None:
    """Not only once its request finishes: a system prompt serves requests that arrive while the
    first one still decodes."""
    rng = random.Random(9)
    system = shared_ids(rng, 60)
    sched = make_scheduler(model_dir)  # no chunking: the whole prompt in one prefill
    sched.handle(make_req("first", system + fresh_ids(rng, 8, vocab), 20))
    sched.step()
    assert [r.rid for r in sched.running] == ["first"]
    assert sched.info()["kv_locked_tokens"] == 68
    sched.handle(make_req("second", system + fresh_ids(rng, 8, vocab), 4))
    sched.step()
    assert [r.rid for r in sched.running] == ["first", "second"]
    got = run_to_completion(sched, [])
    assert got["second"]["cached_tokens"] == 60
    assert got["first"]["finished_reason"] == {"type": "length", "length": 20}
    flush_and_assert_all_free(sched)


def test_multi_turn_reuses_the_previous_answer(model_dir, vocab) -> None:
    rng = random.Random(4)
    sched = make_scheduler(model_dir, chunked_prefill_size=64)
    ref = make_scheduler(model_dir, disable_radix_cache=True)
    convs = [fresh_ids(rng, 70, vocab), fresh_ids(rng, 30, vocab)]  # two chats, turns interleaved
    previous = [0, 0]
    for turn in range(4):
        reqs = [make_req(f"c{c}t{turn}", ids, 12 + c) for c, ids in enumerate(convs)]
        got = run_to_completion(sched, reqs)
        want = run_to_completion(ref, reqs)
        for c in range(2):
            res = got[f"c{c}t{turn}"]
            assert res["output_ids"] == want[f"c{c}t{turn}"]["output_ids"]
            if turn == 0:
                assert res["cached_tokens"] == 0
            else:
                # The tree holds the previous prompt and answer (the answer's last token was
                # sampled, never run through the model, so it has no KV).
                assert res["cached_tokens"] >= previous[c] - 1
            previous[c] = len(convs[c]) + len(res["output_ids"])
            convs[c] = convs[c] + res["output_ids"] + fresh_ids(rng, rng.randint(5, 40), vocab)
    assert sched.info()["cache_hit_rate"] > 0.5
    flush_and_assert_all_free(sched)


def test_extra_key_namespaces_are_isolated(model_dir, vocab) -> None:
    rng = random.Random(5)
    prompt = fresh_ids(rng, 60, vocab)
    sched = make_scheduler(model_dir)
    got = {}
    for rid, key in [("a1", "tenant-a"), ("b1", "tenant-b"), ("none1", None), ("a2", "tenant-a"),
                     ("b2", "tenant-b"), ("none2", None), ("c1", "tenant-c")]:
        got.update(run_to_completion(sched, [make_req(rid, prompt, 6, extra_key=key)]))
    for rid in ("a1", "b1", "none1", "c1"):
        assert got[rid]["cached_tokens"] == 0, rid
    for rid in ("a2", "b2", "none2"):
        assert got[rid]["cached_tokens"] == len(prompt) - 1, rid
    assert len({tuple(r["output_ids"]) for r in got.values()}) == 1
    flush_and_assert_all_free(sched)


def test_input_logprobs_over_a_cached_prefix_match_cache_off(model_dir, vocab) -> None:
    rng = random.Random(6)
    prompt = fresh_ids(rng, 100, vocab)
    sched = make_scheduler(model_dir, chunked_prefill_size=48)
    ref = make_scheduler(model_dir, chunked_prefill_size=48, disable_radix_cache=True)
    run_to_completion(sched, [make_req("warm", prompt + fresh_ids(rng, 5, vocab), 3)])
    starts = [0, 1, 2, 37, 48, 49, 99]
    reqs = [make_req(f"s{s}", prompt, 4, logprob_start_len=s, top_logprobs_num=2) for s in starts]
    got = run_to_completion(sched, reqs)
    want = run_to_completion(ref, reqs)
    for s in starts:
        g, w = got[f"s{s}"], want[f"s{s}"]
        # The cache may serve everything before the first position whose logits are needed.
        assert g["cached_tokens"] == max(s - 1, 0), s
        assert len(g["input_token_logprobs"]) == len(prompt) - s
        assert [t for _, t in g["input_token_logprobs"]] == prompt[s:]
        for (lp_g, _), (lp_w, _) in zip(g["input_token_logprobs"], w["input_token_logprobs"]):
            assert (lp_g is None) == (lp_w is None)
            if lp_g is not None:
                assert lp_g == pytest.approx(lp_w, abs=1e-4), s
        for tg, tw in zip(g["input_top_logprobs"], w["input_top_logprobs"]):
            assert (tg is None) == (tw is None)
            if tg is not None:
                assert [t for _, t in tg] == [t for _, t in tw]
                assert [v for v, _ in tg] == pytest.approx([v for v, _ in tw], abs=1e-4)
        assert g["output_ids"] == w["output_ids"]
        assert [t for _, t in g["output_token_logprobs"]] == g["output_ids"]
    flush_and_assert_all_free(sched)


# ------------------------------------------------------------------------------------------ control


def test_flush_refused_while_a_request_runs_then_frees_everything(model_dir, vocab) -> None:
    rng = random.Random(7)
    prompt = fresh_ids(rng, 90, vocab)
    sched = make_scheduler(model_dir, chunked_prefill_size=32)

    sched.handle(greedy_req("r", prompt, 8))
    assert sched.handle(ControlReq("flush_cache", 1)).ok is False  # waiting
    sched.step()
    assert partial_reqs(sched) and not sched.running
    assert sched.handle(ControlReq("flush_cache", 2)).ok is False  # mid chunked prefill
    while partial_reqs(sched) or not sched.running:
        sched.step()
    resp = sched.handle(ControlReq("flush_cache", 3))
    assert resp.ok is False and resp.request_id == 3  # decoding
    assert "running" in resp.payload["message"]
    while not sched.idle:
        sched.step()
    out = sched.pop_outputs()[-1]
    assert out.finished_reason == FinishReason.of_length(8)

    info = sched.info()
    assert info["kv_cached_tokens"] == len(prompt) + 8 - 1 and info["kv_locked_tokens"] == 0
    resp = sched.handle(ControlReq("flush_cache", 4))
    assert resp.ok is True and resp.request_id == 4
    info = sched.info()
    assert info["kv_free_tokens"] == info["max_total_num_tokens"]
    assert info["kv_cached_tokens"] == info["kv_evictable_tokens"] == info["kv_used_tokens"] == 0
    # Nothing left to hit.
    assert run_to_completion(sched, [greedy_req("after", prompt, 2)])["after"]["cached_tokens"] == 0
    flush_and_assert_all_free(sched)


def test_lpm_orders_longest_cached_prefix_first(model_dir, vocab) -> None:
    rng = random.Random(8)
    cached = shared_ids(rng, 80)
    sched = make_scheduler(model_dir)
    run_to_completion(sched, [greedy_req("warm", cached, 1)])

    def req(rid: str, ids: list[int], extra_key: str | None = None) -> Req:
        return Req.from_wire(make_req(rid, ids, 4, extra_key=extra_key), seed=0)

    waiting = [
        req("none", fresh_ids(rng, 50, vocab)),
        req("short", cached[:20] + fresh_ids(rng, 30, vocab)),
        req("other-namespace", cached + fresh_ids(rng, 5, vocab), extra_key="x"),
        req("long", cached[:70] + fresh_ids(rng, 10, vocab)),
        req("short-too", cached[:20] + fresh_ids(rng, 12, vocab)),
        req("whole", list(cached)),  # capped at len - 1: the last token is always computed
        req("longer", cached + fresh_ids(rng, 3, vocab)),
    ]
    lens = {r.rid: sched._peek_prefix_len(r) for r in waiting}
    assert lens == {"none": 0, "short": 20, "other-namespace": 0, "long": 70, "short-too": 20, "whole": 79,
                    "longer": 80}
    order = [r.rid for r in order_waiting(waiting, "lpm", sched._peek_prefix_len)]
    assert order == ["longer", "whole", "long", "short", "short-too", "none", "other-namespace"]
    assert [r.rid for r in order_waiting(waiting, "fcfs", sched._peek_prefix_len)] == [r.rid for r in waiting]
    assert sched.cache.protected_size() == 0  # peeking locks nothing

    # End to end: with room for one request per step, the longest cached prefix is admitted first.
    for policy, first in (("lpm", "long"), ("fcfs", "none")):
        s = make_scheduler(model_dir, schedule_policy=policy, max_running_requests=1)
        run_to_completion(s, [greedy_req("warm", cached, 1)])
        for r in ("none", "short", "long"):
            s.handle(make_req(r, next(w for w in waiting if w.rid == r).input_ids, 2))
        s.step()
        assert [r.rid for r in active_reqs(s)] == [first]
        run_to_completion(s, [])
        flush_and_assert_all_free(s)


def test_requests_arriving_together_share_a_prefix_computed_once(tiny_model_dir) -> None:
    """Same-step admissions with a shared uncached prefix: the later ones wait one step and hit."""
    model_dir = tiny_model_dir("llama")
    rng = random.Random(11)
    head = [rng.randrange(3, 300) for _ in range(200)]
    reqs = [greedy_req(f"g{i}", head + [rng.randrange(3, 300) for _ in range(10)], 4) for i in range(8)]
    cached = make_scheduler(model_dir, chunked_prefill_size=4096)
    got = run_to_completion(cached, reqs)
    assert sum(r["cached_tokens"] for r in got.values()) >= 7 * len(head)
    plain = run_to_completion(make_scheduler(model_dir, disable_radix_cache=True), reqs)
    assert all(got[k]["output_ids"] == plain[k]["output_ids"] for k in plain)
    assert_pool_idle(cached)

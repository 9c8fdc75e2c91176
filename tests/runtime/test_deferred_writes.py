"""ReqToTokenPool.deferred_writes: the admitted requests' cached prefixes reach the device table as one
scatter when the admission ends (prefill_admission.DEFER_ADMISSION_WRITES). On the CPU the table is its own
host mirror, so these tests keep a separate mirror (`mirror=True`): the "device" table — what attention
reads — then holds only what reaches it as it would on a GPU, and a write that never reaches it changes
the outputs."""
from __future__ import annotations

import random

import pytest
import torch

from radixlm.runtime import prefill_admission
from radixlm.runtime.kv_pool import ReqToTokenPool
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, run_to_completion


def test_writes_in_the_block_reach_the_table_when_it_ends() -> None:
    pool = ReqToTokenPool(8, 64, "cpu", mirror=True)
    assert pool.host is not pool.req_to_token
    pool.write(1, 0, torch.tensor([5, 6, 7]))  # outside a block: at once
    assert pool.req_to_token[1, :3].tolist() == [5, 6, 7]
    rng = random.Random(3)
    spans = [(row, rng.randrange(0, 40), torch.tensor([rng.randrange(1, 1000) for _ in range(rng.randrange(1, 20))]))
             for row in (2, 3, 5, 3)]
    with pool.deferred_writes():
        for row, start, vals in spans:
            pool.write(row, start, vals)
        with pool.deferred_writes():  # nested: still deferred, the outer block flushes
            pool.write(6, 10, torch.tensor([9, 9]))
        assert pool.req_to_token[2:].count_nonzero() == 0  # nothing reached the table yet
        assert pool.host[6, 10:12].tolist() == [9, 9]  # the mirror at once
    assert torch.equal(pool.req_to_token, pool.host)  # the later write to row 3 wins where spans overlap
    with pool.deferred_writes():  # one write: a plain slice store
        pool.write(7, 4, torch.tensor([1, 2, 3], dtype=torch.int64))
    assert torch.equal(pool.req_to_token, pool.host)
    with pool.deferred_writes():
        pass  # nothing to flush
    assert torch.equal(pool.req_to_token, pool.host)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir):
    return tiny_model_dir("llama")


@pytest.mark.parametrize("defer", [False, True])
def test_a_burst_of_cached_prompts_decodes_the_same(model_dir, monkeypatch, defer: bool) -> None:
    """Greedy outputs of prompts admitted with cached prefixes (whole prompts, shared heads, n > 1 forks,
    chunked prompts) are the same with a separate mirror, writes deferred or not, as with the CPU's one
    table; the KV pool is whole after."""
    rng = random.Random(11)
    head = [rng.randrange(3, 200) for _ in range(40)]
    prompts = [head + [rng.randrange(3, 200) for _ in range(rng.randrange(1, 30))] for _ in range(12)]

    def run(mirror: bool) -> dict:
        init = ReqToTokenPool.__init__
        monkeypatch.setattr(ReqToTokenPool, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "mirror": mirror}))
        monkeypatch.setattr(prefill_admission, "DEFER_ADMISSION_WRITES", defer and mirror)
        sched = make_scheduler(model_dir, chunked_prefill_size=64, max_prefill_tokens=64)
        assert (sched.req_to_token_pool.host is not sched.req_to_token_pool.req_to_token) == mirror
        run_to_completion(sched, [greedy_req(f"w{i}", p, 2) for i, p in enumerate(prompts[:4])])  # cache some
        out = run_to_completion(sched, [greedy_req(f"r{i}", p, 6) for i, p in enumerate(prompts)]
                                + [greedy_req(f"n{i}", p, 5, n=2) for i, p in enumerate(prompts[4:6])])
        out.update(run_to_completion(sched, [greedy_req(f"again{i}", p, 6) for i, p in enumerate(prompts)]))
        assert_pool_idle(sched)
        monkeypatch.setattr(ReqToTokenPool, "__init__", init)
        return {rid: r["output_ids"] for rid, r in out.items()}

    base = run(mirror=False)
    assert run(mirror=True) == base
    assert all(base[f"again{i}"] == base[f"r{i}"] for i in range(len(prompts)))


def test_the_admission_flushes_once(model_dir, monkeypatch) -> None:
    """With the constant on, a burst of cached prompts reaches the table in one scatter per admission."""
    init = ReqToTokenPool.__init__
    monkeypatch.setattr(ReqToTokenPool, "__init__", lambda self, *a, **k: init(self, *a, **{**k, "mirror": True}))
    monkeypatch.setattr(prefill_admission, "DEFER_ADMISSION_WRITES", True)
    flushes: list[int] = []
    flush = ReqToTokenPool._flush
    monkeypatch.setattr(ReqToTokenPool, "_flush", lambda self, pending: (flushes.append(len(pending)), flush(self, pending))[1])
    sched = make_scheduler(model_dir)
    rng = random.Random(5)
    prompts = [[rng.randrange(3, 200) for _ in range(24)] for _ in range(8)]
    run_to_completion(sched, [greedy_req(f"w{i}", p, 1) for i, p in enumerate(prompts)])
    flushes.clear()
    run_to_completion(sched, [greedy_req(f"r{i}", p, 2) for i, p in enumerate(prompts)])
    assert 8 in flushes  # the eight cached prefixes in one flush

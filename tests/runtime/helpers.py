"""Drive a Scheduler in-process (no subprocess): fast, deterministic engine tests."""
from __future__ import annotations

import time
from functools import lru_cache
from pathlib import Path

from radixlm.runtime.io_struct import ReqOutput, TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs
from radixlm.runtime.top_rows import expand


@lru_cache(maxsize=8)
def _tokenizer(model_dir: str):
    """One tokenizer per folder for the test process (read-only to the scheduler; the default model's
    takes ~0.3-1 s to load and some 100 schedulers are made over the suite)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


def make_scheduler(model_dir: Path, **options) -> Scheduler:
    options.setdefault("max_total_tokens", 4096)
    options.setdefault("device", "cpu")
    args = ServerArgs(model_path=str(model_dir), **options).resolve()
    sched = Scheduler(args, model_dir, _tokenizer(str(model_dir)))
    if sched.spec is not None:
        # Speculative tests check what drafting does: drafting is not left to the measured payoff
        # (draft_payoff.py), which on a loaded CPU may turn it off part-way (tested on its own).
        sched.spec.payoff = None
        sched.spec.row_cost = None  # ... nor to the measured cost of a draft row at batch 1 (row_cost.py)
    return sched


def run_to_completion(sched: Scheduler, reqs: list[TokenizedGenerateReq], max_steps: int = 100000,
                      timeout_s: float = 300.0) -> dict[str, dict]:
    """Submit all, step until idle; returns rid -> {output_ids, finished_reason, ...} merged from deltas."""
    for r in reqs:
        sched.handle(r)
    results: dict[str, dict] = {}
    steps = 0
    deadline = time.monotonic() + timeout_s
    while not sched.idle:
        if not sched.step():
            time.sleep(0.002)  # waiting for grammar compiles
        steps += 1
        assert steps < max_steps and time.monotonic() < deadline, "scheduler did not finish"
        for out in sched.pop_outputs():
            merge(results, out)
    for out in sched.pop_outputs():
        merge(results, out)
    return results


def merge(results: dict[str, dict], out: ReqOutput) -> None:
    r = results.setdefault(out.rid, {"output_ids": [], "output_token_logprobs": [], "input_token_logprobs": [],
                                     "output_top_logprobs": [], "input_top_logprobs": []})
    r["output_ids"].extend(out.output_ids)
    reason = out.finished_reason  # as the public dict, plus the status of a request failed for its own fault
    r["finished_reason"] = None if reason is None else {
        **reason.to_json(), **({"status_code": reason.status_code} if reason.status_code else {})}
    r["cached_tokens"] = out.cached_tokens
    r["prompt_tokens"] = out.prompt_tokens
    r["num_retractions"] = out.num_retractions
    r["forced_tokens"] = out.forced_tokens
    for k in ("output_token_logprobs", "input_token_logprobs", "output_top_logprobs"):
        if getattr(out, k):
            r[k].extend(getattr(out, k))
    r["input_top_logprobs"].extend(expand(out.input_top_logprobs or []))  # as the front does


def greedy_req(rid: str, ids: list[int], max_new: int, **params) -> TokenizedGenerateReq:
    return TokenizedGenerateReq(rid=rid, input_ids=ids, params=SamplingParams(temperature=0.0, max_new_tokens=max_new,
                                                                              ignore_eos=True, **params))


def assert_pool_idle(sched: Scheduler) -> None:
    """Nothing in use but what the prefix cache holds, nothing locked, every request row free."""
    usage = sched.kv_pool.usage()
    assert usage.in_use == sched.cache.cached_size(), (usage, sched.cache.cached_size())
    assert sched.cache.protected_size() == 0
    assert sched.req_to_token_pool.available() == sched.req_to_token_pool.capacity
    sched.cache.flush()
    assert sched.kv_pool.usage().free == usage.total

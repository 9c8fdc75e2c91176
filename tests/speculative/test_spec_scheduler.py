"""Speculative decoding inside the scheduler: outputs identical to speculation off (greedy and
seeded sampling) on tiny models and the default model, across mixed batches, chunked prefill,
stop strings, n > 1, logprobs, streaming, json_schema, retraction, overlap and abort; KV exact and
the radix tree free of unverified tokens after every step."""
from __future__ import annotations

import json
import random
import sys
import time

import pytest

from radixlm.runtime.fault_isolation import kv_accounting_problem
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.sampling_params import SamplingParams
from tests.runtime.helpers import assert_pool_idle, greedy_req, make_scheduler, merge, run_to_completion

COPY_TEXTS = [
    "def add(a, b):\n    return a + b\n\ndef add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany. Paris is the capital of",
    "JSON looks like {\"name\": \"radix\", \"size\": 42, \"tags\": [\"a\", \"b\"]}. JSON looks like {\"name\"",
]


def tree_paths(sched) -> list[list[int]]:
    """Every root-to-node token path of the radix tree."""
    tree = getattr(sched.cache, "tree", None)
    if tree is None:
        return []
    paths = []
    for node in tree._iter_nodes():
        key: list[int] = []
        n = node
        while n is not None and n.parent is not None:
            key = n.key + key
            n = n.parent
        if key:
            paths.append(key)
    return paths


def run_checked(sched, reqs: list[TokenizedGenerateReq], abort_after: dict[str, int] | None = None) -> dict[str, dict]:
    """run_to_completion, auditing the KV pool after every step and recording every path the radix
    tree ever held; at the end each path must be a prefix of some request's prompt + output."""
    for r in reqs:
        sched.handle(r)
    results: dict[str, dict] = {}
    before = tree_paths(sched)  # cached by earlier runs
    seen: set[tuple[int, ...]] = set()
    steps = 0
    deadline = time.monotonic() + 300
    while not sched.idle:
        if not sched.step():
            time.sleep(0.002)
        steps += 1
        assert steps < 20000 and time.monotonic() < deadline
        assert kv_accounting_problem(sched) is None, kv_accounting_problem(sched)
        seen.update(tuple(p) for p in tree_paths(sched))
        for rid, at in (abort_after or {}).items():
            if steps == at:
                sched.abort(rid, "test abort")
        for out in sched.pop_outputs():
            merge(results, out)
    for out in sched.pop_outputs():
        merge(results, out)
    full = [list(r.input_ids) + results[rid]["output_ids"] for r in reqs for rid in results
            if rid == r.rid or rid.startswith(r.rid + "-")] + before
    for path in seen:
        assert any(f[: len(path)] == list(path) for f in full), f"tree held a path no request produced: {path[-8:]}"
    return results


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    return tiny_model_dir("llama")


def copy_prompts(model_dir, count: int, seed: int = 0) -> list[list[int]]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    rng = random.Random(seed)
    vocab = len(tok)
    out = []
    for i in range(count):
        ids = tok.encode(COPY_TEXTS[i % len(COPY_TEXTS)])
        if i % 3 == 2:  # mixed lengths, some with a random head that does not repeat
            ids = [rng.randrange(3, vocab) for _ in range(rng.randint(1, 90))] + ids
        out.append(ids)
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for rid in a:
        assert a[rid]["output_ids"] == b[rid]["output_ids"], rid
        assert a[rid]["finished_reason"] == b[rid]["finished_reason"], rid


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
def test_greedy_identical_with_ngram_in_a_mixed_chunked_batch(tiny_model_dir, kind: str) -> None:
    model_dir = tiny_model_dir(kind)
    prompts = copy_prompts(model_dir, 12)
    reqs = [greedy_req(f"r{i}", ids, 24 + (i % 5) * 4) for i, ids in enumerate(prompts)]
    base = make_scheduler(model_dir, chunked_prefill_size=32)
    ref = run_to_completion(base, reqs)
    spec = make_scheduler(model_dir, chunked_prefill_size=32, speculative_algorithm="NGRAM")
    got = run_checked(spec, reqs)
    assert_same(got, ref)
    info = spec.info()
    assert info["spec_accepted_tokens"] > 0 and info["avg_spec_accept_length"] > 1.0
    assert info["forward_steps"] < base.stats["forward_steps"]
    assert_pool_idle(spec)


def test_fewer_steps_and_visible_counts(tiny) -> None:
    prompts = copy_prompts(tiny, 4)
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    base = make_scheduler(tiny, max_running_requests=1)
    ref = run_to_completion(base, reqs)
    spec = make_scheduler(tiny, max_running_requests=1, speculative_algorithm="NGRAM", speculative_num_steps=6)
    got = run_to_completion(spec, reqs)
    assert_same(got, ref)
    assert spec.stats["forward_steps"] < base.stats["forward_steps"]
    outs = []
    spec.handle(greedy_req("m", prompts[0], 30))
    while not spec.idle:
        spec.step()
        outs += spec.pop_outputs()
    last = outs[-1]
    assert last.spec_verify_ct is not None and last.spec_verify_ct > 0
    assert 0 < last.spec_accepted_tokens <= 30
    assert base.info().get("avg_spec_accept_length") is None


def test_seeded_sampling_identical_with_and_without_speculation(tiny) -> None:
    prompts = copy_prompts(tiny, 9)
    # Low temperatures: the tiny random model then repeats itself often enough for drafts to land.
    configs = [dict(temperature=0.2), dict(temperature=0.4, top_k=8, top_p=0.9), dict(temperature=0.3, min_p=0.1),
               dict(temperature=0.3, frequency_penalty=0.1, presence_penalty=0.1), dict(temperature=1.0, min_new_tokens=20)]
    reqs = [TokenizedGenerateReq(rid=f"s{i}", input_ids=ids, params=SamplingParams(
        max_new_tokens=30, seed=100 + i, **configs[i % len(configs)])) for i, ids in enumerate(prompts)]
    # n > 1 with a seed: each sequence samples with seed + i.
    reqs.append(TokenizedGenerateReq(rid="n", input_ids=prompts[0], params=SamplingParams(
        max_new_tokens=30, temperature=0.5, seed=7, n=3)))
    ref = run_to_completion(make_scheduler(tiny), reqs)
    # A small batch: at 12 rows on a CPU the budget (rightly) grants no drafts at the prior rate.
    spec = make_scheduler(tiny, speculative_algorithm="NGRAM", max_running_requests=3)
    got = run_checked(spec, reqs)
    assert_same(got, ref)
    assert {"n-0", "n-1", "n-2"} <= got.keys()
    assert spec.info()["spec_accepted_tokens"] > 0


def test_stop_strings_logprobs_streaming_and_max_tokens(tiny) -> None:
    from transformers import AutoTokenizer

    prompts = copy_prompts(tiny, 4)
    free = run_to_completion(make_scheduler(tiny), [greedy_req("f", prompts[0], 20)])["f"]["output_ids"]
    stop = AutoTokenizer.from_pretrained(str(tiny)).decode(free[8:10])  # text the model does produce

    def make(i: int, ids: list[int]) -> TokenizedGenerateReq:
        params = SamplingParams(temperature=0.0, max_new_tokens=17 + i, stop=[stop], ignore_eos=True)
        return TokenizedGenerateReq(rid=f"t{i}", input_ids=ids, params=params, return_logprob=True,
                                    top_logprobs_num=2, stream=i % 2 == 0)

    reqs = [make(i, ids) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    got = run_checked(make_scheduler(tiny, speculative_algorithm="NGRAM", stream_interval=2), reqs)
    assert_same(got, ref)
    assert any(r["finished_reason"]["type"] == "stop" for r in got.values())
    for rid in ref:
        a, b = got[rid]["output_token_logprobs"], ref[rid]["output_token_logprobs"]
        assert [t for _, t in a] == [t for _, t in b] == got[rid]["output_ids"]
        assert all(abs(x - y) < 1e-4 for (x, _), (y, _) in zip(a, b))
        assert [[t for _, t in e] for e in got[rid]["output_top_logprobs"]] == \
            [[t for _, t in e] for e in ref[rid]["output_top_logprobs"]]


@pytest.mark.parametrize("disable_cache", [False, True])
def test_retraction_and_kv_churn_in_a_tiny_pool(tiny, disable_cache: bool) -> None:
    prompts = [ids[:60] for ids in copy_prompts(tiny, 14, seed=3)]
    reqs = [greedy_req(f"r{i}", ids, 40) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny, max_total_tokens=8192), reqs)
    sched = make_scheduler(tiny, max_total_tokens=420, chunked_prefill_size=64, disable_radix_cache=disable_cache,
                           speculative_algorithm="NGRAM")
    got = run_checked(sched, reqs)
    assert sched.stats["retractions"] > 0
    info = sched.info()
    assert 0 < info["spec_accepted_tokens"] < info["spec_draft_tokens"]  # accepted and rejected drafts
    assert_same(got, ref)
    assert_pool_idle(sched)


def test_overlap_schedule_and_abort(tiny) -> None:
    prompts = copy_prompts(tiny, 6)
    reqs = [greedy_req(f"r{i}", ids, 30) for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    sched = make_scheduler(tiny, speculative_algorithm="NGRAM", enable_overlap_schedule_on_cpu=True)
    assert sched.overlap
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    got = run_checked(sched, [greedy_req(f"a{i}", ids, 60) for i, ids in enumerate(prompts)], abort_after={"a1": 6})
    assert got["a1"]["finished_reason"]["type"] == "abort"
    assert len(got["a0"]["output_ids"]) == 60
    assert_pool_idle(sched)


def test_multi_turn_reuse_unchanged_by_speculation(tiny) -> None:
    """Turn 2 (turn 1's prompt + answer + more) hits the cache exactly as much as without speculation."""
    prompt = copy_prompts(tiny, 1)[0]
    cached = {}
    for spec in (None, "NGRAM"):
        sched = make_scheduler(tiny, speculative_algorithm=spec)
        first = run_to_completion(sched, [greedy_req("t1", prompt, 30)])
        turn2 = prompt + first["t1"]["output_ids"] + prompt[:5]
        second = run_to_completion(sched, [greedy_req("t2", turn2, 5)])
        cached[spec] = second["t2"]["cached_tokens"]
    assert cached["NGRAM"] == cached[None] >= len(prompt) + 29


def test_default_model_greedy_json_schema_and_stop(default_model_dir) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "city": {"type": "string"}},
              "required": ["name", "city"], "additionalProperties": False}
    text = ("Alice lives in Paris. Bob lives in Berlin. Carol lives in Tokyo. "
            "Return the first person as JSON with name and city.")
    chat = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False)
    ids = tok.encode(chat)
    copy = tok.encode(tok.apply_chat_template([{"role": "user", "content": "Repeat exactly: " + COPY_TEXTS[0]}],
                                              add_generation_prompt=True, tokenize=False))
    reqs = [
        TokenizedGenerateReq(rid="json", input_ids=ids, params=SamplingParams(
            temperature=0.0, max_new_tokens=40, json_schema=json.dumps(schema))),
        TokenizedGenerateReq(rid="json-s", input_ids=ids, params=SamplingParams(
            temperature=0.7, seed=3, max_new_tokens=40, json_schema=json.dumps(schema))),
        TokenizedGenerateReq(rid="copy", input_ids=copy, params=SamplingParams(temperature=0.0, max_new_tokens=40)),
        TokenizedGenerateReq(rid="stop", input_ids=copy, params=SamplingParams(
            temperature=0.0, max_new_tokens=40, stop=["return"])),
        greedy_req("plain", ids[:20], 24),
    ]
    base = make_scheduler(default_model_dir, max_total_tokens=8192)
    spec = make_scheduler(default_model_dir, max_total_tokens=8192, speculative_algorithm="NGRAM")
    try:
        ref = run_to_completion(base, reqs)
        got = run_checked(spec, reqs)
    finally:
        for s in (base, spec):
            if s.grammars is not None:
                s.grammars.close()
    assert_same(got, ref)
    for rid in ("json", "json-s"):
        if got[rid]["finished_reason"]["type"] == "stop":
            json.loads(tok.decode(got[rid]["output_ids"], skip_special_tokens=True))
    assert spec.info()["spec_accepted_tokens"] > 0


def test_lora_rows_keep_their_adapter_in_verify_steps(tiny, tmp_path) -> None:
    """A verify step expands a decode batch into one row per token: each row keeps its request's adapter."""
    import dataclasses

    from tests.fixtures.lora_adapters import make_peft_adapter

    adapters = {f"a{i}": make_peft_adapter(tiny, tmp_path / f"a{i}", seed=30 + i, r=4) for i in range(2)}
    paths = tuple(f"{n}={p}" for n, p in adapters.items())
    prompts = copy_prompts(tiny, 4)
    reqs = [dataclasses.replace(greedy_req(f"r{i}", ids, 24), lora_path=[None, "a0", "a1", "a0"][i])
            for i, ids in enumerate(prompts)]
    ref = run_to_completion(make_scheduler(tiny, lora_paths=paths), reqs)
    sched = make_scheduler(tiny, lora_paths=paths, speculative_algorithm="NGRAM")
    got = run_checked(sched, reqs)
    assert_same(got, ref)
    assert sched.info()["spec_accepted_tokens"] > 0
    assert ref["r1"]["output_ids"] != ref["r0"]["output_ids"] or ref["r2"]["output_ids"] != ref["r0"]["output_ids"]


def test_default_model_greedy_identical_as_a_4bit_batch_shrinks(default_model_dir) -> None:
    """The default model's 4-bit linears switch kernels at a row count (row_regimes.py): eight copy
    requests finishing at different lengths shrink the batch across it, so verify steps of small
    batches would cross into the other kernel without the cap and drift from plain decoding."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(default_model_dir))
    prompts = [tok.encode(tok.apply_chat_template([{"role": "user", "content": "Repeat exactly: " + text}],
                                                  add_generation_prompt=True, tokenize=False))
               for text in COPY_TEXTS]
    reqs = [greedy_req(f"r{i}", prompts[i % len(prompts)], 4 + 3 * i) for i in range(8)]
    base = make_scheduler(default_model_dir, max_total_tokens=8192)
    spec = make_scheduler(default_model_dir, max_total_tokens=8192, speculative_algorithm="NGRAM",
                          speculative_num_steps=6)
    assert spec.spec.thresholds, "the default model's CPU linears are 4-bit"
    ref = run_to_completion(base, reqs, timeout_s=900)
    got = run_to_completion(spec, reqs, timeout_s=900)
    assert_same(got, ref)
    assert spec.info()["spec_accepted_tokens"] > 0
    assert_pool_idle(spec)


def test_greedy_verify_rows_take_the_samplers_argmax(tiny, monkeypatch) -> None:
    """Greedy verify rows draw their targets with the sampler's greedy argmax (its two-stage kernel at <= 16 rows on a
    GPU, half torch's time on the H200): one call per verify step at batch 1, outputs as without speculation."""
    from radixlm.runtime import result_processor

    calls: list[int] = []  # verify steps' calls (plain steps take the same fast path since 863e044: not counted)
    real = result_processor.greedy_argmax

    def counted(x):
        if sys._getframe(1).f_code.co_name == "_verify_targets":
            calls.append(x.shape[0])
        return real(x)

    monkeypatch.setattr(result_processor, "greedy_argmax", counted)
    reqs = [greedy_req("r0", copy_prompts(tiny, 1)[0], 30)]
    ref = run_to_completion(make_scheduler(tiny), reqs)
    spec = make_scheduler(tiny, speculative_algorithm="NGRAM", max_running_requests=1)
    assert_same(run_to_completion(spec, reqs), ref)
    assert calls and len(calls) == spec.info()["spec_verify_steps"]

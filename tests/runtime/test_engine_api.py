"""The offline Engine on the real default model: answers, streaming, stops, n, logprobs, seeds."""
from __future__ import annotations

import asyncio
import math

import pytest

import radixlm

QUESTION = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def engine(default_model_dir):
    # float32 weights: exact parity with transformers (the quantized default: test_model_logits.py).
    # One torch thread in its scheduler process, as every other Engine and server of the suite: two
    # spin against the test process and each other on a shared 2-core machine.
    with radixlm.Engine(dtype="float32", max_total_tokens=8192, chunked_prefill_size=256, cpu_threads=1) as e:
        yield e


@pytest.fixture(scope="module")
def prompt(engine) -> str:
    return engine.tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)


def test_capital_of_france_is_paris(engine, prompt) -> None:
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 24})
    assert "Paris" in out["text"]
    meta = out["meta_info"]
    assert meta["finish_reason"] == {"type": "stop", "matched": 2}
    assert meta["prompt_tokens"] == len(engine.tokenizer.encode(prompt))
    assert meta["completion_tokens"] == len(out["output_ids"])
    assert engine.model_path.endswith("-v1") or "converted" in engine.model_path


def test_greedy_matches_transformers(engine, prompt, default_model_dir) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(str(default_model_dir), dtype=torch.float32).eval()
    ids = engine.tokenizer.encode(prompt)
    ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, do_sample=False)[0, len(ids):].tolist()
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 12})
    assert out["output_ids"] == ref[: len(out["output_ids"])]


def test_stop_string_across_tokens_is_trimmed_and_never_streamed(engine, prompt) -> None:
    params = {"temperature": 0, "max_new_tokens": 24, "stop": ["is Par"]}
    out = engine.generate(prompt, params)
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": "is Par"}
    assert out["text"] == "The capital of France "
    chunks = [c["text"] for c in engine.generate(prompt, params, stream=True)]
    assert chunks[-1] == out["text"]
    assert all("is Par" not in c and out["text"].startswith(c) for c in chunks)
    kept = engine.generate(prompt, {**params, "no_stop_trim": True})
    assert kept["text"].startswith("The capital of France is Par")


def test_stop_token_ids_min_and_max_tokens_and_ignore_eos(engine, prompt) -> None:
    first = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 5})
    tok = first["output_ids"][1]
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 20, "stop_token_ids": [tok]})
    assert out["meta_info"]["finish_reason"] == {"type": "stop", "matched": tok}
    assert out["output_ids"][-1] == tok and len(out["output_ids"]) == 2
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 30, "ignore_eos": True})
    assert out["meta_info"]["finish_reason"] == {"type": "length", "length": 30}
    out = engine.generate(prompt, {"temperature": 0, "max_new_tokens": 30, "min_new_tokens": 20})
    assert len(out["output_ids"]) >= 20


def test_prefill_only_and_cached_tokens(engine, prompt) -> None:
    engine.flush_cache()
    out = engine.generate(prompt, {"max_new_tokens": 0})
    assert out["text"] == "" and out["meta_info"]["finish_reason"] == {"type": "length", "length": 0}
    again = engine.generate(prompt + "Paris", {"max_new_tokens": 1, "temperature": 0})
    assert again["meta_info"]["cached_tokens"] >= out["meta_info"]["prompt_tokens"] - 1


def test_seed_and_n(engine, prompt) -> None:
    params = {"temperature": 1.0, "max_new_tokens": 12, "seed": 1234}
    a, b = engine.generate([prompt, prompt], params)
    assert a["output_ids"] == b["output_ids"]
    outs = engine.generate(prompt, {**params, "n": 4})
    assert len(outs) == 4 and outs[0]["output_ids"] == a["output_ids"]
    assert len({tuple(o["output_ids"]) for o in outs}) > 1
    assert len({o["meta_info"]["id"] for o in outs}) == 4


def test_logprobs(engine, prompt) -> None:
    ids = engine.tokenizer.encode(prompt)
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 4}, return_logprob=True,
                          logprob_start_len=0, top_logprobs_num=3, return_text_in_logprobs=True)
    meta = out["meta_info"]
    inp = meta["input_token_logprobs"]
    assert len(inp) == len(ids) and inp[0][0] is None and [t[1] for t in inp] == ids
    assert all(lp <= 0 for lp, _, _ in inp[1:])
    outp = meta["output_token_logprobs"]
    assert [t[1] for t in outp] == out["output_ids"]
    for (lp, tid, text), top in zip(outp, meta["output_top_logprobs"]):
        assert len(top) == 3 and top[0][1] == tid and math.isclose(top[0][0], lp, abs_tol=1e-5)
        assert isinstance(text, str)
    # logprob_start_len in the middle: entries from that position on
    out2 = engine.generate(input_ids=ids, sampling_params={"max_new_tokens": 0}, return_logprob=True, logprob_start_len=10)
    inp2 = out2["meta_info"]["input_token_logprobs"]
    assert len(inp2) == len(ids) - 10
    for (a, _, _), (b, _, _) in zip(inp2, inp[10:]):
        assert math.isclose(a, b, abs_tol=1e-4)


def test_async_generate_and_stream(engine, prompt) -> None:
    async def run():
        out = await engine.async_generate(prompt, {"temperature": 0, "max_new_tokens": 8})
        pieces = [c["text"] async for c in await engine.async_generate(prompt, {"temperature": 0, "max_new_tokens": 8}, stream=True)]
        return out, pieces

    out, pieces = asyncio.run(run())
    assert pieces[-1] == out["text"]


def test_bad_input_names_field_and_pool_returns_to_free(engine, prompt) -> None:
    from radixlm.runtime.sampling_params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="temperature"):
        engine.generate(prompt, {"temperature": -1})
    with pytest.raises(InvalidRequestError, match="^text: the prompt has"):
        engine.generate("hi " * 9000, {"max_new_tokens": 10})
    with pytest.raises(InvalidRequestError, match="^sampling_params.max_new_tokens"):
        engine.generate(prompt, {"max_new_tokens": 8190})
    info = engine.get_server_info()
    assert info["kv_locked_tokens"] == 0 and info["num_running_reqs"] == 0
    assert info["gc_frozen_objects"] > 10_000  # the scheduler process's start-up heap, out of the collector's way
    assert info["kv_used_tokens"] == info["kv_cached_tokens"]
    assert engine.flush_cache()
    assert engine.get_server_info()["kv_free_tokens"] == info["max_total_num_tokens"]


def test_rejected_batch_leaves_no_request_state(engine, prompt) -> None:
    """A batch refused part-way through (a duplicate rid in its second item) forgets the first item too."""
    from radixlm.runtime.sampling_params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="^rid"):
        engine.generate([prompt, prompt], {"max_new_tokens": 4}, rid=["dup", "dup"])
    tm = engine.tokenizer_manager
    assert not tm.states and all(r.open_sequences == 0 for r in tm.replicas)
    assert engine.generate(prompt, {"max_new_tokens": 2}, rid="dup")["meta_info"]["completion_tokens"] == 2


def test_empty_prompt_is_refused_and_the_engine_keeps_serving(engine, prompt) -> None:
    """An empty prompt reached the model and killed the scheduler (issue 13): now refused up front,
    except with max_new_tokens 0, where the BOS token is the prompt (SmolLM2's is <|im_start|>)."""
    from radixlm.runtime.sampling_params import InvalidRequestError

    with pytest.raises(InvalidRequestError, match="^text: prompt is empty"):
        engine.generate("", {"max_new_tokens": 4})
    with pytest.raises(InvalidRequestError, match=r"^input_ids\[1\]: prompt is empty"):
        engine.generate(input_ids=[[5, 6], []], sampling_params={"max_new_tokens": 1})
    out = engine.generate("", {"max_new_tokens": 0})
    assert out["meta_info"]["prompt_tokens"] == 1 and out["output_ids"] == []
    assert engine.generate(prompt, {"max_new_tokens": 2})["meta_info"]["completion_tokens"] == 2

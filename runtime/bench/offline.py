"""Offline (Engine) throughput on seeded random-token prompts, no HTTP in the way.

Prefill tok/s comes from a run with 1 new token; steady-state decode tok/s from the extra time a run
with `output_len` new tokens takes: decode = N x (out - 1) tokens / (T_out - T_1).
"""
from __future__ import annotations

import random
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from radixlm.runtime.bench.report import summary_table


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def timed_batch(engine: Any, prompts: list[list[int]], new_tokens: int, desc: str | None = None) -> float:
    """Seconds to generate exactly `new_tokens` for every prompt, as one batch. With `desc` a progress
    bar follows the scheduler's generated-token counter (polled twice a second, off the hot path)."""
    from tqdm.auto import tqdm

    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    with ThreadPoolExecutor(1) as pool:
        start = time.perf_counter()
        future = pool.submit(engine.generate, input_ids=prompts, sampling_params=params)
        if desc is not None:
            base = engine.get_server_info().get("generated_tokens", 0)
            with tqdm(total=len(prompts) * new_tokens, desc=desc, unit="tok") as bar:
                while not future.done():
                    try:
                        future.result(timeout=0.5)
                    except TimeoutError:
                        pass
                    done = engine.get_server_info().get("generated_tokens", 0) - base
                    bar.update(max(min(done, bar.total) - bar.n, 0))
                bar.update(bar.total - bar.n)
        outs = future.result()
        elapsed = time.perf_counter() - start
    assert all(o["meta_info"]["completion_tokens"] == new_tokens for o in outs)
    return elapsed


def measure(engine: Any, n: int, input_len: int, output_len: int, vocab: int, seed: int = 0,
            progress: bool = True) -> dict[str, float]:
    timed_batch(engine, random_prompts(min(n, 4), 16, vocab, seed + 99), 4)  # warm-up
    t1 = timed_batch(engine, random_prompts(n, input_len, vocab, seed + 1), 1, "prefill" if progress else None)
    tn = timed_batch(engine, random_prompts(n, input_len, vocab, seed + 2), output_len,
                     "decode" if progress else None)
    return {"num_prompts": n, "input_len": input_len, "output_len": output_len,
            "t_1_token_s": t1, "t_all_tokens_s": tn,
            "prefill_tok_s": n * input_len / t1,
            "decode_tok_s": n * (output_len - 1) / max(tn - t1, 1e-9),
            "decode_ms_per_step": (tn - t1) / max(output_len - 1, 1) * 1000,
            "request_throughput": n / tn, "output_throughput": n * output_len / tn,
            "total_throughput": n * (input_len + output_len) / tn}


def offline_table(r: dict[str, Any], info: dict[str, Any]) -> str:
    return summary_table("Offline Throughput Benchmark Result", [
        (None, [("Backend", "radixlm Engine"), ("Device / dtype", f"{info.get('device')} / {info.get('dtype')}"),
                ("Prompts x input / output tokens", f"{r['num_prompts']} x {r['input_len']} / {r['output_len']}"),
                ("Benchmark duration (s)", r["t_all_tokens_s"]), ("Request throughput (req/s)", r["request_throughput"]),
                ("Output token throughput (tok/s)", r["output_throughput"]),
                ("Total token throughput (tok/s)", r["total_throughput"])]),
        ("Phases", [("Prefill throughput (tok/s)", r["prefill_tok_s"]),
                    ("Decode throughput (tok/s)", r["decode_tok_s"]),
                    ("Decode step (ms)", r["decode_ms_per_step"])]),
    ])

"""llama.cpp's side of benchmarks/cpu.py, run by that script in llama-cpp-python's own venv.

Reads a JSON job on stdin ({"model", "threads", "batches": {name: [[ids...], ...]}, "new_tokens"}),
prints one JSON line: per batch, seconds for prefill + 1 token and for prefill + new_tokens, greedy
over the raw logits, every sequence decoded in the same llama_decode call (one KV cell stream per
sequence). Only llama_cpp's low-level API and numpy: radixlm is not importable in that venv.
"""
from __future__ import annotations

import json
import sys
import time

import llama_cpp as L
import numpy as np


def run(ctx, model_vocab: int, prompts: list[list[int]], new_tokens: int, n_batch: int) -> float:
    """Prefill every prompt, then decode `new_tokens - 1` more tokens for all of them; seconds."""
    n = len(prompts)
    mem = L.llama_get_memory(ctx)
    L.llama_memory_clear(mem, True)
    batch = L.llama_batch_init(max(n_batch, n), 0, n)
    start = time.perf_counter()
    pending: list[tuple[int, int, int, bool]] = []  # (seq, pos, token, wants logits)
    for s, ids in enumerate(prompts):
        pending += [(s, p, t, p == len(ids) - 1) for p, t in enumerate(ids)]
    last = [0] * n
    positions = [len(ids) for ids in prompts]

    def decode(items: list[tuple[int, int, int, bool]]) -> None:
        for lo in range(0, len(items), n_batch):
            chunk = items[lo : lo + n_batch]
            batch.n_tokens = len(chunk)
            for i, (s, p, t, want) in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i] = t, p, 1
                batch.seq_id[i][0] = s
                batch.logits[i] = want
            if L.llama_decode(ctx, batch) != 0:
                raise RuntimeError("llama_decode failed")
            for i, (s, _, _, want) in enumerate(chunk):
                if want:
                    row = np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, i), shape=(model_vocab,))
                    last[s] = int(row.argmax())

    decode(pending)
    for _ in range(new_tokens - 1):
        decode([(s, positions[s], last[s], True) for s in range(n)])
        positions = [p + 1 for p in positions]
    elapsed = time.perf_counter() - start
    L.llama_batch_free(batch)
    return elapsed


def main() -> None:
    job = json.load(sys.stdin)
    L.llama_backend_init()
    mparams = L.llama_model_default_params()
    if job.get("no_extra_bufts"):
        # ggml's AMX weight buffer: a build with GGML_NATIVE on a VM that lists AMX but faults on
        # ldtilecfg (seen on our 2-core machines) dies with SIGILL; this keeps the plain CPU path.
        mparams.use_extra_bufts = False
    model = L.llama_model_load_from_file(job["model"].encode(), mparams)
    vocab = L.llama_model_get_vocab(model)
    n_vocab = L.llama_vocab_n_tokens(vocab)
    results = {}
    for name, prompts in job["batches"].items():
        cparams = L.llama_context_default_params()
        total = sum(len(p) for p in prompts) + len(prompts) * (job["new_tokens"] + 8)
        cparams.n_ctx = max(512, total)
        cparams.n_batch = cparams.n_ubatch = 512
        cparams.n_seq_max = len(prompts)
        cparams.n_threads = cparams.n_threads_batch = job["threads"]
        ctx = L.llama_init_from_model(model, cparams)
        run(ctx, n_vocab, [p[:8] for p in prompts], 2, 512)  # warm-up
        t1 = min(run(ctx, n_vocab, prompts, 1, 512) for _ in range(job.get("inner_repeats", 1)))
        tn = min(run(ctx, n_vocab, prompts, job["new_tokens"], 512) for _ in range(job.get("inner_repeats", 1)))
        results[name] = {"t_1": t1, "t_n": tn}
        L.llama_free(ctx)
    print(json.dumps({"version": getattr(L, "__version__", "?"), "results": results}))


if __name__ == "__main__":
    main()

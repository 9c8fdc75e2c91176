"""Offline throughput: radixlm Engine vs transformers `generate`, side by side in one run.

Prefill tok/s comes from runs with 1 new token; steady-state decode tok/s from the extra time a run
with `--output-len` new tokens takes (decode = N * (out - 1) tokens / (T_out - T_1)).

    python benchmarks/offline_throughput.py --num-prompts 32 --input-len 128 --output-len 65
"""
from __future__ import annotations

import argparse
import json
import platform
import subprocess
import time
from pathlib import Path

import torch

from radixlm.runtime.bench.offline import random_prompts
from radixlm.runtime.bench.offline import timed_batch as time_radixlm


def time_transformers(model, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts, device=model.device)
    mask = torch.ones_like(ids)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=0)
    if model.device.type == "cuda":
        torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def measure(fn, prompts_a, prompts_b, n: int, inp: int, out: int) -> dict[str, float]:
    t1 = fn(prompts_a, 1)
    tn = fn(prompts_b, out)
    return {
        "t_1_token_s": t1,
        f"t_{out}_tokens_s": tn,
        "prefill_tok_s": n * inp / t1,
        "decode_tok_s": n * (out - 1) / max(tn - t1, 1e-9),
        "decode_ms_per_step": (tn - t1) / (out - 1) * 1000,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--model-path", default=None)
    ap.add_argument("--num-prompts", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=65)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--out", default="benchmarks/results/offline_throughput.json")
    args = ap.parse_args()

    from transformers import AutoModelForCausalLM

    import radixlm

    n, inp, out = args.num_prompts, args.input_len, args.output_len
    rows: dict[str, dict[str, float]] = {}
    with radixlm.Engine(args.model_path, dtype=args.dtype, max_total_tokens=max(n * (inp + out) * 2, 16384),
                        max_running_requests=max(n, 8)) as engine:
        vocab = len(engine.tokenizer)
        dtype_name = engine.tokenizer_manager.info.dtype
        time_radixlm(engine, random_prompts(4, 16, vocab, 99), 4)  # warm-up
        rows["radixlm"] = measure(lambda p, k: time_radixlm(engine, p, k),
                                  random_prompts(n, inp, vocab, 1), random_prompts(n, inp, vocab, 2), n, inp, out)
        model_dir = engine.model_path
        device = engine.tokenizer_manager.info.device
    if not args.skip_transformers:
        model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, dtype_name)).to(device).eval()
        time_transformers(model, random_prompts(4, 16, vocab, 99), 4)
        rows["transformers"] = measure(lambda p, k: time_transformers(model, p, k),
                                       random_prompts(n, inp, vocab, 3), random_prompts(n, inp, vocab, 4), n, inp, out)
    print(f"\nOffline throughput: {n} prompts x {inp} tokens in, {out} out, {dtype_name} on {device}")
    print(f"{'engine':<14}{'prefill tok/s':>16}{'decode tok/s':>16}{'ms/decode step':>18}")
    for name, r in rows.items():
        print(f"{name:<14}{r['prefill_tok_s']:>16.1f}{r['decode_tok_s']:>16.1f}{r['decode_ms_per_step']:>18.1f}")
    if "transformers" in rows:
        ratio = {k: rows["radixlm"][k] / rows["transformers"][k] for k in ("prefill_tok_s", "decode_tok_s")}
        print(f"{'ratio':<14}{ratio['prefill_tok_s']:>15.2f}x{ratio['decode_tok_s']:>15.2f}x")
        rows["ratio"] = ratio
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record = {"config": vars(args), "device": device, "dtype": dtype_name, "machine": platform.node(),
              "torch_threads": torch.get_num_threads(), "commit": commit, "date": time.strftime("%Y-%m-%d"), "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

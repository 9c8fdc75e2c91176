"""Decode throughput against batch size, one Engine, for the throughput-vs-batch figure (plots.py).

    python benchmarks/batch_sweep.py --preset cpu   # the default model on this machine's CPU
    python benchmarks/batch_sweep.py --preset gpu   # Llama-3.1-8B shape, random bf16 weights, on CUDA

For each batch size B: B fresh random prompts (no prefix-cache hits), generated once with 1 new
token and once with `--output-len` (ignore_eos); decode tok/s = B x (output_len - 1) / (t_out - t_1),
so prefill is not counted. Writes benchmarks/results/batch_sweep-<preset>.json.
"""
from __future__ import annotations

import argparse
import json
import random
import subprocess
import tempfile
import time
from pathlib import Path

import radixlm

PRESETS = {"cpu": {"batches": [1, 2, 4, 8, 16, 32], "input_len": 64, "output_len": 32},
           "gpu": {"batches": [1, 4, 16, 64, 128, 256, 512], "input_len": 256, "output_len": 128}}


def _timed(engine: radixlm.Engine, prompts: list[list[int]], new: int) -> float:
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params={"temperature": 0, "max_new_tokens": new,
                                                               "ignore_eos": True})
    seconds = time.perf_counter() - start
    assert all(o["meta_info"]["completion_tokens"] == new for o in outs)
    return seconds


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--batches", default=None, help="comma-separated batch sizes (default: the preset's)")
    ap.add_argument("--cpu-threads", type=int, default=None)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cfg = dict(PRESETS[args.preset])
    if args.batches:
        cfg["batches"] = [int(b) for b in args.batches.split(",")]
    options: dict = {"max_total_tokens": max(cfg["batches"]) * (cfg["input_len"] + cfg["output_len"] + 8) + 4096,
                     "max_running_requests": max(cfg["batches"])}
    if args.cpu_threads:
        options["cpu_threads"] = args.cpu_threads
    model_path = None
    if args.preset == "gpu":
        from gpu_suite import LLAMA_8B, model_dir_for  # benchmarks/ is on sys.path when run as a script

        model_path = str(model_dir_for(LLAMA_8B, Path(tempfile.mkdtemp(prefix="radixlm-sweep-")), "llama8b"))
        options.update(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True)
    rng = random.Random(7)
    points = []
    with radixlm.Engine(model_path, **options) as engine:
        vocab = engine.tokenizer_manager.info.vocab_size
        device = engine.tokenizer_manager.info.device

        def prompts(b: int) -> list[list[int]]:
            return [[rng.randrange(100, vocab - 100) for _ in range(cfg["input_len"])] for _ in range(b)]

        _timed(engine, prompts(2), 4)  # warm-up (graphs, allocator)
        for b in cfg["batches"]:
            t_one = _timed(engine, prompts(b), 1)
            t_out = _timed(engine, prompts(b), cfg["output_len"])
            decode = b * (cfg["output_len"] - 1) / max(t_out - t_one, 1e-9)
            points.append({"batch": b, "t_1_token_s": t_one, "t_output_s": t_out, "decode_tok_s": decode,
                           "decode_ms_per_step": 1000 * (t_out - t_one) / (cfg["output_len"] - 1)})
            print(f"batch {b:4d}: decode {decode:9.1f} tok/s, {points[-1]['decode_ms_per_step']:.1f} ms/step", flush=True)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    report = {"preset": args.preset, "config": cfg, "device": device, "date": time.strftime("%Y-%m-%d"),
              "commit": commit, "cpu_threads": args.cpu_threads, "points": points}
    out = Path(args.out or f"benchmarks/results/batch_sweep-{args.preset}.json")
    out.write_text(json.dumps(report, indent=1))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

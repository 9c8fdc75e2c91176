"""64 LoRA adapters on 8 device slots, workload (b) at its real size (issue 21): how the scheduler's
settings set the run time, next to the base engine, on one Llama-3.1-8B-shaped model (random bf16
weights, --layers of them: fewer layers for a quick A/B of scheduling, 32 for the real figure).

Under the 8-per-batch rule a request decodes only while its adapter holds a slot, so decode steps
>= sum over adapters of their longest output / 8 (printed as the bound). Each configuration is one
LoRA engine serving the same 64-adapter spread as benchmarks/lora.py; per run: seconds, total tok/s,
vs base, forward steps by kind (prefill alone / prefill + decode rows / decode; overlapped), swaps.

    python benchmarks/lora_admission.py --layers 8 --requests 1000 --configs default,mixed512 --out $OUT/lora_admission.json
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import ENGINE_ARGS, params_for, workload_b  # noqa: E402
from lora import run_b, write_adapter  # noqa: E402

# name -> extra engine options of the LoRA engine
CONFIGS: dict[str, dict] = {
    "default": {},
    "mixed512": {"enable_mixed_chunk": True, "chunked_prefill_size": 512},
    "mixed1024": {"enable_mixed_chunk": True, "chunked_prefill_size": 1024},
    "slotchunk1024": {"lora_prefill_chunk": 1024},  # small chunks only while the slots bound the run
    "slotchunk512": {"lora_prefill_chunk": 512},
    "mixed2048": {"enable_mixed_chunk": True, "chunked_prefill_size": 2048},
    "stacked": {"lora_kernels": "stacked"},  # the shrink inside the base GEMM at decode sizes
}
# Every LoRA engine here serves 64 adapters 8 at a time (<= ~200 rows a batch): graphs up to 256 rows,
# and no cascade-attention graphs (random prompts share no prefix), so that each starts in seconds.
LORA_ENGINE_ARGS = {"cuda_graph_max_bs": 256, "cascade_attention": "off"}


def run(eng, prompts: list[list[int]], outs: list[int], loras: list[str | None], slots: int) -> dict:
    before = eng.get_server_info()
    row = run_b(eng, prompts, outs, loras, slots)
    row.pop("_outputs")
    after = eng.get_server_info()
    row["steps"] = {"forward_steps": row["forward_steps"], **row["steps_by_kind"]}
    if "lora" in after:
        row["swaps"] = after["lora"]["swaps"] - before.get("lora", {}).get("swaps", 0)
    return row


def main() -> None:
    import radixlm

    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--adapters", type=int, default=64)
    ap.add_argument("--slots", type=int, default=8)
    ap.add_argument("--configs", default="default,mixed512", help=f"comma-separated, of: {', '.join(CONFIGS)}")
    ap.add_argument("--budget-s", type=float, default=1e9, help="start no LoRA engine past this many seconds")
    ap.add_argument("--skip-base", action="store_true",
                    help="no base engine (an A/B of LoRA configurations only: each row's vs_base is then missing)")
    ap.add_argument("--log-level", default="warning", help="the engines' log level (info: a line every 40 decode steps)")
    ap.add_argument("--out", default="benchmarks/results/lora_admission.json")
    args = ap.parse_args()
    started = time.perf_counter()
    cfg = {**LLAMA_8B, "num_hidden_layers": args.layers}
    engine_args = {**ENGINE_ARGS, "log_level": args.log_level}
    root = Path(tempfile.mkdtemp(prefix="radixlm-lora-adm-"))
    d = model_dir_for(cfg, root, f"llama8b_{args.layers}l")
    prompts, outs = workload_b(args.requests, cfg["vocab_size"])
    report: dict = {"device": torch.cuda.get_device_name(), "layers": args.layers, "requests": args.requests,
                    "adapters": args.adapters, "slots": args.slots, "runs": {}, "skipped": []}

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    base = None
    if not args.skip_base:
        with radixlm.Engine(str(d), mem_fraction_static=0.85, **engine_args) as eng:
            eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8))
            base = report["base"] = run(eng, prompts, outs, [None] * len(prompts), args.slots)
        print(f"base: {base['seconds']:.1f} s, {base['total_tok_s']:.0f} tok/s, steps {base['steps']}", flush=True)
    names = [f"lora{i}" for i in range(args.adapters)]
    paths = tuple(f"{n}={write_adapter(root / n, cfg, seed=i)}" for i, n in enumerate(names))
    rng = random.Random(9)  # the same spread as benchmarks/lora.py's 64-adapter row (its rng draws 1- and 8-adapter spreads first)
    for count in (1, 8):
        for _ in prompts:
            rng.randrange(count)
    loras = [names[rng.randrange(len(names))] for _ in prompts]
    save()
    for name in filter(None, args.configs.split(",")):
        if time.perf_counter() - started > args.budget_s:
            report["skipped"].append(name)
            continue
        t = time.perf_counter()
        try:
            with radixlm.Engine(str(d), mem_fraction_static=0.85, lora_paths=paths, max_loras_per_batch=args.slots,
                                **engine_args, **LORA_ENGINE_ARGS, **CONFIGS[name]) as eng:
                start_s = time.perf_counter() - t
                eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8),
                             lora_path=[names[i % len(names)] for i in range(8)])
                row = run(eng, prompts, outs, loras, args.slots)
        except Exception as exc:  # noqa: BLE001 - one failing configuration must not lose the others
            report["runs"][name] = {"error": f"{type(exc).__name__}: {exc}"[:1000]}
            print(name, "FAILED", exc, flush=True)
            save()
            continue
        row["engine_start_s"] = start_s
        if base is not None:
            row["vs_base"] = row["total_tok_s"] / base["total_tok_s"]
        report["runs"][name] = row
        print(f"{name}: {row['seconds']:.1f} s, {row['total_tok_s']:.0f} tok/s, {row.get('vs_base', float('nan')):.2f}x base, "
              f"decode steps >= {row.get('decode_steps_lower_bound')}, steps {row['steps']}, swaps {row.get('swaps')}, "
              f"start {start_s:.0f} s", flush=True)
        save()
    save()
    print(f"wall {report['wall_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

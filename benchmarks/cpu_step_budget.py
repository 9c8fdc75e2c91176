"""Where a CPU decode step of the default model goes (issue 20): the per-step budget.

The scheduler runs in-process (no front, no pipe) on the default model; after the prompts are
prefilled, each decode step is timed whole and by part, with perf_counter wrappers put around the
runner's forward, every linear layer (by kind), the attention backend (KV store + attention) and
the LM head. "other ops" is the forward minus those (norms, rotary, activations, residual adds,
their dispatch); "outside the forward" is the step minus the forward (scheduling, the step's
tensors, sampling, stop checks, events). Median over the steps, in ms; the wrappers add ~1 us each.

    python benchmarks/cpu_step_budget.py --threads 2 --batch 1,32 [--quantization gguf|none]
        [--compare-torch-ops | --compare-per-op | --compare-before-stack]

--compare-torch-ops alternates the steps (A B B A ...) between the CPU bundle's C kernels and its
torch ops (the code that ran before them, and still runs where no C compiler is): an A/B within one
process, so a busy shared machine's noise falls on both sides alike. --compare-per-op alternates the
one-call decode stack (runtime/cpu_decode_step.py, where the per-layer parts are not timed: all of
it shows as "other ops") with the per-op layers.

The IPC and the front (detokenizing, streaming) are not in this process: benchmarks/cpu.py times
the Engine end to end, and the difference per token is theirs.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from radixlm.kernels import cpu_native, cpu_ops
from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.model_source import resolve_model_path
from radixlm.runtime.quantization import int4_cpu
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs

PARTS = ("qkv", "o", "gate_up", "down", "attention", "lm head", "other ops", "outside the forward")


class Timers:
    def __init__(self) -> None:
        self.spent: dict[str, float] = defaultdict(float)

    def wrap(self, name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        spent = self.spent

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                spent[name] += time.perf_counter() - start

        return timed


def instrument(sched: Scheduler, timers: Timers) -> None:
    runner = sched.runner
    model = runner.model
    for layer in model.layers:
        attn, mlp = layer.self_attn, layer.mlp
        for name, module in (("qkv", attn.qkv_proj), ("o", attn.o_proj), ("gate_up", mlp.gate_up_proj),
                             ("down", mlp.down_proj)):
            module.forward = timers.wrap(name, module.forward)
    runner.attn_backend.forward = timers.wrap("attention", runner.attn_backend.forward)
    model.compute_logits = timers.wrap("lm head", model.compute_logits)
    runner.forward = timers.wrap("forward", runner.forward)


def use_torch_ops(on: bool) -> None:
    """Switch the CPU bundle between its C kernels and torch ops (what runs where no C compiler is,
    and what ran before the kernels), for an A/B inside one process."""
    cpu_ops.decode_kernels_library = (lambda: None) if on else cpu_native.decode_kernels_library


def budget(sched: Scheduler, batch: int, input_len: int, steps: int, seed: int, compare: str) -> dict[str, Any]:
    """Median ms per part; `compare` 'torch-ops': steps alternate C kernels / torch ops (A B B A ...), 'per-op':
    the one-call decode stack / the per-op layers, 'before-stack': the stack / the per-op layers with torch's
    int4 matmul (the code before the stack and the C GEMV); one set of medians each."""
    rng = random.Random(seed)
    vocab = sched.runner.vocab_size
    for i in range(batch):
        ids = [rng.randrange(100, vocab - 100) for _ in range(input_len)]
        params = SamplingParams(temperature=0.0, max_new_tokens=steps + 8, ignore_eos=True)
        sched.handle(TokenizedGenerateReq(rid=f"b{batch}-{i}", input_ids=ids, params=params))
    while sched.waiting or sched.partial:  # prefill (chunks) until every request decodes
        sched.step()
    for _ in range(3):
        sched.step()
    timers = Timers()
    instrument(sched, timers)
    by_mode: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    model = sched.runner.model
    stack = model.decode_stack
    for step in range(steps):
        mode = ("c", compare)[(step + step // 2) % 2] if compare else "c"
        use_torch_ops(mode == "torch-ops")
        model.decode_stack = None if mode in ("per-op", "before-stack") else stack
        int4_cpu.decode_kernels_library = (lambda: None) if mode == "before-stack" else cpu_native.decode_kernels_library
        rows = by_mode[mode]
        timers.spent.clear()
        wall, cpu = time.perf_counter(), time.process_time()
        sched.step()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        spent = dict(timers.spent)
        parts = sum(spent.get(p, 0.0) for p in ("qkv", "o", "gate_up", "down", "attention", "lm head"))
        spent["other ops"] = spent["forward"] - parts
        spent["outside the forward"] = wall - spent["forward"]
        for key, value in spent.items():
            rows[key].append(value * 1e3)
        rows["step (wall)"].append(wall * 1e3)
        rows["step (process cpu)"].append(cpu * 1e3)
    use_torch_ops(False)
    model.decode_stack = stack
    int4_cpu.decode_kernels_library = cpu_native.decode_kernels_library
    while not sched.idle:
        sched.step()
    sched.cache.flush()
    return {mode: {key: statistics.median(values) for key, values in rows.items()} for mode, rows in by_mode.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", default="1,32", help="comma list of decode batch sizes")
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--quantization", default="gguf")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--compare-torch-ops", action="store_true",
                    help="alternate steps between the C kernels and torch ops (kernels/cpu_native.py); medians of each")
    ap.add_argument("--compare-per-op", action="store_true",
                    help="alternate steps between the one-call decode stack (runtime/cpu_decode_step.py) and the "
                         "per-op layers; medians of each")
    ap.add_argument("--compare-before-stack", action="store_true",
                    help="alternate steps between the decode stack and the per-op layers with torch's int4 matmul "
                         "(the code before them)")
    ap.add_argument("--out", default="benchmarks/results/cpu_step_budget.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    opts = ServerArgs(device="cpu", cpu_threads=args.threads, quantization=args.quantization, dtype=args.dtype,
                      max_total_tokens=65536, max_running_requests=64, disable_radix_cache=True)
    sched = Scheduler(opts.resolve(), Path(resolve_model_path(None)), None)
    if cpu_native.decode_kernels_library() is None:
        print("no C kernels on this machine (no compiler?): every step runs torch ops")
    results, sizes = {}, {}
    for size in (int(b) for b in args.batch.split(",")):
        compare = ("torch-ops" if args.compare_torch_ops else "per-op" if args.compare_per_op
                   else "before-stack" if args.compare_before_stack else "")
        for mode, medians in budget(sched, size, args.input_len, args.steps, size, compare).items():
            name = f"batch_{size}" if mode == "c" else f"b{size} {mode}"
            results[name], sizes[name] = medians, size
    load = os.getloadavg()
    print(f"\nper decode step, ms (median of {args.steps}); quantization {sched.runner.quantization}, "
          f"{args.threads} threads, {args.input_len}-token prompts; load average {load[0]:.1f}")
    print(f"{'part':<22}" + "".join(f"{b:>15}" for b in results))
    for part in ("step (wall)", "step (process cpu)", "forward", *PARTS):
        print(f"{part:<22}" + "".join(f"{r.get(part, 0.0):>15.2f}" for r in results.values()))
    print(f"{'tok/s (wall)':<22}" + "".join(f"{sizes[b] / r['step (wall)'] * 1e3:>15.1f}" for b, r in results.items()))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"config": vars(args), "load_average": load, "results": results,
                                          "date": time.strftime("%Y-%m-%d %H:%M"), "torch": torch.__version__},
                                         indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

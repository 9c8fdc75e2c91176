"""Issue 21's 64-adapter row on the CPU: the ceiling the 8-slot rule allows, and what a scheduler setting makes of it.

Replays the real scheduler in process (a tiny random Llama on the CPU, with the H200 engine's batch limits: chunks of
8,192 tokens, 1,024 running requests, the bf16 8B KV pool of 831k tokens) over workload (b) with its requests spread
over N adapters as `lora_issue.py` spreads them, records every forward (prefill tokens, decode rows, KV tokens the
decode rows attend, whether it carries adapters, whether it ran overlapped) and prices each with the H200's measured
costs at the Llama-3.1-8B shape (`H200`, sources in benchmarks/RESULTS.md). The step counts are the scheduler's own
(2026-12-03 the H200 ran 92 / 4 / 3,957 prefill / mixed / decode steps for 64 adapters at 1,000 requests where
this replay runs 92 / 4 / 3,959); the seconds are a model, checked against the base row measured on the H200.

The ceiling: an adapter decodes only while it holds one of the 8 slots, and it holds one for at least its longest
request's output, so decode steps S >= sum over adapters of that / 8 whatever the scheduler does. Every step reads
the weights (G(T), flat up to ~100 rows, then compute-bound) and pays the step's fixed and LoRA costs; the KV that
decode rows read is the same whatever the order (A). With all prompt and output tokens spread evenly over S steps
(the best a scheduler could do: G and L are convex): ceiling = S x (G(T) + F + L(T)) + A, T = all tokens / S.
Without prefill riding on the decode steps: S x (G(rows) + F + L(rows)) + A + the prefill's own time.

    python benchmarks/lora_slot_model.py --requests 1000 --arms base,64,64:256 --out /tmp/lora_slot_model.json
"""
from __future__ import annotations

import argparse
import bisect
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import workload_b  # noqa: E402
from lora import write_adapter  # noqa: E402
from lora_issue import TINY  # noqa: E402


@dataclass(frozen=True)
class Costs:
    """H200 costs of a 32-layer Llama-3.1-8B bf16 forward (ms), measured 2026-12-03 (RESULTS.md)."""

    # the 128 GEMMs of a step at T rows (lora_step.py, branch lora5/lora6 rounds; T = 1 the engine's GEMVs, lean5)
    gemm: tuple[tuple[int, float], ...] = ((1, 3.44), (2, 3.86), (64, 3.92), (256, 5.83), (512, 11.11), (1024, 21.18))
    # rank-16 LoRA on all seven modules, 8 adapters, the engine's kernels (lora_step.py stacked; T = 1: the engine's
    # batch-1 step with an adapter, 4.444 vs 4.135 ms); past 1,024 rows its share of the GEMMs there (21%)
    lora: tuple[tuple[int, float], ...] = ((1, 0.31), (64, 0.844), (256, 1.516), (512, 2.40), (1024, 4.52))
    fixed: float = 0.70  # the rest of a step: LM head, norms, rotary, ... (batch-1 step 4.135 - its GEMVs 3.44)
    kv_bytes_per_ms: float = 3.3e9  # decode attention reads 131,072 B of KV per token attended (~3.3 TB/s)
    prefill_extra: float = 0.002  # per prompt token: prefill attention and the rest (base (b): 13.2 s for 582k)
    sync: float = 0.0  # host time a synchronous (prefill / mixed) step adds: unmeasured, priced at 0 and 1 ms
    # the least a step run eagerly (prefill, mixed: no CUDA graph) takes, its host launching 32 layers op by op: an
    # eager mixed step of 64 rows took ~15.7 ms against a 5.5-ms graph step on the H200 (RESULTS.md, (f)'s
    # jump-forward); a step whose device work is shorter waits for its host. An optimistic floor for LoRA: 1,024-token
    # mixed steps of the 64-adapter row took ~80-115 ms on the H200 (lora9's mid round) where this prices ~30 ms
    eager: float = 0.0


KV_BYTES = 131072  # 32 layers x 8 KV heads x 128 x (K, V) x bf16


def interp(points: tuple[tuple[int, float], ...], t: float) -> float:
    xs = [p[0] for p in points]
    if t >= xs[-1]:
        return points[-1][1] * t / xs[-1]
    i = max(bisect.bisect_left(xs, t), 1)
    (x0, y0), (x1, y1) = points[i - 1], points[i]
    return y0 + (y1 - y0) * (max(t, x0) - x0) / (x1 - x0)


def step_ms(c: Costs, tokens: int, prompt_tokens: int, kv: int, lora: bool, synchronous: bool) -> float:
    device = (interp(c.gemm, tokens) + c.fixed + kv * KV_BYTES / c.kv_bytes_per_ms + prompt_tokens * c.prefill_extra
              + (interp(c.lora, tokens) if lora else 0.0))
    return max(device, c.eager) + c.sync if synchronous else device


def replay(requests: int, adapters: int, chunk: int, root: Path) -> dict:
    """The real scheduler over workload (b) on the CPU: one record per forward."""
    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from radixlm.runtime.scheduler import Scheduler
    from radixlm.runtime.server_args import ServerArgs

    model_dir = model_dir_for(TINY, root, "model")
    names = [f"lora{i}" for i in range(64)]
    for i, name in enumerate(names):
        if adapters and not (root / name / "adapter_config.json").exists():
            write_adapter(root / name, TINY, seed=i, device="cpu")
    paths = tuple(f"{n}={root / n}" for n in names) if adapters else ()
    args = ServerArgs(model_path=str(model_dir), device="cpu", dtype="float32", load_format="dummy",
                      skip_tokenizer_init=True, context_length=4096, max_total_tokens=831_000, chunked_prefill_size=8192,
                      max_running_requests=1024, lora_paths=paths,
                      max_loras_per_batch=8, lora_prefill_chunk=chunk, cpu_threads=1, log_level="warning").resolve()
    sched = Scheduler(args, model_dir, None)
    prompts, outs = workload_b(requests, LLAMA_8B["vocab_size"])  # the H200 run's lengths (its draws depend on vocab)
    prompts = [[t % TINY["vocab_size"] for t in ids] for ids in prompts]
    rng = random.Random(9)  # lora_issue.py's spread: drawn for 0, 1, 8 and 64 adapters in turn from one generator
    spread = {n: [None if n == 0 else names[rng.randrange(n)] for _ in prompts] for n in sorted({0, 1, 8, 64, adapters})}
    spread = spread[adapters]
    for i, (ids, out, name) in enumerate(zip(prompts, outs, spread)):
        sched.handle(TokenizedGenerateReq(rid=f"r{i}", input_ids=ids, lora_path=name, params=SamplingParams(
            temperature=0.0, max_new_tokens=out, ignore_eos=True)))
    steps: list[tuple[int, int, int, bool, bool]] = []  # tokens, prompt tokens, KV attended by decode rows, lora, sync
    forward = sched.runner.forward

    def recording(fb):
        decode = fb.mode is ForwardMode.DECODE
        lens = fb.extend_seq_lens_cpu
        rows = [i for i, n in enumerate(lens) if decode or n == 1]
        steps.append((sum(lens), 0 if decode else sum(n for n in lens if n > 1),
                      sum(fb.seq_lens_cpu[i] for i in rows), any(fb.lora_names or []), not decode))
        return forward(fb)

    sched.runner.forward = recording
    started = time.perf_counter()
    while not sched.idle:
        sched.step()
        sched.pop_outputs()
    longest: dict[str, int] = {}
    for name, out in zip(spread, outs):
        if name is not None:
            longest[name] = max(longest.get(name, 0), out)
    lora = sched.runner.lora
    return {"steps": steps, "replay_s": time.perf_counter() - started, "prompt_tokens": sum(map(len, prompts)),
            "output_tokens": sum(outs), "max_out": max(outs), "slot_bound": -(-sum(longest.values()) // 8),
            "kinds": {k: sched.stats[k] for k in ("prefill_steps", "mixed_steps", "decode_steps")},
            "swaps": getattr(lora, "swaps", 0), "swaps_staged": getattr(lora, "swaps_staged", 0)}


def priced(run: dict, c: Costs) -> float:
    return sum(step_ms(c, *s) for s in run["steps"]) / 1e3


def ceilings(run: dict, c: Costs) -> dict:
    """The 8-slot rule's bounds for this spread (module docstring), seconds."""
    s = max(run["slot_bound"], run["max_out"])
    attention = sum(kv for _, _, kv, _, _ in run["steps"]) * KV_BYTES / c.kv_bytes_per_ms  # ms
    even = (run["prompt_tokens"] + run["output_tokens"]) / s
    rows = run["output_tokens"] / s
    prompt = run["prompt_tokens"]
    prefill = (interp(c.gemm, 8192) * (1 + interp(c.lora, 8192) / interp(c.gemm, 8192)) / 8192 + c.prefill_extra) * prompt
    return {"decode_steps_bound": s,
            "even_s": (s * (interp(c.gemm, even) + c.fixed + interp(c.lora, even)) + attention) / 1e3
            + prompt * c.prefill_extra / 1e3,
            "separate_prefill_s": (s * (interp(c.gemm, rows) + c.fixed + interp(c.lora, rows)) + attention) / 1e3
            + prefill / 1e3}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--arms", default="base,64,64:256",
                    help="base, or adapters[:--lora-prefill-chunk], comma-separated (8, 64, 64:256 ...)")
    ap.add_argument("--sync-ms", default="0,1", help="host ms a synchronous step adds, priced at each")
    ap.add_argument("--eager-ms", type=float, default=16.0,
                    help="the least an eager (prefill / mixed) step takes: its host's launches (0: device time only)")
    ap.add_argument("--base-measured-s", type=float, default=29.46,
                    help="the base row measured on the H200 at 1,000 requests (fdfdef2, 2026-12-03)")
    ap.add_argument("--out", default="benchmarks/results/lora_slot_model.json")
    args = ap.parse_args()
    syncs = [float(x) for x in args.sync_ms.split(",")]
    root = Path(tempfile.mkdtemp(prefix="radixlm-slot-model-"))
    report: dict = {"requests": args.requests, "costs": Costs(eager=args.eager_ms).__dict__, "arms": {}}
    for arm in args.arms.split(","):
        adapters, _, chunk = arm.partition(":")
        run = replay(args.requests, 0 if adapters == "base" else int(adapters), int(chunk or 0), root)
        row = {k: v for k, v in run.items() if k != "steps"}
        row["priced_s"] = {str(x): priced(run, Costs(sync=x, eager=args.eager_ms)) for x in syncs}
        if adapters != "base":
            row["ceiling"] = ceilings(run, Costs())
        report["arms"][arm] = row
        print(f"{arm}: {json.dumps(row)}", flush=True)
    base = report["arms"].get("base")
    print(f"\nworkload (b), {args.requests} requests, priced at the H200's costs (sync ms: {args.sync_ms}, eager "
          f"steps >= {args.eager_ms} ms)")
    for arm, row in report["arms"].items():
        times = " / ".join(f"{t:.1f}" for t in row["priced_s"].values())
        vs = " / ".join(f"{base['priced_s'][k] / t:.3f}x" for k, t in row["priced_s"].items()) if base else "-"
        line = f"{arm:<10} steps p/m/d {row['kinds']} swaps {row['swaps']} ({row['swaps_staged']} staged)  {times} s  {vs}"
        if "ceiling" in row:
            ceil = row["ceiling"]
            line += (f"  | bound {ceil['decode_steps_bound']} steps: even {ceil['even_s']:.1f} s, prefill apart "
                     f"{ceil['separate_prefill_s']:.1f} s")
            if base:
                b0 = base["priced_s"][str(syncs[0])]
                line += f" ({b0 / ceil['even_s']:.3f}x / {b0 / ceil['separate_prefill_s']:.3f}x)"
        print(line)
    if base:
        print(f"base priced {base['priced_s'][str(syncs[0])]:.1f} s against {args.base_measured_s} s measured")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

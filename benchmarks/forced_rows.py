"""Grammar-forced tokens as extra decode rows (runtime/forced_rows.py) on the CPU: item (f)'s JSON workload
through the scheduler with --enable-forced-rows off and on, side by side.

What the CPU can say about a change whose benefit is GPU speed: decode steps and forward passes for the very
same tokens (outputs compared token for token), the guesses made and taken, the decode steps' time on the H200
modeled from each step's rows (H200_STEP_MS + H200_ROW_MS x its graph bucket, from measured H200 steps), and the
host CPU time (thread time: other jobs on a shared VM do not count) of the planning and of the constrained
step's other host parts. The model is the default model's shape (or --model) with random weights, like the H200 runs'
8B shape with random weights: the text inside the JSON is noise either way, what matters is the schema's
structure. The schema's state table is completed first (a server that has served it: the H200 runs'
--f-wait-tables); jump-forward is off (at 64+ rows on a GPU it never pays); overlap scheduling is on (the
GPU's schedule, where the forced rows apply). `--graph-buckets N`: the cost rule for guess rows prices
them as the H200's CUDA graph buckets up to N rows would (padding free, a bucket grown where it pays); without
it the CPU's rule applies (no graphs: every candidate row guesses).

    OMP_NUM_THREADS=1 python benchmarks/forced_rows.py --batch 64 --graph-buckets 512
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}
TIMED = (("radixlm.runtime.scheduler", "plan_rides"), ("radixlm.runtime.scheduler", "resolve_guesses"),
         ("radixlm.runtime.decode_schedule", "plan_guesses"), ("radixlm.runtime.schedule_batch", "decode_rows_forward_batch"))


# The H200's decode step (8B shape, item (f)'s JSON steps at the median: 5.56 ms at 64 rows, 9.51 ms at 256;
# benchmarks/RESULTS.md, gmask5): ms = fixed + per row x the CUDA graph bucket the step's rows replay.
H200_STEP_MS, H200_ROW_MS = 4.24, 0.0206


def timed(spent: dict[str, float], host: tuple[tuple[Any, str, str], ...] = ()) -> None:
    """Wrap the forced-row functions where the scheduler calls them (and `host`: (owner, method, part)
    triples): thread CPU seconds spent in each (wall time on this shared VM counts other jobs' turns), less
    the cyclic collector's pauses inside them, which go to part "gc" (a full collection over the scheduler's
    objects takes tens of ms and lands in whichever part allocates at the time)."""
    import gc
    import importlib

    started = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            started[0] = time.thread_time()
        else:
            spent["gc"] = spent.get("gc", 0.0) + time.thread_time() - started[0]

    gc.callbacks.append(on_gc)
    targets = [(importlib.import_module(module), name, name, None) for module, name in TIMED] + list(host)
    for owner, name, part, only in targets:
        inner = getattr(owner, name)

        def wrapper(*args, _inner=inner, _part=part, _only=only, **kwargs):
            if _only is not None and not _only(*args):
                return _inner(*args, **kwargs)
            t, paused = time.thread_time(), spent.get("gc", 0.0)
            try:
                return _inner(*args, **kwargs)
            finally:
                spent[_part] = spent.get(_part, 0.0) + time.thread_time() - t - (spent.get("gc", 0.0) - paused)

        setattr(owner, name, wrapper)


def host_parts() -> tuple[tuple[Any, str, str, Any], ...]:
    """The constrained step's other host parts, in both arms: the grammar commit (advance_many, overlapped
    before the launch), the masks taken, the commit's appends and finish checks, the decode schedule (with
    the guess planning), and a decode step's forward inputs (with extra rows or the plain builder). Each is
    (owner, method, part, None or a predicate of the call's arguments: time only those calls)."""
    from radixlm.runtime.forward_batch import ForwardMode
    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from radixlm.runtime.result_processor import ResultProcessor
    from radixlm.runtime.schedule_batch import ScheduledBatch
    from radixlm.runtime.scheduler import Scheduler

    return ((GrammarRuntime, "advance_many", "grammar commit", None), (GrammarRuntime, "bitmask", "masks taken", None),
            (ResultProcessor, "commit", "commit", None),
            (Scheduler, "_schedule_decode", "schedule decode", lambda sched, mixed=False: not mixed),
            (ScheduledBatch, "to_forward_batch", "forward inputs", lambda batch, *_: batch.mode is ForwardMode.DECODE))


# The host parts above that do not nest in one another: their sum is the constrained decode step's host time
# (the forward pass and the sampling's device work apart).
STEP_PARTS = ("schedule decode", "forward inputs", "grammar commit", "resolve_guesses", "plan_rides", "masks taken",
              "commit")


def modeled_h200_ms(rows: list[int], buckets: list[int]) -> float:
    """The decode steps' time on the H200 by H200_STEP_MS / H200_ROW_MS, each step at its rows' graph bucket."""
    import bisect

    return sum(H200_STEP_MS + H200_ROW_MS * buckets[min(bisect.bisect_left(buckets, n), len(buckets) - 1)]
               for n in rows)


def run(model_dir: Path, batch: int, forced: bool, spent: dict[str, float], prompt_len: int) -> dict:
    from radixlm.runtime.cuda_graph_runner import batch_size_buckets
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

    sched = make_scheduler(model_dir, max_total_tokens=batch * (prompt_len + 160) + 4096, load_format="dummy",
                           enable_overlap_schedule_on_cpu=True, disable_jump_forward=True, enable_forced_rows=forced,
                           grammar_state_table="complete")
    try:
        spec = json.dumps(SCHEMA)
        warm = TokenizedGenerateReq(rid="warm", input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3, json_schema=spec))
        run_to_completion(sched, [warm])
        t = time.perf_counter()
        while sched.grammars.info()["grammar_tables_completing"] and time.perf_counter() - t < 300:
            sched.grammars.file_completed_rows()
            time.sleep(0.05)
        waited = time.perf_counter() - t
        for key in sched.stats:
            if isinstance(sched.stats[key], int):
                sched.stats[key] = 0
        import gc

        gc.collect()  # (the arm before's scheduler and its cycles go now, not in a full pass inside this arm)
        spent.clear()
        rows: list[int] = []  # each decode step's rows (extra rows included)
        inner = sched._schedule_decode

        def schedule_decode(mixed: bool = False):
            batch = inner(mixed)
            if batch is not None and not mixed:
                rows.append(sum(batch.extend_lens))
            return batch

        sched._schedule_decode = schedule_decode
        reqs = [TokenizedGenerateReq(rid=f"r{i}", input_ids=[100 + (i * 7 + j) % 30000 for j in range(prompt_len)],
                                     params=SamplingParams(temperature=1.0, seed=i, max_new_tokens=128, json_schema=spec))
                for i in range(batch)]
        t = time.perf_counter()
        out = run_to_completion(sched, reqs, timeout_s=3600)
        wall = time.perf_counter() - t
        assert_pool_idle(sched)
        stats = dict(sched.stats)
        per_step = {k: 1e3 * v / max(stats["decode_steps"], 1) for k, v in spent.items()}
        per_step["step host total"] = sum(per_step.get(k, 0.0) for k in STEP_PARTS)
        return {"outputs": {k: v["output_ids"] for k, v in out.items()}, "wall_s": wall, "table_wait_s": waited,
                "decode_steps": stats["decode_steps"], "forward_steps": stats["forward_steps"],
                "tokens": sum(len(v["output_ids"]) for v in out.values()),
                "forced": {k: v for k, v in stats.items() if k.startswith("forced_")},
                "rows_per_step": rows, "modeled_h200_decode_ms": modeled_h200_ms(rows, BUCKETS or batch_size_buckets(512)),
                "host_cpu_ms_per_decode_step": per_step}
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


BUCKETS: list[int] = []


def _ms(res: dict) -> str:
    return json.dumps({k: round(v, 3) for k, v in res["host_cpu_ms_per_decode_step"].items()})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64", help="comma list of batch sizes")
    ap.add_argument("--graph-buckets", type=int, default=0, help="price guess rows as the H200's graphs up to N rows")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--model", default=None, help="model folder (default: the default model's shape)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from radixlm.runtime import forced_rows
    from radixlm.runtime.cuda_graph_runner import batch_size_buckets
    from radixlm.runtime.model_source import resolve_model_path

    global BUCKETS
    BUCKETS = batch_size_buckets(args.graph_buckets or 512)
    if args.graph_buckets:
        inner = forced_rows._worth
        buckets = BUCKETS
        forced_rows._worth = lambda gains, rows, batch, _, *widths: inner(gains, rows, batch, buckets, *widths)  # type: ignore[assignment]
    spent: dict[str, float] = {}
    timed(spent, host_parts())
    model_dir = Path(args.model) if args.model else resolve_model_path(None, progress=False)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "graph_buckets": args.graph_buckets, "batches": {}}
    for batch in [int(b) for b in args.batch.split(",")]:
        off = run(model_dir, batch, False, spent, args.prompt_len)
        on = run(model_dir, batch, True, spent, args.prompt_len)
        same = off.pop("outputs") == on.pop("outputs")
        report["batches"][batch] = {"off": off, "on": on, "identical_outputs": same}
        print(f"batch {batch}: decode steps {off['decode_steps']} -> {on['decode_steps']} "
              f"({on['decode_steps'] / off['decode_steps']:.3f}x), forward passes {off['forward_steps']} -> "
              f"{on['forward_steps']}, tokens {off['tokens']} / {on['tokens']}, identical outputs {same}; "
              f"{on['forced']}; modeled H200 decode ms {off['modeled_h200_decode_ms']:.1f} -> "
              f"{on['modeled_h200_decode_ms']:.1f} ({on['modeled_h200_decode_ms'] / off['modeled_h200_decode_ms']:.3f}x); "
              f"host CPU ms a decode step off {_ms(off)} on {_ms(on)}; wall {off['wall_s']:.1f} / {on['wall_s']:.1f} s",
              flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

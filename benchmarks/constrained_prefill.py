"""Item (f)'s JSON prefill step on the CPU, synchronous vs overlapped (--disable-overlap-constrained-prefill off / on).

Synchronously, a prefill step of constrained requests samples its first tokens under their masks, waits
for them, commits them to the grammars and checks each row's finish before the next step is scheduled:
on a GPU the device idles for all of it (item (f)'s JSON run: its first step 112 ms against 57 ms for the
same prompts unconstrained at 256 rows, H100 2026-12-05). Overlapped, the next decode step is launched
right after the first tokens' draw is, and their commit runs in that step's shadow, as a decode step's do.

What the CPU can say: outputs token for token, which steps were overlapped, and the host time from the
prefill step's draw (masks taken, kernels launched) to the next forward pass's launch (`gap`: synchronously
on a GPU the device has nothing queued after that draw while the host spends it; overlapped, only the next
step's schedule and inputs remain there), against the decode steps' median gap. Jump-forward is judged as
beside a GPU's decode graphs (no jump pays at 32+ running rows; on the CPU every jump would). The
workload is gpu_suite item (f)'s: its schema, 128-token prompts cached by an unconstrained run first,
seeded sampling at temperature 1, the schema's state table completed (--f-wait-tables); overlap on.

    OMP_NUM_THREADS=1 python benchmarks/constrained_prefill.py --batch 64,256 --tokens 12
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forced_rows import SCHEMA  # noqa: E402


def run(model_dir: Path, batch: int, overlap: bool, tokens: int, prompt_len: int = 128) -> dict:
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, run_to_completion

    sched = make_scheduler(model_dir, max_total_tokens=batch * (prompt_len + 160) + 4096, load_format="dummy",
                           enable_overlap_schedule_on_cpu=True, grammar_state_table="complete",
                           disable_overlap_constrained_prefill=not overlap)
    try:
        spec = json.dumps(SCHEMA)
        run_to_completion(sched, [TokenizedGenerateReq(rid="warm", input_ids=[5, 6, 7], params=SamplingParams(
            max_new_tokens=3, json_schema=spec))])
        t = time.perf_counter()
        while sched.grammars.info()["grammar_tables_completing"] and time.perf_counter() - t < 300:
            sched.grammars.file_completed_rows()
            time.sleep(0.05)
        prompts = [[100 + (i * 7 + j) % 30000 for j in range(prompt_len)] for i in range(batch)]
        run_to_completion(sched, [TokenizedGenerateReq(rid=f"u{i}", input_ids=p, params=SamplingParams(
            temperature=1.0, seed=i, max_new_tokens=2, ignore_eos=True)) for i, p in enumerate(prompts)])
        sched.stats.update({k: 0 for k in sched.stats if k.endswith("_steps")})
        sched.results.decode_graphs = True  # jump-forward judged as beside a GPU's decode graphs (none pays at 32+ rows)
        starts: list[float] = []  # each forward pass's call
        drawn: list[float] = []  # each draw's return (its masks taken, its kernels launched on a GPU)
        forward, sample = sched.runner.forward, sched.results.sample

        def timed_forward(fb):
            starts.append(time.perf_counter())
            return forward(fb)

        def timed_sample(*a, **k):
            try:
                return sample(*a, **k)
            finally:
                drawn.append(time.perf_counter())

        sched.runner.forward, sched.results.sample = timed_forward, timed_sample
        gc.collect()
        out = run_to_completion(sched, [TokenizedGenerateReq(rid=f"j{i}", input_ids=p, params=SamplingParams(
            temperature=1.0, seed=i, max_new_tokens=tokens, json_schema=spec)) for i, p in enumerate(prompts)])
        assert_pool_idle(sched)
        # host ms from each step's draw to the next forward's launch (each forward after the first)
        gaps = [1e3 * (start - max(t for t in drawn if t < start)) for start in starts[1:]]
        return {"outputs": {k: v["output_ids"] for k, v in out.items()},
                "steps": {k: v for k, v in sched.stats.items() if k.endswith("_steps") and v},
                "gap_after_prefill_ms": gaps[0], "decode_gap_median_ms": statistics.median(gaps[1:])}
    finally:
        if sched.grammars is not None:
            sched.grammars.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64", help="comma list of batch sizes")
    ap.add_argument("--tokens", type=int, default=12, help="max_new_tokens of the JSON requests (the first steps)")
    ap.add_argument("--rounds", type=int, default=2, help="off / on alternated this many times (medians reported)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from radixlm.runtime.model_source import resolve_model_path

    model_dir = resolve_model_path(None, progress=False)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "tokens": args.tokens, "batches": {}}
    for batch in [int(b) for b in args.batch.split(",")]:
        arms: dict[str, list[dict]] = {"off": [], "on": []}
        for _ in range(args.rounds):
            for arm in arms:
                arms[arm].append(run(model_dir, batch, arm == "on", args.tokens))
        outputs = [r.pop("outputs") for rs in arms.values() for r in rs]
        same = all(o == outputs[0] for o in outputs)
        row: dict = {"identical_outputs": same}
        for arm, rs in arms.items():
            row[arm] = {"steps": rs[0]["steps"], **{k: statistics.median(r[k] for r in rs) for k in
                                                    ("gap_after_prefill_ms", "decode_gap_median_ms")},
                        "gap_after_prefill_ms_each": [round(r["gap_after_prefill_ms"], 2) for r in rs]}
        report["batches"][batch] = row
        print(f"batch {batch}: identical outputs {same}; " + "; ".join(
            f"{arm}: {row[arm]['steps']}, host gap after the prefill's forward {row[arm]['gap_after_prefill_ms']:.1f} ms "
            f"(each {row[arm]['gap_after_prefill_ms_each']}), decode steps' median gap {row[arm]['decode_gap_median_ms']:.1f} ms"
            for arm in arms), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

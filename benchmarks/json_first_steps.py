"""Item (f)'s JSON run vs the same requests unconstrained on the CPU: the host work a batch of new requests
costs the scheduler before and in its first steps (issue 14 item 4).

On the H100 (2026-12-05, 256 rows) the JSON run lost ~55 ms in its first step and 7.4 ms in receiving its
requests against the same prompts unconstrained; its first step's grammar poll made 256 llguidance
matchers (4.7 ms) before the prefill launched. Per arm this measures, in thread CPU time (other jobs on a
shared VM do not count), less the cyclic collector's pauses: the receive (the front's list of messages
unpickled and handled), the first step and its host part (less the forward pass, the draw and the
masking, a GPU's work), its grammar poll, and the llguidance matchers made in the first step and over
the run. The workload is gpu_suite item (f)'s: its schema, 128-token prompts cached by an unconstrained
run first, seeded sampling at temperature 1, the schema's state table completed (--f-wait-tables),
overlap on; the JSON arm's outputs are compared across rounds (and across commits by their digest).

`--engine`: the same two runs through an Engine (the front, its IPC, the scheduler's process) with
RADIXLM_LOOP_STATS: the scheduler loop's receive, grammar poll and first step in wall time.
`--as-decode off,on`: each round with runtime/prefill_as_decode.py's constant off, then on (in-process: the
first step's forward passes, their mode, rows and tokens; through an Engine: the loop's count of
prefill steps run as decode steps, its longest forward launch).

    OMP_NUM_THREADS=1 python benchmarks/json_first_steps.py --batch 64,256 --tokens 8
    OMP_NUM_THREADS=1 python benchmarks/json_first_steps.py --batch 256 --tokens 4 --engine
    OMP_NUM_THREADS=1 python benchmarks/json_first_steps.py --batch 256 --tokens 4 --as-decode off,on
"""
from __future__ import annotations

import argparse
import gc
import json
import pickle
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from forced_rows import SCHEMA  # noqa: E402


class Clock:
    """Thread CPU seconds per part, less the collector's pauses inside them (counted apart as "gc")."""

    def __init__(self) -> None:
        self.spent: dict[str, float] = {}
        self._gc = 0.0
        self._started = 0.0
        gc.callbacks.append(self._on_gc)

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._started = time.thread_time()
        else:
            self._gc += time.thread_time() - self._started

    def part(self, name: str, fn: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            t, g = time.thread_time(), self._gc
            try:
                return fn(*args, **kwargs)
            finally:
                self.spent[name] = self.spent.get(name, 0.0) + time.thread_time() - t - (self._gc - g)
        return timed

    def close(self) -> None:
        gc.callbacks.remove(self._on_gc)


def run(model_dir: Path, batch: int, tokens: int, options: dict[str, Any], prompt_len: int = 128,
        as_decode: bool = False) -> dict:
    from radixlm import constrained
    from radixlm.constrained.backends.llguidance_backend import LLGuidanceGrammar
    from radixlm.runtime import prefill_as_decode, result_processor
    from radixlm.runtime.io_struct import TokenizedGenerateReq
    from radixlm.runtime.sampling_params import SamplingParams
    from tests.runtime.helpers import assert_pool_idle, make_scheduler, merge

    sched = make_scheduler(model_dir, max_total_tokens=batch * (prompt_len + 160) + 4096, load_format="dummy",
                           enable_overlap_schedule_on_cpu=True, grammar_state_table="complete", **options)
    made = [0]
    plain_matcher = LLGuidanceGrammar.matcher

    def counted(self: Any, family: int = 0) -> Any:
        made[0] += 1
        return plain_matcher(self, family)

    LLGuidanceGrammar.matcher = counted  # type: ignore[method-assign]
    clock = Clock()
    default, prefill_as_decode.ONE_TOKEN_PREFILL_AS_DECODE = prefill_as_decode.ONE_TOKEN_PREFILL_AS_DECODE, as_decode
    try:
        spec = json.dumps(SCHEMA)

        def finish(msgs: list) -> dict:
            for m in msgs:
                sched.handle(m)
            out: dict = {}
            while not sched.idle:
                if not sched.step():
                    time.sleep(0.002)
                for o in sched.pop_outputs():
                    merge(out, o)
            for o in sched.pop_outputs():
                merge(out, o)
            return out

        finish([TokenizedGenerateReq(rid="warm", input_ids=[5, 6, 7], params=SamplingParams(max_new_tokens=3,
                                                                                            json_schema=spec))])
        t = time.perf_counter()
        while sched.grammars.info()["grammar_tables_completing"] and time.perf_counter() - t < 300:
            sched.grammars.file_completed_rows()
            time.sleep(0.05)
        prompts = [[100 + (i * 7 + j) % 30000 for j in range(prompt_len)] for i in range(batch)]
        finish([TokenizedGenerateReq(rid=f"u{i}", input_ids=p, params=SamplingParams(
            temperature=1.0, seed=i, max_new_tokens=2, ignore_eos=True)) for i, p in enumerate(prompts)])
        sched.results.decode_graphs = True  # jump-forward judged as beside a GPU's decode graphs
        report: dict = {}
        for arm in ("plain", "json"):
            extra = {"json_schema": spec} if arm == "json" else {"ignore_eos": True}
            blob = pickle.dumps([TokenizedGenerateReq(rid=f"{arm}{i}", input_ids=p, params=SamplingParams(
                temperature=1.0, seed=i, max_new_tokens=tokens, **extra)) for i, p in enumerate(prompts)])
            gc.collect()
            clock.spent.clear()
            made[0] = 0
            poll, forward = sched.grammars.poll, sched.runner.forward
            draw, masked = result_processor.sample, constrained.apply_token_bitmask_
            sched.grammars.poll = clock.part("grammar poll", poll)
            # a GPU's work, the CPU's here: left out of the first step's host time
            passes: list[str] = []

            def traced(fb: Any, *a: Any, **k: Any) -> Any:
                passes.append(f"{fb.mode.value}: {fb.batch_size} rows, {fb.num_tokens} tokens")
                return forward(fb, *a, **k)

            sched.runner.forward = clock.part("forward (device)", traced)
            result_processor.sample = clock.part("draw (device)", draw)
            constrained.apply_token_bitmask_ = clock.part("mask applied (device)", masked)

            def receive() -> None:
                for m in pickle.loads(blob):
                    sched.handle(m)

            clock.part("receive", receive)()
            clock.part("first step", sched.step)()
            in_first = made[0]
            sched.grammars.poll, sched.runner.forward = poll, forward
            result_processor.sample, constrained.apply_token_bitmask_ = draw, masked
            spent = clock.spent
            spent["first step, host"] = spent["first step"] - sum(v for k, v in spent.items() if k.endswith("(device)"))
            out = finish([])
            report[arm] = {"ms": {k: 1e3 * v for k, v in clock.spent.items()}, "matchers_first_step": in_first,
                           "matchers_run": made[0], "first_step_forwards": passes,
                           "outputs": {k: v["output_ids"] for k, v in out.items()}}
        assert_pool_idle(sched)
        return report
    finally:
        LLGuidanceGrammar.matcher = plain_matcher  # type: ignore[method-assign]
        prefill_as_decode.ONE_TOKEN_PREFILL_AS_DECODE = default
        clock.close()
        if sched.grammars is not None:
            sched.grammars.close()


def engine_run(model_dir: Path, batch: int, tokens: int, options: dict[str, Any], prompt_len: int = 128,
               as_decode: bool = False) -> dict:
    """Both arms through an Engine on this CPU, the scheduler loop's own account (RADIXLM_LOOP_STATS)."""
    import os
    import tempfile

    from gpu_throughput import environ

    import radixlm
    from radixlm.runtime import prefill_as_decode
    from radixlm.runtime.loop_stats import ENV, read_last

    loop_file = os.environ.setdefault(ENV, tempfile.mktemp(prefix="radixlm-loop-", suffix=".jsonl"))
    spec = json.dumps(SCHEMA)
    prompts = [[100 + (i * 7 + j) % 30000 for j in range(prompt_len)] for i in range(batch)]
    report: dict = {}
    with environ({prefill_as_decode.ENV: "1" if as_decode else "0"}), radixlm.Engine(
            str(model_dir), load_format="dummy", max_total_tokens=batch * (prompt_len + 160) + 4096,
            enable_overlap_schedule_on_cpu=True, grammar_state_table="complete", **options) as eng:
        eng.generate(input_ids=[[5, 6, 7]] * 2, sampling_params={"max_new_tokens": 3, "json_schema": spec})
        t = time.perf_counter()
        while eng.get_server_info().get("grammar_tables_completing", 0) and time.perf_counter() - t < 300:
            time.sleep(0.05)
        eng.generate(input_ids=prompts, sampling_params={"max_new_tokens": 2, "ignore_eos": True})  # prompts cached
        for arm in ("plain", "json"):
            extra = {"json_schema": spec} if arm == "json" else {"ignore_eos": True}
            sp = [{"temperature": 1.0, "seed": i, "max_new_tokens": tokens, **extra} for i in range(batch)]
            res = eng.generate(input_ids=prompts, sampling_params=sp)
            time.sleep(0.1)  # the loop writes its busy period's line once idle
            loop = read_last(loop_file) or {}
            report[arm] = {"ms": {"receive": 1e3 * loop["seconds"]["receive"],
                                  "grammar poll": 1e3 * loop["parts"].get("grammar poll", 0.0),
                                  "first step (wall)": loop["step_ms"]["longest"][0],
                                  "longest forward launch": 1e3 * loop["parts_max"].get("forward launch", 0.0)},
                           "prefill_as_decode_steps": loop.get("prefill_as_decode_steps", 0),
                           "outputs": {i: r["output_ids"] for i, r in enumerate(res)}}
    return report


def digest(outputs: dict) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(sorted(outputs.items())).encode()).hexdigest()[:16]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64", help="comma list of batch sizes")
    ap.add_argument("--tokens", type=int, default=8, help="max_new_tokens of the requests")
    ap.add_argument("--rounds", type=int, default=2, help="a scheduler each; medians reported")
    ap.add_argument("--option", action="append", default=[], help="NAME=true|false server option (repeatable)")
    ap.add_argument("--engine", action="store_true", help="through an Engine: the scheduler loop's own account")
    ap.add_argument("--as-decode", default="off", help="off, on or off,on: runtime/prefill_as_decode.py's constant")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from radixlm.runtime.model_source import resolve_model_path

    options = {k: v == "true" for k, v in (o.split("=", 1) for o in args.option)}
    model_dir = resolve_model_path(None, progress=False)
    report: dict = {"date": time.strftime("%Y-%m-%d %H:%M"), "tokens": args.tokens, "options": options, "batches": {}}
    for batch, as_decode in [(int(b), a) for b in args.batch.split(",") for a in args.as_decode.split(",")]:
        one = engine_run if args.engine else run
        rounds = [one(model_dir, batch, args.tokens, options, as_decode=as_decode == "on") for _ in range(args.rounds)]
        outputs = [r["json"].pop("outputs") for r in rounds]
        for r in rounds:
            r["plain"].pop("outputs")
        row: dict = {"identical_json_outputs": all(o == outputs[0] for o in outputs), "json_digest": digest(outputs[0])}
        for arm in ("plain", "json"):
            parts = sorted({k for r in rounds for k in r[arm]["ms"]})
            row[arm] = {"ms": {k: round(statistics.median(r[arm]["ms"].get(k, 0.0) for r in rounds), 2) for k in parts},
                        "ms_each": [{k: round(v, 2) for k, v in r[arm]["ms"].items()} for r in rounds]}
            row[arm] |= {k: [r[arm][k] for r in rounds] for k in ("matchers_first_step", "matchers_run", "first_step_forwards",
                                                                  "prefill_as_decode_steps") if k in rounds[0][arm]}
        report["batches"][f"{batch}, as decode {as_decode}"] = row
        print(f"batch {batch}, as decode {as_decode}: identical JSON outputs {row['identical_json_outputs']} ({row['json_digest']}); " + "; ".join(
            f"{arm}: {row[arm]['ms']} ms (median of {args.rounds}), llguidance matchers made in the first step "
            f"{row[arm].get('matchers_first_step')}, in the run {row[arm].get('matchers_run')}; first step's forwards "
            f"{row[arm].get('first_step_forwards', ['n/a'])[0]}; prefill steps as decode {row[arm].get('prefill_as_decode_steps')}"
            for arm in ("plain", "json")),
            flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""Speculative decoding, spec off vs on side by side in one run (issue 18).

    python benchmarks/speculative.py --mode cpu --out benchmarks/results/speculative_cpu.json
    python benchmarks/speculative.py --mode gpu --out $OUT/speculative_gpu.json

cpu  the default model (real tokenizer and chat template), greedy, in-process scheduler, timed in
     process CPU time with one thread (see `run`): NGRAM on
     copy-heavy tasks (JSON extraction from a given text, editing a code snippet, summarising with
     quotes) and on free chat, at batch 1 (one request at a time) and batch 8; per cell: tokens/s off
     and on, speed-up, mean tokens per verify step, forward steps, outputs identical. Also the cost
     of a verify step (k drafts per row) against a decode step, which calibrates draft_budget.BETA.
gpu  Llama-3.1-8B shape, random bf16 weights: verify-step cost for k = 1..8 at batch 1/8/32/64
     against a decode step (CUDA graphs on: verify rows are decode rows), then end-to-end greedy
     generation off vs on at batch 1 and 64 (random weights fall into repeats, which NGRAM exploits:
     the acceptance reported is the workload's own), and the batch-1 projection at EAGLE-3's
     published acceptance (3.5-4 tokens per step) from the measured verify cost.
     `--algorithm EAGLE3`: the same with a random-weight EAGLE-3 head of the 8B shape (speculators'
     layout, draft vocabulary 32k, aux layers [2, 16, 29], 3 steps): also the drafting cost (the
     head's catch-up + k - 1 decode passes per step) and the target's cost of keeping the aux hidden
     states (decode steps with graphs captured with and without them). A random head is not accepted:
     the end-to-end cells show the turn-down (payoff) and the projection uses verify + drafting cost.
     Per end-to-end cell also: spec off's decode step time measured as the payoff measures its arms
     (its k0_step_ms must match it), and where outputs differ (bf16: verify steps round differently)
     each differing request's first differing position and spec off's top-2 logprob gap there.
Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from radixlm.benchmarks.spec_ceiling import ceiling, gpu_batch1_arms  # noqa: E402
from radixlm.benchmarks.spec_divergence import audit_lines, divergence_audit  # noqa: E402
from radixlm.benchmarks.spec_mechanism import (  # noqa: E402
    TREE_NODES,
    ReplayDrafter,
    fresh_spec,
    payoff_line,
    set_small_m,
    step_sections,
    sync,
    verify_kernel_split,
)
from radixlm.benchmarks.spec_step_trace import StepTrace, goal_terms  # noqa: E402
from radixlm.runtime.forward_batch import ForwardMode  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.schedule_batch import ScheduledBatch  # noqa: E402
from radixlm.runtime.scheduler import Scheduler  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402
from radixlm.runtime.speculative.ngram import NgramDrafter  # noqa: E402

PASSAGE = ("The committee met on Tuesday to review the bridge project. \"We are three weeks behind schedule,\" said the "
           "chief engineer, Dana Whitfield. \"The steel deliveries arrived late and the river was too high to pour the "
           "foundations.\" The mayor, Tom Alvarez, replied that \"the city cannot afford another delay\" and asked for a "
           "revised plan by Friday. The contractor promised to add a night shift.")
CODE = ("def total_price(items, tax_rate):\n    total = 0\n    for item in items:\n        total = total + item.price * "
        "item.quantity\n    total = total * (1 + tax_rate)\n    return round(total, 2)\n\n\ndef print_receipt(items, "
        "tax_rate):\n    for item in items:\n        print(item.name, item.quantity, item.price)\n    print('Total:', "
        "total_price(items, tax_rate))\n")
PEOPLE = ("Maria Lopez is 34 years old, lives in Madrid and works as an architect. John Smith, 51, is a teacher in "
          "Boston. Aiko Tanaka is a 28-year-old nurse from Osaka. Peter Novak, aged 45, drives a taxi in Prague.")
COPY_TASKS = [
    f"Extract every person in this text as a JSON list of objects with name, age, city and job.\n\n{PEOPLE}",
    f"Rename the variable `total` to `amount` in this code. Reply with the full code only.\n\n{CODE}",
    f"Summarise this report in two sentences, quoting the engineer and the mayor word for word.\n\n{PASSAGE}",
    f"Repeat this code exactly, adding a docstring to each function.\n\n{CODE}",
]
CHAT_TASKS = [
    "What is the capital of France, and what is it famous for?", "Write a short poem about the sea.",
    "Give me three tips for learning to play the guitar.", "Why do leaves change colour in autumn?",
]


# ------------------------------------------------------------------------------ shared
VARIANTS = {"noahead": "without verify steps launched ahead", "nodry": "dry requests synchronous (before dry_overlap)",
            "eager": "n-gram indexes warmed every step, drafting or not (before spec8)",
            "prefill": "prefill steps overlapped with NGRAM on (step_order.OVERLAP_PREFILL_WITH_NGRAM)",
            "deepfirst": "the payoff measuring the deepest arm first at batch 1 (draft_payoff.DEEP_FIRST_ROWS 1)",
            "fulldepth": "chains as deep as the step's k at batch 1 (spec_decoder.FULL_DEPTH_ROWS 1)",
            "short": "a single matching token drafts at batch 1 (spec_decoder.SHORT_MATCH_ROWS 1)",
            "source": "no match resumes the last chain's copy source at batch 1 (spec_decoder.COPY_SOURCE_ROWS 1)",
            "shortsrc": "both at batch 1 (SHORT_MATCH_ROWS 1, COPY_SOURCE_ROWS 1)",
            "shortsrcdeep": "both, and matches of 1-3 tokens drafting k deep at batch 1 (SHORT_DEPTH_ROWS 1 too)"}

SHORT_ARMS = ("short", "source", "shortsrc", "shortsrcdeep")  # --short-ab's


def make_scheduler(model_dir: Path, tokenizer: Any, spec: bool, **options: Any) -> Scheduler:
    if spec:
        options.setdefault("speculative_algorithm", "NGRAM")
    args = ServerArgs(model_path=str(model_dir), **options).resolve()
    return Scheduler(args, model_dir, tokenizer)


def run(sched: Scheduler, reqs: list[TokenizedGenerateReq], clock: Any = time.perf_counter,
        marks: dict | None = None) -> tuple[float, dict[str, list[int]]]:
    """Time to finish every request (wall clock, or this process's CPU time: on a shared, loaded
    CPU machine wall time swings 10x with the neighbours' load, CPU time of one thread far less),
    and their outputs. `marks`: filled with "start", "end" and "first_decode" (the clock once the step
    that launched the first decode step returned: the prompts' prefill and admission before it)."""
    outs: dict[str, list[int]] = {r.rid: [] for r in reqs}
    start = clock()
    decode_steps, first = sched.stats["decode_steps"], None
    for r in reqs:
        sched.handle(r)
    while not sched.idle:
        sched.step()
        if first is None and sched.stats["decode_steps"] > decode_steps:
            first = clock()
        for o in sched.pop_outputs():
            outs[o.rid] += o.output_ids
    sync(sched.device)
    end = clock()
    if marks is not None:
        marks.update(start=start, end=end, first_decode=first if first is not None else end)
    return end - start, outs


def verify_costs(sched: Scheduler, batch_sizes: list[int], ks: list[int], prompt_len: int, repeats: int,
                 vocab: int, clock: Any = time.perf_counter) -> list[dict]:
    """Median forward time of a decode step whose rows each carry k random drafts, through the
    scheduler's own batch building (ScheduledBatch.set_decode_rows -> to_forward_batch -> forward)."""
    rng = random.Random(0)
    rows = []
    for bs in batch_sizes:
        reqs = [TokenizedGenerateReq(rid=f"v{bs}-{i}", input_ids=[rng.randrange(100, vocab - 100) for _ in range(prompt_len)],
                                     params=SamplingParams(temperature=0.0, max_new_tokens=1 << 14, ignore_eos=True))
                for i in range(bs)]
        for r in reqs:
            sched.handle(r)
        while len(sched.running) < bs:  # prefill them all
            sched.step()
        sched._commit_step()
        live = list(sched.running)
        base = None
        for k in [0, *ks]:
            times = []
            for rep in range(repeats + 2):
                slots = sched.kv_pool.alloc(bs * (k + 1))
                assert slots is not None, "KV pool too small for the verify-cost batch"
                batch = ScheduledBatch(ForwardMode.DECODE, [], [], [])
                drafts = [[rng.randrange(100, vocab - 100) for _ in range(k)] for _ in live]
                batch.set_decode_rows(live, slots, drafts, [None] * bs)
                fb, writes = batch.to_forward_batch(sched.device)
                sched.req_to_token_pool.commit(writes)
                sync(sched.device)
                t = clock()
                sched.runner.forward(fb)
                sync(sched.device)
                if rep >= 2:  # warm-up (graph capture of a new bucket, allocator)
                    times.append(clock() - t)
                sched.kv_pool.free(slots)
            ms = statistics.median(times) * 1e3
            base = ms if k == 0 else base
            rows.append({"batch": bs, "k": k, "ms": round(ms, 3), "vs_decode": round(ms / base, 3)})
            print(f"  verify cost  batch {bs:3d}  k {k}: {ms:8.2f} ms  ({ms / base:.2f}x decode)", flush=True)
        for r in live:
            sched.abort(r.rid, "benchmark done")
        sched.pop_outputs()
    return rows


def prefill_random(sched: Scheduler, bs: int, prompt_len: int, vocab: int, tag: str) -> list:
    rng = random.Random(bs)
    for i in range(bs):
        sched.handle(TokenizedGenerateReq(rid=f"{tag}{bs}-{i}", input_ids=[rng.randrange(100, vocab - 100)
                                                                           for _ in range(prompt_len)],
                                          params=SamplingParams(temperature=0.0, max_new_tokens=1 << 14, ignore_eos=True)))
    while len(sched.running) < bs:
        sched.step()
    sched._commit_step()
    return list(sched.running)


def draft_costs(sched: Scheduler, batch_sizes: list[int], ks: list[int], prompt_len: int, repeats: int,
                vocab: int) -> list[dict]:
    """EAGLE3: median time of the head's drafting for k tokens per row (steady state: a one-entry
    catch-up, then k - 1 decode passes, one device sync), after a first call caught the prompts up."""
    drafter = sched.spec.eagle
    rows = []
    for bs in batch_sizes:
        live = prefill_random(sched, bs, prompt_len, vocab, "d")
        drafter.propose(live, [1] * bs)  # catch-up over the prompts
        for k in ks:
            times = []
            for rep in range(repeats + 2):
                sync(sched.device)
                t = time.perf_counter()
                drafts = drafter.propose(live, [k] * bs)
                sync(sched.device)
                if rep >= 2:
                    times.append(time.perf_counter() - t)
            assert all(len(d) == k for d in drafts)
            ms = statistics.median(times) * 1e3
            rows.append({"batch": bs, "k": k, "ms": round(ms, 3)})
            print(f"  draft cost   batch {bs:3d}  k {k}: {ms:8.2f} ms", flush=True)
        for r in live:
            sched.abort(r.rid, "benchmark done")
        sched.pop_outputs()
    return rows


def aux_cost(sched: Scheduler, batch_sizes: list[int], repeats: int, vocab: int) -> list[dict]:
    """EAGLE3: a decode step (graphs) with the aux hidden states kept vs graphs captured without them."""
    from radixlm.runtime.cuda_graph_runner import CudaGraphRunner

    runner = sched.runner
    out = []
    for keep in (True, False):  # last: the scheduler is left without aux states (drafting would stall)
        if not keep:
            runner.model.aux_layers, runner.model.aux_hidden, sched.spec = (), None, None
            max_bs = runner.graph_runner.max_bs
            runner.graph_runner = None
            torch.cuda.empty_cache()
            runner.graph_runner = CudaGraphRunner(runner, max_bs, runner.req_to_token_pool.pad_row)
        for row in verify_costs(sched, batch_sizes, [], 512, repeats, vocab):
            out.append({**row, "aux": keep})
    for bs in batch_sizes:
        on, off = (next(r["ms"] for r in out if r["batch"] == bs and r["aux"] is a) for a in (True, False))
        print(f"  aux states   batch {bs:3d}: decode {on:.3f} ms with, {off:.3f} ms without ({on / off:.3f}x)")
    return out


def compare(sched: Scheduler, prompts: list[list[int]], batch: int, new_tokens: int, ignore_eos: bool,
            repeats: int, clock: Any = time.perf_counter, outputs: dict | None = None, topk: int | None = None,
            replay: bool = False, variants: tuple[str, ...] = (), trace: bool | None = None) -> dict:
    """Spec off vs on over the same prompts (batch 1: one request at a time), best of `repeats`,
    alternating. One scheduler (one model, KV pool and set of CUDA graphs) runs both: speculation
    is switched per run by giving it a fresh SpecDecoder or none (and spec off overlaps prefill steps as a
    spec-off server does). `outputs`: filled with the last
    runs' tokens per request, {False: off, True: on}. `variants`: more spec-on arms, each with its own
    SpecDecoder, reported as `*_<name>`: "noahead" (verify steps launched only after the previous one's
    results: --disable-speculative-ahead), "nodry" (dry requests' steps synchronous and measured, as
    before SpecDecoder.dry_overlap), "eager" (the n-gram indexes warmed every step, drafting or not: as before
    spec8), and the settings spec8 left off until measured: "prefill" (prefill steps overlapped with NGRAM on),
    "deepfirst" (the payoff's first drafting arm the deepest at batch 1: DraftPayoff.deep_first_rows 1),
    "fulldepth" (chains as deep as the step's k at batch 1: SpecDecoder.full_depth_rows 1), and spec9's "short" (a
    single matching token drafts at batch 1: short_match_rows 1), "source" (a request with no match resumes its last
    chain's copy source: copy_source_rows 1), "shortsrc" (both), "shortsrcdeep" (both, and matches of 1-3 tokens
    drafting the step's k: short_depth_rows 1). Per arm the prompts'
    share of each run (to the first decode step); per spec-on run its own tokens per verify step and x/accept;
    `trace` (default: batch 1 on a GPU) every run's step trace (spec_step_trace.py: where its time goes, by step
    kind; spec-on runs' against the best spec-off run's)."""
    trace = batch == 1 and sched.device.type == "cuda" if trace is None else trace
    kept_ahead, kept_prefill = sched.spec_ahead, sched.overlap_prefill
    can_prefill = sched.overlap and not sched.args.disable_overlap_prefill and sched.runner.lora is None
    best: dict = {False: float("inf"), True: float("inf")}
    runs: dict = {False: [], True: []}  # every run's time: the first spec-on run explores
    outs: dict = {}
    others = {name: fresh_spec(sched, topk) for name in variants}
    for name, other in others.items():
        best[name], runs[name] = float("inf"), []
        other.dry_overlap = name != "nodry"
        other.lazy_warm = name != "eager"
        if name == "deepfirst" and other.payoff is not None:
            other.payoff.deep_first_rows = 1
        if name == "fulldepth" and other.topk == 1:
            other.full_depth_rows = 1
        if name in SHORT_ARMS and other.full_depth_rows:  # (chains with the overlap schedule)
            other.short_match_rows, other.copy_source_rows = int(name != "source"), int(name != "short")
            other.short_depth_rows = int(name == "shortsrcdeep")
            other.drafter = NgramDrafter(short=other.short_match_rows > 0)
    prefill_s: dict = {on: [] for on in best}  # per arm and run: seconds to the first decode step
    # per spec-on arm (True: the main one, else the variant's name), each run's verify steps, tokens per verify step,
    # x/accept and (batch 1) step trace
    per_run: dict = {on: [] for on in best if on is not False}
    off_traces: list[dict] = []  # the best spec-off run's step traces, per group
    ahead_before, rebuilt_before = sched.stats["ahead_steps"], sched.stats["ahead_rebuilt_steps"]
    spec = fresh_spec(sched, topk)
    reference: dict[tuple[int, ...], list[int]] = {}
    if replay:  # chains of spec off's own tokens (filled by the first off run, before any on run)
        spec.drafter = ReplayDrafter(reference)
        for other in others.values():
            other.drafter = ReplayDrafter(reference)
    host: dict[str, float] = {}  # the spec-on runs' host seconds in the SpecDecoder's per-step calls

    def timed(name: str) -> None:
        f = getattr(spec, name)

        def call(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            r = f(*a, **k)
            host[name] = host.get(name, 0.0) + time.perf_counter() - t
            return r
        setattr(spec, name, call)
    spec_calls = ("begin_step", "warm", "propose", "may_draft")
    for name in spec_calls:
        timed(name)
    on_steps = 0
    # the cyclic collector's pauses in each arm's runs (spec on allocates n-gram keys: more collections?)
    collected: dict = {on: [0, 0, 0, 0.0] for on in (False, True, *others)}  # per arm: gen 0 / 1 / 2 counts, seconds
    arm: list = [False]
    gc_start = [0.0]

    def on_gc(phase: str, info: dict) -> None:
        if phase == "start":
            gc_start[0] = time.perf_counter()
        else:
            collected[arm[0]][info["generation"]] += 1
            collected[arm[0]][3] += time.perf_counter() - gc_start[0]
    gc.callbacks.append(on_gc)
    for _ in range(repeats):
        for on in (False, True, *others):
            sched.spec = spec if on is True else others.get(on) if on else None  # type: ignore[call-overload]
            sched.spec_ahead = kept_ahead and on != "noahead"
            # spec off overlaps prefill steps as a spec-off server does (this scheduler, built with NGRAM, would not:
            # before spec8 both arms ran them synchronously); spec on as the scheduler's rule for NGRAM says
            sched.overlap_prefill = can_prefill if on is False or on == "prefill" else kept_prefill
            arm[0] = on
            sched.cache.flush()
            groups = [prompts[i : i + batch] for i in range(0, len(prompts), batch)]
            total, merged, to_decode = 0.0, {}, 0.0
            steps_before = sched.stats["decode_steps"]
            arm_spec = sched.spec
            verify_before = (arm_spec.verify_steps, arm_spec.verify_tokens) if arm_spec is not None else (0, 0)
            traces = []  # (batch 1: a group is one request)
            for g, group in enumerate(groups):
                reqs = [TokenizedGenerateReq(rid=f"{g}-{i}", input_ids=p, params=SamplingParams(
                    temperature=0.0, max_new_tokens=new_tokens, ignore_eos=ignore_eos)) for i, p in enumerate(group)]
                marks: dict = {}
                if trace:
                    with StepTrace(sched) as tracer:
                        dt, o = run(sched, reqs, clock, marks)
                    traces.append(tracer.split(marks["start"], marks["end"]))
                else:
                    dt, o = run(sched, reqs, clock, marks)
                total += dt
                to_decode += marks["first_decode"] - marks["start"]
                merged.update(o)
            on_steps += (sched.stats["decode_steps"] - steps_before) if on is True else 0
            prefill_s[on].append(round(to_decode, 4))
            if arm_spec is not None:
                steps, emitted = arm_spec.verify_steps - verify_before[0], arm_spec.verify_tokens - verify_before[1]
                per_run[on].append({"s": total, "verify_steps": steps, "accept": emitted / steps if steps else 1.0,
                                    "traces": traces})
            if on is False and total < best[False]:
                off_traces = traces
            best[on] = min(best[on], total)
            runs[on].append(total)
            outs[on] = merged
            if replay and not on and not reference:
                reference.update({tuple(prompts[int(g) * batch + int(i)]): merged[f"{g}-{i}"]
                                  for g, i in (rid.split("-") for rid in merged)})
    for name in spec_calls:
        delattr(spec, name)
    gc.callbacks.remove(on_gc)  # the instance attribute goes, the method shows again
    sched.spec, sched.spec_ahead, sched.overlap_prefill = spec, kept_ahead, kept_prefill
    # each spec-on run against the best spec-off run, with its own tokens per verify step (the figure of the
    # cell pairs the best run's speed-up with the mean over all runs: the runs' acceptance differs, the first
    # run's payoff exploring)
    for r in (r for arm_runs in per_run.values() for r in arm_runs):
        x = best[False] / r["s"]
        r.update(speedup=round(x, 3), accept=round(r["accept"], 3), x_per_accept=round(x / r["accept"], 3),
                 goal_terms=[goal_terms(t, off) for t, off in zip(r["traces"], off_traces)] or None)
        del r["s"]
    if outputs is not None:
        outputs.update(outs)
    info = spec.info()
    tokens = sum(len(v) for v in outs[False].values())
    accept = info["avg_spec_accept_length"] or 1.0
    extra = {}
    for name, other in others.items():
        accept_b = other.info()["avg_spec_accept_length"] or 1.0
        extra.update({f"tok_s_on_{name}": round(tokens / best[name], 2),
                      f"speedup_{name}": round(best[False] / best[name], 3),
                      f"speedup_runs_{name}": [round(best[False] / t, 3) for t in runs[name]],
                      f"avg_accept_length_{name}": round(accept_b, 3),
                      f"speedup_per_accept_{name}": round(best[False] / best[name] / accept_b, 3),
                      f"identical_{name}": outs[False] == outs[name],
                      f"payoff_{name}": other.payoff.info() if other.payoff is not None else None})
    return {
        **extra,
        # verify steps launched ahead (all spec-on runs), against all verify steps of those runs
        "ahead_steps": sched.stats["ahead_steps"] - ahead_before,
        "ahead_rebuilt_steps": sched.stats["ahead_rebuilt_steps"] - rebuilt_before,  # (of them: after a wrong guess)
        "batch": batch, "requests": len(prompts), "tokens": tokens, "topk": spec.topk, "tree_nodes": spec.tree_nodes,
        "tok_s_off": round(tokens / best[False], 2), "tok_s_on": round(tokens / best[True], 2),
        "speedup": round(best[False] / best[True], 3),
        "speedup_runs": [round(best[False] / t, 3) for t in runs[True]],  # each spec-on run vs the best off
        "avg_accept_length": round(accept, 3),
        # the mechanism's share kept: speed-up per token a verify step emits (issue 18's batch-1 goal >= 0.8)
        "speedup_per_accept": round(best[False] / best[True] / accept, 3),
        "draft_tokens": info["spec_draft_tokens"], "accepted_tokens": info["spec_accepted_tokens"],
        "identical": outs[False] == outs[True],
        "payoff": spec.payoff.info() if spec.payoff is not None else None,  # per bucket: chosen k, tok/s + step ms per k
        "exploring": spec.payoff.exploring() if spec.payoff is not None else None,
        # CPU (no overlap): a draft row's measured cost at batch 1 (share of a one-row step) and the budget's beta
        "row_cost": ({"rho": rho if (rho := spec.row_cost.relative_row_cost()) is None else round(rho, 4),
                      "beta": round(spec.row_cost.beta(spec.beta), 4)} if spec.row_cost is not None else None),
        "verify_steps": info["spec_verify_steps"],
        # host ms per decode step (spec-on runs) in SpecDecoder.begin_step / warm / propose / may_draft
        "spec_host_ms_per_step": {name: round(v / max(on_steps, 1) * 1e3, 4) for name, v in host.items()},
        # every run of each arm: collections of generation 0 / 1 / 2 and their pauses (ms)
        "gc": {("on" if on is True else on or "off"): {"gen0": c[0], "gen1": c[1], "gen2": c[2],
                                                        "pause_ms": round(c[3] * 1e3, 2)} for on, c in collected.items()},
        # per arm, every run's seconds to its first decode step (prompts admitted and prefilled)
        "to_first_decode_s": {("on" if on is True else on or "off"): v for on, v in prefill_s.items()},
        "spec_runs": per_run[True],
        **{f"spec_runs_{name}": per_run[name] for name in others},
    }


def step_times(sched: Scheduler, prompts: list[list[int]], batch: int, new_tokens: int) -> dict:
    """Mean scheduler step time (start to next start) of plain decode steps, measured as DraftPayoff
    measures its arms (intervals whose step ran a decode batch, with overlap on): with speculation
    on, the payoff's k0_step_ms must match spec off's figure here."""
    modes: list[ForwardMode] = []
    on_step = sched.decode_log.on_step
    sched.decode_log.on_step = lambda mode, info: (modes.append(mode), on_step(mode, info))  # type: ignore[method-assign]
    sched.cache.flush()
    intervals: list[float] = []
    for g in range(0, len(prompts), batch):
        for i, p in enumerate(prompts[g : g + batch]):
            sched.handle(TokenizedGenerateReq(rid=f"t{g}-{i}", input_ids=p, params=SamplingParams(
                temperature=0.0, max_new_tokens=new_tokens, ignore_eos=True)))
        last = None
        while not sched.idle:
            now = time.perf_counter()
            if last is not None and len(modes) >= 2 and modes[-1] == modes[-2] == ForwardMode.DECODE:
                intervals.append(now - last)
            last, seen = now, len(modes)
            sched.step()
            if len(modes) == seen:  # a step that ran no batch (a commit only)
                modes.append(ForwardMode.EXTEND)
            sched.pop_outputs()
    sched.decode_log.on_step = on_step  # type: ignore[method-assign]
    sync(sched.device)
    return {"decode_steps": len(intervals), "step_ms": round(statistics.mean(intervals) * 1e3, 3) if intervals else None}


def print_cell_parts(cell: dict, variants: tuple[str, ...]) -> None:
    """An e2e cell's lines after its headline: the payoff, host and collector figures, each arm's time to the first
    decode step, each spec-on run with its own x/accept (and at batch 1 its step trace's terms), the variants."""
    print(f"    payoff {payoff_line(cell['payoff'], cell['exploring'])}; spec host ms/step "
          f"{cell['spec_host_ms_per_step']}; gc {cell['gc']}; verify steps launched ahead {cell['ahead_steps']} "
          f"({cell['ahead_rebuilt_steps']} after a wrong guess)",
          flush=True)
    print(f"    to the first decode step, s per run: {cell['to_first_decode_s']}", flush=True)
    for r in cell["spec_runs"]:
        print(run_line(r), flush=True)
    for name in variants:
        what = VARIANTS[name]
        print(f"    {what}: on {cell[f'tok_s_on_{name}']:8.1f} tok/s  x{cell[f'speedup_{name}']:.3f} (runs "
              f"{cell[f'speedup_runs_{name}']})  accept {cell[f'avg_accept_length_{name}']:.2f}  x/accept "
              f"{cell[f'speedup_per_accept_{name}']:.2f}  identical {cell[f'identical_{name}']}; payoff "
              f"{payoff_line(cell[f'payoff_{name}'], None)}", flush=True)
        for r in cell[f"spec_runs_{name}"]:
            print("  " + run_line(r), flush=True)


def run_line(r: dict) -> str:
    """One spec-on run: its speed-up, tokens per verify step and x/accept; with a step trace, the verify steps' own
    x/accept, spec off's plain step, both prefills, the plain steps' counts and each step kind's term."""
    terms = (r["goal_terms"] or [{}])[0]
    trace = (r["traces"] or [{}])[0]
    plain = {k: v["n"] for k, v in trace.items() if k.startswith("plain")}
    return (f"    spec-on run: x{r['speedup']:.3f} at {r['accept']:.2f} tok/verify step ({r['verify_steps']} steps): "
            f"x/accept {r['x_per_accept']:.3f}" + (f"; verify steps alone {terms.get('verify_x_per_accept')} (T0 "
            f"{terms.get('t0_ms')} ms, prefill {terms.get('prefill_ms')}, plain steps {plain}); a x T_on over T_off by "
            f"step kind (x/accept = 1 / (1 + their sum)): {terms.get('loss_share')}" if terms else ""))


# ------------------------------------------------------------------------------ modes
def cpu_mode(args: argparse.Namespace) -> dict:
    from transformers import AutoTokenizer

    from radixlm.runtime.model_source import resolve_model_path

    torch.set_num_threads(args.threads)
    model_dir = resolve_model_path(None, progress=False)
    tok = AutoTokenizer.from_pretrained(str(model_dir))

    def chat(text: str) -> list[int]:
        return tok.encode(tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                                  tokenize=False))

    options = dict(device="cpu", cpu_threads=args.threads, max_total_tokens=16384)
    if args.num_steps:
        options["speculative_num_steps"] = args.num_steps
    # Timed in process CPU time (one thread): the machine these run on is shared and loaded.
    report: dict = {"mode": "cpu", "threads": args.threads, "model": str(model_dir), "clock": "process_time",
                    "cells": []}
    sched = make_scheduler(model_dir, tok, True, **options)
    if "cost" in args.sets:
        report["verify_cost"] = verify_costs(sched, [1, 8], [1, 2, 4, 8], 200, args.repeats + 1, sched.runner.vocab_size,
                                             time.process_time)
    kmax = sched.args.speculative_max_drafts
    if "ceiling" in args.sets:  # a batch-1 verify step's cost for 0..kmax drafts, to price the replays
        report["ceiling_cost"] = [row["vs_decode"] for row in verify_costs(
            sched, [1], list(range(1, max(kmax, 8) + 1)), 200, args.repeats + 1, sched.runner.vocab_size, time.process_time)]
    for name, tasks in (("copy", COPY_TASKS), ("chat", CHAT_TASKS)):
        for batch in args.batches:
            if name not in args.sets:
                continue
            prompts = [chat(t) for t in tasks] * (2 if batch == 8 else 1)
            for topk in args.topk:
                outs: dict = {}
                cell = {"set": name, **compare(sched, prompts, batch, args.new_tokens, False, args.repeats,
                                               clock=time.process_time, topk=topk, outputs=outs)}
                if "ceiling" in args.sets and batch == 1 and topk == args.topk[0]:  # spec off's outputs, replayed
                    pairs = [(p, outs[False][f"{g}-0"]) for g, p in enumerate(prompts)]
                    cell["ceiling"] = ceiling(pairs, report["ceiling_cost"], kmax)
                    # the same outputs replayed as batch 1 on a GPU runs them (spec9's drafter arms, H200 step costs)
                    cell["gpu_batch1_arms"] = {name: arm["mean"] for name, arm in gpu_batch1_arms(pairs).items()}
                    print(f"{name:5s} replayed at batch 1 on the H200's step costs (k 4, full depth): " + "  ".join(
                        f"{arm}: plain {m['plain_steps']} verify {m['verify_steps']} a {m['accept']} x{m['speedup']} "
                        f"x/a {m['x_per_accept']}" for arm, m in cell["gpu_batch1_arms"].items()), flush=True)
                    print(f"{name:5s} ceiling (decode steps, measured verify cost; ngram k <= {kmax}, oracles k <= "
                        f"{len(report['ceiling_cost']) - 1}): " + "  ".join(
                        f"{d} {c['tokens_per_step']:.2f} tok/step x{c['speedup']:.2f}" for d, c in cell["ceiling"].items()),
                        flush=True)
                report["cells"].append(cell)
                if args.out:  # partial results survive an interrupted run
                    Path(args.out).write_text(json.dumps(report, indent=2))
                print(f"{name:5s} batch {batch} topk {topk}: off {cell['tok_s_off']:7.2f} tok/s  on "
                      f"{cell['tok_s_on']:7.2f} tok/s  x{cell['speedup']:.2f}  accept {cell['avg_accept_length']:.2f} "
                      f"tok/step  identical {cell['identical']}  row cost {cell['row_cost']}", flush=True)
    return report


def gpu_mode(args: argparse.Namespace) -> dict:
    from gpu_suite import LLAMA_8B, model_dir_for

    started = time.perf_counter()

    root = Path(tempfile.mkdtemp(prefix="radixlm-spec-"))
    # --layers / --dtype: the 8B layer shape cut to fewer layers, or in float32 (the exactness check of
    # the GPU path: verify rows, lanes, graphs — drift there is the kernels' float32 rounding only)
    model_dir = model_dir_for({**LLAMA_8B, "num_hidden_layers": args.layers or LLAMA_8B["num_hidden_layers"]}, root,
                              "llama8b")
    vocab = LLAMA_8B["vocab_size"]
    # CUDA graphs cover every verify shape run: the cost table's 64 rows x 9 tokens (640), else the largest
    # batch's trees (batch x (TREE_NODES + 1) rows): fewer buckets to capture where the batches are small
    rows = 640 if "cost" in args.sets else max(16, max(args.batches) * (TREE_NODES + 2))  # (+ 1: lanes need spare rows)
    options = dict(load_format="dummy", dtype=args.dtype, context_length=4096, mem_fraction_static=0.85,
                   skip_tokenizer_init=True, max_running_requests=rows)
    report: dict = {"mode": "gpu", "device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d"),
                    "algorithm": args.algorithm, "dtype": args.dtype, "layers": args.layers or LLAMA_8B["num_hidden_layers"]}
    ks = list(range(1, 9))
    if args.algorithm == "EAGLE3":
        from radixlm.tests.fixtures.eagle3_heads import build_eagle3_head

        head = build_eagle3_head(model_dir, root / "eagle3-head", draft_vocab_size=32000, scale=0.02,
                                 dtype=torch.bfloat16)
        # 320 rows: graphs cover 64 rows x (3 drafts + 1)
        options.update(speculative_algorithm="EAGLE3", speculative_draft_model_path=str(head), speculative_num_steps=3,
                       max_running_requests=320)
        ks = [1, 2, 3]
    print(f"[{time.perf_counter() - started:5.0f} s] building the model ({args.dtype}, {report['layers']} layers, graphs "
          f"up to {options['max_running_requests']} rows)", flush=True)
    sched = make_scheduler(model_dir, None, True, **options)
    graphs = getattr(sched.runner, "graph_runner", None)
    print(f"[{time.perf_counter() - started:5.0f} s] model and CUDA graphs ready ({report['dtype']}, "
          f"{report['layers']} layers; capture {getattr(graphs, 'capture_s', None)})", flush=True)
    costs = verify_costs(sched, [1, 8, 32, 64], ks, 512, args.repeats + 3, vocab) if "cost" in args.sets else []
    report["verify_cost"] = costs
    if "kernels" in args.sets:  # batch 1: where a verify forward's extra device time goes, by kernel
        live = prefill_random(sched, 1, 512, vocab, "kern")
        try:
            report["verify_kernels_b1"] = verify_kernel_split(sched, live, [1, 4], vocab)
        except Exception as exc:  # noqa: BLE001 - a diagnostic (the profiler may not run here): the rest goes on
            report["verify_kernels_b1"] = []
            print(f"  kernel split failed: {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        for r in live:
            sched.abort(r.rid, "benchmark done")
        sched.pop_outputs()
        for row in report["verify_kernels_b1"]:
            print(f"  batch 1 k {row['k']}: kernels {row['device_us']} us a forward (eager); top {row['top'][:6]}"
                  + (f"; grew most over k 0: {row['grew'][:6]}" if "grew" in row else ""), flush=True)
    if "smallm" in args.sets:  # batch 1 only: the verify rows' linears on the small-M kernel (as loaded), then cuBLAS
        report["verify_cost_b1"] = {"small_m": verify_costs(sched, [1], ks, 512, args.repeats + 3, vocab)}
        kernels = set_small_m(sched, None)
        report["small_m_layers"] = len(kernels)
        report["verify_cost_b1"]["cublas"] = verify_costs(sched, [1], ks, 512, args.repeats + 3, vocab)
        set_small_m(sched, kernels)
        for a, b in zip(*report["verify_cost_b1"].values()):
            print(f"  batch 1 k {a['k']}: small-M {a['ms']:.3f} ms vs cuBLAS {b['ms']:.3f} ms ({len(kernels)} layers "
                  f"with a small-M kernel)", flush=True)
    if args.algorithm == "EAGLE3":
        report["draft_cost"] = draft_costs(sched, [1, 8, 32, 64], ks, 512, args.repeats + 3, vocab)
    rng = random.Random(1)
    report["cells"] = []
    cells = [(batch, kind, topk) for kind in args.prompt_sets for batch in args.batches for topk in args.topk]
    # (--dry-ab at the smallest batch only: where the drafter runs dry before the text repeats)
    variants_of = {b: tuple(name for name, on in (("noahead", args.ahead_ab), ("nodry", args.dry_ab and b == min(args.batches)),
                                                  ("eager", args.eager_ab and b == max(args.batches)),
                                                  ("prefill", args.prefill_ab and b == max(args.batches)),
                                                  ("deepfirst", args.deep_ab and b == 1),
                                                  ("fulldepth", args.deep_ab and b == 1),
                                                  *((name, args.short_ab and b == 1) for name in SHORT_ARMS))
                            if on) for b in args.batches}
    prompt_sets: dict[tuple[int, str], list[list[int]]] = {}  # the same prompts for every topk (chain vs tree)
    for batch, kind, topk in cells:
        if kind == "replay" and topk > 1:
            continue  # replayed drafts are chains
        if (batch, kind) not in prompt_sets and kind in ("random", "replay"):
            prompt_sets[batch, kind] = [[rng.randrange(1000, vocab - 1000) for _ in range(512)] for _ in range(batch)]
        elif (batch, kind) not in prompt_sets:  # copy-heavy: a 64-token block repeated 8 times (what the prompt offers to copy)
            blocks = [[rng.randrange(1000, vocab - 1000) for _ in range(64)] for _ in range(batch)]
            prompt_sets[batch, kind] = [b * 8 for b in blocks]
        prompts = prompt_sets[batch, kind]
        outs: dict = {}
        cell = {"prompts": kind, **compare(sched, prompts, batch, args.new_tokens, True, args.repeats, outputs=outs,
                                           topk=topk, replay=kind == "replay", variants=variants_of[batch])}
        # the divergence audit: every cell ("all"), or batch 1 (cheap: lanes' drift next to lane 0's) and
        # cells whose outputs differ ("divergence")
        if args.audit == "all" or (args.audit == "divergence" and (batch == 1 or not cell["identical"])):
            cell["divergence"] = divergence_audit(sched, prompts, batch, args.new_tokens, outs, fresh_spec(sched, topk))
        if args.audit == "all":
            spec, sched.spec = sched.spec, None
            cell["plain_decode_step"] = step_times(sched, prompts, batch, args.new_tokens)  # spec off, as the payoff times
            sched.spec = spec
        report["cells"].append(cell)
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=2))
        print(f"[{time.perf_counter() - started:5.0f} s] e2e {kind} batch {batch} topk {cell['topk']}: off "
              f"{cell['tok_s_off']:8.1f} tok/s  on {cell['tok_s_on']:8.1f} tok/s  x{cell['speedup']:.3f} (runs "
              f"{cell['speedup_runs']})  accept {cell['avg_accept_length']:.2f} tok/verify step ({cell['verify_steps']} "
              f"steps)  x/accept {cell['speedup_per_accept']:.2f} (batch-1 goal >= 0.8)  identical {cell['identical']}",
              flush=True)
        print_cell_parts(cell, variants_of[batch])
        if "plain_decode_step" in cell:
            k0 = [c["k0_step_ms"] for c in (cell["payoff"] or {}).values() if "k0_step_ms" in c][-1:]
            print(f"  decode step (start to start): spec off {cell['plain_decode_step']['step_ms']} ms, spec on at k = 0 "
                  f"{k0} ms (payoff's largest bucket)", flush=True)
        if "divergence" in cell:
            print("\n".join(audit_lines(cell["divergence"])), flush=True)
    if "profile" in args.sets:  # where a drafting step's time goes, at the smallest and largest batch
        # the mechanism (replayed drafts, every step k deep) at the smallest batch for k = 1, 2, 4 and at
        # the largest for k = 4, then NGRAM on the repeat set at the largest
        kind = "repeat" if "repeat" in args.prompt_sets else args.prompt_sets[-1]
        small, large = min(args.batches), max(args.batches)
        runs = [(small, 1, "replay", k) for k in (1, 2, 4)] + [(large, 1, "replay", 4)] * (large > small)
        runs += [(large, k, kind, None) for k in args.topk]
        if args.profile_small_only:
            runs = [r for r in runs if r[0] == small]
        report["step_sections"] = []
        for batch, topk, which, depth in runs:
            prompts = prompt_sets.get((batch, which)) or prompt_sets[batch, kind]
            prof = {"prompts": which, "batch": batch, "topk": topk, "depth": depth,
                    **step_sections(sched, prompts, args.new_tokens, topk, replay=which == "replay", depth=depth,
                                    ahead_ab=args.ahead_ab)}
            report["step_sections"].append(prof)
            if args.out:
                Path(args.out).write_text(json.dumps(report, indent=2))
            on = prof["on"]
            print(f"[{time.perf_counter() - started:5.0f} s] step {which} batch {batch} topk {topk} k {depth or 'max'}: "
                  f"plain/drafting step {prof['plain_over_drafting']:.3f} (off {prof['off']['step_ms']} ms, on "
                  f"{on['step_ms']} ms: draft {on.get('draft_ms')}, schedule {on.get('schedule_ms')}, build "
                  f"{on.get('build_ms')}, forward+sync {on.get('forward_ms')}, results {on.get('results_ms')}, apply "
                  f"{on.get('apply_ms')}, commit {on.get('commit_ms')}, cascade plan {on.get('cascade_plan_ms')}, slot "
                  f"writes {on.get('slot_writes_ms')}, ahead build {on.get('ahead_build_ms')}, ahead wait "
                  f"{on.get('ahead_wait_ms')}; {on['tokens_per_verify']} tok/verify; {on['ahead_steps']} of "
                  f"{on['verify_steps']} verify steps launched ahead, {on['ahead_rebuilt_steps']} after a wrong guess)",
                  flush=True)
            if "on_noahead" in prof:
                b = prof["on_noahead"]
                print(f"    without verify steps launched ahead: plain/drafting step {prof['plain_over_drafting_noahead']:.3f} "
                      f"(on {b['step_ms']} ms: build {b.get('build_ms')}, forward+sync {b.get('forward_ms')}, results "
                      f"{b.get('results_ms')}; {b['tokens_per_verify']} tok/verify)", flush=True)
    b1 = {c["k"]: c["vs_decode"] for c in costs if c["batch"] == 1}
    if args.algorithm == "EAGLE3":  # a step costs the verify forward plus the head's passes
        decode_ms = next(c["ms"] for c in costs if c["batch"] == 1 and c["k"] == 0)
        b1 = {k: b1[k] + next(d["ms"] for d in report["draft_cost"] if d["batch"] == 1 and d["k"] == k) / decode_ms
              for k in ks}
        if "aux" in args.sets:
            report["aux_cost"] = aux_cost(sched, [1, 8, 32, 64], args.repeats + 3, vocab)
    report["projection_batch1"] = [
        {"accept_length": a, "k": k, "speedup": round(a / b1[k], 2)} for a in (3.5, 4.0) for k in (3, 4, 6)
        if k in b1 and a <= k + 1]
    for p in report["projection_batch1"]:
        print(f"projection (not measured): batch 1, {p['accept_length']} tok/step at k {p['k']}: x{p['speedup']}")
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--mode", choices=("cpu", "gpu"), required=True)
    ap.add_argument("--out", default=None)
    ap.add_argument("--threads", type=int, default=1, help="cpu mode: torch threads")
    ap.add_argument("--new-tokens", type=int, default=None, help="default: 128 (cpu), 256 (gpu)")
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--num-steps", type=int, default=None, help="cpu mode: --speculative-num-steps (default: the "
                    "server's, 4)")
    ap.add_argument("--sets", default="cost,copy,chat,aux", help="which parts to run (cpu: cost,copy,chat, ceiling = "
                    "the batch-1 cells' spec-off outputs replayed through the drafter and two oracles, spec_ceiling.py; gpu: cost "
                    "= the verify-cost table, smallm = its batch-1 rows with the bf16 small-M kernels, then on cuBLAS, kernels = a batch-1 "
                    "verify forward's device time by kernel (torch.profiler, eager), aux = "
                    "EAGLE3's aux hidden-state cost, profile = a decode step's parts "
                    "spec off vs every step drafting at the smallest and largest batch, the end-to-end cells always)")
    ap.add_argument("--algorithm", choices=("NGRAM", "EAGLE3"), default="NGRAM", help="gpu mode: the drafter")
    ap.add_argument("--topk", default="1", help="NGRAM branching per cell, comma-separated (1: chains; above 1: "
                    "trees of up to depth x topk nodes), each side by side with spec off")
    ap.add_argument("--prompt-sets", default="random", help="gpu mode: random (512 random tokens), repeat (a "
                    "64-token block repeated 8 times) and/or replay (random prompts, drafts = spec off's own output: "
                    "the mechanism's cost at full acceptance; chains only), comma-separated")
    ap.add_argument("--audit", choices=("all", "divergence", "none"), default="all", help="gpu mode: all = the "
                    "divergence audit (spec_divergence.py) and the plain decode-step timing of every cell; divergence = "
                    "the audit only, of batch-1 cells and cells whose outputs differ; none = neither")
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"), help="gpu mode: weights "
                    "and activations")
    ap.add_argument("--batches", default=None, help="end-to-end batch sizes, comma-separated (default: 1,8 on the "
                    "cpu, 1,64 on the gpu)")
    ap.add_argument("--layers", type=int, default=None, help="gpu mode: decoder layers of the 8B shape (default 32)")
    ap.add_argument("--no-audit", dest="audit", action="store_const", const="none", help="gpu mode: --audit none")
    switches = {  # gpu mode, on/off
        "--profile-small-only": "the profile's runs at the smallest batch only (replayed drafts, k = 1, 2, 4)",
        "--dry-ab": "e2e cells of the smallest batch also run spec on with dry requests' steps synchronous and measured "
                    "for the payoff's arm (as before SpecDecoder.dry_overlap), in the same process",
        "--ahead-ab": "e2e cells and profile runs also run spec on with verify steps launched only after the previous "
                      "one's results (--disable-speculative-ahead), in the same process",
        "--deep-ab": "e2e cells of batch 1 also run spec on with the payoff measuring the deepest arm first, and spec on "
                     "with chains as deep as the step's k (spec8's, off by default), in the same process",
        "--short-ab": "e2e cells of batch 1 also run spec on with single-token matches drafting, with copy sources "
                      "resumed, with both, and with both and short matches drafting k deep (spec9's, off by default), "
                      "in the same process",
        "--eager-ab": "e2e cells of the largest batch also run spec on with the n-gram indexes warmed every step whether "
                      "a step may draft or not (as before spec8), in the same process",
        "--prefill-ab": "e2e cells of the largest batch also run spec on with prefill steps overlapped (spec8's, off by "
                        "default), in the same process",
    }
    for flag, text in switches.items():
        ap.add_argument(flag, action="store_true", help=f"gpu mode: {text}")
    args = ap.parse_args()
    args.topk = [int(k) for k in args.topk.split(",")]
    args.prompt_sets = args.prompt_sets.split(",")
    args.batches = [int(b) for b in (args.batches or ("1,8" if args.mode == "cpu" else "1,64")).split(",")]
    args.new_tokens = args.new_tokens or (128 if args.mode == "cpu" else 256)
    report = cpu_mode(args) if args.mode == "cpu" else gpu_mode(args)
    out = Path(args.out or f"benchmarks/results/speculative_{args.mode}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

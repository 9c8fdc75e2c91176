"""Where a GPU workload's time goes, step by step: the scheduler runs in-process and every forward
pass is timed with CUDA events (no syncs added, so overlap scheduling behaves as in production).

    python benchmarks/profile_steps.py --items b,f,kernels --out $OUT/profile_steps.json

  b        workload (b) of the throughput suite (offline, random ids): per step mode, batch size, tokens,
           device time of the forward and wall time of the whole step, summed by kind of step
  e        workload (e) (shared prefixes) with cascade attention auto vs off: the same per kind of step
           (cascade steps apart), plus host time in the planner, the graph replay and the previous step's commit
  f        JSON-schema decode at --f-batch (real tokenizer): the same, plus host time in the batched
           grammar commit, taking the masks, and jump-forward
  kernels  torch.profiler over decode steps at a few batch sizes: the top kernels by device time
Llama-3.1-8B shape, random bf16 weights. Prints tables and writes JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import SCHEMA, e_prompts, warmup_b, workload_b  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.scheduler import Scheduler  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402


def make_scheduler(model_dir: Path, tokenizer: Any = None, **options: Any) -> Scheduler:
    opts = dict(load_format="dummy", dtype="bfloat16", context_length=4096, mem_fraction_static=0.85,
                skip_tokenizer_init=tokenizer is None)
    opts.update(options)
    return Scheduler(ServerArgs(model_path=str(model_dir), **opts).resolve(), model_dir, tokenizer)


_UNSET = object()


def time_calls(owner: Any, name: str, add: Callable[[float], None]) -> None:
    """Replace `owner.name` (a method of an object, or of a class) by a wrapper that gives each call's seconds to `add`."""
    fn: Callable = getattr(owner, name)

    def timed(*a: Any, **k: Any) -> Any:
        t = time.perf_counter()
        result = fn(*a, **k)
        add(time.perf_counter() - t)
        return result
    setattr(owner, name, timed)


class StepRecorder:
    """Wraps the runner's forward (CUDA events) and any host methods (perf_counter totals)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.steps: list[dict] = []
        self.host: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self._patched: list[tuple[Any, str, Any]] = []  # (object, name, its own attribute or _UNSET)
        runner = sched.runner
        self._patch(runner, "forward")
        inner = runner.forward

        def forward(fb: Any) -> torch.Tensor:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            graph = runner.graph_runner is not None and runner.graph_runner.can_run(fb)
            start.record()
            out = inner(fb)
            end.record()
            self.steps.append({"mode": fb.mode.value, "bs": fb.batch_size, "tokens": len(fb.extend_seq_lens_cpu) and sum(fb.extend_seq_lens_cpu),
                               "graph": graph, "cascade": fb.cascade is not None, "events": (start, end)})
            return out

        runner.forward = forward

    def _patch(self, obj: Any, name: str) -> None:
        self._patched.append((obj, name, obj.__dict__.get(name, _UNSET)))

    def close(self) -> None:
        """Undo every wrapper, so the next recorder times the scheduler as it is."""
        for obj, name, own in reversed(self._patched):
            if own is _UNSET:
                delattr(obj, name)
            else:
                setattr(obj, name, own)
        self._patched.clear()

    def mark_sampled(self) -> None:
        """After `_launch` / `process_results`: a device event once this step's sampling ran, so the
        step splits into forward, sampling (+ masks, copies) and the device's idle wait for the host."""
        self.overlapped = 0
        self.synchronous = 0
        for name in ("_launch", "process_results"):
            self._patch(self.sched, name)
            fn = getattr(self.sched, name)

            def marked(*a: Any, _fn: Callable = fn, _name: str = name, **k: Any) -> Any:
                out = _fn(*a, **k)
                if self.steps:
                    ev = torch.cuda.Event(enable_timing=True)
                    ev.record()
                    self.steps[-1]["sampled"] = ev
                    if self.steps[-1]["mode"] != "extend":
                        if _name == "_launch":
                            self.overlapped += 1
                        else:
                            self.synchronous += 1
                return out

            setattr(self.sched, name, marked)

    def device_split(self) -> dict[str, float]:
        """Per decode step, from device events: forward, sampling (fwd end -> sampled) and idle (the
        device waiting for the host between a step's sampling and the next forward)."""
        fwd = samp = idle = 0.0
        n = 0
        for s, nxt in zip(self.steps, self.steps[1:] + [None]):
            if s["mode"] == "extend" or "sampled" not in s:
                continue
            start, end = s["events"]
            n += 1
            fwd += start.elapsed_time(end)
            samp += end.elapsed_time(s["sampled"])
            if nxt is not None:
                idle += max(0.0, s["sampled"].elapsed_time(nxt["events"][0]))
        return {"decode_steps_timed": n, "forward_ms_per_step": fwd / max(1, n), "sampling_ms_per_step": samp / max(1, n),
                "device_idle_ms_per_step": idle / max(1, n),
                "overlapped_steps": getattr(self, "overlapped", 0), "synchronous_steps": getattr(self, "synchronous", 0)}

    def wrap(self, obj: Any, name: str, label: str) -> None:
        self._patch(obj, name)
        fn: Callable = getattr(obj, name)

        def timed(*a: Any, **k: Any) -> Any:
            t = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                self.host[label] += time.perf_counter() - t
                self.calls[label] += 1

        setattr(obj, name, timed)

    def run(self, reqs: list[TokenizedGenerateReq], outputs: dict[str, list[int]] | None = None) -> float:
        """Until idle; `outputs` (if given) collects each rid's output ids."""
        for r in reqs:
            self.sched.handle(r)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        while not self.sched.idle:
            t = time.perf_counter()
            n = len(self.steps)
            if not self.sched.step():
                time.sleep(0.0005)
            if len(self.steps) > n:
                self.steps[-1]["wall"] = time.perf_counter() - t
            for out in self.sched.pop_outputs():
                if outputs is not None:
                    outputs.setdefault(out.rid, []).extend(out.output_ids)
        torch.cuda.synchronize()
        return time.perf_counter() - t0

    def summary(self) -> dict:
        groups: dict[str, dict] = defaultdict(lambda: defaultdict(float))
        for s in self.steps:
            if s["mode"] == "extend":
                key = "extend"
            else:
                lo = 1 << (s["bs"].bit_length() - 1)
                key = f"decode bs {lo}-{2 * lo - 1} {'graph' if s['graph'] else 'eager'}{' cascade' if s.get('cascade') else ''}"
            g = groups[key]
            g["steps"] += 1
            g["tokens"] += s["tokens"]
            g["device_ms"] += s["events"][0].elapsed_time(s["events"][1])
            g["wall_ms"] += s.get("wall", 0.0) * 1e3
        out = {k: dict(v) for k, v in sorted(groups.items())}
        for v in out.values():
            v["device_ms_per_step"] = v["device_ms"] / v["steps"]
            v["wall_ms_per_step"] = v["wall_ms"] / v["steps"]
        return {"groups": out, "host_s": dict(self.host), "host_calls": dict(self.calls)}


def print_groups(title: str, summ: dict) -> None:
    print(f"\n{title}\n{'kind of step':<32}{'steps':>7}{'tokens':>10}{'device s':>10}{'wall s':>9}{'dev ms/st':>11}{'wall ms/st':>11}")
    for k, v in summ["groups"].items():
        print(f"{k:<32}{v['steps']:>7.0f}{v['tokens']:>10.0f}{v['device_ms'] / 1e3:>10.2f}{v['wall_ms'] / 1e3:>9.2f}"
              f"{v['device_ms_per_step']:>11.2f}{v['wall_ms_per_step']:>11.2f}")
    for k, v in summ["host_s"].items():
        print(f"  host {k}: {v:.3f} s over {summ['host_calls'][k]} calls")


def item_b(d: Path, vocab: int, n: int, max_bs: int | None, mixed: bool, commit_first: bool = False) -> dict:
    t = time.perf_counter()
    sched = make_scheduler(d, cuda_graph_max_bs=max_bs, enable_mixed_chunk=mixed)
    startup = time.perf_counter() - t
    if commit_first:  # the earlier policy: no overlap while any request waits
        sched._can_schedule_before_commit = lambda: (  # type: ignore[method-assign]
            not sched.waiting and not sched.partial and sched.kv_pool.available() >= len(sched.running))
    rec = StepRecorder(sched)
    prompts, outs = workload_b(n, vocab)
    warm = [TokenizedGenerateReq(rid=f"w{i}", input_ids=p, params=SamplingParams(temperature=0, max_new_tokens=4, ignore_eos=True))
            for i, p in enumerate(warmup_b(vocab))]
    rec.run(warm)
    sched.cache.flush()
    rec.steps.clear()
    reqs = [TokenizedGenerateReq(rid=str(i), input_ids=p, params=SamplingParams(temperature=0, max_new_tokens=o, ignore_eos=True))
            for i, (p, o) in enumerate(zip(prompts, outs))]
    wall = rec.run(reqs)
    total = sum(map(len, prompts)) + sum(outs)
    res = {"requests": n, "cuda_graph_max_bs": sched.runner.graph_runner and sched.runner.graph_runner.max_bs,
           "enable_mixed_chunk": mixed, "commit_first": commit_first, "startup_s": startup, "seconds": wall, "total_tok_s": total / wall,
           "retractions": sched.stats["retractions"], **rec.summary()}
    print_groups(f"(b) {n} requests, graphs up to bs {res['cuda_graph_max_bs']}, mixed chunks {mixed}, commit first {commit_first}: {wall:.1f} s, "
                 f"{total / wall:.0f} total tok/s", res)
    return res


def item_e(d: Path, vocab: int) -> dict:
    """Workload (e) of the suite (16 groups x 32 requests, 1,024-token prefix, 64-token question, 64 out)
    with cascade attention auto vs off: device vs wall time per kind of step, and the host's time in
    the planner, the graph replay (copies + launch) and the commit of the previous step (its wait)."""
    prompts = e_prompts(vocab)
    res: dict = {}
    for mode in ("auto", "off"):
        sched = make_scheduler(d, cascade_attention=mode, mem_fraction_static=0.8)
        rec = StepRecorder(sched)
        mk = lambda i, p, n: TokenizedGenerateReq(rid=f"{mode}{i}", input_ids=p, params=SamplingParams(  # noqa: E731
            temperature=0, max_new_tokens=n, ignore_eos=True))
        first = rec.run([mk(f"w{i}", p, 64) for i, p in enumerate(prompts)])  # JIT of new specializations
        sched.cache.flush()
        rec.steps.clear()
        if sched.runner.cascade is not None:
            rec.wrap(sched.runner.cascade, "plan", "cascade plan")
        if sched.runner.graph_runner is not None:
            rec.wrap(sched.runner.graph_runner, "replay", "graph replay (copies + launch)")
        rec.wrap(sched, "_commit_step", "commit previous step (waits for its tokens)")
        wall = rec.run([mk(i, p, 64) for i, p in enumerate(prompts)])
        res[mode] = {"seconds": wall, "first_pass_seconds": first, "steps": len(rec.steps),
                     "cascade_decode_steps": sum(st["cascade"] for st in rec.steps), **rec.summary()}
        print_groups(f"(e) cascade {mode}: {wall:.2f} s (first pass {first:.2f} s), {res[mode]['cascade_decode_steps']} "
                     f"cascade steps of {res[mode]['steps']}", res[mode])
        del sched, rec
        gc.collect()
        torch.cuda.empty_cache()
    res["auto_over_off_seconds"] = res["auto"]["seconds"] / res["off"]["seconds"]
    return res


def item_f(d: Path, tokenizer_dir: Path, batch: int, mask_threads: list[int] | None = None) -> dict:
    """JSON-schema vs unconstrained at `batch`, in-process: per decode step the wall time of the
    scheduler's step, the device's forward, its sampling (+ masks and copies) and its idle wait for
    the host (events on the stream), and the host's time inside the grammar runtime. JSON runs:
    masks inline on the scheduler's thread (--grammar-mask-threads 0, the default), on one
    background thread beside the scheduler's bookkeeping (1), and split over cores - 1 threads;
    last, unconstrained decoding to exactly the JSON outputs' lengths (same steps, same occupancy).
    `mask_threads` replaces those thread counts (the first run is labelled "json_schema")."""
    from transformers import AutoTokenizer

    from radixlm.constrained.mask_workers import MaskWorkers, default_mask_threads

    tok = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    sched = make_scheduler(d, tokenizer=tok, tokenizer_path=str(tokenizer_dir), mem_fraction_static=0.5)
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(batch)]
    res: dict = {"batch": batch}
    schema = {"json_schema": json.dumps(SCHEMA)}
    lengths: list[int] = []
    counts = mask_threads if mask_threads else [0, 1, max(2, default_mask_threads())]
    runs = [("unconstrained", {}, None),
            *((f"json_schema_threads{n}" if j else "json_schema", schema, n) for j, n in enumerate(counts)),
            ("unconstrained_same_lengths", {}, None)]
    for label, extra, threads in runs:
        rec = StepRecorder(sched)
        new_tokens = lambda i: lengths[i] if label.endswith("same_lengths") else 128  # noqa: E731
        mk = lambda i, pre: TokenizedGenerateReq(rid=f"{pre}{label}{i}", input_ids=prompts[i], params=SamplingParams(  # noqa: E731
            temperature=1.0, seed=i, max_new_tokens=new_tokens(i), ignore_eos=not extra, **extra))
        def use_threads() -> None:
            if extra and sched.grammars is not None and sched.grammars.workers.threads != threads:
                sched.grammars.workers.close()
                sched.grammars.workers = MaskWorkers(threads)

        use_threads()  # before the warm-up: it builds the grammar's matcher families, untimed
        rec.run([mk(i, "w") for i in range(2)])
        use_threads()
        gr = sched.grammars
        if extra:
            rec.wrap(gr, "bitmask", "masks taken (wait + missing rows + copy)")
            rec.wrap(gr, "advance_many", "grammar commit (batched) + mask start")
            rec.wrap(gr, "jump_forward", "jump_forward")
        rec.wrap(sched.results, "sample", "sample (incl. masks)")
        rec.wrap(sched.results, "_append", "commit (all rows)")
        rec.mark_sampled()
        rec.steps.clear()
        generated = sched.stats["generated_tokens"]
        outs: dict[str, list[int]] = {}
        wall = rec.run([mk(i, "") for i in range(batch)], outs)
        summ = rec.summary()
        decode = [s for s in rec.steps if s["mode"] != "extend"]
        dev = sum(s["events"][0].elapsed_time(s["events"][1]) for s in decode)
        host = sum(s.get("wall", 0.0) for s in decode) * 1e3
        counts = [len(outs.get(f"{label}{i}", [])) for i in range(batch)]
        if label == "json_schema":
            lengths = counts
        res[label] = {"seconds": wall, "tokens": sum(counts), "sampled_tokens": sched.stats["generated_tokens"] - generated,
                      "decode_steps": len(decode),
                      "max_tokens": max(counts), "mean_tokens": sum(counts) / batch,
                      "decode_device_ms_per_step": dev / max(1, len(decode)), "decode_wall_ms_per_step": host / max(1, len(decode)),
                      "mask_threads": threads, **rec.device_split(), **summ}
        r = res[label]
        rec.close()
        print_groups(f"(f) batch {batch} {label}: {wall:.2f} s, {r['tokens']} tokens, {len(decode)} decode steps "
                     f"({r['overlapped_steps']} overlapped, {r['synchronous_steps']} synchronous), per decode step "
                     f"{r['decode_wall_ms_per_step']:.2f} ms wall; device: forward {r['forward_ms_per_step']:.2f} + sampling "
                     f"{r['sampling_ms_per_step']:.2f} + idle (waiting for the host) {r['device_idle_ms_per_step']:.2f} ms", summ)
    res["wall_ratio_unconstrained_over_constrained"] = res["unconstrained"]["seconds"] / res["json_schema"]["seconds"]
    res["wall_ratio_same_lengths_over_constrained"] = res["unconstrained_same_lengths"]["seconds"] / res["json_schema"]["seconds"]
    if sched.grammars is not None:
        sched.grammars.close()
    return res


def item_kernels(d: Path, vocab: int, sizes: list[int]) -> dict:
    from torch.profiler import ProfilerActivity, profile

    sched = make_scheduler(d, cuda_graph_max_bs=1, disable_overlap_schedule=True)  # eager: kernels visible
    rng = random.Random(1)
    out: dict = {}
    for bs in sizes:
        reqs = [TokenizedGenerateReq(rid=f"k{bs}-{i}", input_ids=[rng.randrange(1000, vocab - 1000) for _ in range(800)],
                                     params=SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)) for i in range(bs)]
        for r in reqs:
            sched.handle(r)
        while sched.waiting or sched.partial:
            sched.step()
        sched.step()
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(4):
                sched.step()
            torch.cuda.synchronize()
        while not sched.idle:
            sched.step()
        rows = []
        for e in sorted(prof.key_averages(), key=lambda e: -e.device_time_total)[:18]:
            rows.append({"name": e.key[:70], "calls": e.count, "device_ms": e.device_time_total / 1e3 / 4})
        out[str(bs)] = rows
        print(f"\nkernels, eager decode bs {bs}, ctx ~800 (per step):")
        for r in rows:
            print(f"  {r['device_ms']:8.3f} ms  {r['calls'] // 4:5d}x  {r['name']}")
    return out


def item_extend(d: Path, vocab: int) -> dict:
    """torch.profiler over prefill steps of one 8,192-token chunk: host vs device time per op."""
    from torch.profiler import ProfilerActivity, profile

    sched = make_scheduler(d, disable_overlap_schedule=True)
    rng = random.Random(2)
    mk = lambda i: TokenizedGenerateReq(rid=f"x{i}", input_ids=[rng.randrange(1000, vocab - 1000) for _ in range(1024)],  # noqa: E731
                                        params=SamplingParams(temperature=0, max_new_tokens=1, ignore_eos=True))
    for i in range(8):
        sched.handle(mk(i))
    sched.step()  # warm-up chunk
    while not sched.idle:
        sched.step()
    for i in range(24):
        sched.handle(mk(100 + i))
    torch.cuda.synchronize()
    t = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            sched.step()
        torch.cuda.synchronize()
    wall = (time.perf_counter() - t) / 3
    while not sched.idle:
        sched.step()
    ev = prof.key_averages()
    rows = [{"name": e.key[:70], "calls": e.count // 3, "device_ms": e.device_time_total / 3e3, "cpu_self_ms": e.self_cpu_time_total / 3e3}
            for e in sorted(ev, key=lambda e: -(e.device_time_total + e.self_cpu_time_total))[:24]]
    print(f"\nprefill step of 8 x 1,024 tokens: {wall * 1e3:.1f} ms wall (profiled)")
    for r in rows:
        print(f"  dev {r['device_ms']:8.3f} ms  cpu {r['cpu_self_ms']:8.3f} ms  {r['calls']:5d}x  {r['name']}")
    return {"wall_ms": wall * 1e3, "ops": rows}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--items", default="b,f,kernels")
    ap.add_argument("--out", default="benchmarks/results/profile_steps.json")
    ap.add_argument("--num-requests", type=int, default=1000)
    ap.add_argument("--graph-max-bs", default="auto", help="comma list; auto = the engine's default")
    ap.add_argument("--mixed-chunk", default="off", help="comma list of off/on (--enable-mixed-chunk)")
    ap.add_argument("--kernel-sizes", default="64,256,512")
    ap.add_argument("--tokenizer-dir", default=".gpu_assets/smollm_tok")
    ap.add_argument("--f-batch", default="64", help="comma list of batch sizes for item f")
    ap.add_argument("--commit-first", action="store_true", help="(b) with the old overlap policy, for comparison")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="radixlm-prof-"))
    d = model_dir_for(LLAMA_8B, root, "llama8b")
    items = args.items.split(",")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d")}
    for item in items:
        t = time.perf_counter()
        try:
            if item == "b":
                report["b"] = []
                for m in args.graph_max_bs.split(","):
                    for x in args.mixed_chunk.split(","):
                        report["b"].append(item_b(d, LLAMA_8B["vocab_size"], args.num_requests, None if m == "auto" else int(m),
                                                  x == "on", args.commit_first))
                        gc.collect()  # free this scheduler's KV pool before the next one sizes its own
                        torch.cuda.empty_cache()
            elif item == "e":
                report["e"] = item_e(d, LLAMA_8B["vocab_size"])
            elif item == "f":
                report["f"] = [item_f(model_dir_for({**LLAMA_8B, "vocab_size": 49152}, root, "smolvocab"), Path(args.tokenizer_dir), int(b))
                               for b in args.f_batch.split(",")]
            elif item == "extend":
                report["extend"] = item_extend(d, LLAMA_8B["vocab_size"])
            elif item == "kernels":
                report["kernels"] = item_kernels(d, LLAMA_8B["vocab_size"], [int(s) for s in args.kernel_sizes.split(",")])
        except Exception as exc:  # noqa: BLE001 - keep the other items
            import traceback

            traceback.print_exc()
            report[item] = {"error": repr(exc)}
        print(f"[{item} took {time.perf_counter() - t:.0f} s]", flush=True)
        gc.collect()  # the scheduler and its runner reference each other
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2, default=str))


if __name__ == "__main__":
    main()

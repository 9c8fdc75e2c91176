"""Item (f) on the scheduler's step timeline: where a constrained run's time goes, phase by phase,
next to unconstrained decoding to exactly the same lengths (issue 14.4).

The scheduler runs in-process (no front, no IPC), requests handed to it as the scheduler process
would; every phase of its loop is timed on the host (perf_counter around the methods, nested
phases inside their parents) and, on a GPU, every forward pass and sampling launch gets a CUDA
event, so a run's wall splits into: decode steps (device forward + sampling + the device's idle
wait for the host), extend steps (prefill, jump-forward extensions), and host time outside
steps (grammar polls while requests wait, outputs). Per batch it runs,
after an untimed pass of the whole batch (grammar compiled, state table filled, prompts cached, as
on a server that has served the schema), JSON (item (f)'s schema; per --lazy variant) and
unconstrained decoding to the JSON outputs' lengths; then the phases side by side (ms in the
whole run, and per decode step).

    python benchmarks/f_timeline.py --batch 64,256 --out $OUT/f_timeline.json        # H200: 8B shape
    python benchmarks/f_timeline.py --cpu --batch 64 --prompt-len 16                # default model

On a CPU the forward is synchronous (its host time is the compute); compare the other phases.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from gpu_throughput import SCHEMA  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402
from radixlm.runtime.schedule_batch import ScheduledBatch  # noqa: E402
from radixlm.runtime.scheduler import Scheduler  # noqa: E402
from radixlm.runtime.scheduler_process import freeze_startup_heap  # noqa: E402
from radixlm.runtime.server_args import ServerArgs  # noqa: E402
from radixlm.runtime.uncommitted_step import UncommittedStep  # noqa: E402

# (owner, method, label): owner "sched", "runner", "results", "grammars", or a class (patched on it).
PHASES: list[tuple[Any, str, str]] = [
    ("sched", "handle", "receive requests (+ grammar submit)"),
    ("sched", "_poll_grammars", "grammar poll (matchers made)"),
    ("sched", "_schedule_prefill", "schedule prefill / admission"),
    ("sched", "_schedule_decode", "schedule decode"),
    (ScheduledBatch, "to_forward_batch", "build forward batch"),
    ("runner", "forward", "forward (GPU: launch)"),
    ("sched", "_commit_step", "commit a step"),
    (UncommittedStep, "take_tokens", ". wait for its tokens"),
    (UncommittedStep, "peek_tokens", "wait for the last step's tokens (grammar rows, before sampling)"),
    ("results", "advance_grammars", "grammar rows take them (before sampling)"),
    ("results", "_append", ". append + finish checks"),
    ("grammars", "advance_many", ". . grammar commit + mask start"),
    ("grammars", "_settle", ". . . wait for mask work"),
    ("workers", "advance", ". . . matchers advanced"),
    ("tables", "fill_missing", ". . . new states' fills started"),
    ("sched", "_apply", ". apply events"),
    ("sched", "_finish", ". . finish (release KV, output)"),
    ("sched", "_launch", "sample (overlapped step)"),
    ("sched", "process_results", "results (synchronous step)"),
    ("results", "sample", ". sample (incl. masks)"),
    ("grammars", "bitmask", ". . masks taken"),
    ("grammars", "jump_forward", ". jump forward"),
]


class Timeline:
    """Host time per phase over a run, and the device time of every step (CUDA events)."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.cuda = sched.device.type == "cuda"
        self.host: dict[str, float] = defaultdict(float)
        self.calls: dict[str, int] = defaultdict(int)
        self.steps: list[dict] = []
        self._undo: list[Callable[[], None]] = []
        for owner, name, label in PHASES:
            self._wrap(owner, name, label)
        self._mark_forward()
        for name in ("_launch", "process_results"):
            self._mark_sampled(name)
        self._gc_started = 0.0

        def on_gc(phase: str, info: dict) -> None:  # Python's collector pauses, whatever phase they land in
            if phase == "start":
                self._gc_started = time.perf_counter()
            else:
                self.host["gc pauses (inside the phases above)"] += time.perf_counter() - self._gc_started
                self.calls["gc pauses (inside the phases above)"] += 1
                if info.get("generation") == 2:
                    self.calls["gc gen-2 collections"] += 1

        gc.callbacks.append(on_gc)
        self._undo.append(lambda: gc.callbacks.remove(on_gc))

    def _target(self, owner: Any) -> Any:
        gr = self.sched.grammars
        return {"sched": self.sched, "runner": self.sched.runner, "results": self.sched.results, "grammars": gr,
                "workers": gr and gr.workers, "tables": gr and gr._tables}.get(owner, owner) if isinstance(owner, str) else owner

    def _patch(self, obj: Any, name: str, fn: Callable) -> None:
        own = obj.__dict__.get(name, None) if isinstance(obj, type) else obj.__dict__.get(name)
        setattr(obj, name, fn)
        self._undo.append(lambda: setattr(obj, name, own) if own is not None else delattr(obj, name))

    def _wrap(self, owner: Any, name: str, label: str) -> None:
        obj = self._target(owner)
        if obj is None:
            return
        fn = getattr(obj, name)
        host, calls = self.host, self.calls

        if isinstance(obj, type):
            def timed(this: Any, *a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(this, *a, **k)
                finally:
                    host[label] += time.perf_counter() - t
                    calls[label] += 1
        else:
            def timed(*a: Any, **k: Any) -> Any:
                t = time.perf_counter()
                try:
                    return fn(*a, **k)
                finally:
                    host[label] += time.perf_counter() - t
                    calls[label] += 1
        self._patch(obj, name, timed)

    def _event(self) -> Any:
        if not self.cuda:
            return time.perf_counter()
        ev = torch.cuda.Event(enable_timing=True)
        ev.record()
        return ev

    def _mark_forward(self) -> None:
        runner = self.sched.runner
        inner = runner.forward

        def forward(fb: Any) -> torch.Tensor:
            start = self._event()
            out = inner(fb)
            self.steps.append({"decode": fb.mode.value != "extend", "bs": fb.batch_size, "start": start, "end": self._event()})
            return out

        self._patch(runner, "forward", forward)

    def _mark_sampled(self, name: str) -> None:
        fn = getattr(self.sched, name)

        def marked(*a: Any, **k: Any) -> Any:
            out = fn(*a, **k)
            if self.steps:
                self.steps[-1]["sampled"] = self._event()
            return out

        self._patch(self.sched, name, marked)

    def close(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def _ms(self, a: Any, b: Any) -> float:
        return a.elapsed_time(b) if self.cuda else (b - a) * 1e3

    def run(self, reqs: list[TokenizedGenerateReq], outputs: dict[str, list[int]]) -> dict:
        """Hand the requests over (as the scheduler process does: all before the next step), step
        until idle; the run's wall and its split."""
        if self.cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for r in reqs:
            self.sched.handle(r)
        idle_steps = 0
        in_step = 0.0
        while not self.sched.idle:
            t = time.perf_counter()
            ran = self.sched.step()
            in_step += time.perf_counter() - t
            if not ran:
                idle_steps += 1
                time.sleep(0.0005)
            for out in self.sched.pop_outputs():
                outputs.setdefault(out.rid, []).extend(out.output_ids)
        if self.cuda:
            torch.cuda.synchronize()
        wall = time.perf_counter() - t0
        dec = [s for s in self.steps if s["decode"]]
        ext = [s for s in self.steps if not s["decode"]]
        fwd = sum(self._ms(s["start"], s["end"]) for s in dec)
        samp = sum(self._ms(s["end"], s["sampled"]) for s in dec if "sampled" in s)
        idle = sum(max(0.0, self._ms(s["sampled"], n["start"]))
                   for s, n in zip(self.steps, self.steps[1:]) if s["decode"] and "sampled" in s)
        ext_dev = sum(self._ms(s["start"], s.get("sampled", s["end"])) for s in ext)
        first = self.steps[0]["start"] if self.steps else None
        return {"wall_ms": wall * 1e3, "in_step_ms": in_step * 1e3, "idle_steps": idle_steps,
                "decode_steps": len(dec), "extend_steps": len(ext),
                "decode_forward_ms": fwd, "decode_sampling_ms": samp, "decode_device_idle_ms": idle,
                "extend_device_ms": ext_dev,
                "span_first_to_last_step_ms": self._ms(first, self.steps[-1].get("sampled", self.steps[-1]["end"])) if first else 0.0,
                "host_ms": {k: v * 1e3 for k, v in self.host.items()}, "calls": dict(self.calls)}


def make_scheduler(model_dir: Path, tokenizer: Any, tokenizer_path: str, cpu: bool, options: dict) -> Scheduler:
    opts: dict[str, Any] = dict(context_length=4096, tokenizer_path=tokenizer_path)
    if cpu:
        opts.update(enable_overlap_schedule_on_cpu=True)
    else:
        opts.update(load_format="dummy", dtype="bfloat16", mem_fraction_static=0.5)
    opts.update(options)
    sched = Scheduler(ServerArgs(model_path=str(model_dir), **opts).resolve(), model_dir, tokenizer)
    if cpu:  # jump-forward as behind CUDA graphs (an extension costs ~2 decode steps there)
        sched.results.decode_graphs = True
    return sched


def set_lazy(sched: Scheduler, lazy: bool) -> None:
    """Lazy grammar commits on or off for every state table the runtime holds (A/B in one process)."""
    if sched.grammars is None:
        return
    for _, wrapped in sched.grammars._tables._wrapped.values():
        if wrapped is not None:
            wrapped.table.lazy = lazy


def filled_rows(sched: Scheduler) -> int:
    """Table rows filled so far (states some row has reached), over every state table."""
    if sched.grammars is None:
        return 0
    return sum(sum(w.table.ready) for _, w in sched.grammars._tables._wrapped.values() if w is not None)


def wait_for_table_completion(sched: Scheduler, limit_s: float = 60.0) -> float:
    """Let the state tables' background completion (--grammar-state-table complete / auto beside a GPU)
    finish before the timed runs, as on a server that has served the schema a while; seconds waited."""
    gr = sched.grammars
    t = time.perf_counter()
    while gr is not None and gr.info()["grammar_tables_completing"] and time.perf_counter() - t < limit_s:
        gr.file_completed_rows()  # the rows, then the DFA moves the walk sent
        time.sleep(0.01)
    return time.perf_counter() - t


def run_batch(sched: Scheduler, batch: int, prompt_len: int, new_tokens: int, lazy: list[str], warm: str = "same") -> dict:
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(prompt_len)] for _ in range(batch)]
    schema = json.dumps(SCHEMA)
    res: dict = {"batch": batch}
    lengths: list[int] = []
    json_runs = [("json" if i == 0 else f"json_lazy_{v}", {"json_schema": schema}, v) for i, v in enumerate(lazy)]

    def mk(i: int, label: str, extra: dict, n: int, seed_base: int = 0) -> TokenizedGenerateReq:
        return TokenizedGenerateReq(rid=f"{label}{batch}-{i}", input_ids=prompts[i], params=SamplingParams(
            temperature=1.0, seed=seed_base + i, max_new_tokens=n, ignore_eos=not extra, **extra))

    # untimed: compiles the grammar, caches the prompts, warms shapes; "same": the timed run's own walks
    # (every state's table row filled: a server that has served these very documents), "other": other
    # seeds' walks (the timed run meets states no row reached yet, as the Engine's runs do), "small": 2 rows
    warm_reqs = {"same": [mk(i, "warm", {"json_schema": schema}, new_tokens) for i in range(batch)],
                 "other": [mk(i, "warm", {"json_schema": schema}, new_tokens, 100_000) for i in range(batch)],
                 "small": [mk(i, "warm", {"json_schema": schema}, new_tokens, 100_000) for i in range(2)]}[warm]
    warmup = Timeline(sched)
    try:
        warmup.run(warm_reqs, {})
    finally:
        warmup.close()
    res["table_completion_wait_s"] = wait_for_table_completion(sched)
    for label, extra, variant in (*json_runs, ("same_lengths", {}, None)):
        if variant is not None:
            set_lazy(sched, variant == "on")
        tl = Timeline(sched)
        filled = filled_rows(sched)
        outs: dict[str, list[int]] = {}
        try:
            r = tl.run([mk(i, label, extra, lengths[i] if label == "same_lengths" else new_tokens)
                        for i in range(batch)], outs)
        finally:
            tl.close()
        r["new_states_filled"] = filled_rows(sched) - filled
        counts = [len(outs.get(f"{label}{batch}-{i}", [])) for i in range(batch)]
        if variant is not None:
            r["lazy"] = variant
            if label == "json":
                lengths = counts
            docs = [sched.tokenizer.decode(outs[f"{label}{batch}-{i}"], skip_special_tokens=True) for i in range(batch)]
            r["valid_json"] = sum(_parses(d) for d in docs)
        r.update(tokens=sum(counts), mean_tokens=sum(counts) / batch, max_tokens=max(counts))
        res[label] = r
    for label, _, _ in json_runs:  # tok/s ratio (the same tokens when lengths match)
        res[f"{label}_over_same_lengths_tok_s"] = (res[label]["tokens"] / res[label]["wall_ms"]) / (
            res["same_lengths"]["tokens"] / res["same_lengths"]["wall_ms"])
    return res


def _parses(text: str) -> bool:
    try:
        json.loads(text)
        return True
    except ValueError:
        return False


def print_batch(res: dict, label: str = "json") -> None:
    """~12 lines: the ratio, the run's split, then host phases in ms per decode step (json / same)."""
    js, same = res[label], res["same_lengths"]
    n, m = max(1, js["decode_steps"]), max(1, same["decode_steps"])
    print(f"(f) timeline batch {res['batch']} {label} (lazy commits {js.get('lazy')}): {js['wall_ms']:.0f} ms vs same lengths "
          f"{same['wall_ms']:.0f} ms -> {res[f'{label}_over_same_lengths_tok_s']:.3f}x tok/s; {js['tokens']} tokens "
          f"({js['mean_tokens']:.1f} mean, {js['max_tokens']} max), {js.get('valid_json', 0)}/{res['batch']} parse; steps "
          f"decode+extend {js['decode_steps']}+{js['extend_steps']} vs {same['decode_steps']}+{same['extend_steps']}; "
          f"{js.get('new_states_filled', 0)} states first reached (table completion waited "
          f"{res.get('table_completion_wait_s', 0):.1f} s); gc gen-2 {js['calls'].get('gc gen-2 collections', 0)}/"
          f"{same['calls'].get('gc gen-2 collections', 0)}", flush=True)
    print(f"    run ms json/same: wall {js['wall_ms']:.1f}/{same['wall_ms']:.1f}, in steps {js['in_step_ms']:.1f}/"
          f"{same['in_step_ms']:.1f}, extend steps on device {js['extend_device_ms']:.1f}/{same['extend_device_ms']:.1f}; "
          f"per decode step: forward {js['decode_forward_ms'] / n:.2f}/{same['decode_forward_ms'] / m:.2f}, sampling "
          f"{js['decode_sampling_ms'] / n:.2f}/{same['decode_sampling_ms'] / m:.2f}, device idle "
          f"{js['decode_device_idle_ms'] / n:.2f}/{same['decode_device_idle_ms'] / m:.2f}", flush=True)
    cells = []
    for phase in [p for _, _, p in PHASES] + ["gc pauses (inside the phases above)"]:
        a, b = js["host_ms"].get(phase, 0.0), same["host_ms"].get(phase, 0.0)
        if a or b:
            cells.append(f"{phase.strip('. ')[:34]:<34} {a / n:6.3f}/{b / m:6.3f}")
    print("    host ms per decode step, json/same (nested phases are inside the one above):")
    for i in range(0, len(cells), 2):
        print("    " + " | ".join(cells[i : i + 2]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--cpu", action="store_true", help="the default model on the CPU (else the 8B shape on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--tokenizer-dir", default=".gpu_assets/smollm_tok")
    ap.add_argument("--lazy", default="on", help="comma list on/off: lazy grammar commits for each JSON run (A/B)")
    ap.add_argument("--warm", default="same", choices=["same", "other", "small"],
                    help="untimed pass before each batch: the timed walks themselves, other seeds' walks, or 2 rows")
    ap.add_argument("--phases", action="store_true", help="print every phase (default: only the first JSON run's)")
    ap.add_argument("--option", action="append", default=[], help="server arg KEY=VALUE (JSON value), e.g. grammar_mask_threads=0")
    ap.add_argument("--out", default="benchmarks/results/f_timeline.json")
    args = ap.parse_args()
    import logging

    logging.getLogger("radixlm").setLevel(logging.WARNING)  # no per-step decode log lines
    options = {k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}
    from transformers import AutoTokenizer

    if args.cpu:
        from radixlm.runtime.model_source import resolve_model_path

        model_dir = Path(resolve_model_path(None, progress=False))
        tok_dir = str(model_dir)
    else:
        from gpu_suite import LLAMA_8B, model_dir_for

        model_dir = model_dir_for({**LLAMA_8B, "vocab_size": 49152}, Path(tempfile.mkdtemp(prefix="radixlm-ftl-")), "smolvocab")
        tok_dir = args.tokenizer_dir
    tok = AutoTokenizer.from_pretrained(tok_dir)
    batches = [int(x) for x in args.batch.split(",")]
    if not args.cpu:  # graphs up to the largest batch only (start-up: ~half the engine's capture)
        options.setdefault("cuda_graph_max_bs", max(batches))
    t = time.perf_counter()
    sched = make_scheduler(model_dir, tok, tok_dir, args.cpu, options)
    sched.frozen_objects = freeze_startup_heap()  # as the scheduler process does after start-up
    report: dict = {"device": torch.cuda.get_device_name() if not args.cpu else "cpu", "options": options,
                    "startup_s": time.perf_counter() - t, "batches": []}
    print(f"(f) timeline on {report['device']}: scheduler ready in {report['startup_s']:.1f} s, options {options}", flush=True)
    for b in batches:
        lazy = args.lazy.split(",")
        t = time.perf_counter()
        res = run_batch(sched, b, args.prompt_len, args.new_tokens, lazy, args.warm)
        res["batch_wall_s"] = time.perf_counter() - t
        report["batches"].append(res)
        for i, v in enumerate(lazy):
            label = "json" if i == 0 else f"json_lazy_{v}"
            if i == 0 or args.phases:
                print_batch(res, label)
            else:
                js = res[label]
                print(f"(f) timeline batch {b} {label}: {js['wall_ms']:.0f} ms, {res[f'{label}_over_same_lengths_tok_s']:.3f}x "
                      f"tok/s of same lengths; decode fwd {js['decode_forward_ms']:.0f} + sampling {js['decode_sampling_ms']:.0f} "
                      f"+ idle {js['decode_device_idle_ms']:.0f} ms over {js['decode_steps']} steps; grammar commit "
                      f"{js['host_ms'].get('. . grammar commit + mask start', 0):.0f} ms, masks "
                      f"{js['host_ms'].get('. . masks taken', 0):.0f} ms, matchers advanced "
                      f"{js['host_ms'].get('. . . matchers advanced', 0):.0f} ms, gc "
                      f"{js['host_ms'].get('gc pauses (inside the phases above)', 0):.0f} ms; {js.get('new_states_filled', 0)} "
                      f"states first reached; {js.get('valid_json', 0)}/{b} parse", flush=True)
    if sched.grammars is not None:
        sched.grammars.close()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

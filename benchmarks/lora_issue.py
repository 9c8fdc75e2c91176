"""Issue 21's benchmark figures side by side in one run, within ~150 s on an H200.

  (b)     workload (b) (in U[128,1024], out U[64,512]; --requests of (b)'s 1,000, stated in the table) on a
          Llama-3.1-8B-shaped model (32 layers, random bf16 weights): the base engine alone, then one
          --enable-lora engine (8 device slots) with requests spread uniformly over 8, 64 and 1 rank-16
          adapters (q,k,v,o,gate,up,down; 64 on 8 slots: 8 per batch, the rest swapped in from host memory)
  decode  batch-1 decode ms/step: the base engine, a rank-16 adapter, and a base request on the LoRA engine
  check   a batch mixing 4 adapters + the base model: each row's output equals the same request alone

What keeps it short: the 64 adapters are written (to /dev/shm where it has room) on a thread while the
base engine starts; decode graphs up to --cuda-graph-max-bs rows (no (b) batch of --requests has more);
engine logs at warning level; a (b) row estimated to end past --budget-s is skipped and named under errors
(the JSON is rewritten after every part, so a run cut short keeps what it measured).

    python3 benchmarks/lora_issue.py --out $OUT/lora7.json                  (H200, ~150 s)
    python3 benchmarks/lora_issue.py --tiny --out /tmp/lora_issue.json     (CPU dry run: a tiny model, seconds)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import ENGINE_ARGS, params_for, workload_b  # noqa: E402
from lora import check_mixed_batch, decode_ms, run_b, write_adapter  # noqa: E402
from step_account import KINDS, fit_step_costs  # noqa: E402

from radixlm.runtime.loop_stats import ENV as LOOP_ENV  # noqa: E402

# the CPU dry run's model: Llama-shaped, every projection a LoRA target, a vocabulary workload_b can draw from
TINY = {**LLAMA_8B, "vocab_size": 4096, "hidden_size": 64, "intermediate_size": 128, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "torch_dtype": "float32"}
ROWS = {"8": ("b_8_adapters", 8, ">= 0.85x"), "64": ("b_64_adapters_8_slots", 64, ">= 0.75x"),
        "1": ("b_1_adapter", 1, "-"), "base": ("b_lora_engine_base", 0, "-")}
SLOTS = 8
SKIPPABLE = {"base_engine", "decode", "check"}


class AdapterWriter(threading.Thread):
    """Writes the PEFT adapter folders while the base engine starts (the main thread only waits on it)."""

    def __init__(self, root: Path, cfg: dict, names: list[str], device: str) -> None:
        super().__init__(name="adapter-writer", daemon=True)
        self.root, self.cfg, self.names, self.device = root, cfg, names, device
        self.paths: list[str] = []
        self.seconds = 0.0
        self.error: BaseException | None = None

    def run(self) -> None:
        t = time.perf_counter()
        try:
            for i, name in enumerate(self.names):
                self.paths.append(f"{name}={write_adapter(self.root / name, self.cfg, seed=i, device=self.device)}")
        except BaseException as exc:  # noqa: BLE001 - re-raised by the main thread (`wait`)
            self.error = exc
        if self.device == "cuda":
            torch.cuda.empty_cache()  # the draws' blocks: the engines size their KV pools from free memory
        self.seconds = time.perf_counter() - t

    def wait(self) -> tuple[str, ...]:
        self.join()
        if self.error is not None:
            raise self.error
        return tuple(self.paths)


class Progress(threading.Thread):
    """Prints the engine's counters every `every` seconds while a row runs, so that a run cut by a time limit
    still says how far it got (generated tokens, forward steps by kind, swaps), and keeps them (`samples`: seconds,
    counters) for the row's per-kind step costs (step_account.py)."""

    def __init__(self, eng, label: str, started: float, every: float) -> None:
        super().__init__(name="progress", daemon=True)
        self.eng, self.label, self.started, self.every = eng, label, started, every
        self.done = threading.Event()
        self.first = eng.get_server_info()  # before the row's requests go in
        self.samples: list[tuple[float, dict[str, int]]] = [(time.perf_counter(), dict.fromkeys(KINDS, 0))]

    def sample(self) -> tuple[dict[str, int], dict]:
        """The counters since the row began (kept as a sample) and the server info they came from."""
        info = self.eng.get_server_info()
        d = {k: info.get(k, 0) - self.first.get(k, 0) for k in ("generated_tokens", *KINDS)}
        self.samples.append((time.perf_counter(), d))
        return d, info

    def run(self) -> None:
        while not self.done.wait(self.every):
            d, info = self.sample()
            lora = {k: info.get("lora", {}).get(k, 0) - self.first.get("lora", {}).get(k, 0)
                    for k in ("swaps", "swaps_staged")}
            print(f"[{time.perf_counter() - self.started:.0f} s] {self.label} so far: {d['generated_tokens']} tokens, "
                  f"steps {d['prefill_steps']}/{d['mixed_steps']}/{d['decode_steps']}, swaps {lora['swaps']} "
                  f"({lora['swaps_staged']} ahead)", flush=True)


def scratch_root() -> Path:
    """/dev/shm when it has room for 64 adapters of the 8B shape (5.4 GB): no disk writes, fast reads."""
    shm = Path("/dev/shm")
    if shm.is_dir() and shutil.disk_usage(shm).free > 12 << 30:
        return Path(tempfile.mkdtemp(prefix="radixlm-lora-", dir=shm))
    return Path(tempfile.mkdtemp(prefix="radixlm-lora-"))


def main() -> None:
    import radixlm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="benchmarks/results/lora_issue.json")
    ap.add_argument("--requests", type=int, default=None,
                    help="requests of workload (b) (its full size: 1,000; default 300, 12 with --tiny)")
    ap.add_argument("--rows", default="8,64,1", help="(b) rows of the LoRA engine, in order: 8, 64, 1 adapters "
                    "and base (its base-model requests)")
    ap.add_argument("--budget-s", type=float, default=140, help="a (b) row estimated to end past this is skipped")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=320)
    ap.add_argument("--lora-prefill-chunk", type=int, default=0, help="the LoRA engine's --lora-prefill-chunk")
    ap.add_argument("--decode-steps", type=int, default=None,
                    help="decode steps of each batch-1 measurement (default 128, 16 with --tiny)")
    ap.add_argument("--tiny", action="store_true", help="CPU dry run: a 2-layer model of hidden size 64, float32")
    ap.add_argument("--progress-s", type=float, default=0, help="print a LoRA row's counters this often (0: never)")
    ap.add_argument("--loop-stats", action="store_true", help="each LoRA row's scheduler-loop account in the JSON "
                    "(runtime/loop_stats.py: seconds in steps / waiting for the device, step-time quantiles, the "
                    "longest steps); a few µs of host time a step")
    ap.add_argument("--skip", default="", help="parts left out, comma-separated: base_engine (the base engine and "
                    "its rows; `vs base` then reads the LoRA engine's base row where --rows has it), decode (batch-1 "
                    "decode), check (the mixed-batch check)")
    args = ap.parse_args()
    rows = [r for r in args.rows.split(",") if r]
    skip = {p for p in args.skip.split(",") if p}
    if skip - SKIPPABLE:
        ap.error(f"--skip: unknown {sorted(skip - SKIPPABLE)}; known: {', '.join(sorted(SKIPPABLE))}")
    if set(rows) - ROWS.keys():
        ap.error(f"--rows: unknown {sorted(set(rows) - ROWS.keys())}; known: {', '.join(ROWS)}")
    tiny = args.tiny or not torch.cuda.is_available()
    cfg = TINY if tiny else LLAMA_8B
    args.requests = args.requests or (12 if tiny else 300)
    args.decode_steps = args.decode_steps or (16 if tiny else 128)
    vocab = cfg["vocab_size"]
    if tiny:
        engine_args = {**ENGINE_ARGS, "device": "cpu", "dtype": "float32", "max_total_tokens": 65536,
                       "log_level": "warning"}
    else:
        engine_args = {**ENGINE_ARGS, "mem_fraction_static": 0.85, "cuda_graph_max_bs": args.cuda_graph_max_bs,
                       "log_level": "warning"}
    started = time.perf_counter()
    report: dict = {"device": "cpu (tiny dry run)" if tiny else torch.cuda.get_device_name(),
                    "torch": torch.__version__, "date": time.strftime("%Y-%m-%d %H:%M"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                             text=True).stdout.strip(),
                    "model": "tiny" if tiny else "llama-3.1-8b shape, 32 layers", "requests": args.requests,
                    "rows": rows, "slots": SLOTS, "rank": 16, "errors": {}, "section_s": {}}

    def save() -> None:
        report["wall_s"] = round(time.perf_counter() - started, 1)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    def section(label: str, fn) -> None:
        """One part; a failure is recorded (and printed) and the parts after it still run."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
            report["errors"][label] = f"{type(exc).__name__}: {exc}"[:600]
            report.setdefault("tracebacks", {})[label] = traceback.format_exc()[-3000:]
            print(f"{label} FAILED: {type(exc).__name__}: {str(exc)[:300]}", flush=True)
        report["section_s"][label] = round(time.perf_counter() - t0, 1)
        save()

    root = scratch_root()
    names = [f"lora{i}" for i in range(64)]
    writer = AdapterWriter(root, cfg, names, "cpu" if tiny else "cuda")
    writer.start()
    model_dir = model_dir_for(cfg, root, "model")
    prompts, outs = workload_b(args.requests, vocab)
    rng = random.Random(9)
    spread = {n: [None if n == 0 else names[rng.randrange(n)] for _ in prompts] for n in (0, 1, 8, 64)}

    def warm_up(eng, adapters: list[str] | None) -> None:
        """The same for both engines before anything is timed: a prefill of 2 to 4 thousand tokens, then one of
        ~9 thousand (a full 8,192-token chunk), 4 new tokens each: JIT specializations of prefill-sized kernels
        are compiled here (the LoRA engine compiles its LoRA ones at start-up), not in a timed run."""
        for part in filter(None, (prompts[:4], prompts[4:20])):
            loras = None if adapters is None else [adapters[i % len(adapters)] for i in range(len(part))]
            eng.generate(input_ids=part, sampling_params=params_for([4] * len(part)), lora_path=loras)

    def base_engine() -> None:
        t = time.perf_counter()
        with radixlm.Engine(str(model_dir), **engine_args) as eng:
            report["base_engine_start_s"] = round(time.perf_counter() - t, 1)
            report["adapter_write_wait_s"] = round(_timed(writer.join), 1)  # nothing on the GPU beside decode / (b)
            warm_up(eng, None)
            report["base_decode_ms"] = decode_ms(eng, vocab, None, args.decode_steps)
            report["b_base"] = run_b(eng, prompts, outs, [None] * len(prompts))
            report["b_base"].pop("_outputs")
        print(f"[{time.perf_counter() - started:.0f} s] base: {report['b_base']['total_tok_s']:.0f} tok/s, "
              f"batch-1 {report['base_decode_ms']:.3f} ms", flush=True)

    if "base_engine" not in skip:
        section("base_engine", base_engine)
    section("adapters", lambda: writer.wait())
    report["adapter_write_s"] = round(writer.seconds, 1)

    def fits(label: str, count: int) -> bool:
        """Whether a row should end within --budget-s: 1.3x the base row's time with up to 8 adapters; with
        more adapters than slots, half of it (prefill; 15 s at 1,000 requests without a base row) plus the slot
        bound's decode steps, each 1.2x this run's batch-1 LoRA step (7.5 ms where that is missing: a 32-layer step
        of ~75 rows on the H200)."""
        base_s = report.get("b_base", report.get(ROWS["base"][0], {})).get("seconds", 0.0)
        guess = 1.3 * base_s
        if count > SLOTS:
            longest: dict[str, int] = {}
            for name, out in zip(spread[count], outs):
                longest[name] = max(longest.get(name, 0), out)
            step_s = 1.2 * report["lora_decode_ms"] / 1e3 if "lora_decode_ms" in report else 0.0075
            prefill_s = 0.5 * base_s if base_s else 15.0 * len(prompts) / 1000  # (b)'s prefill: ~13 s + LoRA's share
            guess = prefill_s + sum(longest.values()) / SLOTS * step_s
        if time.perf_counter() - started + guess <= args.budget_s:
            return True
        report["errors"][label] = f"skipped: past --budget-s {args.budget_s:.0f} (estimated {guess:.0f} s)"
        return False

    def lora_engine() -> None:
        paths = writer.wait()
        if args.loop_stats:  # read by the scheduler process at its start (runtime/scheduler_process.py)
            os.environ[LOOP_ENV] = tempfile.mktemp(prefix="radixlm-loop-", suffix=".jsonl")
        t = time.perf_counter()
        with radixlm.Engine(str(model_dir), lora_paths=paths, max_loras_per_batch=SLOTS,
                            lora_prefill_chunk=args.lora_prefill_chunk, **engine_args) as eng:
            report["lora_engine_start_s"] = round(time.perf_counter() - t, 1)
            warm_up(eng, names[:SLOTS])
            if "check" not in skip:
                report["check_mixed_batch"] = check_mixed_batch(eng, vocab, names)
            if "decode" not in skip:
                report["lora_decode_ms"] = decode_ms(eng, vocab, names[0], args.decode_steps)
                report["lora_engine_base_decode_ms"] = decode_ms(eng, vocab, None, args.decode_steps)
            print(f"[{time.perf_counter() - started:.0f} s] LoRA engine up in {report['lora_engine_start_s']} s; "
                  f"batch-1 {report.get('lora_decode_ms', float('nan')):.3f} ms", flush=True)
            for row in rows:
                label, count, _ = ROWS[row]
                if not fits(label, count):
                    continue
                eng.flush_cache()
                before = eng.get_server_info().get("lora", {})
                swaps, staged = before.get("swaps", 0), before.get("swaps_staged", 0)
                periods = len(loop_periods(os.environ[LOOP_ENV])) if args.loop_stats else 0
                progress = Progress(eng, label, started, args.progress_s)
                if args.progress_s > 0:
                    progress.start()
                try:
                    report[label] = run_b(eng, prompts, outs, spread[count], SLOTS)
                finally:
                    progress.done.set()
                report[label].pop("_outputs")
                if args.progress_s > 0:  # the row's seconds by kind of step, fitted over the sampled windows
                    progress.join()
                    progress.sample()  # (the row's end)
                    fit = report[label]["step_cost_fit"] = fit_step_costs(progress.samples)
                    if fit:
                        print("  steps: " + ", ".join(f"{k} {ms:.2f} ms ({fit['seconds_by_kind'][k]:.1f} s)"
                                                      for k, ms in fit["ms_a_step"].items()), flush=True)
                if args.loop_stats:
                    time.sleep(0.1)  # the loop writes its busy period's line once idle
                    loop = report[label]["scheduler_loop"] = max(loop_periods(os.environ[LOOP_ENV])[periods:],
                                                                 key=lambda line: line.get("wall_s", 0.0), default=None)
                    if loop:
                        steps = loop.get("step_ms", {})
                        print(f"  loop: {loop['seconds']['step']:.1f} s in steps, device waits "
                              f"{loop['parts'].get('device waits (sampled tokens)', 0):.1f} s, step ms median "
                              f"{steps.get('median', 0):.2f} p90 {steps.get('p90', 0):.2f}, longest "
                              f"{[round(v) for v in steps.get('longest', [])]}", flush=True)
                lora_info = eng.get_server_info().get("lora", {})
                report[label]["swaps"] = lora_info.get("swaps", 0) - swaps
                report[label]["swaps_staged"] = lora_info.get("swaps_staged", 0) - staged
                base_row = report.get("b_base", report.get(ROWS["base"][0]))
                if base_row is not None and label != ROWS["base"][0]:
                    report[label]["vs_base"] = report[label]["total_tok_s"] / base_row["total_tok_s"]
                print(f"[{time.perf_counter() - started:.0f} s] {label}: {report[label]['total_tok_s']:.0f} tok/s",
                      flush=True)
                save()

    section("lora_engine", lora_engine)
    derive(report)
    save()
    shutil.rmtree(root, ignore_errors=True)
    print_table(report, args.out)


def loop_periods(path: str) -> list[dict]:
    """The scheduler loop's busy periods written so far (runtime/loop_stats.py). A row's is the longest of those
    written while it ran: the counter reads around it make short periods of their own."""
    try:
        return [json.loads(ln) for ln in Path(path).read_text().splitlines() if ln.strip()]
    except OSError:
        return []


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def derive(report: dict) -> None:
    """Overheads, and the 64-adapter row's ceiling: its decode steps are at least the slot bound whatever
    the scheduler does; were each one only a batch-1 LoRA step and prefill free, it would take that long."""
    base = report.get("b_base", report.get(ROWS["base"][0]))
    if "lora_decode_ms" in report and "base_decode_ms" in report:
        report["batch1_decode_overhead"] = report["lora_decode_ms"] / report["base_decode_ms"] - 1
    if "lora_engine_base_decode_ms" in report and "base_decode_ms" in report:
        report["batch1_base_request_on_lora_engine_overhead"] = (report["lora_engine_base_decode_ms"]
                                                                 / report["base_decode_ms"] - 1)
    row64 = report.get(ROWS["64"][0])
    if row64 and base and "lora_decode_ms" in report:
        row64["ceiling_vs_base"] = base["seconds"] / (row64["decode_steps_lower_bound"] * report["lora_decode_ms"] / 1e3)


def print_table(report: dict, out: str) -> None:
    print(f"\nIssue 21, {report['device']}, {report['model']}, commit {report['commit']}: workload (b) at "
          f"{report['requests']} requests (full size 1,000), rank 16 on q,k,v,o,gate,up,down, {report['slots']} slots")
    print(f"{'row':<24}{'s':>7}{'tok/s':>9}{'vs base':>9}{'goal':>10}{'steps p/m/d':>16}{'tok/step':>9}"
          f"{'bound':>7}{'swaps/ahead':>12}")
    for label, goal in [("b_base", "")] + [(ROWS[r][0], ROWS[r][2]) for r in report["rows"]]:
        r = report.get(label)
        if not r:
            print(f"{label:<24}  {report['errors'].get(label, report['errors'].get('lora_engine', 'not run'))[:80]}")
            continue
        kinds = r["steps_by_kind"]
        steps = f"{kinds['prefill_steps']}/{kinds['mixed_steps']}/{kinds['decode_steps']}"
        vs = f"{r['vs_base']:.3f}x" if "vs_base" in r else "-"
        print(f"{label:<24}{r['seconds']:>7.1f}{r['total_tok_s']:>9.0f}{vs:>9}{goal or '-':>10}{steps:>16}"
              f"{r['tokens_per_forward_step']:>9.0f}{r.get('decode_steps_lower_bound', '-'):>7}"
              f"{str(r.get('swaps', '-')) + '/' + str(r.get('swaps_staged', '-')):>12}")
    row64 = report.get(ROWS["64"][0], {})
    if "ceiling_vs_base" in row64:
        print(f"64 adapters: decode steps >= {row64['decode_steps_lower_bound']} (slot bound); at a batch-1 LoRA step "
              f"each and free prefill: <= {row64['ceiling_vs_base']:.2f}x of base at this size")

    def ms(key: str) -> str:
        return f"{report[key]:.3f}" if key in report else "-"

    def pct(key: str) -> str:
        return f"{report[key]:+.1%}" if key in report else "-"

    print(f"batch-1 decode ms/step: base {ms('base_decode_ms')}, adapter {ms('lora_decode_ms')} "
          f"({pct('batch1_decode_overhead')}, goal <= +10%), base request on the LoRA engine "
          f"{ms('lora_engine_base_decode_ms')} ({pct('batch1_base_request_on_lora_engine_overhead')})")
    mixed = report.get("check_mixed_batch", {})
    print(f"mixed batch (4 adapters + base) rows = alone: {mixed.get('rows_identical', '-')}, first-token logprob "
          f"max diff {mixed.get('first_token_logprob_max_diff', float('nan')):.3g}, adapter changes output "
          f"{mixed.get('adapter_changes_output', '-')}")
    print(f"start-up s: base engine {report.get('base_engine_start_s', '-')}, LoRA engine "
          f"{report.get('lora_engine_start_s', '-')}; adapters written in {report.get('adapter_write_s', '-')} s "
          f"(waited {report.get('adapter_write_wait_s', '-')} s); parts {json.dumps(report['section_s'])}")
    if report["errors"]:
        print("errors:", json.dumps(report["errors"])[:800])
    print(f"wall {report.get('wall_s', 0):.0f} s -> {out}")


if __name__ == "__main__":
    main()

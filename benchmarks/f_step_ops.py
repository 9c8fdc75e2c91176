"""Item (f)'s decode step op by op: what a JSON step launches beyond the same step unconstrained (issue 14
item 4).

On the H100 at 256 rows (2026-12-05) the JSON run's decode steps took 0.26 ms (2.7%) longer than the
same-length run's while its host waited for the device in every one of them: device work, which the
JSON step's extra ops (the mask rows' index copy, the table gather, the bitmask kernel) should not reach
by their sizes. This runs one scheduler and both arms' batches (item (f)'s schema and seeded sampling;
the JSON batch replays an untimed run's walks, so every table row it reads is filled, and the table is
completed) and records `--steps` overlapped decode steps in the middle of each with torch.profiler:
every op outside the forward pass (the outermost aten ops, with their input shapes; on a GPU also the
kernels and copies each launched, with their device time, and any CUDA synchronize call), per step,
JSON beside plain, the ops only one arm runs marked.

    python benchmarks/f_step_ops.py --cpu --batch 64 --prompt-len 16       # the default model on this CPU
    timeout 120 python benchmarks/f_step_ops.py --batch 256 --out $OUT/f_step_ops.json   # the 8B shape on a GPU
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent)]  # f_timeline; tests.runtime.helpers
from f_timeline import SCHEMA, make_scheduler, wait_for_table_completion  # noqa: E402

from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402


def _inside(evt: Any, name: str) -> bool:
    parent = evt.cpu_parent
    while parent is not None:
        if parent.name == name:
            return True
        parent = parent.cpu_parent
    return False


def _kernels(evt: Any) -> list[Any]:
    out = list(getattr(evt, "kernels", []))
    for child in evt.cpu_children:
        out += _kernels(child)
    return out


def step_ops(prof: Any, steps: int) -> dict[str, dict[str, float]]:
    """Per step: each outermost op outside the forward pass (name and input shapes), its calls, host µs and
    the device µs of what it launched (kernels and copies, named); CUDA synchronize calls on their own."""
    ops: dict[str, dict[str, float]] = defaultdict(lambda: {"calls": 0.0, "host_us": 0.0, "device_us": 0.0})
    for evt in prof.events():
        sync = evt.name.startswith("cuda") and "Synchronize" in evt.name
        if not sync and (not evt.name.startswith("aten::") or (evt.cpu_parent is not None
                                                              and evt.cpu_parent.name.startswith("aten::"))):
            continue
        if evt.name == "forward" or _inside(evt, "forward"):
            continue
        shapes = [list(s) for s in (evt.input_shapes or []) if s]
        kernels = _kernels(evt)
        key = f"{evt.name} {shapes}" + (f" -> {sorted({k.name[:60] for k in kernels})}" if kernels else "")
        row = ops[key]
        row["calls"] += 1 / steps
        row["host_us"] += evt.cpu_time_total / steps
        row["device_us"] += sum(k.duration for k in kernels) / steps
    return dict(ops)


def run_arm(sched: Any, reqs: list[TokenizedGenerateReq], skip: int, steps: int) -> dict[str, dict[str, float]]:
    """Submit, step `skip` decode steps in, profile the next `steps` overlapped decode steps, finish."""
    from tests.runtime.helpers import run_to_completion

    for r in reqs:
        sched.handle(r)
    while sched.stats["decode_steps"] < skip:
        sched.step()
    forward = sched.runner.forward

    def marked(fb: Any) -> Any:
        with torch.profiler.record_function("forward"):
            return forward(fb)

    sched.runner.forward = marked
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
        torch.cuda.synchronize()
    overlapped = sched.stats["overlapped_steps"]
    try:
        with torch.profiler.profile(activities=activities, record_shapes=True) as prof:
            for _ in range(steps):
                sched.step()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
    finally:
        sched.runner.forward = forward
    assert sched.stats["overlapped_steps"] - overlapped == steps, "a profiled step was not an overlapped decode step"
    run_to_completion(sched, [])
    sched.pop_outputs()
    return step_ops(prof, steps)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--cpu", action="store_true", help="the default model on the CPU (else the 8B shape on CUDA)")
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--skip", type=int, default=12, help="decode steps before the profiled ones")
    ap.add_argument("--steps", type=int, default=4, help="profiled decode steps per arm")
    ap.add_argument("--tokenizer-dir", default=".gpu_assets/smollm_tok")
    ap.add_argument("--option", action="append", default=[], help="server arg KEY=VALUE (JSON value)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from transformers import AutoTokenizer

    options = {"grammar_state_table": "complete", **{k: json.loads(v) for k, v in (o.split("=", 1) for o in args.option)}}
    if args.cpu:
        from radixlm.runtime.model_source import resolve_model_path

        model_dir = Path(resolve_model_path(None, progress=False))
        tok_dir = str(model_dir)
        options.setdefault("load_format", "dummy")
    else:
        from gpu_suite import LLAMA_8B, model_dir_for

        model_dir = model_dir_for({**LLAMA_8B, "vocab_size": 49152}, Path(tempfile.mkdtemp(prefix="radixlm-ops-")), "smolvocab")
        tok_dir = args.tokenizer_dir
        options.setdefault("cuda_graph_max_bs", args.batch)
    sched = make_scheduler(model_dir, AutoTokenizer.from_pretrained(tok_dir), tok_dir, args.cpu, options)
    rng = random.Random(7)
    prompts = [[rng.randrange(100, 40000) for _ in range(args.prompt_len)] for _ in range(args.batch)]
    schema = json.dumps(SCHEMA)

    def batch(label: str, extra: dict) -> list[TokenizedGenerateReq]:
        return [TokenizedGenerateReq(rid=f"{label}{i}", input_ids=p, params=SamplingParams(
            temperature=1.0, seed=i, max_new_tokens=args.new_tokens, ignore_eos=not extra, **extra))
            for i, p in enumerate(prompts)]

    from tests.runtime.helpers import run_to_completion

    run_to_completion(sched, batch("warm", {"json_schema": schema}))  # the grammar, its walks' rows, the prompts
    wait_for_table_completion(sched)
    run_to_completion(sched, batch("warmplain", {}))
    arms = {}
    for label, extra in (("json", {"json_schema": schema}), ("plain", {})):
        sched.stats["decode_steps"] = 0
        arms[label] = run_arm(sched, batch(label, extra), args.skip, args.steps)
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
    keys = sorted(set(arms["json"]) | set(arms["plain"]),
                  key=lambda k: -(arms["json"].get(k, {}).get("device_us", 0) + arms["json"].get(k, {}).get("host_us", 0)))
    print(f"(f) decode step ops on {device}, batch {args.batch}, per step over {args.steps} steps (outside the forward): "
          f"calls json/plain, host µs json/plain, device µs json/plain")
    zero = {"calls": 0.0, "host_us": 0.0, "device_us": 0.0}
    for k in keys:
        a, b = arms["json"].get(k, zero), arms["plain"].get(k, zero)
        only = " [json only]" if not b["calls"] else " [plain only]" if not a["calls"] else ""
        print(f"  {a['calls']:4.1f}/{b['calls']:4.1f}  {a['host_us']:8.1f}/{b['host_us']:8.1f}  "
              f"{a['device_us']:7.1f}/{b['device_us']:7.1f}  {k[:200]}{only}")
    total = {arm: {m: sum(v[m] for v in ops.values()) for m in ("host_us", "device_us")} for arm, ops in arms.items()}
    print(f"  total per step: json {total['json']}, plain {total['plain']}", flush=True)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({"device": device, "batch": args.batch, "steps": args.steps,
                                              "options": options, "arms": arms, "total": total}, indent=2))
    if sched.grammars is not None:
        sched.grammars.close()


if __name__ == "__main__":
    main()

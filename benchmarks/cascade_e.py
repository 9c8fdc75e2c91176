#!/usr/bin/env python3
"""Workload (e) and cascade attention, one H200 call (issue 22 items 1 and 4):

  kernel  cascade vs plain decode attention at (e)'s decode shape (512 rows, 16 groups x 32, 1,024-token
          prefix, ~96-token suffixes), a group's rows contiguous and spread over the batch (as requests
          arrive in the engine), against the unique-KV-bytes floor; a few prefix-stage launch configs
  e       (e) in one in-process scheduler (8B shape, random bf16 weights, radix cache on), passes
          alternating cascade auto / off: wall, device and host time per kind of step; then a
          torch.profiler split of a few 512-row decode steps (CUDA graphs) by kernel, each arm
  check   gpu_suite's float32 check: Triton + CUDA graphs vs transformers on the same float32 weights
          (greedy divergences outside near-ties; batch vs alone; KV released)
  off     (e) with the radix cache off (one pass), so the cache-on passes give the item's ratio

    python benchmarks/cascade_e.py --out $OUT/casc1.json --budget-s 140
Prints a compact summary; the JSON has every figure.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cascade_attention as CA  # noqa: E402
from gpu_suite import LLAMA_8B, check_correctness, model_dir_for  # noqa: E402
from gpu_throughput import e_prompts  # noqa: E402
from profile_steps import StepRecorder, make_scheduler  # noqa: E402

from radixlm.kernels import cascade_layout as CL  # noqa: E402
from radixlm.kernels import decode_attention as DA  # noqa: E402
from radixlm.kernels.cascade_layout import CascadeShape  # noqa: E402
from radixlm.runtime.cascade import CascadePlanner  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


def kernel_item(bw: float) -> dict:
    planner = CascadePlanner.for_model(CA.HQ, CA.HKV, CA.D, 2, torch.device("cuda"))
    out: dict = {"copy_bytes_per_s": bw, "rows": []}
    saved = dict(CL.GPU_CONFIG)
    suffix_saved = dict(DA.GPU_CONFIG)
    configs = [dict(saved), {**saved, "fused_merge": not saved.get("fused_merge")},
               {**saved, "block_m": 128, "num_warps": 8}, {**saved, "block_n": 32},
               {**saved, "suffix_block_n": 64}]  # the suffix pass's KV block (decode's GPU_CONFIG)
    for bsz, shuffle in ((512, False), (512, True), (256, True)):  # B=256: the other batch the rule groups
        batch = CA.Batch(bsz, 32, 1024, 96, torch.bfloat16, shuffle=shuffle)
        out_p, out_c = torch.empty_like(batch.q), torch.empty_like(batch.q)
        t_plain = CA.bench_graph(lambda: batch.plain(out_p))
        unique = (len(batch.groups) * batch.prefix + sum(n - batch.prefix for n in batch.seq_lens)) * batch.kv_token
        row = {"B": bsz, "shuffle": shuffle, "plain_ms": t_plain, "plain_floor_ms": batch.bytes_plain() / bw * 1e3,
               "cascade_unique_floor_ms": unique / bw * 1e3, "configs": []}
        for cfg in configs[:2] if bsz != 512 else configs:
            CL.GPU_CONFIG.clear()
            CL.GPU_CONFIG.update({k: v for k, v in cfg.items() if k != "suffix_block_n"})
            DA.GPU_CONFIG.update(block_n=cfg.get("suffix_block_n", suffix_saved["block_n"]))
            shape = CascadeShape.for_device(CA.HQ, CA.HKV, torch.device("cuda"))
            layout = batch.layout(shape)
            try:
                ms = CA.bench_graph(lambda: batch.cascade(layout, out_c))
                batch.plain(out_p)
                batch.cascade(layout, out_c)
                err = CA.rel_err(out_c, out_p)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                ms, err = float("nan"), repr(exc)[:120]
            row["configs"].append({**cfg, "cascade_ms": ms, "rel_err": err, "tasks": int((layout.tasks[:, 1] > 0).sum())})
        CL.GPU_CONFIG.clear()
        CL.GPU_CONFIG.update(saved)
        DA.GPU_CONFIG.update(suffix_saved)
        row["prefix_stage_alone_ms"] = _prefix_stage_alone(batch)
        out["rows"].append(row)
        best = min(row["configs"], key=lambda c: c["cascade_ms"] if c["cascade_ms"] == c["cascade_ms"] else 1e9)
        print(f"kernel B={bsz} g=32 P=1024 S~96 rows {'spread' if shuffle else 'contiguous'}: plain {t_plain * 1e3:.1f} us "
              f"(floor {row['plain_floor_ms'] * 1e3:.1f}); cascade "
              + ", ".join(f"m{c['block_m']}/n{c['block_n']}/w{c['num_warps']}{'/fused' if c.get('fused_merge') else ''}"
                          f"{'/sn' + str(c['suffix_block_n']) if 'suffix_block_n' in c else ''} "
                          f"{c['cascade_ms'] * 1e3:.1f}"
                          for c in row["configs"])
              + f" us; unique-bytes floor {row['cascade_unique_floor_ms'] * 1e3:.1f} us (best at "
              f"{row['cascade_unique_floor_ms'] / best['cascade_ms']:.0%}); prefix stage alone "
              f"{row['prefix_stage_alone_ms'] * 1e3:.1f} us; err {row['configs'][0]['rel_err']}",
              flush=True)
    del planner
    return out


def _prefix_stage_alone(batch: CA.Batch) -> float:
    """ms of the default config's prefix stage by itself (the rest of a cascade call is the suffix pass)."""
    from radixlm.kernels.attention_common import LOG2E
    from radixlm.kernels.cascade_attention import launch_prefix_stage

    shape = CascadeShape.for_device(CA.HQ, CA.HKV, torch.device("cuda"))
    layout = batch.layout(shape)
    n = layout.max_prefix_splits
    mid_o = torch.empty((batch.bsz, CA.HQ, n, CA.D), dtype=torch.float32, device=batch.q.device)
    mid_lse = torch.empty((batch.bsz, CA.HQ, n), dtype=torch.float32, device=batch.q.device)
    return CA.bench_graph(lambda: launch_prefix_stage(batch.q, batch.k, batch.v, batch.r2t, layout, mid_o, mid_lse, 0,
                                                      batch.scale * LOG2E, 1.0, "tf32"))


def _profile(sched: Any, steps: int) -> list[dict]:
    """Device time per kernel over `steps` scheduler steps (per step), top entries."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            sched.step()
        torch.cuda.synchronize()
    rows = [{"name": e.key[:60], "calls": e.count / steps, "device_ms": e.device_time_total / 1e3 / steps}
            for e in prof.key_averages() if e.device_time_total > 0]
    rows.sort(key=lambda r: -r["device_ms"])
    return rows[:14]


def e_item(d: Path, vocab: int, passes: int, budget_end: float) -> dict:
    prompts = e_prompts(vocab)
    t = time.perf_counter()
    sched = make_scheduler(d, cascade_attention="auto", mem_fraction_static=0.8)
    res: dict = {"startup_s": time.perf_counter() - t, "passes": []}
    planner = sched.runner.cascade
    mk = lambda tag, i, p: TokenizedGenerateReq(rid=f"{tag}{i}", input_ids=p, params=SamplingParams(  # noqa: E731
        temperature=0, max_new_tokens=64, ignore_eos=True))

    def set_arm(arm: str) -> None:
        if planner is None:
            return
        if arm == "off":
            planner.plan = lambda *a, **k: None  # type: ignore[method-assign]
        else:
            planner.__dict__.pop("plan", None)

    def one_pass(tag: str, arm: str) -> dict:
        set_arm(arm)
        sched.cache.flush()
        rec = StepRecorder(sched)
        rec.mark_sampled()
        if planner is not None:
            rec.wrap(planner, "plan", "cascade plan")
        wall = rec.run([mk(tag, i, p) for i, p in enumerate(prompts)])
        summ = rec.summary()
        steps = rec.steps
        step_wall = sum(s.get("wall", 0.0) for s in steps)
        r = {"arm": arm, "seconds": wall, "steps": len(steps), "cascade_steps": sum(s["cascade"] for s in steps),
             "sum_step_wall_s": step_wall, **rec.device_split(), **summ}
        rec.close()
        return r

    one_pass("warm", "auto")  # JIT and allocator warm-up (untimed)
    arms = ["auto", "off"] * passes
    for n, arm in enumerate(arms):
        if elapsed() > budget_end and n >= 2:
            break
        r = one_pass(f"p{n}", arm)
        res["passes"].append(r)
        g = r["groups"]
        dec = {k: v for k, v in g.items() if k.startswith("decode")}
        big = max(dec.items(), key=lambda kv: kv[1]["steps"]) if dec else ("-", {})
        ext = g.get("extend", {})
        print(f"(e) pass {n} {arm}: {r['seconds']:.3f} s, {r['steps']} steps ({r['cascade_steps']} cascade); "
              f"extend {ext.get('steps', 0):.0f} steps dev {ext.get('device_ms', 0) / 1e3:.3f} s wall "
              f"{ext.get('wall_ms', 0) / 1e3:.3f} s; {big[0]} x{big[1].get('steps', 0):.0f}: dev "
              f"{big[1].get('device_ms_per_step', 0):.2f} wall {big[1].get('wall_ms_per_step', 0):.2f} ms/step; "
              f"decode fwd {r['forward_ms_per_step']:.2f} samp {r['sampling_ms_per_step']:.2f} idle "
              f"{r['device_idle_ms_per_step']:.2f} ms; host plan {r['host_s'].get('cascade plan', 0):.3f} s; "
              f"outside steps {r['seconds'] - r['sum_step_wall_s']:.3f} s", flush=True)
    for arm in ("auto", "off"):
        secs = [p["seconds"] for p in res["passes"] if p["arm"] == arm]
        res[f"{arm}_seconds_min"] = min(secs) if secs else None
    # Kernel split of 512-row decode steps (graphs), each arm: start a pass, profile mid-decode.
    res["profile"] = {}
    for arm in ("auto", "off"):
        if elapsed() > budget_end + 10:
            break
        set_arm(arm)
        sched.cache.flush()
        for i, p in enumerate(prompts):
            sched.handle(mk(f"prof{arm}", i, p))
        decode_seen = 0
        while not sched.idle and decode_seen < 8:
            before = sched.stats["forward_steps"]
            sched.step()
            if sched.stats["forward_steps"] > before and not sched.waiting and not sched.partial:
                decode_seen += 1
        try:
            rows = _profile(sched, 4)
        except Exception as exc:  # noqa: BLE001 - the passes above still count
            rows = [{"name": f"profiler failed: {exc!r}"[:60], "calls": 0, "device_ms": 0.0}]
        if not any("stage" in r["name"] for r in rows):  # kernels inside graph replays not traced: run eagerly
            graphs, sched.runner.graph_runner = sched.runner.graph_runner, None
            try:
                rows = [{**r, "name": "eager " + r["name"]} for r in _profile(sched, 2)]
            except Exception as exc:  # noqa: BLE001
                rows = [{"name": f"eager profile failed: {exc!r}"[:60], "calls": 0, "device_ms": 0.0}]
            finally:
                sched.runner.graph_runner = graphs
        while not sched.idle:
            sched.step()
            sched.pop_outputs()
        sched.pop_outputs()
        res["profile"][arm] = rows
        tot = sum(r["device_ms"] for r in rows)
        print(f"(e) kernels per 512-row decode step, {arm} (top {len(rows)}, {tot:.2f} ms): "
              + "; ".join(f"{r['name'][:28]} {r['device_ms']:.2f}" for r in rows[:9]), flush=True)
    set_arm("auto")
    return res  # the scheduler goes with this frame (main collects before the next one)


def off_item(d: Path, vocab: int) -> dict:
    gc.collect()  # the cache-on scheduler's KV pool
    torch.cuda.empty_cache()
    prompts = e_prompts(vocab)
    sched = make_scheduler(d, disable_radix_cache=True, mem_fraction_static=0.8)
    rec = StepRecorder(sched)
    rec.run([TokenizedGenerateReq(rid=f"w{i}", input_ids=p, params=SamplingParams(temperature=0, max_new_tokens=4,
                                                                                    ignore_eos=True))
             for i, p in enumerate(prompts[:16])])
    rec.steps.clear()
    wall = rec.run([TokenizedGenerateReq(rid=str(i), input_ids=p, params=SamplingParams(
        temperature=0, max_new_tokens=64, ignore_eos=True)) for i, p in enumerate(prompts)])
    r = {"seconds": wall, "steps": len(rec.steps), **rec.summary()}
    rec.close()
    del sched, rec
    gc.collect()
    torch.cuda.empty_cache()
    return r


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/cascade_e.json")
    ap.add_argument("--items", default="kernel,e,check,off")
    ap.add_argument("--passes", type=int, default=3, help="(e) pairs of passes, auto and off alternating")
    ap.add_argument("--budget-s", type=float, default=140.0, help="skip later parts past this many seconds")
    ap.add_argument("--off-seconds", type=float, default=15.6,
                    help="cache-off time used for the ratio when the off item is skipped (H200, 2026-12-02/03 runs)")
    args = ap.parse_args()
    items = args.items.split(",")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "items": items}
    root = Path(tempfile.mkdtemp(prefix="radixlm-casc-"))
    d = model_dir_for(LLAMA_8B, root, "llama8b")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(report, indent=1, default=str))

    def run(name: str, fn: Any) -> None:
        t = time.perf_counter()
        try:
            report[name] = fn()
        except Exception as exc:  # noqa: BLE001 - record it and go on: the other parts still count
            import traceback

            traceback.print_exc()
            report[name] = {"error": repr(exc)}
        report[name]["wall_s"] = time.perf_counter() - t
        save()
        gc.collect()  # a scheduler and its runner reference each other: free its KV pool and graphs now
        torch.cuda.empty_cache()

    if "kernel" in items:
        run("kernel", lambda: kernel_item(CA.copy_bandwidth()))
    if "e" in items:
        run("e", lambda: e_item(d, LLAMA_8B["vocab_size"], args.passes, args.budget_s - 75))
    if "check" in items:
        run("check", lambda: check_correctness(root))
        print(f"float32 check: {report['check']}", flush=True)
    off_s = args.off_seconds
    if "off" in items and elapsed() < args.budget_s - 38:
        run("off", lambda: off_item(d, LLAMA_8B["vocab_size"]))
        off_s = report["off"].get("seconds", off_s)
        print(f"(e) cache off: {off_s:.2f} s", flush=True)
    e = report.get("e", {})
    if e.get("auto_seconds_min"):
        report["ratio"] = {"cache_off_seconds": off_s, "measured_off": "off" in report,
                           "auto": off_s / e["auto_seconds_min"],
                           "off": off_s / e["off_seconds_min"] if e.get("off_seconds_min") else None}
        print(f"(e) cache on vs off (in-process, best pass): cascade auto {report['ratio']['auto']:.2f}x, "
              f"plain attention {report['ratio']['off'] or float('nan'):.2f}x (off {off_s:.2f} s, "
              f"{'measured' if 'off' in report else 'assumed'}); total {elapsed():.0f} s", flush=True)
    save()


if __name__ == "__main__":
    main()

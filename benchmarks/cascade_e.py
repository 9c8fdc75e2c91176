#!/usr/bin/env python3
"""Workload (e) and cascade attention, one H200 call (issue 22 items 1 and 4):

  engine  (e) through the `Engine` (cache on, defaults) as gpu_suite times it, two passes: the Engine's
          seconds against the scheduler process's own busy period (RADIXLM_LOOP_STATS: step, receive,
          send, gc), and `build_generate_request` on the batch alone — where the Engine's time goes
          beyond the in-process pass
  e       (e) in one in-process scheduler (8B shape, random bf16 weights, radix cache on), passes
          alternating between --arms (auto: cascade auto + overlapped prefill; auto-sync: prefill steps
          committed before the next is scheduled; off: cascade off): wall, device and host time per
          kind of step, the device's idle time between prefill steps; with --profile a
          torch.profiler split of a few 512-row decode steps by kernel, each arm
  kernel  cascade vs plain decode attention at (e)'s decode shape (512 rows, 16 groups x 32, 1,024-token
          prefix, ~96-token suffixes, a group's rows spread over the batch as requests arrive in the
          engine), against the unique-KV-bytes floor; prefix-stage launch configs and prefix splits
  check   gpu_suite's float32 check: Triton + CUDA graphs vs transformers on the same float32 weights
          (greedy divergences outside near-ties; batch vs alone; KV released)
  off     (e) with the radix cache off (one pass), so the cache-on passes give the item's ratio

    python benchmarks/cascade_e.py --items engine,e,kernel --out $OUT/casc2.json --budget-s 75
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
from gpu_throughput import ENGINE_ARGS, e_prompts, params_for  # noqa: E402
from profile_steps import StepRecorder, make_scheduler  # noqa: E402

from radixlm.kernels import cascade_layout as CL  # noqa: E402
from radixlm.kernels import decode_attention as DA  # noqa: E402
from radixlm.kernels import extend_attention as EA  # noqa: E402
from radixlm.kernels.cascade_layout import CascadeShape  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402

T0 = time.perf_counter()


def elapsed() -> float:
    return time.perf_counter() - T0


# Cascade arms at B = 512 (spread rows): launch configs (GPU_CONFIG keys) and "min_split", the
# layout's shortest prefix split (512: at most 2 splits of a 1,024-token prefix, 1024: one; the
# default balance gives 1 at B = 512, 2 at B = 256 since 2026-12-04, 3 and 4 before);
# "suffix_block_n": the suffix pass's KV block (decode's GPU_CONFIG).
UNFUSED = {"fused_merge": False}  # decode's stage 1 on each row's suffix, the prefix stage, stage 2 merging
KERNEL_ARMS = [{}, {"min_split": 512}, {"min_split": 1024}, UNFUSED,
               {"block_n": 32}, {"num_stages": 3}, {"block_n": 128}, {"block_m": 128, "num_warps": 8, "num_stages": 3}]


def kernel_item(bw: float, budget_end: float) -> dict:
    try:
        ext = extend_chunk()
    except Exception as exc:  # noqa: BLE001 - the cascade arms below still count
        ext = {"error": repr(exc)[:200]}
        print(f"extend chunk failed: {exc!r}"[:200], flush=True)
    out: dict = {"copy_bytes_per_s": bw, "rows": [], "extend": ext}
    saved, suffix_saved = dict(CL.GPU_CONFIG), dict(DA.GPU_CONFIG)
    for bsz, arms in ((512, KERNEL_ARMS), (256, [{}, {"min_split": 512}, UNFUSED])):  # B=256: the rule's other
        batch = CA.Batch(bsz, 32, 1024, 96, torch.bfloat16, shuffle=True)
        out_p, out_c = torch.empty_like(batch.q), torch.empty_like(batch.q)
        t_plain = CA.bench_graph(lambda: batch.plain(out_p))
        unique = (len(batch.groups) * batch.prefix + sum(n - batch.prefix for n in batch.seq_lens)) * batch.kv_token
        row = {"B": bsz, "plain_ms": t_plain, "plain_floor_ms": batch.bytes_plain() / bw * 1e3,
               "cascade_unique_floor_ms": unique / bw * 1e3, "arms": []}
        for arm in arms:
            if elapsed() > budget_end:
                break
            CL.GPU_CONFIG.update({k: v for k, v in arm.items() if k in saved})
            DA.GPU_CONFIG.update(block_n=arm.get("suffix_block_n", suffix_saved["block_n"]))
            shape = CascadeShape.for_device(CA.HQ, CA.HKV, torch.device("cuda"))
            min_split = arm.get("min_split", CL.MIN_SPLIT_TOKENS)
            layout = batch.layout(shape, min_split)
            try:
                ms = CA.bench_graph(lambda: batch.cascade(layout, out_c))
                prefix_ms = _prefix_stage_alone(batch, shape, min_split)
                batch.plain(out_p)
                batch.cascade(layout, out_c)
                err = CA.rel_err(out_c, out_p)
            except Exception as exc:  # noqa: BLE001 - e.g. out of shared memory: record, go on
                ms = prefix_ms = float("nan")
                err = repr(exc)[:120]
            row["arms"].append({**arm, "cascade_ms": ms, "prefix_stage_ms": prefix_ms, "rel_err": err,
                                "tasks": int((layout.tasks[:, 1] > 0).sum()),
                                "prefix_splits": int(layout.prefix_splits.max())})
            CL.GPU_CONFIG.clear()
            CL.GPU_CONFIG.update(saved)
            DA.GPU_CONFIG.update(suffix_saved)
        out["rows"].append(row)
        print(f"kernel B={bsz} g=32 P=1024 S~96 spread: plain {t_plain * 1e3:.1f} us (floor "
              f"{row['plain_floor_ms'] * 1e3:.1f}); unique-bytes floor {row['cascade_unique_floor_ms'] * 1e3:.1f} us; "
              "cascade (prefix stage) per arm: "
              + "; ".join(f"{_arm_name(a)} {a['cascade_ms'] * 1e3:.1f} ({a['prefix_stage_ms'] * 1e3:.1f}, "
                          f"{a['prefix_splits']} splits, {a['tasks']} tasks)" for a in row["arms"])
              + f"; err {row['arms'][0]['rel_err'] if row['arms'] else '-'}", flush=True)
    return out


def extend_chunk(groups: int = 4, per: int = 32, prefix: int = 1024, ext: int = 64) -> dict:
    """Extend attention on one of (e)'s cache-on prefill chunks (128 requests of 4 groups x 32, a
    64-token question each after its group's cached 1,024-token prefix): one q head per tile (half
    of each 128-row tile empty) vs the group's heads packed, µs per layer."""
    bsz = groups * per
    total = groups * prefix + bsz * ext
    k = torch.randn(total + 1, CA.HKV, CA.D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    r2t = torch.zeros(bsz + 1, prefix + ext, dtype=torch.int32, device="cuda")
    for b in range(bsz):
        g = b % groups
        r2t[b + 1, :prefix] = torch.arange(1 + g * prefix, 1 + (g + 1) * prefix, dtype=torch.int32)
        own = 1 + groups * prefix + b * ext
        r2t[b + 1, prefix:] = torch.arange(own, own + ext, dtype=torch.int32)
    q = torch.randn(bsz * ext, CA.HQ, CA.D, dtype=torch.bfloat16, device="cuda")
    args = (q, k, v, r2t, torch.arange(1, bsz + 1, device="cuda"),
            torch.full((bsz,), prefix + ext, device="cuda"), torch.full((bsz,), ext, device="cuda"),
            torch.arange(0, bsz * ext, ext, device="cuda"), CA.D**-0.5)
    res: dict = {"requests": bsz, "prefix": prefix, "extend": ext}
    outs = {}
    for pack in (False, True):
        EA.PACK_HEADS = pack
        out = torch.empty_like(q)
        res["packed_ms" if pack else "one_head_ms"] = CA.bench_graph(
            lambda: EA.extend_attention(*args, max_extend_len=ext, out=out))
        EA.extend_attention(*args, max_extend_len=ext, out=out)
        outs[pack] = out
    EA.PACK_HEADS = True
    flops = 4 * bsz * ext * (prefix + ext / 2) * CA.HQ * CA.D
    res["rel_diff"] = CA.rel_err(outs[True], outs[False])
    res["packed_tflops"] = flops / (res["packed_ms"] * 1e-3) / 1e12
    print(f"extend attention, (e) chunk ({bsz} x {ext} new tokens on {prefix} cached): one head a tile "
          f"{res['one_head_ms'] * 1e3:.1f} us, heads packed {res['packed_ms'] * 1e3:.1f} us "
          f"({res['packed_tflops']:.0f} TFLOP/s), rel diff {res['rel_diff']:.1e}", flush=True)
    return res


def _arm_name(arm: dict) -> str:
    return "/".join(f"{k}={v}" for k, v in arm.items() if k in KNOBS) or "default"


KNOBS = ("block_m", "block_n", "num_warps", "num_stages", "min_split", "suffix_block_n", "fused_merge")


def _prefix_stage_alone(batch: CA.Batch, shape: CascadeShape, min_split: int) -> float:
    """ms of the prefix stage by itself (the rest of a cascade call is the suffix pass)."""
    from radixlm.kernels.attention_common import LOG2E
    from radixlm.kernels.cascade_attention import launch_prefix_stage

    layout = batch.layout(shape, min_split)
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


def _prefill_idle(steps: list[dict]) -> dict:
    """The device's time between the first prefill step's start and the first decode step's start
    that no forward pass covered: the host's gaps between synchronous prefill steps."""
    ext = [s for s in steps if s["mode"] == "extend"]
    first_decode = next((s for s in steps if s["mode"] != "extend"), None)
    if not ext or first_decode is None:
        return {}
    span = ext[0]["events"][0].elapsed_time(first_decode["events"][0])
    busy = sum(s["events"][0].elapsed_time(s["events"][1]) for s in ext)
    return {"prefill_span_ms": span, "prefill_device_ms": busy, "prefill_device_idle_ms": span - busy}


def e_item(d: Path, vocab: int, arms: list[str], passes: int, budget_end: float, profile: bool) -> dict:
    """arms: auto (cascade auto, overlapped prefill, packed extend tiles: the defaults), auto-sync
    (prefill steps committed before the next is scheduled), auto-nopack (one q head per extend
    attention tile), off (cascade off)."""
    prompts = e_prompts(vocab)
    t = time.perf_counter()
    sched = make_scheduler(d, cascade_attention="auto", mem_fraction_static=0.8)
    res: dict = {"startup_s": time.perf_counter() - t, "passes": [], "overlap_prefill_default": sched.overlap_prefill}
    planner = sched.runner.cascade
    overlap_prefill = sched.overlap_prefill
    mk = lambda tag, i, p: TokenizedGenerateReq(rid=f"{tag}{i}", input_ids=p, params=SamplingParams(  # noqa: E731
        temperature=0, max_new_tokens=64, ignore_eos=True))


    def set_arm(arm: str) -> None:
        sched.overlap_prefill = overlap_prefill and arm != "auto-sync"
        EA.PACK_HEADS = arm != "auto-nopack"
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
        before = sched.stats["overlapped_prefill_steps"]
        wall = rec.run([mk(tag, i, p) for i, p in enumerate(prompts)])
        summ = rec.summary()
        steps = rec.steps
        step_wall = sum(s.get("wall", 0.0) for s in steps)
        r = {"arm": arm, "seconds": wall, "steps": len(steps), "cascade_steps": sum(s["cascade"] for s in steps),
             "overlapped_prefill_steps": sched.stats["overlapped_prefill_steps"] - before,
             "sum_step_wall_s": step_wall, **_prefill_idle(steps), **rec.device_split(), **summ}
        rec.close()
        return r

    one_pass("warm", arms[0])  # JIT and allocator warm-up (untimed)
    for n, arm in enumerate(arms * passes):
        if elapsed() > budget_end and n >= len(arms):
            break
        r = one_pass(f"p{n}", arm)
        res["passes"].append(r)
        g = r["groups"]
        dec = {k: v for k, v in g.items() if k.startswith("decode")}
        big = max(dec.items(), key=lambda kv: kv[1]["steps"]) if dec else ("-", {})
        ext = g.get("extend", {})
        print(f"(e) pass {n} {arm}: {r['seconds']:.3f} s, {r['steps']} steps ({r['cascade_steps']} cascade, "
              f"{r['overlapped_prefill_steps']} prefill overlapped); extend {ext.get('steps', 0):.0f} steps dev "
              f"{ext.get('device_ms', 0) / 1e3:.3f} s, device idle until the first decode step "
              f"{r.get('prefill_device_idle_ms', float('nan')):.1f} ms of {r.get('prefill_span_ms', float('nan')):.1f}; "
              f"{big[0]} x{big[1].get('steps', 0):.0f}: dev {big[1].get('device_ms_per_step', 0):.2f} wall "
              f"{big[1].get('wall_ms_per_step', 0):.2f} ms/step; decode fwd {r['forward_ms_per_step']:.2f} samp "
              f"{r['sampling_ms_per_step']:.2f} idle {r['device_idle_ms_per_step']:.2f} ms; host plan "
              f"{r['host_s'].get('cascade plan', 0):.3f} s", flush=True)
    for arm in arms:
        secs = [p["seconds"] for p in res["passes"] if p["arm"] == arm]
        res[f"{arm}_seconds_min"] = min(secs) if secs else None
    if profile:
        res["profile"] = {arm: _profile_decode(sched, set_arm, arm, prompts, mk) for arm in ("auto", "off")}
    set_arm("auto")
    return res  # the scheduler goes with this frame (main collects before the next one)


def _profile_decode(sched: Any, set_arm: Any, arm: str, prompts: list[list[int]], mk: Any) -> list[dict]:
    """Kernel split of 512-row decode steps (graphs): start a pass, profile mid-decode."""
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
    except Exception as exc:  # noqa: BLE001 - the passes still count
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
    tot = sum(r["device_ms"] for r in rows)
    print(f"(e) kernels per 512-row decode step, {arm} (top {len(rows)}, {tot:.2f} ms): "
          + "; ".join(f"{r['name'][:28]} {r['device_ms']:.2f}" for r in rows[:9]), flush=True)
    return rows


def engine_item(d: Path, vocab: int, passes: int) -> dict:
    """(e)'s cache-on pass through the Engine (gpu_suite's item_e, defaults), against the scheduler
    process's busy period, and the front's request building alone."""
    import os

    import radixlm
    from radixlm.runtime.generate_request import build_generate_request
    from radixlm.runtime.loop_stats import ENV, read_last

    prompts = e_prompts(vocab)
    params = params_for([64] * len(prompts))
    t = time.perf_counter()
    build_generate_request(vocab, input_ids=prompts, sampling_params=params)
    res: dict = {"build_request_s": time.perf_counter() - t, "passes": []}
    loop_file = tempfile.mktemp(prefix="radixlm-loop-", suffix=".jsonl")
    os.environ[ENV] = loop_file  # the scheduler process inherits it
    t = time.perf_counter()
    with radixlm.Engine(str(d), mem_fraction_static=0.8, **ENGINE_ARGS) as eng:
        res["startup_s"] = time.perf_counter() - t
        eng.generate(input_ids=[[5] * 16], sampling_params=params_for([4]))
        for n in range(passes + 1):  # the first pass warms up (JIT of new specializations, first allocations)
            eng.flush_cache()
            before = eng.get_server_info()
            t = time.perf_counter()
            eng.generate(input_ids=prompts, sampling_params=params)
            dt = time.perf_counter() - t
            time.sleep(0.05)  # the loop writes its busy period's line once idle (before the next message's)
            loop = read_last(loop_file) or {}
            info = eng.get_server_info()
            r = {"seconds": dt, "warm_up": n == 0, "loop": loop, "outside_loop_s": dt - loop.get("wall_s", float("nan")),
                 **{k: info.get(k, 0) - before.get(k, 0)
                    for k in ("cascade_decode_steps", "forward_steps", "overlapped_prefill_steps", "prefill_steps")}}
            res["passes"].append(r)
            secs = loop.get("seconds", {})
            print(f"(e) Engine pass {n}{' (warm-up)' if n == 0 else ''}: {dt:.3f} s; scheduler busy "
                  f"{loop.get('wall_s', float('nan')):.3f} s (step {secs.get('step', float('nan')):.3f}, receive "
                  f"{secs.get('receive', float('nan')):.3f}, send {secs.get('send', float('nan')):.3f}, gc "
                  f"{secs.get('gc', float('nan')):.3f}); outside the loop {r['outside_loop_s']:.3f} s; "
                  f"{r['forward_steps']} steps, {r['cascade_decode_steps']} cascade, {r['overlapped_prefill_steps']} of "
                  f"{r['prefill_steps']} prefill overlapped; request building alone {res['build_request_s']:.3f} s",
                  flush=True)
    os.environ.pop(ENV, None)
    timed = [p["seconds"] for p in res["passes"] if not p["warm_up"]]
    res["seconds_min"] = min(timed) if timed else None
    return res


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
    ap.add_argument("--items", default="engine,e,kernel,check,off", help="run in this order")
    ap.add_argument("--arms", default="auto,auto-sync,auto-nopack",
                    help="(e) in-process arms: auto, auto-sync, auto-nopack, off")
    ap.add_argument("--passes", type=int, default=2, help="(e) rounds of passes over the arms, alternating")
    ap.add_argument("--engine-passes", type=int, default=1, help="(e) Engine passes timed after its warm-up pass")
    ap.add_argument("--profile", action="store_true", help="(e) torch.profiler split of decode steps per arm")
    ap.add_argument("--budget-s", type=float, default=140.0, help="skip later parts past this many seconds")
    ap.add_argument("--off-seconds", type=float, default=15.39,
                    help="cache-off time used for the ratio when the off item is skipped (H200, 2026-12-03 18:47)")
    args = ap.parse_args()
    items = args.items.split(",")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "items": items}
    root = Path(tempfile.mkdtemp(prefix="radixlm-casc-"))
    d = model_dir_for(LLAMA_8B, root, "llama8b")
    vocab = LLAMA_8B["vocab_size"]
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

    for item in items:
        if item == "engine" and elapsed() < args.budget_s - 20:
            run("engine", lambda: engine_item(d, vocab, args.engine_passes))
        elif item == "e" and elapsed() < args.budget_s - 20:
            later = 14 if "kernel" in items[items.index("e"):] else 0
            run("e", lambda: e_item(d, vocab, args.arms.split(","), args.passes, args.budget_s - later - 6,
                                    args.profile))
        elif item == "kernel" and elapsed() < args.budget_s - 6:
            run("kernel", lambda: kernel_item(CA.copy_bandwidth(), args.budget_s - 2))
        elif item == "check":
            run("check", lambda: check_correctness(root))
            print(f"float32 check: {report['check']}", flush=True)
    off_s = args.off_seconds
    if "off" in items and elapsed() < args.budget_s - 38:
        run("off", lambda: off_item(d, LLAMA_8B["vocab_size"]))
        off_s = report["off"].get("seconds", off_s)
        print(f"(e) cache off: {off_s:.2f} s", flush=True)
    e = report.get("e", {})
    ratio = {f"in_process_{k.removesuffix('_seconds_min')}": off_s / v for k, v in e.items()
             if k.endswith("_seconds_min") and v}
    if report.get("engine", {}).get("seconds_min"):
        ratio["engine_auto"] = off_s / report["engine"]["seconds_min"]
    if ratio:
        report["ratio"] = {"cache_off_seconds": off_s, "measured_off": "off" in report, **ratio}
        print(f"(e) cache on vs off ({'measured' if 'off' in report else 'assumed'} off {off_s:.2f} s; in-process: best "
              f"pass): " + ", ".join(f"{k} {v:.2f}x" for k, v in ratio.items()) + f"; total {elapsed():.0f} s", flush=True)
    save()


if __name__ == "__main__":
    main()

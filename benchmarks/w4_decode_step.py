"""Issue 19 on the H200: where the batch-1 4-bit decode step's time goes, and which kernel choices shorten it,
all on one model load.

An in-process scheduler on the Llama-3.1-8B shape with GPTQ 4-bit weights (random, quantized at load: the
benchmarks/quantized_w4.GPTQ_CONFIG folder that quantized.py's w4a16 engine uses), CUDA graphs at batch 1 only,
one request of 128 prompt tokens (decoded 140 steps before the variants: context ~270). For each variant the batch-1 decode
graph is captured again — the kernels read their config tables ($RADIXLM_SMALL_M_TABLE, a sweep-format JSON over
the DEFAULTS) and the attention's split count at every call, so a new capture takes the variant's — and its
replay is timed with CUDA events (median of --replays): the device time of the 32 layers. What runs outside the
graph (LM head, argmax, copies) is the same in every variant. Variants are interleaved --rounds times (the
spread between rounds of one variant is the noise; no variant starts past --budget-s). First the wall time per
scheduler step on the defaults (100 steps: what (a) measures, without the Engine's process hop); last, on the
defaults again, the graph's kernels by torch.profiler (µs per layer by kind, the four GEMMs named in order) and
the step's kernels outside the graph.

    python benchmarks/w4_decode_step.py --out $OUT/w4_step.json
    python benchmarks/w4_decode_step.py --variants defaults,p1 --rounds 3

Variants: defaults (main's tables); p1 / p1b (qkv and o on GEMV configs that load their first weight step before
the PDL wait); mma1-qkv-o (qkv and o on the tensor-core M = 1 kernel, gate_up's tile); gemv-all (gate_up and down
on the GEMV too, as before the tensor-core kernel); pdl-off (no programmatic dependent launch); silu-epilogue
(gate_up's SiLU-and-mul in its kernel); splits-N (decode attention with at most N KV splits; 1: one pass, no
merge kernel); rope-split (rotary + KV store in their own launch, not in the attention's first stage);
split-norm (each residual add + RMSNorm split across the 4-bit linears around it: no norm launch in a layer);
split-norm-silu (and gate_up's SiLU-and-mul in its kernel's last split); no-split-norm (the norms as launches of
their own; split-norm is on by default since 2026-12-04 evening, so "split-norm" then equals "defaults"); pf-*
(each linear hints the next one's first bytes into L2: `PF_PLANS`, runtime/models/w4_l2_prefetch.py); blk (the
tensor-core kernel's weights in `w4_blocked.block_codes`' layout, a copy: `W4Weight.use_blocked_m1`); blk-only (those
weights' codes stored blocked as their only copy, every kernel reading them so: `W4Weight.set_blocked`, what
`w4a16.BLOCKED_CODES` does at load).

--wall-variants: before the replays, each listed variant's graphs (full and short-context) are captured and the
wall time per scheduler step measured on them (--wall-steps steps, interleaved --rounds times): the (a) figure
of each variant in one process, LM head and sampler included (the replays then run at that longer context).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from decode_overlap import profiled, replay_us  # noqa: E402
from gpu_suite import LLAMA_8B, model_dir_for, rand_ids  # noqa: E402
from profile_steps import make_scheduler  # noqa: E402
from quantized_w4 import GPTQ_CONFIG  # noqa: E402

from radixlm.kernels import decode_attention, get_kernel_ops, w4a16_mma_m1  # noqa: E402
from radixlm.kernels.small_m import TABLE_ENV  # noqa: E402
from radixlm.runtime.io_struct import TokenizedGenerateReq  # noqa: E402
from radixlm.runtime.models import w4_l2_prefetch  # noqa: E402
from radixlm.runtime.quantization import w4a16  # noqa: E402
from radixlm.runtime.quantization.base import set_decode_pdl  # noqa: E402
from radixlm.runtime.sampling_params import SamplingParams  # noqa: E402

QKV, OPROJ, GATE_UP, DOWN = "6144x4096", "4096x4096", "28672x4096", "4096x14336"
MMA1_TILE = "mma1-n64-c2-w2-sa-st2-g1-j8-r1"  # gate_up's DEFAULTS entry
# name -> (sweep-format tables over the DEFAULTS, the attention's split cap or None for the default); "gemv-all"
# also takes gate_up / down off the tensor-core kernel's DEFAULTS (in this process only): all four on the GEMV;
# "pdl-off": every decode kernel launched without PDL (--decode-pdl off; auto is on for quantized models);
# "silu-epilogue": gate_up's SiLU-and-mul in its kernel's last split (--decode-silu-epilogue on)
VARIANTS: dict[str, tuple[dict, int | None]] = {
    "defaults": ({}, None),
    "p1": ({"gemv": {QKV: {"1": "gemv-n32-c4-w4-s2-p1"}, OPROJ: {"1": "gemv-n32-c2-w4-sa-p1"}}}, None),
    "p1b": ({"gemv": {QKV: {"1": "gemv-n16-c4-w4-sa-p1"}, OPROJ: {"1": "gemv-n16-c4-w4-sa-p1"}}}, None),
    "mma1-qkv-o": ({"mma1": {QKV: {"1": MMA1_TILE}, OPROJ: {"1": MMA1_TILE}}}, None),
    "gemv-all": ({}, None),
    "splits-8": ({}, 8),
    "silu-epilogue": ({}, None),
    "pdl-off": ({}, None),  # (last but one: every small kernel compiles again without PDL)
    "splits-1": ({}, 1),
    "splits-4": ({}, 4),
    "rope-split": ({}, None),  # rotary + KV store in their own launch before the attention (as before 2026-12-04 evening)
    "split-norm": ({}, None),  # each add + RMSNorm split across the 4-bit linears around it (--decode-split-norm on)
    "split-norm-silu": ({}, None),  # and gate_up's SiLU-and-mul in its kernel (--decode-silu-epilogue on)
    "no-split-norm": ({}, None),  # the norms as launches of their own (--decode-split-norm off)
    "no-split-norm-s8": ({}, 8),  # and at most 8 KV splits (against splits-8: the short-context graphs' A/B)
    **{name: ({}, None) for name in (
        "pf-o", "pf-o-start", "pf-o-gu8", "pf-o-gu16", "pf-o-gu32", "pf-gu16", "pf-o-gu16-d8", "pf-o-gu16-q4", "pf-all",
        "pf-o-gu16-qall", "pf-o-gu16-silu")},
    # with o's bytes in L2 its best GEMV tile may differ: qkv's (two 1 KB row steps) and the 08:00 sweep's p1 one
    "pf-o-gu16-on8": ({"gemv": {OPROJ: {"1": "gemv-n8-c16-w2-sa-p0"}}}, None),
    "pf-o-gu16-on32": ({"gemv": {OPROJ: {"1": "gemv-n32-c2-w4-sa-p1"}}}, None),
    # longer row segments a step on the tensor-core kernel (256 B of each of 64 rows, 16 KB a step; the table's: 128 B)
    "gu-c4": ({"mma1": {GATE_UP: {"1": "mma1-n64-c4-w2-sa-st2-g1-j8-r1"}}}, None),
    "gu-c4-st3": ({"mma1": {GATE_UP: {"1": "mma1-n64-c4-w2-sa-st3-g1-j8-r1"}}}, None),
    "down-c4": ({"mma1": {DOWN: {"1": "mma1-n64-c4-w2-sa-st2-g1"}}}, None),
    # the tensor-core kernel's weights (gate_up, down) in `block_codes`' layout: a step's 64 rows x 128 B contiguous
    "blk": ({}, None),
    "pf-o-gu16-blk": ({}, None),
    "blk-only": ({}, None),  # the same layout as the weights' only copy (w4a16.BLOCKED_CODES at load)
}
BLOCKED = ("blk", "pf-o-gu16-blk")
BLOCKED_ONLY = ("blk-only",)
# the pf-* variants: runtime/models/w4_l2_prefetch.py's plans (target:MB|all:1 before / 2 after the carrier's loop;
# the carrier is the linear before the target: qkv -> o -> gate_up -> down -> the next qkv)
PF_PLANS = {"pf-o": "o:all:2", "pf-o-start": "o:all:1", "pf-o-gu8": "o:all:2,gate_up:8:1",
            "pf-o-gu16": "o:all:2,gate_up:16:1", "pf-o-gu32": "o:all:2,gate_up:32:1", "pf-gu16": "gate_up:16:1",
            "pf-o-gu16-d8": "o:all:2,gate_up:16:1,down:8:2", "pf-o-gu16-q4": "o:all:2,gate_up:16:1,qkv:4:2",
            "pf-all": "o:all:2,gate_up:16:1,down:8:2,qkv:4:2", "pf-o-gu16-qall": "o:all:2,gate_up:16:1,qkv:all:2",
            "pf-o-gu16-on8": "o:all:2,gate_up:16:1", "pf-o-gu16-on32": "o:all:2,gate_up:16:1",
            "pf-o-gu16-silu": "o:all:2,gate_up:16:1",  # (and gate_up's SiLU-and-mul in its kernel)
            "pf-o-gu16-blk": "o:all:2,gate_up:16:1"}
MMA1_DEFAULTS = dict(w4a16_mma_m1.DEFAULTS)


DEFAULT_SPLITS = decode_attention._MAX_SPLITS


def use_variant(name: str, folder: Path, runner=None) -> None:
    """Point the kernels at the variant's tables and split cap (read at every call: the next capture takes them);
    with the model's `runner`, also its PDL, SiLU-epilogue and split-norm switches (the defaults: PDL on, the SiLU
    epilogue and the split norm as --decode-silu-epilogue / --decode-split-norm auto)."""
    tables, splits = VARIANTS[name]
    if tables:
        path = folder / f"{name}.json"
        path.write_text(json.dumps({"tables": tables}))
        os.environ[TABLE_ENV] = str(path)
    else:
        os.environ.pop(TABLE_ENV, None)
    decode_attention._MAX_SPLITS = splits or DEFAULT_SPLITS
    os.environ[w4_l2_prefetch.ENV] = PF_PLANS.get(name, w4_l2_prefetch.DEFAULT_PLAN)  # (read at every forward)
    decode_attention.ROPE_IN_STAGE1 = name != "rope-split"  # (read by the attention backend at every call)
    w4a16_mma_m1.DEFAULTS.clear()  # (the dict the kernel's table lookup reads)
    if name != "gemv-all":
        w4a16_mma_m1.DEFAULTS.update(MMA1_DEFAULTS)
    if runner is not None:  # as ModelRunner._make_attention_backend sets them, with this variant's choices
        pdl = name != "pdl-off"
        split = not name.startswith("no-split-norm") and (name.startswith("split-norm") or w4a16.split_norm_enabled("auto"))
        silu = name in ("silu-epilogue", "split-norm-silu", "pf-o-gu16-silu") or w4a16.silu_epilogue_enabled("auto")
        set_decode_pdl(runner.model, pdl, silu, split)
        for module in runner.model.modules():  # (outside any capture: the copies are made or dropped here)
            if isinstance(getattr(module, "quantized", None), w4a16.W4Weight):
                module.quantized.set_blocked(name in BLOCKED_ONLY or (w4a16.BLOCKED_CODES and name not in BLOCKED))
                module.quantized.use_blocked_m1(name in BLOCKED)
        runner.model.l2_prefetch_plan = None  # the hints' spans follow the codes the kernels read
        runner.model.ops = runner.attn_backend.ops = get_kernel_ops(True, pdl)
    # a kernel that failed to compile under the last variant's config is tried again under this one's
    w4a16._mma1_failed.clear()
    w4a16._gemv_failed.clear()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--variants", default=",".join(VARIANTS), help="of " + ", ".join(VARIANTS))
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--replays", type=int, default=40)
    ap.add_argument("--budget-s", type=float, default=60, help="no new round past this")
    ap.add_argument("--out", default="benchmarks/results/w4_decode_step.json")
    ap.add_argument("--wall-variants", default="", help="variants whose wall time per step is measured (see above)")
    ap.add_argument("--wall-steps", type=int, default=100)
    ap.add_argument("--check", default="", help="variants whose batch-1 graph output (the final hidden state) is "
                    "compared with the defaults' on the same step: the relative difference (bf16 rounding amplified "
                    "by 32 random layers: a few 1e-2; a wrong kernel: ~1)")
    ap.add_argument("--profile-variant", default="defaults", help="whose graph the closing profile takes (its GEMMs "
                    "are named in launch order: with the split norm o + gate_up and down + the next qkv run back to "
                    "back and count as one each, so take no-split-norm for per-layer names)")
    args = ap.parse_args()
    names = args.variants.split(",")
    wall_names = [n for n in args.wall_variants.split(",") if n]
    check_names = [n for n in args.check.split(",") if n]
    unknown = [n for n in names + wall_names + check_names + [args.profile_variant] if n not in VARIANTS]
    if unknown:
        ap.error(f"--variants: unknown {unknown}; known: {', '.join(VARIANTS)}")
    started = time.perf_counter()
    folder = Path(tempfile.mkdtemp(prefix="radixlm-w4step-"))
    d4 = model_dir_for({**LLAMA_8B, "quantization_config": GPTQ_CONFIG}, folder, "llama8b-gptq")
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"),
                    "variants": {n: {"replay_us": []} for n in names}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=1, default=str))

    use_variant("defaults", folder)
    sched = make_scheduler(d4, cuda_graph_max_bs=1, mem_fraction_static=0.5)
    runner = sched.runner
    report["load_s"] = time.perf_counter() - started
    report["quantization"] = runner.quantization
    print(f"model ready in {report['load_s']:.0f} s: {runner.quantization}", flush=True)
    forwards: list[str] = []
    inner = runner.forward
    runner.forward = lambda fb: (forwards.append(fb.mode.value), inner(fb))[1]
    sched.handle(TokenizedGenerateReq(rid="0", input_ids=rand_ids(128, LLAMA_8B["vocab_size"], random.Random(3)),
                                      params=SamplingParams(temperature=0, max_new_tokens=4096 - 200, ignore_eos=True)))

    def steps(n: int) -> None:
        goal = len(forwards) + n
        while len(forwards) < goal and not sched.idle:
            sched.step()
            sched.pop_outputs()

    steps(1 + 40)  # the prefill, then decode steps on the defaults' graph (context ~170)
    graphs = runner.graph_runner

    if not runner.model.ops.name.endswith("pdl"):
        print(f"note: the model loaded with ops {runner.model.ops.name} (no PDL); the variants set PDL on", flush=True)
    report["ops_at_load"] = runner.model.ops.name

    def capture(name: str, short: bool = False) -> torch.cuda.CUDAGraph:
        use_variant(name, folder, runner)
        with torch.inference_mode():  # as the runner's own capture (CudaGraphRunner._capture_all)
            graphs._capture_buckets(False)  # batch 1 only (cuda_graph_max_bs=1), at the current context
            if short:  # and the short-context graph the steps replay up to 1,024 tokens of context
                graphs.short_graphs.clear()  # (a variant whose split cap leaves no short plan replays none)
                graphs._capture_short()
        return graphs.graphs[1, False, False]

    def wall_ms(n: int) -> float:
        torch.cuda.synchronize()
        t = time.perf_counter()
        steps(n)
        torch.cuda.synchronize()
        return (time.perf_counter() - t) / n * 1e3

    # the wall time per scheduler step on the defaults (the graph the model loaded with), before any profiler
    # (CUPTI stays attached and slows the host) and any recapture
    report["wall_ms_per_step"] = wall_ms(100)
    print(f"wall {report['wall_ms_per_step']:.3f} ms a step = {1e3 / report['wall_ms_per_step']:.1f} tok/s "
          f"(in-process, defaults)", flush=True)
    save()
    if check_names:  # each variant's step output against the defaults' (same inputs, same KV: a replay writes the
        # new position's K/V itself, the same values in every variant)
        def hidden(name: str) -> torch.Tensor:
            capture(name).replay()
            torch.cuda.synchronize()
            return graphs.outputs[1, False, False][:1].float().clone()

        ref = hidden("defaults")
        report["check_rel_diff"] = {}
        for name in check_names:
            diff = ((hidden(name) - ref).norm() / ref.norm().clamp_min(1e-30)).item()
            report["check_rel_diff"][name] = diff
            print(f"check {name}: final hidden state {diff:.2e} (relative) from the defaults'", flush=True)
        save()
    if wall_names:  # first (the figure that matters most): each variant's (a) in this process, whole steps on its
        # full and short-context graphs
        report["wall"] = {n: [] for n in wall_names}
        for r in range(args.rounds):
            for name in wall_names:
                try:
                    capture(name, short=True)
                    steps(5)
                    report["wall"][name].append(wall_ms(args.wall_steps))
                except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
                    report.setdefault("wall_errors", {})[name] = f"{type(exc).__name__}: {str(exc)[:300]}"
                    print(f"wall round {r + 1} {name}: {report['wall_errors'][name]}", flush=True)
                    continue
                ms = report["wall"][name][-1]
                print(f"wall round {r + 1} {name}: {ms:.3f} ms a step = {1e3 / ms:.1f} tok/s "
                      f"(context ~{128 + len(forwards)})", flush=True)
                save()
    for r in range(args.rounds):
        for name in names:
            if time.perf_counter() - started > args.budget_s:
                print(f"round {r + 1} {name} and after: skipped (budget)", flush=True)
                break
            try:
                t = replay_us(capture(name), args.replays)
                report["variants"][name]["replay_us"].append(t)
                print(f"round {r + 1} {name}: {t:.1f} µs a replay ({t / LLAMA_8B['num_hidden_layers']:.2f} µs a layer)",
                      flush=True)
            except Exception as exc:  # noqa: BLE001 - one variant's failure must not lose the others
                report["variants"][name]["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
                print(f"round {r + 1} {name}: {report['variants'][name]['error']}", flush=True)
            save()
    base = statistics.median(report["variants"]["defaults"]["replay_us"] or [float("nan")]) if "defaults" in names else None
    for name, v in report["variants"].items():
        if v["replay_us"]:
            v["median_us"] = statistics.median(v["replay_us"])
            if base:
                v["vs_defaults_us"] = v["median_us"] - base
    # the defaults again: one more replay sample after every other variant, then the graph's kernels by kind and
    # the step's kernels outside the graph
    graph = capture(args.profile_variant, short=bool(wall_names))
    report["profile_variant"] = args.profile_variant
    if "defaults" in names and args.profile_variant == "defaults":
        report["variants"]["defaults"]["after_us"] = replay_us(graph, args.replays)
    layers = LLAMA_8B["num_hidden_layers"]
    gemms = ["qkv", "o", "gate_up", "down"] * layers
    try:
        graph_us, launches = profiled(graph.replay, 10, gemms)
        report["per_layer_us"] = {k: v / layers for k, v in sorted(graph_us.items(), key=lambda kv: -kv[1])}
        report["launches_per_layer"] = {k: v / layers for k, v in launches.items()}
        step_us, _ = profiled(lambda: steps(1), 12, gemms + ["LM head"])
        report["outside_graph_us"] = {k: v - graph_us.get(k, 0.0) for k, v in step_us.items()
                                      if v - graph_us.get(k, 0.0) > 0.5}
    except Exception as exc:  # noqa: BLE001 - the variants' and the wall figures are saved already
        report["profile_error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
    report["context_tokens"] = 128 + len(forwards)
    save()
    if "after_us" in report["variants"].get("defaults", {}):
        print(f"defaults again after the variants: {report['variants']['defaults']['after_us']:.1f} µs")
    print("\n" + "\n".join(f"{name:<14} replay {v.get('median_us', float('nan')):8.1f} µs  "
                           f"({v.get('vs_defaults_us', 0.0):+.1f} vs defaults; rounds {[round(x, 1) for x in v['replay_us']]})"
                           + (f"  {v['error']}" if "error" in v else "") for name, v in report["variants"].items()))
    print(f"{args.profile_variant} per layer (µs): " + ", ".join(f"{k} {v:.2f}" for k, v in report.get("per_layer_us", {}).items()))
    print("outside the graph per step (µs): " + ", ".join(f"{k} {v:.1f}" for k, v in report.get("outside_graph_us", {}).items()))
    for name, ms in report.get("wall", {}).items():
        if ms:
            print(f"wall {name:<14} {statistics.median(ms):.3f} ms a step = {1e3 / statistics.median(ms):.1f} tok/s "
                  f"(rounds {[round(x, 3) for x in ms]})")
    print(f"wall {report['wall_ms_per_step']:.3f} ms a step = {1e3 / report['wall_ms_per_step']:.1f} tok/s "
          f"(in-process, context ~170-270); done in {time.perf_counter() - started:.0f} s")
    sched = runner = graphs = graph = None
    gc.collect()


if __name__ == "__main__":
    main()

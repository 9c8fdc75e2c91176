"""What LoRA adds to a decode step's projections, on the H200 (issue 21): the 128 base GEMMs of a
Llama-3.1-8B-shaped decode step (32 layers x qkv, o, gate_up, down; random bf16 weights, 14 GB,
each read once per step as in serving: no L2 reuse between layers) captured in one CUDA graph,
alone and with each LoRA kernel variant after every GEMM (rank 16 on all seven modules, 8 device
slots), replayed; the difference is the LoRA cost per step as the engine's graphs pay it (launch
gaps between dependent kernels included, which a single kernel timed in a loop hides).

  variants  --lora-kernels serial (sgmv_shrink then sgmv_expand after the GEMM), overlap (the shrink
            on a side stream beside the GEMM, the expand after it; for o / down the expand too, into
            the residual), fused (sgmv_fused, default tiles),
            and a sweep of the fused kernel's tiles (block_k x span, one inner column step up to 512)
  sizes     T = 1 (one adapter), 8, 16, 32, 64 tokens (8 adapters)
  check     at every size: the fused result == the serial result (bf16 tolerance), base rows untouched

    python benchmarks/lora_step.py --out $OUT/lora_step.json
Prints one line per (T, variant): ms per step, LoRA ms per step, and the LoRA cost as a share of the
base GEMMs' step; the JSON has every figure. ~1 minute on an H200.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B  # noqa: E402
from lora import RANK, projection_shapes  # noqa: E402
from quantized import _graph_time as graph_time  # noqa: E402  (seconds per call inside a CUDA graph)

SLOTS = 8
# --silu-mul: gate_up's output goes through ops.silu_and_mul in the base step and the engine variants (its activation
# kernel in the step, as the model runs it), and the _silu variants compute it in gate_up's expand by rows instead
SILU_MUL = False


class Projection:
    """One projection of one layer: base weight, the slots' LoRA A / B, its input and output."""

    def __init__(self, k: int, offsets: list[int], t: int, x: torch.Tensor) -> None:
        self.k, self.offsets, self.x = k, offsets, x
        self.w = torch.randn(offsets[-1], k, device="cuda", dtype=torch.bfloat16) / k**0.5
        pieces = len(offsets) - 1
        self.a = torch.randn(SLOTS, pieces * RANK, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        self.b = torch.randn(SLOTS, offsets[-1], RANK, device="cuda", dtype=torch.bfloat16) * 0.01
        self.offs = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        self.widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
        self.out = torch.empty(t, offsets[-1], device="cuda", dtype=torch.bfloat16)
        self.residual: torch.Tensor | None = None  # o / down: the residual their output is added to
        self.gemv = None  # --gemv: the engine's M = 1 kernel for this shape (runtime/dense_gemv.py), PDL as it runs
        self.name = ""  # qkv / o / gate_up / down

    def product(self) -> torch.Tensor:
        """The base projection into `out` (torch.mm), or by the engine's M = 1 GEMV (then `out` is its result)."""
        if self.gemv is None:
            return torch.mm(self.x, self.w.t(), out=self.out)
        self.out = self.gemv(self.x, None)
        return self.out


def build(cfg: dict, t: int, gemv: bool = False) -> list[Projection]:
    """The step's projections; `gemv`: at T = 1 the base products take the engine's M = 1 GEMV (with PDL where
    the engine's --decode-pdl auto turns it on) instead of cuBLAS."""
    shapes = projection_shapes(cfg)
    inputs = {k: torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes.values()}
    projs = [Projection(k, offsets, t, inputs[k]) for _ in range(cfg["num_hidden_layers"]) for k, offsets in shapes.values()]
    residual = torch.zeros(t, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
    for p, name in zip(projs, [n for _ in range(cfg["num_hidden_layers"]) for n in shapes]):
        p.name = name
        if name in ("o", "down"):
            p.residual = residual
    if gemv and t == 1:
        from radixlm.kernels.bf16_gemv import config_for
        from radixlm.kernels.gdc import enabled
        from radixlm.runtime.dense_gemv import DenseGemv

        pdl = enabled("auto", torch.device("cuda"))
        for p in projs:
            cfg_ = config_for(*p.w.shape)
            p.gemv = None if cfg_ is None else DenseGemv(p.w, cfg_, pdl)
    return projs


VARIANTS = {
    # name: (side stream priority or None for no side stream, how qkv / gate_up finish, side kernels' tile options)
    "serial": None, "overlap": None, "fused": None,  # the --lora-kernels values as first written
    "engine": None,  # the engine's own code: LoRAProjection.begin / finish (--lora-kernels overlap, its defaults)
    "engine_delta": None,  # ... with the delta path at every size (projection.DELTA_MAX_TOKENS)
    "engine_inline": None,  # ... with the shrink's in-launch sum of its split partial sums (INLINE_REDUCE_MIN_TOKENS)
    "engine_delta_inline": None,  # both
    "engine_stacked": None,  # --lora-kernels stacked as the engine runs it (LoRAProjection over a stacked weight)
    "engine_stacked1": None,  # ... with the stacked path from 1 row (projection.STACKED_MIN_TOKENS = 1; with --gemv the
    # stacked weight's one-row product by the layer's M = 1 GEMV config, and the expand after it with PDL)
    "engine_stacked_col": None,  # ... qkv and gate_up stacked, o and down on the overlap path (into the residual)
    # engine_stacked with suffixes (lora9): _pdl the expand after each stacked GEMM with PDL, its segment and rows read
    # before the wait (projection.STACKED_PDL_MIN_TOKENS); _sN each expand program looping over N column blocks
    # (sgmv_triton.EXPAND_STEPS), e.g. engine_stacked_pdl_s4; above 1,024 rows (prefill) the engine's in-line path
    "engine_stacked_pdl": None, "engine_stacked_s2": None, "engine_stacked_s4": None, "engine_stacked_s8": None,
    "engine_stacked_pdl_s2": None, "engine_stacked_pdl_s4": None,
    "engine_stacked_rows": None, "engine_stacked_rows_pdl": None,  # _rows: the expand by rows (lora10, sgmv_rows.py;
    # projection.ROWS_EXPAND_MAX_TOKENS unbounded), one memory round trip a program; _rows_pdl: launched with PDL;
    # _silu (with --silu-mul): gate_up's expand by rows computing silu(gate) * up (projection.ROWS_SILU_MUL); _nN / _wW: its
    # column block and warps (sgmv_rows.BLOCK_N, WARPS), e.g. engine_stacked_rows_n64_w8 (any such name is taken)
    "engine_stacked_rows_silu": None, "engine_stacked_rows_pdl_silu": None,
    "engine_stacked_psilu": None,  # (with --silu-mul) past the stacked range, gate_up's activation in the launch that
    # adds its update after the in-line shrink (projection.PREFILL_SILU_MUL)
    "engine_stacked_all": None,  # ... the stacked path at every size (projection.STACKED_MAX_TOKENS unbounded: prefill too)
    "stacked": None,  # the shrink inside the base GEMM (W with every slot's A stacked under it: [N + slots·n·R, K]),
    # one expand after it on the main stream reading each row's slot's y from the GEMM output's tail; no side stream
    "overlap_hi": (-1, "expand", {}),  # the side stream at the highest priority: its blocks go first
    "overlap_lean": (0, "expand", {"warps": 2, "stages": 1}),  # side kernels taking less of an SM
    "overlap_wide": (0, "expand", {"expand_n": 512, "split_k": 8}),  # fewer, wider expand programs
    "delta": (0, "add", {}),  # qkv / gate_up: the whole update on the side stream into a delta buffer,
    "delta_hi": (-1, "add", {}),  # the main stream only adds it after the GEMM (one plain add launch)
    "diag_forkjoin": (0, "none", None),  # fork / join edges only, no LoRA kernel: what the edges cost
    "diag_side": (0, "none", {}),  # the side-stream kernels only (no launch on the main stream)
    "diag_crit_expand": (None, "expand", None),  # only the two expands on the main stream (y precomputed)
    "diag_crit_add": (None, "add", None),  # only the two adds on the main stream
}


def step_fn(projs: list[Projection], seg, variant: str, tile=None):
    """One step's projections as the engine runs them under each --lora-kernels value, and the
    candidate / diagnostic arrangements of `VARIANTS`."""
    from radixlm.runtime.lora.sgmv_fused import sgmv_fused
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, shrink_buffer, tiles

    spec = VARIANTS.get(variant)
    priority, finish, side_opts = spec if spec is not None else (0, "expand", {})
    side = torch.cuda.Stream(priority=priority or 0)
    for p in projs:  # buffers the diagnostics and the delta variants read (allocated outside the graph)
        if not hasattr(p, "y"):
            p.y = sgmv_shrink(p.x, p.a, seg)
            p.delta = torch.zeros_like(p.out)
            p.flag = torch.zeros(1, device="cuda")

    def side_tile(p: Projection):
        if not side_opts:
            return None
        return tiles(p.x.shape[0], p.k, p.a.shape[1], **side_opts)

    def crit_tile(p: Projection):  # the main-stream expand: the side's tile sizes, default launch options
        if not side_opts:
            return None
        return tiles(p.x.shape[0], p.k, p.a.shape[1], **{k: v for k, v in side_opts.items() if k in ("expand_n", "split_k")})

    def run_candidate() -> None:
        main = torch.cuda.current_stream()
        for p in projs:
            into_residual = p.residual is not None
            forked = priority is not None
            if forked:
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    if side_opts is None:  # a trivial kernel, so that the edges exist in the graph
                        p.flag.zero_()
                    else:
                        t = side_tile(p)
                        y = sgmv_shrink(p.x, p.a, seg, t)
                        if into_residual:
                            sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.residual, seg, t)
                        elif finish == "add":  # base rows' delta must be zero: a memset node first
                            p.delta.zero_()
                            sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.delta, seg, t, accumulate=False)
                        else:
                            p.y = y
            p.product()
            if forked:
                main.wait_stream(side)
            if into_residual:
                continue
            if finish == "expand":
                sgmv_expand(p.y, p.b, p.offs, p.widest, RANK, p.out, seg, crit_tile(p) if forked else None)
            elif finish == "add":
                p.out.add_(p.delta)

    if variant == "stacked":
        for p in projs:
            if not hasattr(p, "w_stack"):
                p.w_stack = torch.cat([p.w, p.a.reshape(-1, p.k)])
                p.out_stack = torch.empty(p.x.shape[0], p.w_stack.shape[0], device="cuda", dtype=torch.bfloat16)

        def run_stacked() -> None:
            for p in projs:
                n = p.offsets[-1]
                torch.mm(p.x, p.w_stack.t(), out=p.out_stack)
                out = p.residual if p.residual is not None else p.out_stack[:, :n]
                sgmv_expand(p.out_stack[:, n:], p.b, p.offs, p.widest, RANK, out, seg, per_slot=True)
        return run_stacked

    if variant.startswith("engine"):
        from radixlm.runtime.dense_gemv import DenseGemv
        from radixlm.runtime.lora import pool, projection, sgmv_triton
        from radixlm.runtime.lora.projection import BatchAdapters, LoRAProjection

        def suffix(letter: str) -> int | None:  # _s4, _n64, _w8: a number after a letter
            return next((int(part[1:]) for part in variant.split("_") if part[:1] == letter and part[1:].isdigit()), None)

        steps = suffix("s")
        from radixlm.runtime.lora import sgmv_rows
        settings = {(projection, "DELTA_MAX_TOKENS"): 1 << 30 if "delta" in variant else projection.DELTA_MAX_TOKENS,
                    (sgmv_triton, "INLINE_REDUCE_MIN_TOKENS"): 1 if "inline" in variant
                    else sgmv_triton.INLINE_REDUCE_MIN_TOKENS,
                    (projection, "STACKED_MIN_TOKENS"): 1 if "stacked1" in variant else projection.STACKED_MIN_TOKENS,
                    (projection, "STACKED_PDL_MIN_TOKENS"): 2 if "_pdl" in variant else projection.STACKED_PDL_MIN_TOKENS,
                    (projection, "STACKED_MAX_TOKENS"): 1 << 30 if "_all" in variant else projection.STACKED_MAX_TOKENS,
                    (projection, "ROWS_EXPAND_MAX_TOKENS"): 1 << 30 if "_rows" in variant else projection.ROWS_EXPAND_MAX_TOKENS,
                    (projection, "ROWS_SILU_MUL"): "_silu" in variant,
                    (projection, "PREFILL_SILU_MUL"): "_psilu" in variant,
                    (sgmv_rows, "BLOCK_N"): suffix("n") or sgmv_rows.BLOCK_N, (sgmv_rows, "WARPS"): suffix("w") or sgmv_rows.WARPS,
                    (sgmv_triton, "EXPAND_STEPS"): ((1, steps),) if steps else sgmv_triton.EXPAND_STEPS}
        pdl_all = "_pdl" in variant
        batch = BatchAdapters()
        batch.segments = seg
        stream = torch.cuda.Stream(priority=pool.SIDE_STREAM_PRIORITY)
        if "stacked" in variant:  # the layer's weight with every slot's A under it (pool.stack_weight)
            for p in projs:
                if not hasattr(p, "w_stack"):
                    p.w_stack = torch.cat([p.w, p.a.reshape(-1, p.k)])
            # stacked_col: only the projections without a residual to take their update (qkv, gate_up);
            # o / down keep the overlap path, their whole update on the side stream (pool.STACKED_PROJECTIONS)
            lora = [LoRAProjection(p.w_stack[p.offsets[-1]:].view(p.a.shape), p.b, p.offsets, RANK, batch, True,
                                   "stacked", stream, stacked=p.w_stack, pdl=pdl_all or (p.gemv is not None and p.gemv.pdl),
                                   gemv=None if p.gemv is None else DenseGemv(p.w_stack, p.gemv.cfg, p.gemv.pdl))
                    if "col" not in variant or p.residual is None
                    else LoRAProjection(p.a, p.b, p.offsets, RANK, batch, True, "stacked", stream) for p in projs]
        else:
            lora = [LoRAProjection(p.a, p.b, p.offsets, RANK, batch, True, "overlap", stream) for p in projs]

        def run_engine() -> None:
            saved = {key: getattr(*key) for key in settings}
            for (module, name), value in settings.items():
                setattr(module, name, value)
            try:
                for p, proj in zip(projs, lora):  # as ColumnParallelLinear / RowParallelLinear.forward
                    if SILU_MUL and p.name == "gate_up":  # as LlamaMLP.forward: the activation from the expand or after
                        act = proj.forward_silu_mul(p.x, p.product)
                        if act is not None:
                            p.last = act
                            continue
                    pending = proj.begin(p.x, into=p.residual)
                    if pending is not None and pending.out is not None:
                        p.last = silu(p, proj.finish(pending, pending.out))
                        continue
                    p.last = silu(p, proj.finish(pending, p.product()))
            finally:
                for (module, name), value in saved.items():
                    setattr(module, name, value)
        return run_engine

    def run() -> None:
        for p in projs:
            if variant == "base":
                silu(p, p.product())
                continue
            if variant == "overlap":  # as LoRAProjection.begin / finish: shrink beside the GEMM, and
                main = torch.cuda.current_stream()  # for o / down the expand too, into the residual
                y = shrink_buffer(p.x, p.a)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    y = sgmv_shrink(p.x, p.a, seg, y=y)
                    if p.residual is not None:
                        sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.residual, seg)
            p.product()
            if variant == "overlap":
                main.wait_stream(side)
                if p.residual is None:
                    sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.out, seg)
            elif variant == "serial":
                sgmv_expand(sgmv_shrink(p.x, p.a, seg), p.b, p.offs, p.widest, RANK, p.out, seg)
            elif variant == "fused":
                sgmv_fused(p.x, p.a, p.b, p.offs, p.widest, RANK, p.out, seg, tile)
            silu(p, p.out)
    return run_candidate if spec is not None else run


def silu(p: Projection, out: torch.Tensor) -> torch.Tensor:
    """--silu-mul: gate_up's output through the activation kernel (as the model runs it after the projection)."""
    if SILU_MUL and p.name == "gate_up":
        from radixlm.kernels.ops import silu_and_mul

        return silu_and_mul(out)
    return out


def output(p: Projection, variant: str) -> torch.Tensor:
    """The projection's output as the variant left it (stacked: the head of the stacked GEMM's output); with
    --silu-mul gate_up's activation."""
    out = p.last if variant.startswith("engine") else p.out_stack[:, :p.offsets[-1]] if variant == "stacked" else p.out
    return silu(p, out) if out.shape[1] == p.offsets[-1] else out


REPS = 20  # --reps


def graph_ms(fn) -> float:
    """Milliseconds per step: the step captured in one CUDA graph, median of REPS replays."""
    return graph_time(fn, inner=1, reps=REPS) * 1e3


def check(projs: list[Projection], seg, used: torch.Tensor) -> dict:
    """Fused vs serial on the first layer's four projections (same base output, bf16 tolerance)."""
    from radixlm.runtime.lora.sgmv_fused import sgmv_fused
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    worst, untouched = 0.0, True
    for p in projs[:4]:
        base = torch.mm(p.x, p.w.t())
        two, one = base.clone(), base.clone()
        sgmv_expand(sgmv_shrink(p.x, p.a, seg), p.b, p.offs, p.widest, RANK, two, seg)
        sgmv_fused(p.x, p.a, p.b, p.offs, p.widest, RANK, one, seg)
        scale = (two.float() - base.float()).abs().max().item()
        worst = max(worst, (one.float() - two.float()).abs().max().item() / max(scale, 1e-6))
        untouched &= bool(torch.equal(one[~used], base[~used]))
    return {"fused_vs_serial_rel_err": worst, "base_rows_untouched": untouched,
            "ok": worst < 3e-2 and untouched}


def _kind(name: str) -> str:
    low = name.lower()
    for key, kind in (("_shrink", "shrink"), ("_expand", "expand"), ("_fused", "fused"), ("gemm", "gemm"),
                      ("gemv", "gemm"), ("cutlass", "gemm"), ("sm90", "gemm"), ("xmma", "gemm"), ("nvjet", "gemm"),
                      ("memset", "memset"), ("fill", "memset"), ("add", "add")):
        if key in low:
            return kind
    return "other"


def kernel_profile(fn, reps: int = 5) -> dict:
    """Device time per step by kernel kind (gemm / shrink / expand / memset / add / other) as the
    step's CUDA graph replays it: launches per step and mean us per launch (torch.profiler, CUPTI)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    graph.replay()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            graph.replay()
        torch.cuda.synchronize()
    kinds: dict[str, list[float]] = {}
    for e in prof.key_averages():
        us = getattr(e, "device_time_total", None)
        if us is None:
            us = getattr(e, "cuda_time_total", 0.0)
        if not us or e.key.startswith(("cudaGraphLaunch", "cuda")):
            continue
        k = kinds.setdefault(_kind(e.key), [0.0, 0.0])
        k[0] += e.count / reps
        k[1] += us / reps
    return {k: {"per_step": n, "us_per_launch": us / max(n, 1e-9), "us_per_step": us} for k, (n, us) in kinds.items()}


DEFAULT_VARIANTS = "serial,overlap,fused"


def step_table(sizes: list[int], variants: str = DEFAULT_VARIANTS, sweep: bool = True,
               profiled: dict[int, list[str]] | None = None, deadline: float | None = None, save=None,
               gemv: bool = False) -> dict:
    """Every (T, variant) row, and the check, as JSON-ready dicts (printed as it goes). Each
    variant's qkv and gate_up outputs of layer 0 are compared with serial's (`vs_serial`)."""
    from radixlm.runtime.lora.sgmv import LoRASegments
    from radixlm.runtime.lora.sgmv_fused import fused_tiles

    report: dict = {"rows": [], "checks": {}}
    grid = [(bk, sp) for bk in (128, 256, 512, 1024) for sp in (256, 512, 1024, 2048)] if sweep else []
    print(f"{'T':>4} {'variant':<24}{'ms/step':>9}{'LoRA ms':>9}{'vs GEMMs':>9}{'vs serial':>10}", flush=True)
    for t in sizes:
        if deadline is not None and time.perf_counter() > deadline:
            report.setdefault("skipped", []).append(f"T={t}")
            continue
        adapters = 1 if t == 1 else min(t, SLOTS)
        projs = build(LLAMA_8B, t, gemv)
        token_slots = torch.arange(t) % adapters
        if t >= 8:
            token_slots[-1] = -1  # a base-model row in the batch
        seg = LoRASegments.build(token_slots, SLOTS, torch.device("cuda"))
        if sweep or "fused" in variants.split(","):  # the check compares the fused kernel with serial
            report["checks"][t] = check(projs, seg, (token_slots >= 0).cuda())
        base = graph_ms(step_fn(projs, seg, "base"))
        names = [("serial", None)] + [(v, None) for v in variants.split(",") if v and v != "serial"]
        names += [(f"fused bk={bk} span={sp}", fused_tiles(t, block_k=bk, span=sp, block_n=min(sp, 512)))
                  for bk, sp in grid]
        reference = None
        for name, tile in names:
            if deadline is not None and time.perf_counter() > deadline:
                report.setdefault("skipped", []).append(f"T={t} {name}")
                continue
            try:
                ms = graph_ms(step_fn(projs, seg, name.split()[0], tile))
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a finding, not a stop
                print(f"{t:>4} {name:<24} failed: {str(exc)[:160]}", flush=True)
                continue
            outs = [output(projs[0], name).float().clone(), output(projs[2], name).float().clone()]
            if reference is None:
                reference = outs
            diff = max(((o - r).abs().max() / r.abs().max()).item() for o, r in zip(outs, reference))
            row = {"tokens": t, "adapters": adapters, "variant": name, "base_ms": base, "ms": ms,
                   "lora_ms": ms - base, "vs_gemms": (ms - base) / base, "vs_serial_rel_diff": diff}
            report["rows"].append(row)
            if tile is None:
                print(f"{t:>4} {name:<24}{ms:>9.3f}{ms - base:>9.3f}{(ms - base) / base:>9.1%}{diff:>10.1e}", flush=True)
        for name in (profiled or {}).get(t, []):
            if deadline is not None and time.perf_counter() > deadline:
                break
            try:
                prof = kernel_profile(step_fn(projs, seg, name))
            except Exception as exc:  # noqa: BLE001 - the profile is extra information
                print(f"{t:>4} profile {name} failed: {str(exc)[:160]}", flush=True)
                continue
            report.setdefault("profile", {}).setdefault(str(t), {})[name] = prof
            print(f"{t:>4} profile {name:<12}" + ", ".join(
                f"{k} {v['per_step']:.0f}x{v['us_per_launch']:.1f}us" for k, v in sorted(prof.items())), flush=True)
        again = graph_ms(step_fn(projs, seg, "base"))
        report.setdefault("base_ms_end", {})[t] = again
        best = min((r for r in report["rows"] if r["tokens"] == t and r["variant"].startswith("fused")),
                   key=lambda r: r["ms"], default=None)
        fused = f"; best fused: {best['variant']} {best['lora_ms']:.3f} ms" if best else ""
        check_note = f"; check {report['checks'][t]}" if t in report["checks"] else ""
        print(f"{t:>4} GEMMs alone {base:.3f} ms (again at the end: {again:.3f}){fused}{check_note}", flush=True)
        del projs
        torch.cuda.empty_cache()
        if save is not None:
            save(report)
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lora_step.json")
    ap.add_argument("--sizes", default="1,8,16,32,64")
    ap.add_argument("--variants", default=DEFAULT_VARIANTS, help=f"comma-separated, of: {', '.join(VARIANTS)}")
    ap.add_argument("--no-sweep", action="store_true", help="leave out the fused kernel's tile sweep")
    ap.add_argument("--budget-s", type=float, default=None, help="start no new measurement past this many seconds")
    ap.add_argument("--gemv", action="store_true", help="T = 1: the base products by the engine's M = 1 GEMV (PDL as "
                    "--decode-pdl auto), not cuBLAS")
    ap.add_argument("--reps", type=int, default=20, help="graph replays a figure is the median of")
    ap.add_argument("--silu-mul", action="store_true", help="gate_up's activation kernel in the base step and the "
                    "engine variants (the _silu variants compute it in gate_up's expand)")
    ap.add_argument("--profile", default="", help="T:variant+variant;T:... kernel time by kind per step (torch.profiler)")
    args = ap.parse_args()
    global SILU_MUL, REPS  # this run's settings of the module
    SILU_MUL, REPS = args.silu_mul, args.reps
    started = time.perf_counter()
    head = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "argv": sys.argv[1:]}

    def save(report: dict) -> None:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**head, **report, "wall_s": time.perf_counter() - started}, indent=2))

    profiled = {int(t): names.split("+") for t, names in (p.split(":") for p in args.profile.split(";") if p)}
    deadline = None if args.budget_s is None else started + args.budget_s
    report = step_table([int(t) for t in args.sizes.split(",")], args.variants, not args.no_sweep, profiled,
                        deadline, save, args.gemv)
    save(report)
    print(f"wall {time.perf_counter() - started:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

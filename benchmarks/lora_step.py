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


def build(cfg: dict, t: int) -> list[Projection]:
    shapes = projection_shapes(cfg)
    inputs = {k: torch.randn(t, k, device="cuda", dtype=torch.bfloat16) for k, _ in shapes.values()}
    projs = [Projection(k, offsets, t, inputs[k]) for _ in range(cfg["num_hidden_layers"]) for k, offsets in shapes.values()]
    residual = torch.zeros(t, cfg["hidden_size"], device="cuda", dtype=torch.bfloat16)
    for p, name in zip(projs, [n for _ in range(cfg["num_hidden_layers"]) for n in shapes]):
        if name in ("o", "down"):
            p.residual = residual
    return projs


def step_fn(projs: list[Projection], seg, variant: str, tile=None):
    """One step's projections as the engine runs them under each --lora-kernels value."""
    from radixlm.runtime.lora.sgmv_fused import sgmv_fused
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, shrink_buffer

    side = torch.cuda.Stream()

    def run() -> None:
        for p in projs:
            if variant == "overlap":  # as LoRAProjection.begin / finish: shrink beside the GEMM, and
                main = torch.cuda.current_stream()  # for o / down the expand too, into the residual
                y = shrink_buffer(p.x, p.a)
                side.wait_stream(main)
                with torch.cuda.stream(side):
                    sgmv_shrink(p.x, p.a, seg, y=y)
                    if p.residual is not None:
                        sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.residual, seg)
            torch.mm(p.x, p.w.t(), out=p.out)
            if variant == "overlap":
                main.wait_stream(side)
                if p.residual is None:
                    sgmv_expand(y, p.b, p.offs, p.widest, RANK, p.out, seg)
            elif variant == "serial":
                sgmv_expand(sgmv_shrink(p.x, p.a, seg), p.b, p.offs, p.widest, RANK, p.out, seg)
            elif variant == "fused":
                sgmv_fused(p.x, p.a, p.b, p.offs, p.widest, RANK, p.out, seg, tile)
    return run


def graph_ms(fn) -> float:
    """Milliseconds per step: the step captured in one CUDA graph, median of replays."""
    return graph_time(fn, inner=1, reps=20) * 1e3


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


def step_table(sizes: list[int]) -> dict:
    """Every (T, variant) row, and the check, as JSON-ready dicts (printed as it goes)."""
    from radixlm.runtime.lora.sgmv import LoRASegments
    from radixlm.runtime.lora.sgmv_fused import fused_tiles

    report: dict = {"rows": [], "checks": {}}
    sweep = [(bk, sp) for bk in (128, 256, 512, 1024) for sp in (256, 512, 1024, 2048)]
    print(f"{'T':>4} {'variant':<24}{'ms/step':>9}{'LoRA ms':>9}{'vs GEMMs':>9}", flush=True)
    for t in sizes:
        adapters = 1 if t == 1 else min(t, SLOTS)
        projs = build(LLAMA_8B, t)
        token_slots = torch.arange(t) % adapters
        if t >= 8:
            token_slots[-1] = -1  # a base-model row in the batch
        seg = LoRASegments.build(token_slots, SLOTS, torch.device("cuda"))
        report["checks"][t] = check(projs, seg, (token_slots >= 0).cuda())
        base = graph_ms(step_fn(projs, seg, "base"))
        variants = [("serial", None), ("overlap", None), ("fused", None)]
        variants += [(f"fused bk={bk} span={sp}", fused_tiles(t, block_k=bk, span=sp, block_n=min(sp, 512)))
                     for bk, sp in sweep]
        for name, tile in variants:
            try:
                ms = graph_ms(step_fn(projs, seg, name.split()[0], tile))
            except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a finding, not a stop
                print(f"{t:>4} {name:<24} failed: {str(exc)[:160]}", flush=True)
                continue
            row = {"tokens": t, "adapters": adapters, "variant": name, "base_ms": base, "ms": ms,
                   "lora_ms": ms - base, "vs_gemms": (ms - base) / base}
            report["rows"].append(row)
            if tile is None:
                print(f"{t:>4} {name:<24}{ms:>9.3f}{ms - base:>9.3f}{(ms - base) / base:>9.1%}", flush=True)
        best = min((r for r in report["rows"] if r["tokens"] == t and r["variant"].startswith("fused")),
                   key=lambda r: r["ms"], default=None)
        print(f"{t:>4} GEMMs alone {base:.3f} ms; best fused: {best and best['variant']} "
              f"{best and best['lora_ms']:.3f} ms; check {report['checks'][t]}", flush=True)
        del projs
        torch.cuda.empty_cache()
    return report


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lora_step.json")
    ap.add_argument("--sizes", default="1,8,16,32,64")
    args = ap.parse_args()
    started = time.perf_counter()
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              **step_table([int(t) for t in args.sizes.split(",")])}
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    print(f"wall {report['wall_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

"""Issue 19 on the H200: what the batch-1 4-bit linears gain when their bytes are in L2 (kernels/l2_prefetch.py).

For each Llama-3.1-8B linear at M = 1 on its DEFAULTS kernel (W4Weight's M = 1 path, PDL on): µs per call cold
(rotating among weight copies that never fit L2 together: benchmarks/small_m_gemm_sweep.py's timer) and hot (one
copy, called again and again: every byte in L2) — the most an L2 hint could give it. With --edges, each edge of a
layer's chain (qkv -> o -> gate_up -> down -> qkv) as pairs back to back in one graph, rotating copies: the carrier's
M = 1 kernel without hints and with `W4_l2_prefetch` plans of the target's bytes (before / after its loop).

    python benchmarks/w4_l2_hot.py --out $OUT/w4_l2_hot.json --edges
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantized import _graph_time  # noqa: E402

from radixlm.runtime.models.w4_l2_prefetch import plan_for  # noqa: E402
from radixlm.runtime.quantization.w4_formats import quantize_rtn  # noqa: E402
from radixlm.runtime.quantization.w4a16 import W4Weight  # noqa: E402

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
EDGES = {("qkv", "o"): [("all", 2), ("all", 1)], ("o", "gate_up"): [(8, 1), (16, 1), (32, 1)],
         ("gate_up", "down"): [(8, 2), (16, 2)], ("down", "qkv"): [(4, 2), ("all", 2)]}
L2_BYTES = 50 << 20


def _weights(name: str, copies: int) -> list[W4Weight]:
    n, k = SHAPES[name]
    w = torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * k ** -0.5
    out = [W4Weight([quantize_rtn(w, 128, True)], 128, "bench") for _ in range(copies)]  # equal copies, apart in memory
    for c in out:
        c.pdl, c.l2_next = True, None
    return out


def _time(calls: list) -> float:
    cycle = itertools.cycle(calls)
    for fn in calls:
        fn()
    return _graph_time(lambda: next(cycle)(), inner=24, reps=12) * 1e6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="w4_l2_hot.json")
    ap.add_argument("--edges", action="store_true", help="also the carrier + target pairs with and without hints")
    args = ap.parse_args()
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "layers": {},
                    "edges": {}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    # copies of each weight that together are 4 x the L2 (a pair's copies: min of its two, >= 4 x the L2 as well)
    weights = {name: _weights(name, max(2, -(-4 * L2_BYTES // (n * k // 2)))) for name, (n, k) in SHAPES.items()}
    xs = {name: torch.randn(1, SHAPES[name][1], device="cuda", dtype=torch.bfloat16) for name in SHAPES}
    for name, ws in weights.items():
        x = xs[name]
        cold = _time([lambda w=w: w.linear(x) for w in ws])
        hot = _time([lambda: ws[0].linear(x)])
        report["layers"][name] = {"cold_us": cold, "hot_us": hot}
        print(f"{name:<8} cold {cold:6.2f} µs  hot (in L2) {hot:6.2f} µs", flush=True)
        out.write_text(json.dumps(report, indent=1))
    for (a, b), plans in (EDGES.items() if args.edges else ()):
        pairs = list(zip(weights[a], weights[b]))
        row: dict = {}

        def pair_calls():
            return [lambda wa=wa, wb=wb: (wa.linear(xs[a]), wb.linear(xs[b])) for wa, wb in pairs]

        for wa, _ in pairs:
            wa.l2_next = None
        row["none"] = _time(pair_calls())
        for mb, at in plans:
            for wa, wb in pairs:
                wa.l2_next = plan_for(wb, float("inf") if mb == "all" else float(mb), at)
            row[f"{mb}:{at}"] = _time(pair_calls())
        for wa, _ in pairs:
            wa.l2_next = None
        report["edges"][f"{a}->{b}"] = row
        print(f"{a}->{b}: pair µs " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()), flush=True)
        out.write_text(json.dumps(report, indent=1))
    report["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=1))
    print(f"done in {report['wall_s']:.0f} s")


if __name__ == "__main__":
    main()

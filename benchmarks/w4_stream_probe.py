"""Issue 19 on the H200: how fast the batch-1 tensor-core 4-bit kernel's access pattern streams, with no math.

kernels/w4a16_mma_m1.py reads gate_up at 61% and down at 51% of the copy bandwidth, though its instruction count,
its MMAs and its bytes in flight per SM each fell by a third to a half in earlier rounds without a gain
(RESULTS.md, w4b / w4c). This times its loads alone — the same grid (row tiles x splits, a row tile's splits
consecutive), the same Triton pipeline (num_stages), each step's tile into one small MMA — on a buffer of gate_up's /
down's code bytes, in the weight's row-major layout (a step: 128 B of each of 64 rows, `c2`, or 256 B, `c4`) and in
a blocked layout where each step's 64 x 128 B is one contiguous 8 KB run. If the blocked reads stream near the
copy bandwidth and the row-major ones near the kernel's own time, the layout is the lever (a repack at load).

    python benchmarks/w4_stream_probe.py --out $OUT/w4_stream_probe.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

import torch
import triton
import triton.language as tl

sys.path.insert(0, str(Path(__file__).resolve().parent))
from quantized import _graph_time  # noqa: E402

SHAPES = {"gate_up": (28672, 4096), "down": (4096, 14336)}  # (N, K)
# name -> (rows a tile, chunks a step, blocked, stages, splits)
PATTERNS = {"row-c2-st2": (64, 2, False, 2, 4), "row-c4-st2": (64, 4, False, 2, 4), "blk-c2-st2": (64, 2, True, 2, 4),
            "row-c2-st3": (64, 2, False, 3, 4), "blk-c2-st3": (64, 2, True, 3, 4)}
L2_BYTES = 50 << 20


@triton.jit
def _probe(Codes, Out, stride_row, n_chunks, chunks_per_split, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr,
           BLOCKED: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_n = tl.program_id(1)
    r = tl.arange(0, BLOCK_N)
    ri = tl.arange(0, CHUNKS * 32)
    c_first = pid_k * chunks_per_split
    # the tile feeds an MMA, as in the kernel (so Triton pipelines its loads through shared memory: cp.async)
    ones = tl.full((CHUNKS * 32, 8), 1.0, dtype=tl.bfloat16)
    acc = tl.zeros((BLOCK_N, 8), dtype=tl.float32)
    for c0 in range(c_first, c_first + chunks_per_split, CHUNKS):
        if BLOCKED:  # [tiles][steps][BLOCK_N][CHUNKS * 32]: a step is one contiguous run
            base = (pid_n.to(tl.int64) * (n_chunks // CHUNKS) + c0 // CHUNKS) * (BLOCK_N * CHUNKS * 32)
            h = tl.load(Codes + base + r[:, None] * (CHUNKS * 32) + ri[None, :])
        else:
            rows = (pid_n * BLOCK_N + r).to(tl.int64)
            h = tl.load(Codes + rows[:, None] * stride_row + c0 * 32 + ri[None, :])
        acc = tl.dot((h & 0x3F7F).to(tl.bfloat16, bitcast=True), ones, acc)  # (finite values: no NaN or inf)
    tl.store(Out + pid_n * BLOCK_N + r + pid_k * 0, tl.sum(acc, 1))


def probe(codes: torch.Tensor, out: torch.Tensor, pattern: str) -> None:
    block_n, chunks, blocked, stages, split = PATTERNS[pattern]
    n, kw = codes.shape
    n_chunks = kw // 32
    _probe[(split, n // block_n)](codes, out, kw, n_chunks, n_chunks // split, BLOCK_N=block_n, CHUNKS=chunks,
                                  BLOCKED=blocked, num_warps=2, num_stages=stages)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="w4_stream_probe.json")
    args = ap.parse_args()
    started = time.perf_counter()
    report: dict = {"device": torch.cuda.get_device_name(), "date": time.strftime("%Y-%m-%d %H:%M"), "layers": {}}
    src = torch.empty(1 << 28, dtype=torch.uint8, device="cuda")  # copy bandwidth: 256 MB device to device
    dst = torch.empty_like(src)
    report["copy_bytes_per_s"] = 2 * src.numel() / _graph_time(lambda: dst.copy_(src), inner=5, reps=5)
    for name, (n, k) in SHAPES.items():
        nbytes = n * k // 2
        copies = max(2, -(-4 * L2_BYTES // nbytes))
        bufs = [torch.randint(-32768, 32767, (n, k // 4), dtype=torch.int16, device="cuda") for _ in range(copies)]
        out = torch.empty(n, dtype=torch.float32, device="cuda")
        row = {"floor_us": nbytes / report["copy_bytes_per_s"] * 1e6}
        for pattern in PATTERNS:
            calls = itertools.cycle([lambda b=b: probe(b, out, pattern) for b in bufs])
            row[pattern] = _graph_time(lambda: next(calls)(), inner=24, reps=12) * 1e6
        report["layers"][name] = row
        print(f"{name}: " + ", ".join(f"{k} {v:.2f}" for k, v in row.items()) + " µs", flush=True)
        del bufs
    report["wall_s"] = time.perf_counter() - started
    Path(args.out).write_text(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()

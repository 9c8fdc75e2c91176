"""Issue 19 on the H200: sweep the small-M (decode) kernels' configs and pick the defaults.

For the FP8 W8A16 kernel (kernels/fp8_small_m.py) and the 4-bit W4A16 kernel (kernels/w4a16_small_m.py),
on the Llama-3.1-8B layer shapes at M = 1, 2, 4, 8, 16: every config of FP8_CONFIGS / W4_CONFIGS is
checked against the float32 reference of the same codes (max relative error; the split-K tickets back at
zero) and timed with CUDA events over CUDA-graph replays, rotating among enough copies of the weight that
it never sits in the 50 MB L2; beside it the older kernel (fp8_gemm.w8a16_matmul / w4a16_gemm.w4a16_matmul)
and bf16 matmul. Bytes floor = (weight + scales + activations + output bytes) / measured copy bandwidth.
The best config per (shape, M) becomes the "tables" entry of the JSON and a Python literal to paste into
each module's DEFAULTS.

--decode: then (a) batch-1 decode tok/s of the 8B shape (benchmarks/quantized.py's engines: bf16, fp8,
w4a16 GPTQ), the quantized engines on the table just measured (through $RADIXLM_SMALL_M_TABLE, since the
scheduler is another process); --ab adds fp8 / w4a16 on the older kernels (RADIXLM_SMALL_M_TABLE=off).

    python benchmarks/small_m_gemm_sweep.py --out $OUT/small_m.json --decode
    python benchmarks/small_m_gemm_sweep.py --decode-only --decode-arms w4a16-defaults,fp8   # no sweep: main's tables
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
import triton
import triton.language as tl

# dot configs with BLOCK_N = 16 x num_warps give each warp its own 16 weight rows; a 16-row tile over 4 warps
# makes every warp convert the whole tile (seen in the sm_90 TTGIR: mma warpsPerCTA [2, 2]): kept as a reference
FP8_CONFIGS = [
    "dot-n16-k512-s1-w1-st3", "dot-n16-k512-s1-w1-st4", "dot-n16-k256-s1-w1-st4", "dot-n16-k1024-s1-w1-st3",
    "dot-n16-k512-s2-w1-st3", "dot-n32-k512-s1-w2-st3", "dot-n32-k256-s1-w2-st4", "dot-n32-k512-s2-w2-st3",
    "dot-n64-k256-s1-w4-st3", "dot-n64-k256-s2-w4-st4", "dot-n64-k512-s2-w4-st3", "dot-n64-k512-s4-w4-st3",
    "dot-n16-k512-s1-w4-st3",
    "fma-n8-k512-s1-w4-st3", "fma-n16-k512-s1-w4-st3", "fma-n8-k1024-s1-w4-st2", "fma-n16-k256-s2-w4-st3",
    "fma-n32-k256-s1-w8-st3",
    "fma-n8-k512-s2-w4-st3", "fma-n16-k512-s2-w4-st3", "fma-n8-k256-s2-w2-st4", "fma-n8-k512-s1-w2-st4",
    "fma-n16-k1024-s1-w8-st2", "fma-n8-k2048-s1-w8-st2", "fma-n8-k1024-s2-w4-st2", "fma-n16-k256-s1-w4-st4",
]
W4_CONFIGS = [
    "dot-n16-k512-s1-w1-st3", "dot-n16-k512-s2-w1-st3", "dot-n16-k512-s1-w1-st4", "dot-n16-k256-s2-w1-st4",
    "dot-n16-k1024-s1-w1-st3", "dot-n32-k512-s1-w2-st3", "dot-n32-k512-s2-w2-st3", "dot-n32-k256-s2-w2-st4",
    "dot-n64-k256-s2-w4-st3", "dot-n64-k512-s2-w4-st3", "dot-n64-k256-s4-w4-st4", "dot-n64-k128-s4-w4-st5",
    "dot-n16-k512-s2-w4-st3",
]
# the M = 1 CUDA-core 4-bit GEMV (kernels/w4a16_gemv.py): rows x chunks per step, warps, split-K (a: ~4 programs
# per SM), p1: the next step's words and scales loaded before this step's math
GEMV_CONFIGS = [  # n: 2 rows a thread per 8 (w4) / 16 (w8) rows of tile; p0 at 8 rows a thread (p1 spills there);
    # the first three: the 08:00 round's winners (RESULTS.md), then one-warp / two-warp rows of 128 words a step
    # (3.3 SASS instructions a weight against 4.4, no barrier in the loop, but 168 registers)
    "gemv-n32-c4-w4-s2-p1", "gemv-n16-c4-w4-sa-p0", "gemv-n32-c2-w4-sa-p1", "gemv-n8-c8-w1-sa-p0",
    "gemv-n8-c16-w2-sa-p0", "gemv-n32-c4-w4-sa-p1", "gemv-n16-c4-w4-sa-p1", "gemv-n64-c4-w4-sa-p0",
    "gemv-n64-c2-w4-sa-p1", "gemv-n32-c4-w8-sa-p1", "gemv-n128-c2-w8-sa-p1", "gemv-n64-c4-w8-sa-p1",
    "gemv-n32-c4-w4-s1-p1", "gemv-n32-c4-w4-s4-p1",
    "gemv-n16-c4-w4-s8-p1", "gemv-n64-c2-w4-s2-p1", "gemv-n64-c2-w2-sa-p0", "gemv-n16-c2-w2-sa-p1",
]
# the M = 1 tensor-core kernel (kernels/w4a16_mma_m1.py): rows x chunks per step, warps, split-K (a: ~4 programs
# per SM), Triton stages; 4 / 8 warps: wgmma (the codes' operand in registers), 1 / 2 warps: mma.sync
MMA1_CONFIGS = [  # -g1: the group sums from one load issued before the loop and summed after it, not a second
    # small dot of a ones row in the loop; -j8: a window of 8 groups, the MMA 8 columns wide (32 MMAs a step at
    # n64-c2, the activation tiles' shared memory halved; twice the splits); -v: split-K planned for ~v programs per SM
    # (4 without); -r1: a row tile's splits as consecutive programs; st: Triton stages. The 17:41 round (w4c,
    # RESULTS.md): gate_up 23.6 us at n64-c2-w2-st2-g1-j8-r1 (24.6 the 14:50 table's), down 14.1 at n64-c2-w2-st3-g1
    # (the table's); x in registers (-x1), an L2 prefetch before the PDL wait, long row segments (c8 / c16 at n16 /
    # n32) all lost there and are gone. First the neighbours of the two winners that round's budget left untimed.
    "mma1-n64-c2-w2-sa-st3-g1-r1", "mma1-n64-c2-w2-sa-st3-g1-j8-r1", "mma1-n64-c2-w2-sa-st3-g1-j8",
    "mma1-n64-c2-w1-sa-st2-g1-j8-r1", "mma1-n128-c2-w2-sa-st2-g1-j8-r1", "mma1-n64-c4-w2-sa-st2-g1-j8-r1",
    "mma1-n64-c2-w2-sa-st2-v2-g1-j8-r1", "mma1-n64-c2-w2-sa-st3-v2-g1-r1", "mma1-n64-c2-w1-sa-st3-g1-j8-r1",
    "mma1-n32-c2-w1-sa-st2-g1-j8-r1", "mma1-n64-c1-w2-sa-st2-g1-j8-r1", "mma1-n128-c2-w2-sa-st3-g1-j8-r1",
    "mma1-n64-c2-w2-sa-st4-g1-r1", "mma1-n64-c2-w2-sa-st2-g1-j8", "mma1-n64-c2-w2-sa-st2-g1",
]
# the bf16 2..16-row kernel (kernels/bf16_small_m.py, a verify step's rows): "dot" (tensor cores) waits for its
# predecessor first, "de" loads its first weight tile before the PDL wait; 16 weight rows a warp, split-K for enough
# programs per SM. "fma" / "fe" (CUDA cores, M <= 4): the M = 1 GEMV's loop per row, each row its bits under the
# same config: the engine's M = 1 configs (bf16_gemv.DEFAULTS; its "pf" as "fma", the same sums)
BF16M_CONFIGS = [
    "dot-n16-k512-s1-w1-st3", "dot-n16-k256-s2-w1-st4", "dot-n32-k256-s1-w2-st4", "dot-n64-k256-s2-w4-st3",
    "dot-n64-k128-s4-w4-st4", "de-n32-k256-s2-w2-st4",
    "fma-n8-k512-s1-w4-st3", "fma-n16-k256-s1-w4-st3", "fe-n8-k512-s1-w4-st1", "fma-n4-k512-s1-w2-st1",
]  # (sm_90 compile: "de" at one warp and n16-k1024 with SiLU in the loads spill; left out)
SHAPES = {"qkv": (4096, 6144), "o": (4096, 4096), "gate_up": (4096, 28672), "down": (14336, 4096)}  # (K, N)
LM_HEAD = (4096, 128256)  # --layers lm_head: the 8B LM head (bf16m only; the model's logits take cuBLAS)
MS = (1, 2, 4, 8, 16)
FMA_MAX_M = 2  # the fma family is swept at these M only (its FMAs per weight grow with M)
L2_BYTES = 50 << 20
DEVICE = "cuda"  # a CPU smoke run of this script's code paths sets "cpu" (with TRITON_INTERPRET=1 and a CPU timer)


def graph_time(fns: list, inner: int = 24, reps: int = 12) -> float:
    """Seconds per call: `inner` calls (cycling through `fns`, one per weight copy) in one CUDA graph,
    median over replays (quantized.py's timer over a cycling call)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from quantized import _graph_time

    for fn in fns:  # each copy's first call outside the capture
        fn()
    calls = itertools.cycle(fns)
    return _graph_time(lambda: next(calls)(), inner, reps)


def copies_for(nbytes: int) -> int:
    """Weight copies to rotate among so that consecutive calls never find their weight in L2."""
    return max(2, -(-4 * L2_BYTES // nbytes))


@triton.jit
def _stream(Words, Out, N, stride_wn, chunks_per_split, n_chunks, BLOCK_N: tl.constexpr, CHUNKS: tl.constexpr):
    """The GEMV's loads (tile, split, register prefetch) with one integer add a word for its math."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rw = tl.arange(0, CHUNKS * 16)
    c_first = tl.program_id(1) * chunks_per_split
    c_end = tl.minimum(c_first + chunks_per_split, n_chunks)
    ptrs = Words + rn[:, None].to(tl.int64) * stride_wn + rw[None, :]
    acc = tl.zeros((BLOCK_N, CHUNKS * 16), dtype=tl.int32)
    nxt = tl.load(ptrs + c_first * 16, mask=(rn < N)[:, None] & (c_first * 16 + rw < c_end * 16)[None, :], other=0)
    for c0 in range(c_first, c_end, CHUNKS):
        w = nxt
        nxt = tl.load(ptrs + (c0 + CHUNKS) * 16, mask=(rn < N)[:, None] & ((c0 + CHUNKS) * 16 + rw < c_end * 16)[None, :],
                      other=0)
        acc += w
    tl.store(Out + tl.program_id(1) * N + rn, tl.sum(acc, 1), mask=rn < N)


def stream_probe(words: torch.Tensor, key: str) -> torch.Tensor:
    """The GEMV's weight reads alone at config `key`: how long streaming these bytes takes at this launch
    shape (the GEMV's own floor; the rest of its time is its math)."""
    from radixlm.kernels.w4a16_gemv import GemvConfig, gemv_plan

    cfg = GemvConfig.parse(key)
    n, kw = words.shape
    split, per_split = gemv_plan(n, kw * 8, cfg, words.device)
    out = torch.empty(split, n, dtype=torch.int32, device=words.device)
    _stream[(triton.cdiv(n, cfg.block_n), split)](words, out, n, kw, per_split, kw // 16, BLOCK_N=cfg.block_n,
                                                 CHUNKS=cfg.chunks, num_warps=cfg.num_warps, num_stages=1)
    return out


def _rel(got: torch.Tensor, ref: torch.Tensor) -> float:
    return ((got.float() - ref).abs().max() / ref.abs().max()).item()


def sweep_kind(kind: str, copy_bw: float, deadline: float, ms: tuple[int, ...] = MS, pdl: bool = False,
               layers: tuple[str, ...] = tuple(SHAPES), on_row: Callable[[list[dict]], None] | None = None) -> list[dict]:
    """One kernel's configs on the 8B shapes named in `layers` at each M; `pdl`: the best config again with
    programmatic dependent launch (its calls back to back in the graph overlap their launches); `on_row`: called
    with the rows so far after each one (the JSON is written as it goes: a command's time limit keeps what finished)."""
    started_at = time.perf_counter()
    from radixlm.kernels.fp8_gemm import w8a16_matmul
    from radixlm.kernels.fp8_small_m import config_for as fp8_default
    from radixlm.kernels.fp8_small_m import fp8_small_m_matmul
    from radixlm.kernels.small_m import SmallMConfig, tickets_for
    from radixlm.kernels.w4a16_gemm import w4a16_matmul
    from radixlm.kernels.w4a16_gemv import GemvConfig, gemv_default_config, w4a16_gemv
    from radixlm.kernels.w4a16_mma_m1 import Mma1Config, mma1_table_config, w4a16_mma_m1
    from radixlm.kernels.w4a16_small_m import config_for as w4_default
    from radixlm.kernels.w4a16_small_m import w4a16_small_m_matmul
    from radixlm.runtime.quantization.fp8 import Fp8Weight
    from radixlm.runtime.quantization.w4_formats import quantize_rtn
    from radixlm.runtime.quantization.w4a16 import W4Weight

    rows = []
    shapes = {**SHAPES, "lm_head": LM_HEAD}
    if kind == "bf16m":  # compile every config first (the binaries of the 8B shapes: the same specialization), so
        from radixlm.kernels.bf16_small_m import bf16_small_m  # that the first layer's share of the budget is timing

        w = torch.randn(256, 4096, device=DEVICE, dtype=torch.bfloat16)
        for key, m in itertools.product(BF16M_CONFIGS, ms):  # (fma kinds: a binary per row count)
            if m < 2 or (m > 2 and not key.startswith("f")) or (m > 4 and key.startswith("f")):
                continue
            try:
                bf16_small_m(torch.randn(m, 4096, device=DEVICE, dtype=torch.bfloat16), w, SmallMConfig.parse(key))
            except Exception as exc:  # noqa: BLE001 - the sweep records it again per shape
                print(f"bf16m {key}: {type(exc).__name__}: {str(exc)[:160]}", flush=True)
        deadline += time.perf_counter() - started_at
    for i, (name, (k, n)) in enumerate((name, shapes[name]) for name in layers):
        layer_deadline = time.perf_counter() + (deadline - time.perf_counter()) / (len(layers) - i)  # a fair share each
        w = torch.randn(n, k, device=DEVICE, dtype=torch.bfloat16) * k**-0.5
        if kind == "bf16m":  # "old": torch's product (cuBLAS), what the engine runs at 2..16 rows without this kernel
            from radixlm.kernels.bf16_small_m import bf16_small_m
            from radixlm.kernels.bf16_small_m import config_for as bf16m_table

            q, ref_w = w, w.float()
            weight_bytes = 2 * n * k
            reps = copies_for(weight_bytes)
            parts = [(w if r == 0 else w.clone(), tickets_for(n, w.device)) for r in range(reps)]
            new = [lambda x, cfg, p=p, pdl=False, silu=False: bf16_small_m(x, p[0], cfg, p[1], pdl=pdl, silu_mul=silu)
                   for p in parts]
            old = [lambda x, p=p: torch.matmul(x, p[0].t()) for p in parts]
            configs, parse = BF16M_CONFIGS, SmallMConfig.parse

            def default(m, n, k, device):
                return bf16m_table(m, n, k) or SmallMConfig.parse(BF16M_CONFIGS[0])
        elif kind == "fp8":
            q = Fp8Weight.from_float(w)
            ref_w = q.dequantize()
            s = q.scales.reshape(-1)
            weight_bytes = n * k + 4 * n
            reps = copies_for(weight_bytes)
            parts = [(q.codes.clone(), s.clone(), tickets_for(n, w.device)) for _ in range(reps)]
            new = [lambda x, cfg, p=p, pdl=False: fp8_small_m_matmul(x, p[0], p[1], p[2], cfg, pdl) for p in parts]
            old = [lambda x, p=p: w8a16_matmul(x, p[0], p[1]) for p in parts]
            configs, default, parse = FP8_CONFIGS, fp8_default, SmallMConfig.parse
        else:
            q = W4Weight([quantize_rtn(w, 128, True)], 128, "sweep")
            q.set_blocked(False)  # (the kernels below are called on the plain layout, w4a16.BLOCKED_CODES or not)
            ref_w = q.dequantize()
            weight_bytes = n * k // 2 + n * (k // 128) * 2
            reps = copies_for(weight_bytes)
            parts = [(q.codes.clone(), q.scales.clone(), tickets_for(n, w.device)) for _ in range(reps)]
            if kind == "mma1":  # "old": the GEMV at its table's config (what the engine runs now at M = 1)
                new = [lambda x, cfg, p=p, pdl=False: w4a16_mma_m1(x, p[0], p[1], None, None, k, 128, tickets=p[2],
                                                                   cfg=cfg, pdl=pdl) for p in parts]
                old = [lambda x, p=p: w4a16_gemv(x, p[0], p[1], None, None, k, 128, tickets=p[2]) for p in parts]
                configs, parse = MMA1_CONFIGS, Mma1Config.parse

                def default(m, n, k, device):
                    return mma1_table_config(n, k) or Mma1Config()
            elif kind == "gemv":  # "old": the small-M MMA kernel at its table's config (what the engine runs now)
                new = [lambda x, cfg, p=p, pdl=False: w4a16_gemv(x, p[0], p[1], None, None, k, 128, tickets=p[2], cfg=cfg,
                                                                 pdl=pdl) for p in parts]
                old = [lambda x, p=p: w4a16_small_m_matmul(x, p[0], p[1], None, None, k, 128, tickets=p[2]) for p in parts]
                configs, parse = GEMV_CONFIGS, GemvConfig.parse

                def default(m, n, k, device):
                    return gemv_default_config(n, k)
            else:
                new = [lambda x, cfg, p=p, pdl=False: w4a16_small_m_matmul(x, p[0], p[1], None, None, k, 128,
                                                                           tickets=p[2], cfg=cfg) for p in parts]
                old = [lambda x, p=p: w4a16_matmul(x, p[0], p[1], None, None, k, 128) for p in parts]
                configs, default, parse = W4_CONFIGS, w4_default, SmallMConfig.parse
        bf16 = [p[0] for p in parts] if kind == "bf16m" else [w] + [w.clone() for _ in range(copies_for(2 * n * k) - 1)]
        for m in ms:
            if (kind in ("gemv", "mma1") and m > 1) or (kind == "bf16m" and m == 1):
                continue
            x = torch.randn(m, k, device=DEVICE, dtype=torch.bfloat16)
            ref = x.float() @ ref_w.t()
            floor = (weight_bytes + 2 * m * (k + n)) / copy_bw
            row = {"kind": kind, "layer": name, "M": m, "K": k, "N": n, "copies": reps, "floor_us": floor * 1e6,
                   "bf16_us": graph_time([lambda b=b: torch.matmul(x, b.t()) for b in bf16]) * 1e6,
                   "old_us": graph_time([lambda f=f: f(x) for f in old]) * 1e6,
                   "old_max_rel": _rel(old[0](x), ref)}
            default_cfg = default(m, n, k, x.device)
            sweep: dict[str, object] = {}
            for key in dict.fromkeys([default_cfg.key(), *configs]):
                cfg = parse(key)
                if getattr(cfg, "kind", "") == "fma" and m > FMA_MAX_M and kind != "bf16m":
                    continue
                if kind == "bf16m" and cfg.kind in ("fma", "fe") and m > 4:  # (bf16_small_m.FMA_MAX_M)
                    continue
                if time.perf_counter() > layer_deadline:
                    sweep[key] = "skipped: sweep time budget spent"
                    continue
                try:
                    err = _rel(new[0](x, cfg), ref)
                    t = graph_time([lambda f=f, cfg=cfg: f(x, cfg) for f in new]) * 1e6
                    err = max(err, _rel(new[0](x, cfg), ref))  # again after the replays: tickets reset?
                    sweep[key] = {"us": t, "max_rel": err, "tickets_zero": not any(p[-1].any().item() for p in parts)}
                except Exception as exc:  # noqa: BLE001 - a config that does not compile is recorded and skipped
                    sweep[key] = f"{type(exc).__name__}: {str(exc)[:160]}"
            ok = {key: v for key, v in sweep.items()
                  if isinstance(v, dict) and v["max_rel"] < 2e-2 and v["tickets_zero"]}
            best = min(ok, key=lambda key: ok[key]["us"]) if ok else None
            row.update(default=default_cfg.key(), default_us=ok.get(default_cfg.key(), {}).get("us"), best=best,
                       best_us=ok[best]["us"] if best else None, sweep=sweep,
                       wrong=[key for key, v in sweep.items() if isinstance(v, dict) and key not in ok])
            if kind == "gemv" and best:
                try:
                    row["stream_us"] = graph_time([lambda p=p: stream_probe(p[0].view(torch.int32), best) for p in parts]) * 1e6
                except Exception as exc:  # noqa: BLE001 - the probe is a diagnostic
                    row["stream_us"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            if name == "gate_up" and best and kind in ("gemv", "mma1"):  # the SiLU-and-mul epilogue: the same bits?
                from radixlm.kernels.ops import silu_and_mul

                try:
                    cfg = parse(best)
                    fn = w4a16_mma_m1 if kind == "mma1" else w4a16_gemv
                    p = parts[0]
                    fused = fn(x, p[0], p[1], None, None, k, 128, tickets=p[2], cfg=cfg, silu_mul=True)
                    row["silu_mul_equal"] = torch.equal(fused, silu_and_mul(fn(x, p[0], p[1], None, None, k, 128,
                                                                               tickets=p[2], cfg=cfg)))
                    row["silu_mul_us"] = graph_time([lambda p=p: fn(x, p[0], p[1], None, None, k, 128, tickets=p[2],
                                                                     cfg=cfg, silu_mul=True) for p in parts]) * 1e6
                except Exception as exc:  # noqa: BLE001 - recorded: a diagnostic
                    row["silu_mul_equal"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            if name == "down" and best and kind == "bf16m":  # the down projection's SiLU-and-mul in the loads
                from radixlm.kernels.ops import silu_and_mul

                try:
                    cfg = parse(best)
                    gate_up = torch.randn(m, 2 * k, device=DEVICE, dtype=torch.bfloat16)
                    row["silu_mul_equal"] = torch.equal(new[0](gate_up, cfg, silu=True),
                                                        new[0](silu_and_mul(gate_up), cfg))
                    row["silu_mul_us"] = graph_time([lambda f=f: f(gate_up, cfg, pdl=pdl, silu=True) for f in new]) * 1e6
                    row["old_silu_mul_us"] = graph_time([lambda f=f: f(silu_and_mul(gate_up)) for f in old]) * 1e6
                except Exception as exc:  # noqa: BLE001 - recorded: a diagnostic
                    row["silu_mul_equal"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            if pdl and best and kind != "w4":
                try:
                    cfg = parse(best)
                    row["best_pdl_us"] = graph_time([lambda f=f: f(x, cfg, pdl=True) for f in new]) * 1e6
                    row["best_pdl_max_rel"] = _rel(new[0](x, cfg, pdl=True), ref)
                except Exception as exc:  # noqa: BLE001 - recorded: PDL may not launch here
                    row["best_pdl_us"] = f"{type(exc).__name__}: {str(exc)[:160]}"
            rows.append(row)
            if on_row is not None:
                on_row(rows)
            print(_line(row), flush=True)
        del parts, new, old, bf16, q, ref_w, w
        torch.cuda.empty_cache()
    return rows


def _line(r: dict) -> str:
    best = r["best_us"] or float("nan")
    dflt = r["default_us"] or float("nan")
    pdl = r.get("best_pdl_us")
    return (f"{r['kind']:<4}{r['layer']:<8}{r['M']:>3}{r['floor_us']:>8.1f}{r['bf16_us']:>8.1f}{r['old_us']:>8.1f}"
            f"{r['floor_us'] / r['old_us']:>6.0%}{dflt:>8.1f}{best:>8.1f}{r['floor_us'] / best:>6.0%}"
            + (f"{pdl:>7.1f}" if isinstance(pdl, float) else "      -") + f"  {r['best']}"
            + (f"  WRONG: {r['wrong']}" if r["wrong"] else "") + (f"  PDL: {pdl}" if isinstance(pdl, str) else "")
            + (f"  reads alone {r['stream_us']:.1f}" if isinstance(r.get("stream_us"), float) else "")
            + (f"  silu_mul {r['silu_mul_us']:.1f} us (activation kernel + old {r['old_silu_mul_us']:.1f}), same bits "
               f"{r['silu_mul_equal']}" if "old_silu_mul_us" in r
               else f"  silu_mul {r['silu_mul_us']:.1f} us, same bits {r['silu_mul_equal']}" if "silu_mul_us" in r
               else f"  silu_mul: {r['silu_mul_equal']}" if "silu_mul_equal" in r else ""))


def tables(rows: list[dict]) -> dict:
    """{"fp8": {"NxK": {"M": best key}}, "w4": ...}: what the kernels' DEFAULTS should say."""
    out: dict = {}
    for r in rows:
        if r["best"]:
            best = r["best"]
            if r["kind"] == "bf16m" and not r["best_us"] < r["old_us"]:
                best = "cublas"  # said explicitly: a larger M's config must not cover this M
            elif r["kind"] in ("gemv", "mma1") and not r["best_us"] < r["old_us"]:
                continue  # the GEMV / mma1 serve a shape only where they beat what the engine ran (their "old" here)
            out.setdefault(r["kind"], {}).setdefault(f"{r['N']}x{r['K']}", {})[str(r["M"])] = best
    return out


def python_literal(table: dict) -> str:
    lines = ["DEFAULTS: Table = {"]
    for shape, by_m in table.items():
        n, k = shape.split("x")
        entries = ", ".join(f"{m}: \"{key}\"" for m, key in by_m.items())
        lines.append(f"    ({n}, {k}): {{{entries}}},")
    return "\n".join(lines + ["}"])


DECODE_ARMS = ("bf16", "fp8", "w4a16", "w4a16-defaults", "fp8-pdl", "w4a16-pdl", "w4a16-silu", "w4a16-defaults-silu",
               "w4a16-p1", "w4a16-p1b", "w4a16-defaults-splitnorm", "w4a16-defaults-nosplitnorm", "w4a16-defaults-nol2",
               "w4a16-defaults-blocked", "w4a16-defaults-plain")
# the arms' environment (the scheduler process inherits it): -nol2 no L2 hints between the 4-bit linears; -blocked /
# -plain the tensor-core kernel's weights stored blocked by row tile / plain (runtime/quantization/w4a16.BLOCKED_CODES)
ARM_ENV = {"w4a16-defaults-nol2": {"RADIXLM_W4_L2_PREFETCH": ""},
           "w4a16-defaults-blocked": {"RADIXLM_W4_BLOCKED_CODES": "1"},
           "w4a16-defaults-plain": {"RADIXLM_W4_BLOCKED_CODES": "0"}}
# "w4a16-p1" / "-p1b": qkv / o on GEMV configs that load their first weight step before the PDL wait (p1); the table's
# p0 ones won back to back without PDL, where that load cannot overlap the predecessor, but the engine launches them
# with PDL after a small kernel (the norm, attention's merge). p1: the 2026-12-03 08:00 sweep's best p1 config of each
# shape; p1b: o's table tile (n16-c4-w4) with the prefetch, on both shapes.
P1_TABLES = {"w4a16-p1": {"6144x4096": {"1": "gemv-n32-c4-w4-s2-p1"}, "4096x4096": {"1": "gemv-n32-c2-w4-sa-p1"}},
             "w4a16-p1b": {"6144x4096": {"1": "gemv-n16-c4-w4-sa-p1"}, "4096x4096": {"1": "gemv-n16-c4-w4-sa-p1"}}}


def decode_figures(table_path: Path, ab: bool, only: tuple[str, ...] = ("bf16", "fp8", "w4a16")) -> dict:
    """(a) batch-1 decode of the 8B shape: bf16, fp8 and w4a16 (GPTQ) engines, the quantized ones on the
    swept table; `only` picks among DECODE_ARMS ("-defaults": on the kernels' DEFAULTS tables, what main runs;
    "-pdl": the swept table with --decode-pdl on; "-silu": with --decode-silu-epilogue on; "-splitnorm" /
    "-nosplitnorm": --decode-split-norm on / off; "-nol2" / "-blocked" / "-plain": `ARM_ENV`); `ab` adds fp8 / w4a16 on
    the older kernels."""
    import tempfile

    from gpu_suite import LLAMA_8B, model_dir_for
    from quantized import CONFIGS, engine_items
    from quantized_w4 import GPTQ_CONFIG

    table = str(table_path)
    p1_dir = Path(tempfile.mkdtemp())
    for name, gemv in P1_TABLES.items():
        (p1_dir / f"{name}.json").write_text(json.dumps({"tables": {"gemv": gemv}}))
    arms = {"bf16": ("bf16", "", {}), "fp8": ("fp8", table, {}), "w4a16": ("w4a16", table, {}),
            "w4a16-defaults": ("w4a16", "", {}), "fp8-pdl": ("fp8", table, {"decode_pdl": "on"}),
            "w4a16-pdl": ("w4a16", table, {"decode_pdl": "on"}),
            "w4a16-silu": ("w4a16", table, {"decode_silu_epilogue": "on"}),
            "w4a16-defaults-silu": ("w4a16", "", {"decode_silu_epilogue": "on"}),
            "w4a16-defaults-splitnorm": ("w4a16", "", {"decode_split_norm": "on"}),
            "w4a16-defaults-nosplitnorm": ("w4a16", "", {"decode_split_norm": "off"}),
            **{name: ("w4a16", "", {}) for name in ARM_ENV},
            **{name: ("w4a16", str(p1_dir / f"{name}.json"), {}) for name in P1_TABLES}}
    chosen = [(name, *arms[name]) for name in only]
    if ab:
        chosen += [("fp8 (older kernel)", "fp8", "off", {}), ("w4a16 (older kernel)", "w4a16", "off", {})]
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        d = model_dir_for(LLAMA_8B, Path(tmp), "llama8b")
        d4 = model_dir_for({**LLAMA_8B, "quantization_config": GPTQ_CONFIG}, Path(tmp), "llama8b-gptq")
        for label, config, source, extra in chosen:
            os.environ["RADIXLM_SMALL_M_TABLE"] = source
            for key in {key for env in ARM_ENV.values() for key in env}:
                os.environ.pop(key, None)
            os.environ.update(ARM_ENV.get(label, {}))  # (the scheduler process inherits it)
            t = time.perf_counter()
            try:
                out[label] = engine_items(d4 if config == "w4a16" else d, LLAMA_8B["vocab_size"],
                                          {**CONFIGS[config], **extra}, True)
            except Exception as exc:  # noqa: BLE001 - recorded; the other arms still run
                out[label] = {"error": f"{type(exc).__name__}: {str(exc)[:300]}"}
            print(f"(a) {label}: {out[label].get('a_decode_tok_s', out[label].get('error'))} "
                  f"({time.perf_counter() - t:.0f} s)", flush=True)
    for key in ("RADIXLM_SMALL_M_TABLE", *{key for env in ARM_ENV.values() for key in env}):
        os.environ.pop(key, None)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="small_m.json")
    ap.add_argument("--kinds", default="fp8,w4")
    ap.add_argument("--budget-s", type=float, default=240, help="stop sweeping configs after this many seconds "
                    "(the older kernel, bf16 and the default config are still timed)")
    ap.add_argument("--decode", action="store_true", help="then (a) batch-1 decode: bf16 / fp8 / w4a16 engines")
    ap.add_argument("--decode-arms", default="bf16,fp8,w4a16", help="with --decode: which engines, of " + ", ".join(DECODE_ARMS))
    ap.add_argument("--ab", action="store_true", help="with --decode: fp8 and w4a16 on the older kernels too")
    ap.add_argument("--ms", default=",".join(map(str, MS)), help="activation rows to sweep (the GEMV: 1 only)")
    ap.add_argument("--pdl", action="store_true", help="time each best config again launched with PDL")
    ap.add_argument("--layers", default=",".join(SHAPES), help="the 8B layer shapes to sweep, of " + ", ".join(SHAPES))
    ap.add_argument("--decode-only", action="store_true", help="no sweep: only the --decode-arms engines (arms on "
                    "the swept table then run on the DEFAULTS)")
    args = ap.parse_args()
    if unknown := [a for a in args.decode_arms.split(",") if a not in DECODE_ARMS]:  # (before any device time)
        ap.error(f"--decode-arms: unknown {unknown}")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from gpu_suite import measure_ceilings

    started = time.perf_counter()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    if args.decode_only:
        out.write_text(json.dumps({"tables": {}}))  # an empty sweep: the swept-table arms run on the DEFAULTS
        report["decode"] = decode_figures(out, args.ab, tuple(args.decode_arms.split(",")))
        report["wall_s"] = time.perf_counter() - started
        out.write_text(json.dumps(report, indent=1))
        print("\n(a) batch-1 decode tok/s: " + ", ".join(f"{label} {v.get('a_decode_tok_s', float('nan')):.1f}"
                                                        for label, v in report["decode"].items()))
        print(f"wall {report['wall_s']:.0f} s")
        return
    report["ceilings"] = measure_ceilings()
    copy_bw = report["ceilings"]["copy_bytes_per_s"]
    print(f"copy {copy_bw / 1e12:.2f} TB/s\n{'kind':<4}{'layer':<8}{'M':>3}{'floor':>8}{'bf16':>8}{'old':>8}{'o/fl':>6}"
          f"{'dflt':>8}{'best':>8}{'b/fl':>6}{'pdl':>7}  (us; best config; gemv's old: the small-M kernel, mma1's: the gemv)", flush=True)
    rows: list[dict] = []
    kinds = args.kinds.split(",")
    for i, kind in enumerate(kinds):  # the time budget is shared out between the kinds
        share = (args.budget_s - (time.perf_counter() - started)) / (len(kinds) - i)
        def partial(kind_rows: list[dict], done: list[dict] = list(rows)) -> None:
            report["rows"], report["tables"] = done + kind_rows, tables(done + kind_rows)
            tmp = out.with_name(out.name + ".part")  # (renamed over it: a kill mid-write leaves the last whole file)
            tmp.write_text(json.dumps(report, indent=1))
            tmp.replace(out)
        rows += sweep_kind(kind, copy_bw, time.perf_counter() + share, tuple(int(v) for v in args.ms.split(",")),
                           args.pdl, tuple(args.layers.split(",")), partial)
        report["rows"], report["tables"] = rows, tables(rows)
        out.write_text(json.dumps(report, indent=1))
    report["sweep_s"] = time.perf_counter() - started
    for kind, m in itertools.product(kinds, sorted({r["M"] for r in rows})):  # the layers summed: a decoder layer's GEMMs
        one = [r for r in rows if r["kind"] == kind and r["M"] == m]
        if len(one) == len(args.layers.split(",")) and all(r["best_us"] for r in one):
            print(f"# {kind} M = {m}, the swept layers summed: floor {sum(r['floor_us'] for r in one):.1f}, "
                  f"old {sum(r['old_us'] for r in one):.1f}, best {sum(r['best_us'] for r in one):.1f}"
                  + (f", best+PDL {sum(r['best_pdl_us'] for r in one):.1f}"
                     if all(isinstance(r.get("best_pdl_us"), float) for r in one) else "") + " us")
    for kind, table in report["tables"].items():
        module = {"fp8": "fp8_small_m", "w4": "w4a16_small_m", "gemv": "w4a16_gemv", "mma1": "w4a16_mma_m1",
                  "bf16m": "bf16_small_m"}[kind]
        print(f"# {kind} DEFAULTS (kernels/{module}.py): " + python_literal(table).replace("\n   ", ""))
    out.write_text(json.dumps(report, indent=1))
    if args.decode:
        report["decode"] = decode_figures(out, args.ab, tuple(args.decode_arms.split(",")))
        out.write_text(json.dumps(report, indent=1))
        print("\n(a) batch-1 decode tok/s: " + ", ".join(f"{label} {v.get('a_decode_tok_s', float('nan')):.1f}"
                                                        for label, v in report["decode"].items()))
    report["wall_s"] = time.perf_counter() - started
    out.write_text(json.dumps(report, indent=1))
    print(f"wall {report['wall_s']:.0f} s (sweep {report['sweep_s']:.0f} s)")


if __name__ == "__main__":
    main()

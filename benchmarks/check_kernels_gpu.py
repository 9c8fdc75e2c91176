#!/usr/bin/env python3
"""Check every Triton kernel against its torch reference at real shapes, then time it (H200).

    python benchmarks/check_kernels_gpu.py            # ~1-2 minutes; JSON to $OUT/kernels.json if OUT is set

Correctness: ||out - ref|| / ||ref|| (bf16 passes below 1e-2, fp16 below 5e-3). Speed: median of
`triton.testing.do_bench` (L2 flushed between runs, Python launch overhead included) and of a
CUDA-graph replay with a cold L2 (the kernels' own time), against the floor
max(bytes / copy bandwidth, flops / matmul rate), both measured at start. Needs only torch + triton and this repo's kernels/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
from triton.testing import do_bench

# Import kernels/ as a top-level package: the checkout need not be installed nor named radixlm.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import kernels as K  # noqa: E402
from kernels import attention_ref, ops_ref  # noqa: E402
from kernels.api import AttentionMetadata  # noqa: E402

DEV = "cuda"
TOL = {torch.bfloat16: 1e-2, torch.float16: 5e-3, torch.float32: 1e-4}
HQ, HKV, D = 32, 8, 128  # Llama-3.1-8B
HIDDEN, INTER = 4096, 14336


@dataclass
class Case:
    kernel: str
    shape: str
    run: Callable[[], object]  # the Triton op, returning its output tensor(s)
    ref: Callable[[], object]
    nbytes: float
    flops: float = 0.0
    dtype: torch.dtype = torch.bfloat16
    baseline: Callable[[], object] | None = None  # e.g. dense flash SDPA, for perspective
    fetch: Callable[[], object] | None = None  # reads the result of an op that returns nothing
    ref_timed: Callable[[], object] | None = None  # what to time for the reference, if not `ref`
    result: dict = field(default_factory=dict)


def rel_err(out: object, ref: object) -> float:
    outs = out if isinstance(out, tuple) else (out,)
    refs = ref if isinstance(ref, tuple) else (ref,)
    worst = 0.0
    for o, r in zip(outs, refs, strict=True):
        o, r = o.float(), r.float()
        if not torch.isfinite(o).all():
            return math.inf
        worst = max(worst, ((o - r).norm() / r.norm().clamp_min(1e-30)).item())
    return worst


def make_pool(lens: list[int], dtype: torch.dtype, hkv: int = HKV, d: int = D):
    """KV pool holding len tokens per request at randomly permuted slots (fragmented paging)."""
    total = sum(lens)
    k_buf = torch.randn(total + 1, hkv, d, dtype=dtype, device=DEV)
    v_buf = torch.randn(total + 1, hkv, d, dtype=dtype, device=DEV)
    perm = (torch.randperm(total, device=DEV) + 1).to(torch.int32)
    rows = len(lens) + 2
    r2t = torch.zeros(rows, max(lens) + 16, dtype=torch.int32, device=DEV)
    req_rows = torch.randperm(rows)[: len(lens)].tolist()  # rows not in batch order
    start = 0
    for row, n in zip(req_rows, lens):
        r2t[row, :n] = perm[start : start + n]
        start += n
    return k_buf, v_buf, r2t, req_rows


def decode_case(lens: list[int], dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, tag="") -> Case:
    k_buf, v_buf, r2t, rows = make_pool(lens, dtype, hkv, d)
    bsz = len(lens)
    q = torch.randn(bsz, hq, d, dtype=dtype, device=DEV)
    idx = torch.tensor(rows, dtype=torch.int64, device=DEV)
    seq = torch.tensor(lens, dtype=torch.int64, device=DEV)
    out = torch.empty_like(q)
    scale = d**-0.5
    elt = k_buf.element_size()
    nbytes = sum(lens) * (2 * hkv * d * elt + 4) + 2 * q.numel() * elt
    from kernels.decode_attention import decode_attention

    uniform = len(set(lens)) == 1
    shape = f"B={bsz} ctx={lens[0] if uniform else f'{min(lens)}..{max(lens)}'} Hq={hq} Hkv={hkv} D={d}{tag}"
    return Case(
        "decode_attention", shape,
        run=lambda: decode_attention(q, k_buf, v_buf, r2t, idx, seq, scale, out=out),
        ref=lambda: attention_ref.decode_attention_ref(q, k_buf, v_buf, r2t, idx, seq, scale, max(lens)),
        nbytes=nbytes, flops=4.0 * sum(lens) * hq * d, dtype=dtype,
    )


def extend_case(prefix: list[int], ext: list[int], dtype=torch.bfloat16, hq=HQ, hkv=HKV, d=D, tag="") -> Case:
    seq_lens = [p + e for p, e in zip(prefix, ext)]
    k_buf, v_buf, r2t, rows = make_pool(seq_lens, dtype, hkv, d)
    q = torch.randn(sum(ext), hq, d, dtype=dtype, device=DEV)
    meta = AttentionMetadata.for_extend(r2t, rows, seq_lens, ext)
    scale = d**-0.5
    out = torch.empty_like(q)
    from kernels.extend_attention import extend_attention

    visible = sum(p * e + e * (e + 1) // 2 for p, e in zip(prefix, ext))  # (query, key) pairs
    elt = q.element_size()
    nbytes = sum(seq_lens) * (2 * hkv * d * elt + 4) + 2 * q.numel() * elt
    baseline = None
    if len(set(ext)) == 1 and not any(prefix):  # same problem, dense layout, torch flash SDPA
        qd = q.view(len(ext), ext[0], hq, d).transpose(1, 2)
        kd = torch.randn(len(ext), hkv, ext[0], d, dtype=dtype, device=DEV)
        vd = torch.randn_like(kd)
        baseline = lambda: torch.nn.functional.scaled_dot_product_attention(  # noqa: E731
            qd, kd, vd, is_causal=True, scale=scale, enable_gqa=True)
    return Case(
        "extend_attention",
        f"B={len(ext)} ext={ext[0]} prefix={prefix[0]}" + (" mixed" if len(set(ext)) > 1 else "") + tag,
        run=lambda: extend_attention(
            q, k_buf, v_buf, r2t, meta.req_pool_indices, meta.seq_lens, meta.extend_seq_lens,
            meta.extend_start_loc, scale, max_extend_len=meta.max_extend_len, out=out),
        ref=lambda: attention_ref.extend_attention_ref(q, k_buf, v_buf, r2t, rows, seq_lens, ext, scale),
        nbytes=nbytes, flops=4.0 * visible * hq * d, dtype=dtype, baseline=baseline,
    )


def elementwise_cases(tokens: int) -> list[Case]:
    from kernels import ops

    bf = torch.bfloat16
    x = torch.randn(tokens, HIDDEN, dtype=bf, device=DEV)
    res = torch.randn_like(x)
    w = torch.rand(HIDDEN, dtype=bf, device=DEV) + 0.5
    gu = torch.randn(tokens, 2 * INTER, dtype=bf, device=DEV)
    qkv = torch.randn(tokens, (HQ + 2 * HKV) * D, dtype=bf, device=DEV)
    q = qkv[:, : HQ * D].view(tokens, HQ, D)  # strided views, as the model slices its qkv
    k = qkv[:, HQ * D : (HQ + HKV) * D].view(tokens, HKV, D)
    v = qkv[:, (HQ + HKV) * D :].view(tokens, HKV, D)
    max_pos = 8192
    inv = 1.0 / (500000.0 ** (torch.arange(0, D, 2, device=DEV, dtype=torch.float32) / D))
    ang = torch.arange(max_pos, device=DEV, dtype=torch.float32)[:, None] * inv[None, :]
    cache = torch.cat((ang.cos(), ang.sin()), dim=-1)
    pos = torch.randint(0, max_pos, (tokens,), device=DEV)
    pool = 1 << 20
    k_buf = torch.zeros(pool + 1, HKV, D, dtype=bf, device=DEV)
    v_buf = torch.zeros_like(k_buf)
    k_ref, v_ref = k_buf.clone(), v_buf.clone()
    slots = torch.randperm(pool, device=DEV)[:tokens] + 1

    def store_ref():
        ops_ref.store_kv_ref(k_ref, v_ref, slots, k, v)
        return k_ref[slots], v_ref[slots]

    k_buf2, v_buf2 = torch.zeros_like(k_buf), torch.zeros_like(v_buf)

    def rotary_store_ref():
        q_rot, k_rot = ops_ref.rotary_ref(q, k, pos, cache)
        return q_rot, k_rot, v

    eps, tag, e = 1e-5, f"T={tokens}", 2
    return [
        Case("rotary_store_kv", f"{tag} Hq={HQ} Hkv={HKV} D={D}",
             lambda: ops.rotary_store_kv(q, k, v, pos, cache, k_buf2, v_buf2, slots), rotary_store_ref,
             2 * (q.numel() + 2 * k.numel()) * e + tokens * D * 4,
             fetch=lambda: (ops.rotary_store_kv(q, k, v, pos, cache, k_buf2, v_buf2, slots), k_buf2[slots], v_buf2[slots])),
        Case("rms_norm", f"{tag} H={HIDDEN}", lambda: ops.rms_norm(x, w, eps),
             lambda: ops_ref.rms_norm_ref(x, w, eps), 2 * x.numel() * e),
        Case("fused_add_rms_norm", f"{tag} H={HIDDEN}", lambda: ops.fused_add_rms_norm(x, res, w, eps),
             lambda: ops_ref.fused_add_rms_norm_ref(x, res, w, eps), 4 * x.numel() * e),
        Case("silu_and_mul", f"{tag} I={INTER}", lambda: ops.silu_and_mul(gu),
             lambda: ops_ref.silu_and_mul_ref(gu), 1.5 * gu.numel() * e),
        Case("rotary", f"{tag} Hq={HQ} Hkv={HKV} D={D}", lambda: ops.rotary(q, k, pos, cache),
             lambda: ops_ref.rotary_ref(q, k, pos, cache), 2 * (q.numel() + k.numel()) * e + tokens * D * 4),
        Case("store_kv", f"{tag} Hkv={HKV} D={D}", lambda: ops.store_kv(k_buf, v_buf, slots, k, v), store_ref,
             4 * k.numel() * e, fetch=lambda: (k_buf[slots], v_buf[slots]),
             ref_timed=lambda: ops_ref.store_kv_ref(k_ref, v_ref, slots, k, v)),
    ]


_FLUSH: list[torch.Tensor] = []


def bench_graph(fn: Callable[[], object], reps: int = 40) -> float:
    """Median GPU time (ms) of one CUDA-graph replay of `fn`, L2 flushed before each replay.

    do_bench's times include Python launch overhead, which dwarfs small kernels; the runner replays
    decode as CUDA graphs, so this is the number that matters there.
    """
    if not _FLUSH:
        _FLUSH.append(torch.empty(256 << 20, dtype=torch.uint8, device=DEV))
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(reps)]
    for start, end in events:
        _FLUSH[0].zero_()
        start.record()
        graph.replay()
        end.record()
    torch.cuda.synchronize()
    times = sorted(start.elapsed_time(end) for start, end in events)
    del graph
    return times[len(times) // 2]


def measure_ceilings() -> tuple[float, float]:
    """(copy bandwidth in bytes/s counting read+write, dense bf16 matmul rate in flop/s)."""
    a = torch.empty(1 << 30, dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    bw = 2 * a.numel() / (do_bench(lambda: b.copy_(a), return_mode="median") * 1e-3)  # noqa: F821 (deleted after use)
    del a, b
    n = 8192
    x = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    y = torch.randn(n, n, dtype=torch.bfloat16, device=DEV)
    mm = 2 * n**3 / (do_bench(lambda: x @ y, return_mode="median") * 1e-3)
    return bw, mm


def run_case(case: Case, bw: float, mm: float, time_ref: bool) -> None:
    r = case.result
    r.update(kernel=case.kernel, shape=case.shape, dtype=str(case.dtype).replace("torch.", ""))
    try:
        out = case.run()
        if case.fetch is not None:
            out = case.fetch()
        torch.cuda.synchronize()
        ref = case.ref()
        err = rel_err(out, ref)
        del out, ref
        r.update(rel_err=err, ok=err < TOL[case.dtype])
        ms = do_bench(case.run, return_mode="median")
        gms = bench_graph(case.run)
        floor_ms = max(case.nbytes / bw, case.flops / mm) * 1e3
        r.update(ms=ms, graph_ms=gms, floor_ms=floor_ms, frac_of_floor=floor_ms / gms,
                 gbps=case.nbytes / (gms * 1e-3) / 1e9, tflops=case.flops / (gms * 1e-3) / 1e12)
        if time_ref:
            r["ref_ms"] = do_bench(case.ref_timed or case.ref, return_mode="median")
        if case.baseline is not None:
            r["baseline_ms"] = do_bench(case.baseline, return_mode="median")
    except Exception as exc:  # keep going: one broken kernel must not hide the others
        r.update(ok=False, error=f"{type(exc).__name__}: {exc}")
        traceback.print_exc()
    finally:
        torch.cuda.empty_cache()


def build_cases(quick: bool) -> list[Callable[[], Case | list[Case]]]:
    builders: list[Callable[[], Case | list[Case]]] = []
    batches, ctxs = ([1, 32], [128, 4096]) if quick else ([1, 32, 128], [128, 1024, 8192])
    for bsz in batches:
        for ctx in ctxs:
            builders.append(lambda b=bsz, c=ctx: decode_case([c] * b))
    g = torch.Generator().manual_seed(0)
    uneven = torch.randint(1, 4097, (32,), generator=g).tolist()
    builders += [
        lambda: decode_case(uneven),
        lambda: decode_case([2048] * 32, dtype=torch.float16),
        lambda: decode_case([1024] * 32, hq=32, hkv=32, d=64, tag=" (MHA, D=64)"),
        lambda: decode_case([1024] * 32, hq=32, hkv=8, d=96, tag=" (D=96 masked)"),
        lambda: extend_case([0] * 4, [2048] * 4),
        lambda: extend_case([2048] * 4, [2048] * 4),
        lambda: extend_case([0, 512, 3000, 17, 0, 1024], [700, 1, 2048, 333, 64, 1500]),
        lambda: extend_case([100, 0], [1000, 999], hq=16, hkv=16, d=64, tag=" (MHA, D=64)"),
        lambda: extend_case([300, 0], [1000, 999], dtype=torch.float16, hq=24, hkv=8, d=96, tag=" (fp16, D=96)"),
    ]
    for tokens in ([32] if quick else [32, 4096]):
        builders.append(lambda t=tokens: elementwise_cases(t))
    builders.append(gemv_cases)
    return builders


def gemv_cases() -> list[Case]:
    """The bf16 M = 1 GEMV (kernels/bf16_gemv.py) at the 8B layer shapes, by its table's config where it has one;
    down also with SiLU-and-mul in its loads, qkv and gate_up also with the residual add + RMSNorm in them."""
    from kernels import ops
    from kernels.bf16_gemv import bf16_gemv, bf16_gemv_add_norm, config_for
    from kernels.small_m import SmallMConfig

    cases = []
    for name, n, k in (("qkv", (HQ + 2 * HKV) * D, HIDDEN), ("o", HIDDEN, HQ * D), ("gate_up", 2 * INTER, HIDDEN),
                       ("down", HIDDEN, INTER)):
        cfg = config_for(n, k) or SmallMConfig("fma", 8, 512, 2, 4, 3)
        w = torch.randn(n, k, dtype=torch.bfloat16, device=DEV) * k**-0.5
        x = torch.randn(1, k, dtype=torch.bfloat16, device=DEV)
        cases.append(Case("bf16_gemv", f"{name} {n}x{k} M=1 {cfg.key()}", lambda x=x, w=w, c=cfg: bf16_gemv(x, w, c),
                          lambda x=x, w=w: x.float() @ w.float().T, n * k * 2.0, 2.0 * n * k,
                          baseline=lambda x=x, w=w: torch.nn.functional.linear(x, w)))
        if name in ("qkv", "gate_up"):
            res = torch.randn(1, k, dtype=torch.bfloat16, device=DEV)
            nw = torch.rand(k, dtype=torch.bfloat16, device=DEV) + 0.5
            cases.append(Case("bf16_gemv (add+norm)", f"{name} {n}x{k} M=1 {cfg.key()}",
                              lambda x=x, r=res, nw=nw, w=w, c=cfg: bf16_gemv_add_norm(x, r, nw, 1e-5, w, c),
                              lambda x=x, r=res, nw=nw, w=w: (ops_ref.rms_norm_ref(x + r, nw, 1e-5).float() @ w.float().T,
                                                              x + r),
                              n * k * 2.0, 2.0 * n * k,
                              baseline=lambda x=x, r=res, nw=nw, w=w: torch.nn.functional.linear(
                                  ops.fused_add_rms_norm(x, r, nw, 1e-5)[0], w)))
        if name == "down":
            gu = torch.randn(1, 2 * k, dtype=torch.bfloat16, device=DEV)
            cases.append(Case("bf16_gemv (SiLU-and-mul)", f"{name} {n}x{k} M=1 {cfg.key()}",
                              lambda gu=gu, w=w, c=cfg: bf16_gemv(gu, w, c, silu_mul=True),
                              lambda gu=gu, w=w: ops.silu_and_mul(gu).float() @ w.float().T, n * k * 2.0, 2.0 * n * k,
                              baseline=lambda gu=gu, w=w: torch.nn.functional.linear(ops.silu_and_mul(gu), w)))
    return cases


def print_table(rows: list[dict]) -> None:
    hdr = (f"{'kernel':<19} {'shape':<44} {'rel_err':>9} {'ok':>4} {'ms':>8} {'graph_ms':>8} {'floor':>8} {'%floor':>6} "
           f"{'GB/s':>6} {'TF/s':>6} {'ref_ms':>8} {'base_ms':>8}")
    print("ms: do_bench median (with launch overhead); graph_ms: CUDA-graph replay, cold L2 (kernel time);")
    print("floor: max(bytes/copy BW, flops/matmul rate); %floor, GB/s, TF/s use graph_ms")
    print(hdr)
    print("-" * len(hdr))
    for r in rows:
        def f(key: str, fmt: str) -> str:
            return format(r[key], fmt) if key in r else "-"
        print(f"{r['kernel']:<19} {r['shape'][:44]:<44} {f('rel_err', '.2e'):>9} {'yes' if r.get('ok') else 'NO':>4} "
              f"{f('ms', '.4f'):>8} {f('graph_ms', '.4f'):>8} {f('floor_ms', '.4f'):>8} "
              f"{format(100 * r['frac_of_floor'], '.0f') if 'frac_of_floor' in r else '-':>6} "
              f"{f('gbps', '.0f'):>6} {f('tflops', '.0f'):>6} {f('ref_ms', '.4f'):>8} {f('baseline_ms', '.4f'):>8}")
        if "error" in r:
            print(f"    ERROR: {r['error'][:300]}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="fewer shapes")
    ap.add_argument("--no-ref-timing", action="store_true", help="skip timing the torch references")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: this script is for the GPU machine (CPU tests: pytest tests/kernels)")
        return 2
    torch.manual_seed(0)
    print(f"torch {torch.__version__}  triton {triton.__version__}  {torch.cuda.get_device_name()}  "
          f"triton_available={K.triton_available()}")
    bw, mm = measure_ceilings()
    print(f"measured ceilings: copy {bw / 1e12:.2f} TB/s, bf16 matmul {mm / 1e12:.0f} TFLOP/s\n")
    rows: list[dict] = []
    for build in build_cases(args.quick):
        try:
            made = build()
        except Exception as exc:
            traceback.print_exc()
            rows.append(dict(kernel="(setup)", shape=getattr(build, "__name__", "?"), ok=False,
                             error=f"{type(exc).__name__}: {exc}"))
            continue
        for case in made if isinstance(made, list) else [made]:
            run_case(case, bw, mm, time_ref=not args.no_ref_timing)
            rows.append(case.result)
            r = case.result
            print(f"  {r['kernel']:<19} {r['shape']:<44} err={r.get('rel_err', float('nan')):.2e} "
                  f"ms={r.get('ms', float('nan')):.4f} {r.get('error', '')}", flush=True)
        del made
        torch.cuda.empty_cache()
    print()
    print_table(rows)
    failed = [r for r in rows if not r.get("ok")]
    print(f"\n{len(rows) - len(failed)}/{len(rows)} cases pass")
    if os.environ.get("OUT"):
        path = Path(os.environ["OUT"]) / "kernels.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        meta = dict(torch=torch.__version__, triton=triton.__version__, device=torch.cuda.get_device_name(),
                    copy_bw_bytes_per_s=bw, bf16_matmul_flops=mm)
        path.write_text(json.dumps(dict(meta=meta, results=rows), indent=1, default=str))
        print(f"wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())

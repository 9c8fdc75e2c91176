"""Multi-LoRA on the H200 (issue 21), one command, one table, one JSON:

  check   the Triton SGMV shrink/expand kernels vs the torch reference on CUDA (8B shapes, bf16 and
          fp32, ragged segments with base rows, prefill-sized tiles, 64 slots); a batch mixing 4
          adapters + the base model vs each alone
  kernel  SGMV shrink/expand inside CUDA graphs vs the bytes floor (measured copy bandwidth), rank 16,
          decode (T = 1 .. 256; 8 adapters, and 64) and prefill (2,048 and 8,192 tokens) sizes; and a
          sweep of other tile sizes against the defaults
  (b)     workload (b) (in U[128,1024], out U[64,512]) on a Llama-3.1-8B-shaped model: the base engine,
          then one --enable-lora engine (8 device slots) serving the base model, 1, 8 and 64 rank-16
          adapters (q,k,v,o,gate,up,down; 64 on 8 slots: 8 per batch, the rest swapped from host
          memory), then an engine with 64 device slots (all 64 adapters resident: 5.4 GB) on 64 adapters
  decode  batch-1 decode ms/step: base engine vs a rank-16 adapter, and a base request on the LoRA
          engine (its base-only CUDA graph)
  steps   per (b) run, forward steps, generated tokens per step, and with adapters the fewest decode
          steps the slots allow (an adapter holds its slot at least as long as its longest request:
          steps >= sum over adapters of that / slots), which bounds 64 adapters on 8 slots

  step    what LoRA adds to the 128 base GEMMs of a decode step in one CUDA graph, per --lora-kernels
          variant (lora_step.py)

    python benchmarks/lora.py --requests 600 --out $OUT/lora.json
Random bf16 weights (--load-format dummy); the adapters are PEFT-format folders written here with
safetensors (adapter_config.json + adapter_model.safetensors: PEFT's own format, no peft needed).
Each part is guarded: a failure is recorded under "errors" and the other parts still run.
"""
from __future__ import annotations

import argparse
import json
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import ENGINE_ARGS, params_for, workload_b  # noqa: E402
from quantized import _graph_time as graph_time  # noqa: E402  (seconds per call inside a CUDA graph)

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16
# --skip values: each leaves out exactly that part (an unknown name is an error, not a no-op)
PARTS = {"check": "the SGMV kernels vs the torch reference on CUDA (check_kernels)",
         "kernel": "SGMV shrink/expand times in CUDA graphs vs the bytes floor",
         "sweep": "the tile sweeps (SGMV, and lora_step's)", "step": "the per-step LoRA table (lora_step.py)",
         "mixed": "a batch of 4 adapters + base vs each alone", "decode": "batch-1 decode ms on the LoRA engine",
         "slots64": "the engine with 64 device slots (and the swap check against it)"}
OUTPUTS_BY_LABEL: dict[str, list[list[int]]] = {}  # (b) run -> its output ids (for the swap check)


def features(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def write_adapter(folder: Path, cfg: dict, seed: int, rank: int = RANK, device: str = "cuda") -> Path:
    """A PEFT LoRA folder with random weights, exactly as peft's save_pretrained writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device=device).manual_seed(seed)
    shapes = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fin, fout) in features(cfg).items():
            part = "self_attn" if module in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            shapes[f"{key}.lora_A.weight"] = (rank, fin, fin**-0.5)
            shapes[f"{key}.lora_B.weight"] = (fout, rank, 0.01)
    # one draw and one device-to-host copy per adapter (84 MB at the 8B shape), then views of it
    flat = torch.randn(sum(r * c for r, c, _ in shapes.values()), generator=g, device=device)
    scale = torch.cat([torch.full((r * c,), s, device=device) for r, c, s in shapes.values()])
    flat = (flat * scale).bfloat16().cpu()
    tensors, at = {}, 0
    for key, (r, c, _) in shapes.items():
        tensors[key] = flat[at:at + r * c].view(r, c)
        at += r * c
    save_file(tensors, str(folder / "adapter_model.safetensors"), metadata={"format": "pt"})
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank, "lora_dropout": 0.0,
        "target_modules": TARGETS, "bias": "none", "use_rslora": False, "fan_in_fan_out": False,
        "rank_pattern": {}, "alpha_pattern": {}, "base_model_name_or_path": "llama8b-dummy"}))
    return folder


def copy_bandwidth() -> float:
    a = torch.empty(1 << 30, dtype=torch.uint8, device="cuda")
    b = torch.empty_like(a)
    b.copy_(a)
    torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(10):
        b.copy_(a)
    torch.cuda.synchronize()
    bw = 2 * a.numel() * 10 / (time.perf_counter() - t)
    del a, b
    torch.cuda.empty_cache()
    return bw


# ------------------------------------------------------------------------------------ check
def check_kernels(cfg: dict) -> dict:
    from radixlm.runtime.lora.sgmv import LoRASegments, expand_ref, shrink_ref
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict = {}
    cases = [(dtype, name, 300, 8) for dtype in (torch.float32, torch.bfloat16) for name in projection_shapes(cfg)]
    cases += [(torch.bfloat16, "gate_up", 1100, 8), (torch.bfloat16, "qkv", 200, 64), (torch.bfloat16, "down", 1, 8)]
    cases += [(dtype, name, t, 8) for dtype in (torch.float32, torch.bfloat16) for name in projection_shapes(cfg)
              for t in (1, 29)]  # decode sizes: the one-launch kernel too (float32: the H200's crash)
    cases = [(*case, RANK) for case in cases]
    # ranks above the expand's rank step (64) and the one-launch kernel's FUSED_MAX_RANK at 64
    cases += [(dtype, name, t, 8, rank) for dtype in (torch.float32, torch.bfloat16) for name in ("qkv", "down")
              for t, rank in ((29, 64), (300, 128))]
    for dtype, name, t, slots, rank in cases:
        k, offsets = projection_shapes(cfg)[name]
        pieces = len(offsets) - 1
        a = (torch.randn(slots, pieces * rank, k, generator=g, device="cuda") / k**0.5).to(dtype)
        b = torch.randn(slots, offsets[-1], rank, generator=g, device="cuda").to(dtype)
        x = torch.randn(t, k, generator=g, device="cuda").to(dtype)
        token_slots = torch.randint(-1, slots, (t,), generator=g, device="cuda").cpu()
        token_slots[0] = 0
        seg = LoRASegments.build(token_slots, slots, torch.device("cuda"))
        used = (token_slots >= 0).cuda()
        y_ref, y = shrink_ref(x, a, seg), sgmv_shrink(x, a, seg).sum(0)
        base = torch.randn(t, offsets[-1], generator=g, device="cuda").to(dtype)
        o_ref, o = base.clone(), base.clone()
        expand_ref(y_ref, b, offsets, rank, o_ref, seg)
        widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
        sgmv_expand(y_ref, b, torch.tensor(offsets, dtype=torch.int32, device="cuda"), widest, rank, o, seg)
        fused = base.clone()
        if t <= 32:  # the one-launch decode kernel (its tile from the device's shared memory): same update
            from radixlm.runtime.lora.sgmv_fused import sgmv_fused

            sgmv_fused(x, a, b, torch.tensor(offsets, dtype=torch.int32, device="cuda"), widest, rank, fused, seg)
        tol = 1e-3 if dtype == torch.float32 else 3e-2
        err_y = ((y[used].float() - y_ref[used].float()).abs().max() / y_ref[used].float().abs().max()).item()
        err_o = ((o.float() - o_ref.float()).abs().max() / (o_ref - base).float().abs().max()).item()
        base_ok = bool(torch.equal(o[~used], base[~used]) and torch.equal(fused[~used], base[~used]))
        err_f = ((fused.float() - o_ref.float()).abs().max() / (o_ref - base).float().abs().max()).item() if t <= 32 else 0.0
        out[f"{name}_{str(dtype)[6:]}_T{t}_S{slots}_R{rank}"] = {"shrink_rel_err": err_y, "expand_rel_err": err_o,
                                                          "fused_rel_err": err_f, "base_rows_untouched": base_ok,
                                                          "ok": max(err_y, err_o, err_f) < tol and base_ok}
    out["all_ok"] = all(v["ok"] for v in out.values() if isinstance(v, dict))
    return out


def check_mixed_batch(eng, vocab: int, names: list[str]) -> dict:
    """Each row of a batch mixing 4 adapters + base vs the same request alone (greedy, logprobs)."""
    rng = random.Random(5)
    prompts = [[rng.randrange(1000, vocab - 1000) for _ in range(rng.randint(20, 200))] for _ in range(5)]
    loras = [*names[:4], None]
    sp = {"temperature": 0, "max_new_tokens": 16, "ignore_eos": True}
    mixed = eng.generate(input_ids=prompts, sampling_params=sp, lora_path=loras, return_logprob=True)
    same, lp_diff = 0, 0.0
    for p, lora, m in zip(prompts, loras, mixed):
        alone = eng.generate(input_ids=p, sampling_params=sp, lora_path=lora, return_logprob=True)
        same += m["output_ids"] == alone["output_ids"]
        a0, m0 = alone["meta_info"]["output_token_logprobs"][0][0], m["meta_info"]["output_token_logprobs"][0][0]
        lp_diff = max(lp_diff, abs(a0 - m0))
    base_alone = eng.generate(input_ids=prompts[0], sampling_params=sp, return_logprob=True)
    return {"rows_identical": f"{same}/5", "first_token_logprob_max_diff": lp_diff,
            "adapter_changes_output": base_alone["output_ids"] != mixed[0]["output_ids"]}


# ------------------------------------------------------------------------------------ kernel
def projection_shapes(cfg: dict) -> dict[str, tuple[int, list[int]]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"qkv": (h, [0, q, q + kv, q + 2 * kv]), "o": (q, [0, h]), "gate_up": (h, [0, i, 2 * i]), "down": (i, [0, h])}


class KernelCase:
    """One projection's SGMV operands: `slots` adapters of rank 16, T tokens spread over `adapters` of them."""

    def __init__(self, k: int, offsets: list[int], t: int, adapters: int, slots: int) -> None:
        from radixlm.runtime.lora.sgmv import LoRASegments

        self.k, self.offsets, self.t, self.adapters = k, offsets, t, adapters
        self.pieces, self.n_out = len(offsets) - 1, offsets[-1]
        self.a = torch.randn(slots, self.pieces * RANK, k, device="cuda", dtype=torch.bfloat16) / k**0.5
        self.b = torch.randn(slots, self.n_out, RANK, device="cuda", dtype=torch.bfloat16) * 0.01
        self.offs = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        self.widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
        self.x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
        self.out = torch.zeros(t, self.n_out, device="cuda", dtype=torch.bfloat16)
        self.seg = LoRASegments.build(torch.arange(t) % adapters, slots, torch.device("cuda"))

    def run(self, tile=None, split_tile=None) -> None:
        from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

        y = sgmv_shrink(self.x, self.a, self.seg, split_tile)
        sgmv_expand(y, self.b, self.offs, self.widest, RANK, self.out, self.seg, tile)

    def floors(self, bw: float) -> tuple[float, float]:
        """Bytes floors (s) of shrink and expand: every operand read or written once, y in bf16."""
        used, nr = min(self.t, self.adapters), self.pieces * RANK
        shrink = 2 * (self.t * self.k + used * nr * self.k + self.t * nr)
        expand = 2 * (self.t * nr + used * self.n_out * RANK + 2 * self.t * self.n_out)
        return shrink / bw, expand / bw


def kernel_times(cfg: dict, bw: float) -> list[dict]:
    """Shrink and expand (default tiles) inside CUDA graphs vs their bytes floors: decode sizes with
    8 adapters (1 at T = 1), a 64-adapter decode batch, and prefill sizes."""
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink, tiles

    rows = []
    for name, (k, offsets) in projection_shapes(cfg).items():
        for t, adapters, slots in ((1, 1, 8), (8, 8, 8), (64, 8, 8), (256, 8, 8), (256, 64, 64), (2048, 8, 8), (8192, 1, 8)):
            case = KernelCase(k, offsets, t, adapters, slots)
            y = sgmv_shrink(case.x, case.a, case.seg)
            ts = graph_time(lambda: sgmv_shrink(case.x, case.a, case.seg))
            te = graph_time(lambda: sgmv_expand(y, case.b, case.offs, case.widest, RANK, case.out, case.seg))
            fs, fe = case.floors(bw)
            tile = tiles(t, k, case.pieces * RANK)
            rows.append({"proj": name, "tokens": t, "adapters": adapters, "slots": slots, "shrink_us": ts * 1e6,
                         "shrink_floor_us": fs * 1e6, "expand_us": te * 1e6, "expand_floor_us": fe * 1e6,
                         "pct_of_floor": 100 * (fs + fe) / (ts + te), "split_k": tile.split_k, "block_m": tile.block_m})
    return rows


def tile_sweep(cfg: dict) -> list[dict]:
    """Shrink + expand together under other tiles than the defaults (decode at T = 1 and 64, prefill
    at 8192), to check the defaults' choice on this GPU."""
    from radixlm.runtime.lora.sgmv_triton import tiles

    rows = []
    variants = {1: [dict(split_k=s, expand_n=n) for s in (8, 16, 32) for n in (64, 128, 256)],
                64: [dict(block_m=m, split_k=s) for m in (16, 32) for s in (1, 4, 8)],
                8192: [dict(block_m=m, expand_n=n) for m in (32, 64, 128) for n in (64, 128, 256)]}
    for name in ("qkv", "gate_up", "down"):
        k, offsets = projection_shapes(cfg)[name]
        for t, options in variants.items():
            case = KernelCase(k, offsets, t, 1 if t == 1 else 8, 8)
            default = tiles(t, k, case.pieces * RANK)
            base = graph_time(lambda: case.run())
            best = (base, "default")
            for opt in options:
                tile = tiles(t, k, case.pieces * RANK, **opt)
                try:
                    dt = graph_time(lambda: case.run(tile, tile))
                except Exception as exc:  # noqa: BLE001 - a tile that does not compile is a finding, not a stop
                    print("tile", name, t, opt, "failed:", str(exc)[:200], flush=True)
                    continue
                best = min(best, (dt, str(opt)))
            rows.append({"proj": name, "tokens": t, "default": f"bm={default.block_m} split={default.split_k} "
                         f"en={default.expand_n}", "default_us": base * 1e6, "best_us": best[0] * 1e6, "best": best[1]})
    return rows


# ------------------------------------------------------------------------------------ (b) and decode
def run_b(eng, prompts: list[list[int]], outs: list[int], loras: list[str | None], slots: int = 8) -> dict:
    """Throughput, plus generated tokens per forward step (the mean batch) and, with adapters, the
    fewest decode steps `slots` device slots allow: an adapter holds its slot for at least its longest
    request's output, so steps >= sum over adapters of that / slots (the base: its longest output)."""
    before = eng.get_server_info()
    t = time.perf_counter()
    res = eng.generate(input_ids=prompts, sampling_params=params_for(outs), lora_path=loras)
    dt = time.perf_counter() - t
    after = eng.get_server_info()
    assert sum(r["meta_info"]["completion_tokens"] for r in res) == sum(outs)
    total = sum(map(len, prompts)) + sum(outs)
    steps = max(after["forward_steps"] - before["forward_steps"], 1)
    row = {"_outputs": [r["output_ids"] for r in res],
           "seconds": dt, "total_tok_s": total / dt, "output_tok_s": sum(outs) / dt, "forward_steps": steps,
           "tokens_per_forward_step": (after["generated_tokens"] - before["generated_tokens"]) / steps,
           "steps_by_kind": {k: after.get(k, 0) - before.get(k, 0)
                             for k in ("prefill_steps", "mixed_steps", "decode_steps", "overlapped_steps")}}
    longest: dict[str, int] = {}
    for name, out in zip(loras, outs):
        if name is not None:
            longest[name] = max(longest.get(name, 0), out)
    if longest:
        row["decode_steps_lower_bound"] = max(-(-sum(longest.values()) // slots), max(outs))
    return row


def swap_check(swapped: list[list[int]], resident: list[list[int]]) -> dict:
    """The same 64-adapter requests (greedy) on 8 slots, swapping adapters in on the side stream
    while steps run, and on 64 slots, where every adapter stays resident. bf16 batches of other
    sizes round differently, so a few outputs may part late; a swap racing with a forward (a slot
    overwritten while read) would corrupt adapters wholesale: most outputs would differ early."""
    same = sum(a == b for a, b in zip(swapped, resident))
    prefix = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(swapped, resident)]
    first8 = sum(p >= min(8, len(a)) for p, a in zip(prefix, swapped))
    return {"identical": f"{same}/{len(swapped)}", "first_8_tokens_identical": f"{first8}/{len(swapped)}",
            "mean_common_prefix": statistics.mean(prefix), "ok": first8 >= 0.9 * len(swapped)}


def decode_ms(eng, vocab: int, lora: str | None, steps: int = 256) -> float:
    """Batch-1 decode ms per step: (time of 1 + `steps` new tokens - time of 1) / `steps`, medians of 3."""
    rng = random.Random(7)

    def one(new: int) -> float:
        ids = [rng.randrange(1000, vocab - 1000) for _ in range(128)]
        t = time.perf_counter()
        eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
                     lora_path=lora)
        return time.perf_counter() - t

    t1 = statistics.median(one(1) for _ in range(3))
    tn = statistics.median(one(steps + 1) for _ in range(3))
    return (tn - t1) / steps * 1000


def main() -> None:
    import radixlm

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lora.json")
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--budget-s", type=float, default=540,
                    help="wall-time budget: a (b) row or the 64-slot engine that would end past it is skipped "
                         "(each row's time estimated from the base row's)")
    ap.add_argument("--skip", default="", help="comma-separated parts to leave out: " + "; ".join(
        f"{k} ({v})" for k, v in PARTS.items()))
    ap.add_argument("--check-only", action="store_true",
                    help="only the kernel check (check_kernels: cold Triton caches compile ~40 kernel variants)")
    ap.add_argument("--cuda-graph-max-bs", type=int, default=None,
                    help="every engine's decode graphs up to this batch size (default: the server's, 1,024 here); "
                         "a smaller run (--requests) never decodes more rows, and each graph size costs start-up")
    ap.add_argument("--lora-prefill-chunk", type=int, default=0,
                    help="the LoRA engines' --lora-prefill-chunk (0: the server's default, off)")
    ap.add_argument("--decode-kernels", default="fused",
                    help="other --lora-kernels values whose batch-1 decode is measured (one small engine each)")
    ap.add_argument("--rows", default="base,1,8,64",
                    help="(b) rows of the 8-slot LoRA engine: base (its base-model requests), 1, 8, 64 adapters")
    ap.add_argument("--step-variants", default="engine,overlap,fused",
                    help="variants of the per-step LoRA table (lora_step.py VARIANTS; serial always)")
    ap.add_argument("--step-sizes", default="1,8,32", help="token counts of the per-step LoRA table (lora_step.py)")
    args = ap.parse_args()
    skip = set(filter(None, args.skip.split(",")))
    if skip - PARTS.keys():
        ap.error(f"--skip: unknown part(s) {sorted(skip - PARTS.keys())}; known: {', '.join(PARTS)}")
    if args.check_only:
        skip = (skip | {"kernel", "sweep"}) - {"check"}
    root = Path(tempfile.mkdtemp(prefix="radixlm-lora-"))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip(),
                    "requests": args.requests, "skip": sorted(skip), "lora_prefill_chunk": args.lora_prefill_chunk,
                    "cuda_graph_max_bs": args.cuda_graph_max_bs,
                    "errors": {}, "section_s": {}}
    started = time.perf_counter()

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    def section(label: str, fn) -> None:
        """Run one part; a failure is recorded and the rest still runs."""
        t0 = time.perf_counter()
        try:
            fn()
        except Exception as exc:  # noqa: BLE001 - one failing part must not lose the others' figures
            report["errors"][label] = f"{type(exc).__name__}: {exc}"[:2000]
            print(f"{label} FAILED: {exc}", flush=True)
            traceback.print_exc()
        report["section_s"][label] = round(time.perf_counter() - t0, 1)
        save()

    cfg = LLAMA_8B
    vocab = cfg["vocab_size"]
    engine_args = {**ENGINE_ARGS, **({} if args.cuda_graph_max_bs is None else {"cuda_graph_max_bs": args.cuda_graph_max_bs})}
    report["copy_bytes_per_s"] = bw = copy_bandwidth()

    def kernels() -> None:
        if "check" not in skip:
            report["check_kernels"] = check_kernels(cfg)
            print("check_kernels all ok:", report["check_kernels"]["all_ok"], flush=True)
        if "kernel" not in skip:
            report["kernel"] = kernel_times(cfg, bw)
        if "sweep" not in skip:
            report["tile_sweep"] = tile_sweep(cfg)

    def step() -> None:
        from lora_step import step_table

        report["step"] = step_table([int(t) for t in args.step_sizes.split(",")], args.step_variants,
                                    sweep="sweep" not in skip)

    if not {"check", "kernel", "sweep"} <= skip:
        section("kernels", kernels)
    if args.check_only:
        print("check_kernels all ok:", report.get("check_kernels", {}).get("all_ok"), "failed:",
              [k for k, v in report.get("check_kernels", {}).items() if isinstance(v, dict) and not v["ok"]],
              "errors:", report["errors"], f"{report['section_s'].get('kernels')} s", flush=True)
        return
    if "step" not in skip:
        section("step", step)
    d = model_dir_for(cfg, root, "llama8b")
    prompts, outs = workload_b(args.requests, vocab)

    def base_engine() -> None:
        with radixlm.Engine(str(d), mem_fraction_static=0.85, **engine_args) as eng:
            eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8))
            if "decode" not in skip:
                report["base_decode_ms"] = decode_ms(eng, vocab, None)
            report["b_base"] = run_b(eng, prompts, outs, [None] * len(prompts))
            report["b_base"].pop("_outputs")
            report["base_graph_capture_s"] = eng.get_server_info().get("cuda_graph_capture_s")
        print("base", report["b_base"], "decode ms", report.get("base_decode_ms"), flush=True)

    section("base_engine", base_engine)
    t = time.perf_counter()
    names = [f"lora{i}" for i in range(64)]
    paths = tuple(f"{n}={write_adapter(root / n, cfg, seed=i)}" for i, n in enumerate(names))
    report["adapter_write_s"] = time.perf_counter() - t
    rng = random.Random(9)
    spread = {count: [None if count == 0 else names[rng.randrange(count)] for _ in prompts] for count in (0, 1, 8, 64)}

    def fits(label: str, count: int, slots: int) -> bool:
        """Whether a (b) row should end within --budget-s: estimated from the base row's time (x1.3 with
        1 or 8 adapters; more adapters than slots: half of it for prefill, plus the slot bound's decode
        steps at ~7.5 ms, a 32-layer step of ~75 rows on the H200)."""
        base_s = report.get("b_base", {}).get("seconds")
        guess = 0.0 if base_s is None else base_s * 1.3
        if base_s is not None and count > slots:
            longest: dict[str, int] = {}
            for name, out in zip(spread[count], outs):
                longest[name] = max(longest.get(name, 0), out)
            guess = 0.5 * base_s + sum(longest.values()) / slots * 0.0075
        if time.perf_counter() - started + guess <= args.budget_s:
            return True
        report["errors"][label] = f"skipped: past --budget-s {args.budget_s:.0f} (estimated {guess:.0f} s)"
        print(label, report["errors"][label], flush=True)
        return False

    def lora_row(eng, label: str, count: int, slots: int) -> None:
        if not fits(label, count, slots):
            return
        eng.flush_cache()
        report[label] = run_b(eng, prompts, outs, spread[count], slots)
        OUTPUTS_BY_LABEL[label] = report[label].pop("_outputs")
        if "b_base" in report:
            report[label]["vs_base"] = report[label]["total_tok_s"] / report["b_base"]["total_tok_s"]
        print(label, report[label], flush=True)
        save()

    def lora_engine(slots: int) -> None:
        t = time.perf_counter()
        with radixlm.Engine(str(d), mem_fraction_static=0.85, lora_paths=paths, max_loras_per_batch=slots,
                            lora_prefill_chunk=args.lora_prefill_chunk, **engine_args) as eng:
            key = f"slots{slots}"
            report[f"lora_engine_start_s_{key}"] = time.perf_counter() - t
            eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8), lora_path=names[:8])
            if slots == 8:
                if "mixed" not in skip:
                    report["check_mixed_batch"] = check_mixed_batch(eng, vocab, names)
                    print("check_mixed_batch", report["check_mixed_batch"], flush=True)
                if "decode" not in skip:
                    report["lora_decode_ms"] = decode_ms(eng, vocab, names[0])
                    report["lora_engine_base_decode_ms"] = decode_ms(eng, vocab, None)
                rows = set(args.rows.split(","))
                for label, count, row in (("b_lora_engine_base", 0, "base"), ("b_1_adapter", 1, "1"),
                                          ("b_8_adapters", 8, "8"), ("b_64_adapters_8_slots", 64, "64")):
                    if row in rows:
                        lora_row(eng, label, count, slots)
            else:
                if "decode" not in skip:
                    report[f"lora_decode_ms_{key}"] = decode_ms(eng, vocab, names[0])
                lora_row(eng, f"b_64_adapters_{slots}_slots", 64, slots)
            info = eng.get_server_info()
            report[f"lora_info_{key}"] = {k: v for k, v in info.get("lora", {}).items() if k not in ("adapters", "in_device_slots")}
            report[f"lora_graph_capture_s_{key}"] = info.get("cuda_graph_capture_s")

    section("lora_engine_8_slots", lambda: lora_engine(8))

    def decode_with(kernels: str) -> None:
        """Batch-1 decode on an engine with one adapter and another --lora-kernels value."""
        with radixlm.Engine(str(d), mem_fraction_static=0.85, lora_paths=paths[:1], lora_kernels=kernels,
                            **engine_args) as eng:
            eng.generate(input_ids=prompts[:2], sampling_params=params_for([8] * 2), lora_path=names[:1] * 2)
            report[f"lora_decode_ms_{kernels}"] = decode_ms(eng, vocab, names[0])
        print(f"batch-1 decode ms, --lora-kernels {kernels}:", report[f"lora_decode_ms_{kernels}"], flush=True)

    for kernels in filter(None, args.decode_kernels.split(",")):
        section(f"decode_{kernels}", lambda k=kernels: decode_with(k))
    if "slots64" in skip:
        report["errors"]["lora_engine_64_slots"] = "skipped: --skip slots64"
    elif time.perf_counter() - started < args.budget_s - 60 - 2 * report.get("b_base", {}).get("seconds", 30):
        section("lora_engine_64_slots", lambda: lora_engine(64))
    else:
        report["errors"]["lora_engine_64_slots"] = "skipped: past the time budget"
    if {"b_64_adapters_8_slots", "b_64_adapters_64_slots"} <= OUTPUTS_BY_LABEL.keys():
        report["swap_check"] = swap_check(OUTPUTS_BY_LABEL["b_64_adapters_8_slots"], OUTPUTS_BY_LABEL["b_64_adapters_64_slots"])
        print("swap_check", report["swap_check"], flush=True)
    row64, base = report.get("b_64_adapters_8_slots"), report.get("b_base")
    if row64 and base and "lora_decode_ms" in report and "decode_steps_lower_bound" in row64:
        # 8 adapters per batch: decode steps >= the bound, whatever the scheduler does; even if each
        # cost only a batch-1 LoRA step and prefill were free, the run takes bound x that
        fastest = row64["decode_steps_lower_bound"] * report["lora_decode_ms"] / 1e3
        row64["ceiling_vs_base"] = base["seconds"] / fastest
    if "lora_decode_ms" in report and "base_decode_ms" in report and "lora_engine_base_decode_ms" in report:
        report["batch1_decode_overhead"] = report["lora_decode_ms"] / report["base_decode_ms"] - 1
        report["batch1_base_request_on_lora_engine_overhead"] = report["lora_engine_base_decode_ms"] / report["base_decode_ms"] - 1
    save()
    print_table(report, args.out)


def print_table(report: dict, out: str) -> None:
    def get(*keys, fmt="{:.2f}"):
        node = report
        for k in keys:
            if not isinstance(node, dict) or k not in node:
                return "-"
            node = node[k]
        return fmt.format(node) if isinstance(node, (int, float)) and not isinstance(node, bool) else str(node)

    print(f"\n{'item':<38}{'result':>44}")
    print(f"{'kernels vs reference (cuda)':<38}{get('check_kernels', 'all_ok'):>44}")
    print(f"{'mixed batch rows = alone':<38}{get('check_mixed_batch', 'rows_identical'):>44}")
    print(f"{'64 adapters: swapped = resident':<38}{get('swap_check', 'identical'):>44}  first 8 tokens "
          f"{get('swap_check', 'first_8_tokens_identical')}, ok {get('swap_check', 'ok')}")
    print(f"{'(b) base engine tok/s':<38}{get('b_base', 'total_tok_s', fmt='{:.0f}'):>44}  "
          f"{get('b_base', 'tokens_per_forward_step', fmt='{:.0f}')} tok/step")
    for label, goal in (("b_lora_engine_base", ""), ("b_1_adapter", ""), ("b_8_adapters", ">= 0.85x"),
                        ("b_64_adapters_8_slots", ">= 0.75x"), ("b_64_adapters_64_slots", ">= 0.75x")):
        bound = get(label, "decode_steps_lower_bound", fmt="{:.0f}")
        print(f"{label:<38}{get(label, 'total_tok_s', fmt='{:.0f}'):>28} tok/s {get(label, 'vs_base'):>5}x  "
              f"{get(label, 'tokens_per_forward_step', fmt='{:.0f}')} tok/step, {get(label, 'forward_steps', fmt='{:.0f}')} steps"
              f" (decode steps >= {bound})  goal {goal or '-'}")
    print(f"{'64 adapters on 8 slots: ceiling':<38}{get('b_64_adapters_8_slots', 'ceiling_vs_base'):>28}x of base "
          f"(decode steps >= bound, each >= a batch-1 LoRA step); swaps {get('lora_info_slots8', 'swaps')}")
    for r in report.get("step", {}).get("rows", []):
        if " " not in r["variant"]:
            print(f"step T={r['tokens']:<3} {r['variant']:<8} LoRA {r['lora_ms']:.3f} ms per 32-layer step "
                  f"({r['vs_gemms']:+.1%} of the GEMMs' {r['base_ms']:.3f} ms)")
    fused = [r for r in report.get("step", {}).get("rows", []) if r["variant"].startswith("fused")]
    for t in sorted({r["tokens"] for r in fused}):
        best = min((r for r in fused if r["tokens"] == t), key=lambda r: r["ms"])
        print(f"step T={t:<3} best fused tiles: {best['variant']} LoRA {best['lora_ms']:.3f} ms")
    print(f"{'batch-1 decode ms/step base / lora':<38}{get('base_decode_ms'):>30} / {get('lora_decode_ms')}"
          f"  overhead {get('batch1_decode_overhead', fmt='{:+.1%}')} (goal <= +10%)")
    for key in [k for k in report if k.startswith("lora_decode_ms_") and not k.endswith("slots64")]:
        overhead = report[key] / report["base_decode_ms"] - 1 if "base_decode_ms" in report else float("nan")
        print(f"{'batch-1 decode, --lora-kernels ' + key[15:]:<38}{report[key]:>30.2f}  overhead {overhead:+.1%}")
    print(f"{'batch-1 base request on LoRA engine':<38}{get('lora_engine_base_decode_ms'):>30} ms"
          f"  overhead {get('batch1_base_request_on_lora_engine_overhead', fmt='{:+.1%}')}")
    print(f"{'batch-1 decode ms/step, 64 slots':<38}{get('lora_decode_ms_slots64'):>30}")
    print("\nSGMV in CUDA graphs, us (shrink + expand vs bytes floor; bw", get("copy_bytes_per_s", fmt="{:.3g}"), "B/s)")
    print(f"{'proj':<8}{'T':>6}{'ad.':>4}{'slots':>6}{'shrink':>9}{'floor':>8}{'expand':>9}{'floor':>8}{'% floor':>9}{'split':>6}{'bm':>4}")
    for r in report.get("kernel", []):
        print(f"{r['proj']:<8}{r['tokens']:>6}{r['adapters']:>4}{r['slots']:>6}{r['shrink_us']:>9.1f}{r['shrink_floor_us']:>8.1f}"
              f"{r['expand_us']:>9.1f}{r['expand_floor_us']:>8.1f}{r['pct_of_floor']:>9.0f}{r['split_k']:>6}{r['block_m']:>4}")
    by_t1 = [r for r in report.get("kernel", []) if r["tokens"] == 1]
    if by_t1:
        per_step = sum(r["shrink_us"] + r["expand_us"] for r in by_t1) * 32
        print(f"batch-1 LoRA per decode step (32 layers x these kernels): {per_step / 1e3:.3f} ms")
    for r in report.get("tile_sweep", []):
        print(f"tiles {r['proj']:<8} T={r['tokens']:<5} default ({r['default']}) {r['default_us']:.1f} us, best {r['best_us']:.1f} us: {r['best']}")
    print("seconds per part:", json.dumps(report.get("section_s", {})), f"adapters written in "
          f"{get('adapter_write_s', fmt='{:.1f}')} s, LoRA engine started in {get('lora_engine_start_s_slots8', fmt='{:.1f}')} s")
    if report.get("errors"):
        print("errors:", json.dumps(report["errors"])[:1500])
    print(f"wall {report.get('wall_s', 0):.0f} s -> {out}")


if __name__ == "__main__":
    main()

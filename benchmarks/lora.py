"""Multi-LoRA on the H200 (issue 21), one command, one table, one JSON:

  check   the Triton SGMV shrink/expand kernels vs the torch reference on CUDA (8B shapes, bf16 and
          fp32, ragged segments with base rows); a batch mixing 4 adapters + the base model vs each alone
  kernel  SGMV shrink/expand time vs the bytes floor (measured copy bandwidth), 8 adapters, rank 16
  (b)     workload (b) (1,000 requests, in U[128,1024], out U[64,512]) on a Llama-3.1-8B-shaped model:
          the base engine, then one --enable-lora engine serving the base model, 1, 8 and 64 rank-16
          adapters (q,k,v,o,gate,up,down; 8 per batch, the rest swapped from host memory)
  decode  batch-1 decode ms/step: base engine vs a rank-16 adapter, and a base request on the LoRA
          engine (its base-only CUDA graph); graph capture seconds per variant
  rows    per (b) run, generated tokens per forward step (the mean batch) and, with adapters, the most
          rows the 8 device slots can hold (the 8 adapters with most requests): with 64 adapters
          uniform over --requests 600, ~9 requests each, so the batch is bounded near 8 x 9-12

    python benchmarks/lora.py --out $OUT/lora.json
Random bf16 weights (--load-format dummy); the adapters are PEFT-format folders written here with
safetensors (adapter_config.json + adapter_model.safetensors: PEFT's own format, no peft needed).
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
from collections import Counter
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from gpu_suite import LLAMA_8B, model_dir_for  # noqa: E402
from gpu_throughput import ENGINE_ARGS, params_for, workload_b  # noqa: E402

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK = 16


def features(cfg: dict) -> dict[str, tuple[int, int]]:
    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h), "gate_proj": (h, i),
            "up_proj": (h, i), "down_proj": (i, h)}


def write_adapter(folder: Path, cfg: dict, seed: int, rank: int = RANK) -> Path:
    """A PEFT LoRA folder with random weights, exactly as peft's save_pretrained writes it."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator(device="cuda").manual_seed(seed)
    tensors = {}
    for layer in range(cfg["num_hidden_layers"]):
        for module, (fin, fout) in features(cfg).items():
            part = "self_attn" if module in TARGETS[:4] else "mlp"
            key = f"base_model.model.model.layers.{layer}.{part}.{module}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, fin, generator=g, device="cuda") / fin**0.5).bfloat16().cpu()
            tensors[f"{key}.lora_B.weight"] = (torch.randn(fout, rank, generator=g, device="cuda") * 0.01).bfloat16().cpu()
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

    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"qkv": (h, [0, q, q + kv, q + 2 * kv]), "o": (q, [0, h]), "gate_up": (h, [0, i, 2 * i]), "down": (i, [0, h])}
    g = torch.Generator(device="cuda").manual_seed(0)
    out: dict = {}
    for dtype in (torch.float32, torch.bfloat16):
        for name, (k, offsets) in shapes.items():
            pieces = len(offsets) - 1
            a = (torch.randn(8, pieces * RANK, k, generator=g, device="cuda") / k**0.5).to(dtype)
            b = torch.randn(8, offsets[-1], RANK, generator=g, device="cuda").to(dtype)
            t = 300
            x = torch.randn(t, k, generator=g, device="cuda").to(dtype)
            token_slots = torch.randint(-1, 8, (t,), generator=g, device="cuda").cpu()
            seg = LoRASegments.build(token_slots, 8, torch.device("cuda"))
            used = (token_slots >= 0).cuda()
            y_ref, y = shrink_ref(x, a, seg), sgmv_shrink(x, a, seg).sum(0)
            base = torch.randn(t, offsets[-1], generator=g, device="cuda").to(dtype)
            o_ref, o = base.clone(), base.clone()
            expand_ref(y_ref, b, offsets, RANK, o_ref, seg)
            widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
            sgmv_expand(y_ref, b, torch.tensor(offsets, dtype=torch.int32, device="cuda"), widest, RANK, o, seg)
            tol = 1e-3 if dtype == torch.float32 else 3e-2
            err_y = ((y[used].float() - y_ref[used].float()).abs().max() / y_ref[used].float().abs().max()).item()
            err_o = ((o.float() - o_ref.float()).abs().max() / (o_ref - base).float().abs().max()).item()
            base_ok = bool(torch.equal(o[~used], base[~used]))
            out[f"{name}_{str(dtype)[6:]}"] = {"shrink_rel_err": err_y, "expand_rel_err": err_o, "base_rows_untouched": base_ok,
                                               "ok": err_y < tol and err_o < tol and base_ok}
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
def kernel_times(cfg: dict, bw: float) -> list[dict]:
    from radixlm.runtime.lora.sgmv import LoRASegments
    from radixlm.runtime.lora.sgmv_triton import sgmv_expand, sgmv_shrink

    h, i = cfg["hidden_size"], cfg["intermediate_size"]
    q, kv = cfg["num_attention_heads"] * cfg["head_dim"], cfg["num_key_value_heads"] * cfg["head_dim"]
    shapes = {"qkv": (h, [0, q, q + kv, q + 2 * kv]), "gate_up": (h, [0, i, 2 * i]), "down": (i, [0, h])}
    rows = []
    for name, (k, offsets) in shapes.items():
        pieces, n_out = len(offsets) - 1, offsets[-1]
        a = torch.randn(8, pieces * RANK, k, device="cuda", dtype=torch.bfloat16)
        b = torch.randn(8, n_out, RANK, device="cuda", dtype=torch.bfloat16)
        offs = torch.tensor(offsets, dtype=torch.int32, device="cuda")
        widest = max(hi - lo for lo, hi in zip(offsets, offsets[1:]))
        for t in (1, 8, 64, 512):
            x = torch.randn(t, k, device="cuda", dtype=torch.bfloat16)
            out = torch.zeros(t, n_out, device="cuda", dtype=torch.bfloat16)
            seg = LoRASegments.build(torch.arange(t) % 8, 8, torch.device("cuda"))
            used = min(t, 8)
            y = sgmv_shrink(x, a, seg)

            def timed(fn) -> float:
                for _ in range(3):
                    fn()
                torch.cuda.synchronize()
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                for _ in range(50):
                    fn()
                end.record()
                torch.cuda.synchronize()
                return start.elapsed_time(end) / 50 / 1e3

            ts = timed(lambda: sgmv_shrink(x, a, seg))
            te = timed(lambda: sgmv_expand(y, b, offs, widest, RANK, out, seg))
            shrink_bytes = 2 * (t * k + used * pieces * RANK * k + t * pieces * RANK)
            expand_bytes = 2 * (t * pieces * RANK + used * n_out * RANK + 2 * t * n_out)
            rows.append({"proj": name, "tokens": t, "adapters": used, "shrink_us": ts * 1e6,
                         "shrink_floor_us": shrink_bytes / bw * 1e6, "expand_us": te * 1e6,
                         "expand_floor_us": expand_bytes / bw * 1e6})
    return rows


# ------------------------------------------------------------------------------------ (b) and decode
def run_b(eng, prompts: list[list[int]], outs: list[int], loras: list[str | None], slots: int = 8) -> dict:
    """Throughput, plus generated tokens per forward step (the mean batch) and, with adapters, the
    most rows `slots` device slots can hold at once: the rows of the `slots` adapters with most requests."""
    before = eng.get_server_info()
    t = time.perf_counter()
    res = eng.generate(input_ids=prompts, sampling_params=params_for(outs), lora_path=loras)
    dt = time.perf_counter() - t
    after = eng.get_server_info()
    assert sum(r["meta_info"]["completion_tokens"] for r in res) == sum(outs)
    total = sum(map(len, prompts)) + sum(outs)
    steps = max(after["forward_steps"] - before["forward_steps"], 1)
    row = {"seconds": dt, "total_tok_s": total / dt, "output_tok_s": sum(outs) / dt,
           "tokens_per_forward_step": (after["generated_tokens"] - before["generated_tokens"]) / steps}
    per_adapter = sorted(Counter(n for n in loras if n is not None).values(), reverse=True)
    if per_adapter:
        row["max_rows_in_slots"] = sum(per_adapter[:slots]) + sum(n is None for n in loras)
    return row


def decode_ms(eng, vocab: int, lora: str | None) -> float:
    rng = random.Random(7)

    def one(new: int) -> float:
        ids = [rng.randrange(1000, vocab - 1000) for _ in range(128)]
        t = time.perf_counter()
        eng.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True},
                     lora_path=lora)
        return time.perf_counter() - t

    t1 = statistics.median(one(1) for _ in range(3))
    tn = statistics.median(one(257) for _ in range(3))
    return (tn - t1) / 256 * 1000


def main() -> None:
    import radixlm

    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/lora.json")
    ap.add_argument("--requests", type=int, default=1000)
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="radixlm-lora-"))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    started = time.perf_counter()

    def save() -> None:
        report["wall_s"] = time.perf_counter() - started
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))

    cfg = LLAMA_8B
    vocab = cfg["vocab_size"]
    report["check_kernels"] = check_kernels(cfg)
    print("check_kernels", report["check_kernels"], flush=True)
    report["copy_bytes_per_s"] = bw = copy_bandwidth()
    report["kernel"] = kernel_times(cfg, bw)
    for row in report["kernel"]:
        print("kernel", {k: round(v, 1) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    save()
    d = model_dir_for(cfg, root, "llama8b")
    prompts, outs = workload_b(args.requests, vocab)
    with radixlm.Engine(str(d), mem_fraction_static=0.85, **ENGINE_ARGS) as eng:
        eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8))
        report["base_decode_ms"] = decode_ms(eng, vocab, None)
        report["b_base"] = run_b(eng, prompts, outs, [None] * len(prompts))
        report["base_graph_capture_s"] = eng.get_server_info().get("cuda_graph_capture_s")
    print("base", report["b_base"], "decode ms", report["base_decode_ms"], flush=True)
    save()
    t = time.perf_counter()
    names = [f"lora{i}" for i in range(64)]
    paths = [f"{n}={write_adapter(root / n, cfg, seed=i)}" for i, n in enumerate(names)]
    report["adapter_write_s"] = time.perf_counter() - t
    t = time.perf_counter()
    with radixlm.Engine(str(d), mem_fraction_static=0.85, lora_paths=tuple(paths), max_loras_per_batch=8,
                        **ENGINE_ARGS) as eng:
        report["lora_engine_start_s"] = time.perf_counter() - t
        eng.generate(input_ids=prompts[:8], sampling_params=params_for([8] * 8), lora_path=names[:8])
        report["check_mixed_batch"] = check_mixed_batch(eng, vocab, names)
        print("check_mixed_batch", report["check_mixed_batch"], flush=True)
        report["lora_decode_ms"] = decode_ms(eng, vocab, names[0])
        report["lora_engine_base_decode_ms"] = decode_ms(eng, vocab, None)
        rng = random.Random(9)
        for label, count in (("b_lora_engine_base", 0), ("b_1_adapter", 1), ("b_8_adapters", 8), ("b_64_adapters", 64)):
            loras = [None if count == 0 else names[rng.randrange(count)] for _ in prompts]
            eng.flush_cache()
            report[label] = run_b(eng, prompts, outs, loras)
            report[label]["vs_base"] = report[label]["total_tok_s"] / report["b_base"]["total_tok_s"]
            print(label, report[label], flush=True)
            save()
        info = eng.get_server_info()
        report["lora_info"] = {k: v for k, v in info.get("lora", {}).items() if k != "adapters"}
        report["lora_graph_capture_s"] = info.get("cuda_graph_capture_s")
    report["batch1_decode_overhead"] = report["lora_decode_ms"] / report["base_decode_ms"] - 1
    report["batch1_base_request_on_lora_engine_overhead"] = report["lora_engine_base_decode_ms"] / report["base_decode_ms"] - 1
    save()
    print(f"\n{'item':<34}{'result':>40}")
    print(f"{'kernels vs reference (cuda)':<34}{str(report['check_kernels']['all_ok']):>40}")
    print(f"{'mixed batch rows = alone':<34}{report['check_mixed_batch']['rows_identical']:>40}")
    base = report["b_base"]["total_tok_s"]
    print(f"{'(b) base engine':<34}{base:>34.0f} tok/s")
    for label in ("b_lora_engine_base", "b_1_adapter", "b_8_adapters", "b_64_adapters"):
        r = report[label]
        bound = f" (rows <= {r['max_rows_in_slots']})" if "max_rows_in_slots" in r else ""
        print(f"{label:<34}{r['total_tok_s']:>28.0f} tok/s {r['vs_base']:>5.2f}x  "
              f"{r['tokens_per_forward_step']:.0f} tok/step{bound}")
    print(f"{'(b) base engine tok/step':<34}{report['b_base']['tokens_per_forward_step']:>34.0f}")
    print(f"{'batch-1 decode ms/step base/lora':<34}{report['base_decode_ms']:>20.2f} / {report['lora_decode_ms']:.2f} "
          f"(+{100 * report['batch1_decode_overhead']:.1f}%)")
    print(f"{'batch-1 base request, LoRA engine':<34}{report['lora_engine_base_decode_ms']:>20.2f} ms "
          f"(+{100 * report['batch1_base_request_on_lora_engine_overhead']:.1f}%)")
    print(f"{'graph capture s base / lora eng.':<34}{str(report['base_graph_capture_s']):>40}")
    print(f"{'':<34}{str(report['lora_graph_capture_s']):>40}")
    print(f"wall {report['wall_s']:.0f} s -> {args.out}")


if __name__ == "__main__":
    main()

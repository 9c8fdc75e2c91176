"""Scale-out on two H200s (`nvidia-h200-x2`), one table, one JSON, self-checking:

  check  TP=2 and PP=2 give TP=1's greedy outputs on a small random Llama (float32, real weights on
         disk, Triton + CUDA graphs + NCCL): identical except where TP=1's top-2 gap is a near tie
  (a)    batch-1 decode tok/s, Llama-3.1-8B shape: TP=1 (one GPU) vs TP=2 (two GPUs)
  (b)    throughput, 128 requests x 512 prompt / 256 output tokens: TP=1 vs TP=2
  (c)    DP=2 (one GPU each) on a shared-prefix workload, cache-aware vs round-robin routing: 16 groups
         x 16 requests, each a 2,048-token group prefix + 64 own tokens, 64 output tokens, 64 in flight

    python benchmarks/scale_out.py --items check,a,b --out $OUT/scale_out_tp.json
    python benchmarks/scale_out.py --items c --out $OUT/scale_out_dp.json
(two commands: each stays well under 10 minutes). Random bf16 weights for (a)-(c)
(`--load-format dummy --skip-tokenizer-init`): speed does not depend on values. Every generation must
return the requested token count; the run ends with PASS/FAIL lines and exits 1 on any FAIL.
"""
from __future__ import annotations

import argparse
import asyncio
import gc
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

sys.path.insert(0, str(Path(__file__).resolve().parent))
from gpu_suite import LLAMA_8B, gen, model_dir_for, rand_ids  # noqa: E402  (same folder)

MODEL = LLAMA_8B
DRY_RUN = False  # set by a CPU dry run of this script's logic (tiny sizes, no GPU)
BIG = {"load_format": "dummy", "dtype": "bfloat16", "skip_tokenizer_init": True, "mem_fraction_static": 0.6,
       "context_length": 8192, "cuda_graph_max_bs": 256}
SMALL = {"dtype": "float32", "skip_tokenizer_init": True, "mem_fraction_static": 0.3, "chunked_prefill_size": 512}
NEAR_TIE = 1e-3
# Workload sizes (a dry run on a CPU shrinks them).
SIZES = {"check_prompts": 24, "check_len": 600, "a_prompt": 128, "a_new": 257, "b_requests": 128, "b_prompt": 512, "b_new": 256,
         "c_groups": 16, "c_per_group": 16, "c_prefix": 2048, "c_own": 64, "c_new": 64, "c_inflight": 64}


def start_engine(model_dir: Path, notes: list[str], **options):
    """An Engine; if a multi-GPU one fails to start with CUDA graphs (NCCL inside a capture), say so and
    retry without them, so the timings still come."""
    import radixlm

    try:
        return radixlm.Engine(str(model_dir), **options)
    except Exception as exc:  # noqa: BLE001
        if options.get("tp_size", 1) * options.get("pp_size", 1) == 1 or options.get("disable_cuda_graph"):
            raise
        traceback.print_exc()
        notes.append(f"{options}: failed with CUDA graphs ({type(exc).__name__}); retried without")
        return radixlm.Engine(str(model_dir), **options, disable_cuda_graph=True)


def settle() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    time.sleep(2)  # the engine's processes free their GPUs


# ------------------------------------------------------------------------------------------ check
def check_outputs(root: Path, notes: list[str]) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)  # spread logits: fewer near ties
    d = root / "small"
    hf.save_pretrained(str(d))
    del hf
    rng = random.Random(0)
    prompts = [rand_ids(rng.randint(5, SIZES["check_len"]), 4096, rng) for _ in range(SIZES["check_prompts"])]
    params = {"temperature": 0, "max_new_tokens": 24, "ignore_eos": True}
    small = SMALL
    with start_engine(d, notes, **small) as eng:
        ref = eng.generate(input_ids=prompts, sampling_params=params, return_logprob=True, top_logprobs_num=2)
    settle()
    result: dict = {}
    for name, opts in (("tp2", {"tp_size": 2}), ("pp2", {"pp_size": 2})):
        with start_engine(d, notes, **small, **opts) as eng:
            outs = eng.generate(input_ids=prompts, sampling_params=params)
            alone = [eng.generate(input_ids=p, sampling_params=params) for p in prompts[:4]]
            locked = eng.get_server_info()["kv_locked_tokens"]
        settle()
        mismatches = 0
        for r, o in zip(ref, outs):
            for i, (a, b) in enumerate(zip(o["output_ids"], r["output_ids"])):
                if a != b:
                    top = r["meta_info"]["output_top_logprobs"][i]
                    mismatches += (top[0][0] - top[1][0]) >= NEAR_TIE
                    break
        result[f"{name}_mismatches_beyond_near_ties"] = mismatches
        result[f"{name}_diverged_at_near_ties"] = sum(o["output_ids"] != r["output_ids"] for r, o in zip(ref, outs)) - mismatches
        result[f"{name}_alone_equals_batch"] = all(a["output_ids"] == b["output_ids"] for a, b in zip(alone, outs))
        result[f"{name}_kv_locked_after"] = locked
    return result


# ------------------------------------------------------------------------------------------ (a), (b)
def tp_timings(model_dir: Path, vocab: int, tp: int, notes: list[str]) -> dict:
    rng = random.Random(1)
    res: dict = {}
    t = time.perf_counter()
    with start_engine(model_dir, notes, tp_size=tp, **BIG) as eng:
        res["startup_s"] = time.perf_counter() - t
        z = SIZES
        gen(eng, rand_ids(64, vocab, rng), 8)  # warm-up
        t1 = statistics.median(gen(eng, rand_ids(z["a_prompt"], vocab, rng), 1) for _ in range(3))
        tn = statistics.median(gen(eng, rand_ids(z["a_prompt"], vocab, rng), z["a_new"]) for _ in range(2))
        res["a_decode_ms_per_step"] = (tn - t1) / (z["a_new"] - 1) * 1000
        res["a_decode_tok_s"] = (z["a_new"] - 1) / (tn - t1)
        prompts = [rand_ids(z["b_prompt"], vocab, rng) for _ in range(z["b_requests"])]
        gen(eng, prompts[:8], 16)  # warm the batched paths
        dt = gen(eng, prompts, z["b_new"])
        res["b_seconds"] = dt
        res["b_output_tok_s"] = z["b_requests"] * z["b_new"] / dt
        res["b_total_tok_s"] = z["b_requests"] * (z["b_prompt"] + z["b_new"]) / dt
    settle()
    return res


# ------------------------------------------------------------------------------------------ (c)
def shared_prefix_workload(vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    z = SIZES
    groups = [rand_ids(z["c_prefix"], vocab, rng) for _ in range(z["c_groups"])]
    reqs = [g + rand_ids(z["c_own"], vocab, rng) for g in groups for _ in range(z["c_per_group"])]
    rng.shuffle(reqs)
    return reqs


async def run_concurrent(eng, prompts: list[list[int]], new: int, inflight: int) -> float:
    sem = asyncio.Semaphore(inflight)
    params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}

    async def one(ids: list[int]) -> None:
        async with sem:
            out = await eng.async_generate(input_ids=ids, sampling_params=params)
            assert out["meta_info"]["completion_tokens"] == new, out["meta_info"]

    t = time.perf_counter()
    await asyncio.gather(*(one(p) for p in prompts))
    return time.perf_counter() - t


def dp_routing(model_dir: Path, vocab: int, notes: list[str]) -> dict:
    res: dict = {}
    z = SIZES
    prompts = shared_prefix_workload(vocab, seed=3)
    with start_engine(model_dir, notes, dp_size=2, load_balance_method="round_robin", **BIG) as eng:
        router = eng.tokenizer_manager.replicas.router
        asyncio.run(run_concurrent(eng, shared_prefix_workload(vocab, seed=99)[:32], 8, 32))  # warm-up
        for method in ("round_robin", "cache_aware"):  # round_robin first: it leaves the router's trees empty
            assert eng.flush_cache(), "flush_cache refused: requests still running"
            router.method = method  # the same engine and workload, only the routing differs
            before = eng.get_server_info()
            dt = asyncio.run(run_concurrent(eng, prompts, z["c_new"], z["c_inflight"]))
            after = eng.get_server_info()
            per = {r["dp_rank"]: r for r in after["dp_replicas"]}
            per0 = {r["dp_rank"]: r for r in before["dp_replicas"]}
            prompt_tokens = after["prompt_tokens"] - before["prompt_tokens"]
            res[method] = {
                "seconds": dt,
                "requests_per_s": len(prompts) / dt,
                "output_tok_s": len(prompts) * z["c_new"] / dt,
                "cache_hit_rate": (after["cached_tokens"] - before["cached_tokens"]) / max(prompt_tokens, 1),
                "prompt_tokens_per_replica": [per[i]["prompt_tokens"] - per0[i]["prompt_tokens"] for i in sorted(per)],
            }
            print("c", method, res[method], flush=True)
    settle()
    return res


# ------------------------------------------------------------------------------------------ main
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/scale_out.json")
    ap.add_argument("--items", default="check,a,b,c", help="any of check,a,b,c (a and b share engines)")
    args = ap.parse_args()
    items = set(args.items.split(","))
    if torch.cuda.device_count() < 2 and not DRY_RUN:
        sys.exit(f"scale_out.py needs 2 GPUs; {torch.cuda.device_count()} visible")
    root = Path(tempfile.mkdtemp(prefix="radixlm-scale-"))
    notes: list[str] = []
    report: dict = {"device": "cpu (dry run)" if DRY_RUN else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name()}",
                    "torch": torch.__version__,
                    "date": time.strftime("%Y-%m-%d"), "notes": notes,
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    big = model_dir_for(MODEL, root, "big")
    vocab = MODEL["vocab_size"]
    sections = []
    if "check" in items:
        sections.append(("check", lambda: check_outputs(root, notes)))
    if items & {"a", "b"}:
        sections += [("tp1", lambda: tp_timings(big, vocab, 1, notes)), ("tp2", lambda: tp_timings(big, vocab, 2, notes))]
    if "c" in items:
        sections.append(("c", lambda: dp_routing(big, vocab, notes)))
    for name, run in sections:
        t = time.perf_counter()
        try:
            report[name] = run()
        except Exception as exc:  # noqa: BLE001 - record it and go on: the other sections still count
            traceback.print_exc()
            report[name] = {"error": repr(exc)}
        report[name]["wall_s"] = time.perf_counter() - t
        print(name, report[name], flush=True)

    checks: list[tuple[str, bool, str]] = []
    if "check" in items:
        c = report["check"]
        for p in ("tp2", "pp2"):
            ok = c.get(f"{p}_mismatches_beyond_near_ties") == 0 and c.get(f"{p}_alone_equals_batch") is True \
                and c.get(f"{p}_kv_locked_after") == 0
            checks.append((f"{p.upper()} outputs = TP=1 (near-tie rule)", ok, json.dumps({k: v for k, v in c.items() if k.startswith(p)})))
    rows = []
    if items & {"a", "b"}:
        t1, t2 = report["tp1"], report["tp2"]
        if "error" not in t1 and "error" not in t2:
            sa = t2["a_decode_tok_s"] / t1["a_decode_tok_s"]
            sb = t2["b_output_tok_s"] / t1["b_output_tok_s"]
            rows += [("(a) batch-1 decode tok/s", t1["a_decode_tok_s"], t2["a_decode_tok_s"], f"TP=2 {sa:.2f}x"),
                     ("(b) throughput output tok/s", t1["b_output_tok_s"], t2["b_output_tok_s"], f"TP=2 {sb:.2f}x")]
            checks.append(("TP=2 batch-1 decode faster than TP=1", sa > 1.0, f"{sa:.2f}x"))
            checks.append(("TP=2 throughput higher than TP=1", sb > 1.0, f"{sb:.2f}x"))
        else:
            checks.append(("TP timings ran", False, f"tp1 {t1.get('error')} / tp2 {t2.get('error')}"))
    if "c" in items:
        c = report["c"]
        if "error" not in c:
            rr, ca = c["round_robin"], c["cache_aware"]
            rows += [("(c) DP=2 requests/s", rr["requests_per_s"], ca["requests_per_s"],
                      f"cache-aware {ca['requests_per_s'] / rr['requests_per_s']:.2f}x round-robin"),
                     ("(c) DP=2 prefix-cache hit rate", rr["cache_hit_rate"], ca["cache_hit_rate"], "")]
            checks.append(("cache-aware hit rate > round-robin's", ca["cache_hit_rate"] > rr["cache_hit_rate"],
                           f"{ca['cache_hit_rate']:.3f} vs {rr['cache_hit_rate']:.3f}"))
            checks.append(("cache-aware uses both replicas", min(ca["prompt_tokens_per_replica"]) > 0,
                           str(ca["prompt_tokens_per_replica"])))
        else:
            checks.append(("DP routing ran", False, c["error"]))
    report["table"] = [{"item": a, "baseline": b, "scaled": s, "note": n} for a, b, s, n in rows]
    report["checks"] = [{"check": a, "pass": ok, "detail": d} for a, ok, d in checks]
    print(f"\n{'item':<32}{'TP=1 / round-robin':>20}{'TP=2 / cache-aware':>20}  note")
    for a, b, s, n in rows:
        print(f"{a:<32}{b:>20.3f}{s:>20.3f}  {n}")
    for a, ok, d in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {a}  {d}")
    for n in notes:
        print("note:", n)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))
    sys.exit(0 if all(ok for _, ok, _ in checks) else 1)


if __name__ == "__main__":
    main()

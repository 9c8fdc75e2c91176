"""The H200 suite (issue: GPU fast path), one command, one table, one JSON:

  check  engine (Triton kernels + CUDA graphs) vs transformers on the same random weights, GPU
  (a)    batch-1 decode tok/s of a Llama-3.1-8B-shaped model vs the bandwidth floor, and transformers
  (c)    TTFT of one 1,024-token prompt on an idle engine
  (d)    prefill tok/s for 4 x 2,048 tokens vs the measured bf16 matmul rate

    python benchmarks/gpu_suite.py --out $OUT/gpu_suite.json
Random bf16 weights (`--load-format dummy`) and random token ids: speed does not depend on values.
"""
from __future__ import annotations

import argparse
import gc
import json
import random
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import torch

LLAMA_8B = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
    "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32, "num_key_value_heads": 8,
    "head_dim": 128, "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "max_position_embeddings": 131072,
    "rope_scaling": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                     "original_max_position_embeddings": 8192},
    "tie_word_embeddings": False, "bos_token_id": 128000, "eos_token_id": 128001, "torch_dtype": "bfloat16",
}


def measure_ceilings() -> dict[str, float]:
    x = torch.empty(1 << 30, dtype=torch.uint8, device="cuda").random_()  # 1 GiB, random
    y = torch.empty_like(x)
    for _ in range(3):
        y.copy_(x)
    torch.cuda.synchronize()
    ev = [torch.cuda.Event(enable_timing=True) for _ in range(2)]
    times = []
    for _ in range(10):
        ev[0].record()
        y.copy_(x)
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    copy_bw = 2 * x.numel() / statistics.median(times)
    del x, y
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    torch.cuda.synchronize()
    times = []
    for _ in range(10):
        ev[0].record()
        a @ b
        ev[1].record()
        torch.cuda.synchronize()
        times.append(ev[0].elapsed_time(ev[1]) / 1e3)
    flops = 2 * 8192**3 / statistics.median(times)
    del a, b
    torch.cuda.empty_cache()
    return {"copy_bytes_per_s": copy_bw, "bf16_matmul_flops": flops}


def model_dir_for(cfg: dict, root: Path, name: str) -> Path:
    d = root / name
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg))
    return d


def rand_ids(n: int, vocab: int, rng: random.Random) -> list[int]:
    return [rng.randrange(1000, vocab - 1000) for _ in range(n)]


def gen(engine, ids, new: int) -> float:
    t = time.perf_counter()
    out = engine.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": new, "ignore_eos": True})
    dt = time.perf_counter() - t
    outs = out if isinstance(out, list) else [out]
    assert all(o["meta_info"]["completion_tokens"] == new for o in outs), outs[0]["meta_info"]
    return dt


def build_small_llama(root: Path):
    """The GPU checks' small random Llama (float32; LM head x 8 so logits are spread), saved in root/small:
    (folder, transformers model on the CPU)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    cfg = LlamaConfig(vocab_size=4096, hidden_size=512, intermediate_size=1024, num_hidden_layers=4,
                      num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
    torch.manual_seed(0)
    hf = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
    with torch.no_grad():
        hf.lm_head.weight.mul_(8.0)
    d = root / "small"
    hf.save_pretrained(str(d))
    return d, hf


def check_correctness(root: Path) -> dict:
    """Small random Llama in float32 and bf16: engine on GPU (Triton + graphs) vs transformers."""
    import radixlm

    d, hf = build_small_llama(root)
    hf = hf.cuda().eval()
    rng = random.Random(0)
    prompts = [rand_ids(rng.randint(5, 700), 4096, rng) for _ in range(40)]
    new = 24
    refs = []
    with torch.no_grad():
        # No EOS: `min_new_tokens` would mask EOS's logit, which the engine's ignore_eos never does (a
        # step whose argmax is EOS then "diverged" at a gap of ~1.7; benchmarks/check_fp32_exactness.py).
        hf.generation_config.eos_token_id = None
        for p in prompts[:8]:
            g = hf.generate(torch.tensor([p], device="cuda"), max_new_tokens=new, do_sample=False,
                            output_logits=True, return_dict_in_generate=True, pad_token_id=0)
            refs.append((g.sequences[0, len(p):].tolist(), [step[0].float() for step in g.logits]))
    result: dict = {}
    with radixlm.Engine(str(d), dtype="float32", skip_tokenizer_init=True, mem_fraction_static=0.3,
                        chunked_prefill_size=512) as eng:
        params = {"temperature": 0, "max_new_tokens": new, "ignore_eos": True}
        batch = eng.generate(input_ids=prompts, sampling_params=params)
        alone = [eng.generate(input_ids=p, sampling_params=params) for p in prompts[:8]]
        mismatches = 0
        for (ref_ids, ref_logits), a, b in zip(refs, alone, batch[:8]):
            for ours in (a["output_ids"], b["output_ids"]):
                for i, (x, y) in enumerate(zip(ours, ref_ids)):
                    if x != y:
                        top2 = torch.log_softmax(ref_logits[i], -1).topk(2).values
                        if (top2[0] - top2[1]).item() >= 1e-3:
                            mismatches += 1
                        break
        result["float32_greedy_vs_transformers_mismatches"] = mismatches
        result["batch_vs_alone_equal"] = all(a["output_ids"] == b["output_ids"] for a, b in zip(alone, batch[:8]))
        info = eng.get_server_info()
        result["kv_locked_after"] = info["kv_locked_tokens"]
    del hf
    gc.collect()
    torch.cuda.empty_cache()
    return result


def run_engine_suite(model_dir: Path, vocab: int) -> dict:
    import radixlm

    rng = random.Random(1)
    res: dict = {}
    t = time.perf_counter()
    with radixlm.Engine(str(model_dir), load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True,
                        mem_fraction_static=0.55, context_length=8192, cuda_graph_max_bs=256) as eng:
        res["startup_s"] = time.perf_counter() - t
        gen(eng, rand_ids(64, vocab, rng), 8)  # warm-up
        # (a) batch-1 decode: extra time of 257 vs 1 new tokens
        t1 = statistics.median(gen(eng, rand_ids(128, vocab, rng), 1) for _ in range(3))
        tn = statistics.median(gen(eng, rand_ids(128, vocab, rng), 257) for _ in range(2))
        res["a_decode_ms_per_step"] = (tn - t1) / 256 * 1000
        res["a_decode_tok_s"] = 256 / (tn - t1)
        # (c) TTFT of a 1,024-token prompt (fresh ids: no cache hit), whole Engine round trip
        ttft = [gen(eng, rand_ids(1024, vocab, rng), 1) for _ in range(7)]
        res["c_ttft_ms_p50"] = statistics.median(ttft) * 1000
        res["c_ttft_ms_min"] = min(ttft) * 1000
        # (d) prefill 4 x 2,048
        times = [gen(eng, [rand_ids(2048, vocab, rng) for _ in range(4)], 1) for _ in range(3)]
        res["d_prefill_s"] = statistics.median(times)
        res["d_prefill_tok_s"] = 4 * 2048 / res["d_prefill_s"]
    return res


def transformers_decode(cfg: dict, vocab: int) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    rng = random.Random(2)

    def run(new: int) -> float:
        ids = torch.tensor([rand_ids(128, vocab, rng)], device="cuda")
        torch.cuda.synchronize()
        t = time.perf_counter()
        with torch.no_grad():
            model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)  # noqa: F821 (deleted after use)
        torch.cuda.synchronize()
        return time.perf_counter() - t

    run(4)
    t1 = statistics.median(run(1) for _ in range(3))
    tn = run(65)
    del model
    gc.collect()
    torch.cuda.empty_cache()
    return {"decode_tok_s": 64 / (tn - t1), "decode_ms_per_step": (tn - t1) / 64 * 1000}


def item_f(model_dir: Path, tokenizer_dir: Path, batches: list[int], mask_threads: list[int] | None = None,
           engine_mask_threads: int | None = None, state_tables: list[str] | None = None, profile: bool = True,
           wait_tables: bool = False, warm_shapes: bool = True, forced_rows: tuple[bool, ...] = (False,),
           flag_arms: tuple[tuple[str, ...], ...] = ((),), repeats: int = 1) -> dict:
    """Per batch size: the Engine's constrained/unconstrained tok/s ratio (the target), then the
    same workload in-process with every decode step timed (host wall vs device), for where the
    time goes."""
    import gpu_throughput as tp
    import profile_steps

    out: dict = {}
    if state_tables:  # --grammar-state-table side by side: the Engine's tok/s ratios only
        for table, rows, flags in [(t, r, f) for t in state_tables for r in forced_rows for f in flag_arms]:  # an Engine each
            by_batch = tp.item_f_batches(model_dir, tokenizer_dir, batches, engine_mask_threads, table, wait_tables,
                                         warm_shapes, rows, dict(f.split("=", 1) if "=" in f else (f, True) for f in flags),
                                         repeats)
            gc.collect()
            torch.cuda.empty_cache()
            for batch, res in by_batch.items():
                label = f"--grammar-state-table {table}" + (" --enable-forced-rows" if rows else "") + "".join(
                    f" {flag}" if "=" in flag else f" --{flag.replace('_', '-')}" for flag in flags)
                key = f"batch_{batch}_state_table_{table}" + ("_forced_rows" if rows else "") + "".join(
                    f"_{flag}" for flag in flags)
                again = sum(k == key or k.startswith(key + "#") for k in out)  # an arm named twice: an Engine each
                out[key + (f"#{again + 1}" if again else "")] = res
                js = res["json_schema"]
                print(f"(f) batch {batch} {label}: json/unconstrained {res['constrained_vs_unconstrained_tok_s']:.3f}x raw, "
                      f"{res['constrained_vs_same_lengths_tok_s']:.3f}x same lengths (json {js['tok_s']:.0f} tok/s, same-length "
                      f"{res['unconstrained_same_lengths']['tok_s']:.0f}); {js['valid_json']}/{batch} parse, "
                      f"{js['valid_schema']}/{batch} validate, {js['mean_tokens']:.1f} tokens mean, {js['forced_tokens']} forced, "
                      f"aborts {js['abort_messages']}; waited {js.get('table_wait_s', 0.0):.1f} s for the table; batch sizes warmed in "
                      f"{res.get('shape_warmup_s', 0.0):.1f} s", flush=True)
                if "repeats" in res:  # the figure to compare (one pair's ratio moves with its first steps)
                    rep = res["repeats"]
                    print(f"    repeats: {rep['constrained_vs_same_lengths_tok_s_medians']:.3f}x median JSON / median same-lengths "
                          f"tok/s over {len(rep['pair_ratios'])} pairs (pair ratios {[round(x, 3) for x in rep['pair_ratios']]}, "
                          f"median {rep['median_pair_ratio']:.3f}); json {[round(x) for x in rep['tok_s']['json_schema']]}, "
                          f"same {[round(x) for x in rep['tok_s']['unconstrained_same_lengths']]}; repeated JSON runs "
                          f"{rep['valid_schema_min']}/{batch} valid at least, {rep['json_runs_of_other_lengths']} of other lengths",
                          flush=True)
                if js.get("forced_rows_so_far"):
                    print(f"    forced-token rows so far (runtime/forced_rows.py): {js['forced_rows_so_far']}", flush=True)
                loops = [res[k].get("scheduler_loop") for k in ("json_schema", "unconstrained_same_lengths")]
                if all(loops):  # the scheduler process's loop over each run (runtime/loop_stats.py)
                    a, b = loops
                    print("    scheduler loop json/same: " + ", ".join(
                        f"{k} {a['seconds'][k]:.3f}/{b['seconds'][k]:.3f} s" for k in ("step", "receive", "send", "wait", "gc"))
                        + f", busy {a['wall_s']:.3f}/{b['wall_s']:.3f} s; turns {a['turns']}/{b['turns']} "
                        f"({a['turns_without_a_step']}/{b['turns_without_a_step']} without a step), full gc "
                        f"{a['gc_full_collections']}/{b['gc_full_collections']}; decode steps "
                        f"{a['decode_steps']}/{b['decode_steps']} (overlapped {a['overlapped_steps']}/{b['overlapped_steps']}), "
                        f"prefill {a['prefill_steps']}/{b['prefill_steps']} (as decode {a.get('prefill_as_decode_steps', 0)}/"
                        f"{b.get('prefill_as_decode_steps', 0)}), mixed {a['mixed_steps']}/{b['mixed_steps']}", flush=True)
                    parts = sorted(set(a.get("parts", {})) | set(b.get("parts", {})))
                    if parts:  # inside "step": where the host waits for the device, and what it does
                        print("    step parts json/same: " + ", ".join(
                            f"{k} {a.get('parts', {}).get(k, 0.0):.3f}/{b.get('parts', {}).get(k, 0.0):.3f} s"
                            for k in parts), flush=True)
                        print("    longest single call json/same (calls): " + ", ".join(
                            f"{k} {1e3 * a.get('parts_max', {}).get(k, 0.0):.2f}/{1e3 * b.get('parts_max', {}).get(k, 0.0):.2f} ms "
                            f"({a.get('parts_calls', {}).get(k, 0)}/{b.get('parts_calls', {}).get(k, 0)})"
                            for k in parts), flush=True)
                    first = sorted(set(a.get("first_step_parts", {})) | set(b.get("first_step_parts", {})))
                    if first:  # the first step: a batch's admission and first forward, where the runs differed most
                        print("    first step's parts json/same: " + ", ".join(
                            f"{k} {1e3 * a.get('first_step_parts', {}).get(k, 0.0):.2f}/"
                            f"{1e3 * b.get('first_step_parts', {}).get(k, 0.0):.2f} ms" for k in first), flush=True)
                    if a.get("step_ms") and b.get("step_ms"):  # every step alike, or a few stalls?
                        print("    step ms json/same: " + ", ".join(
                            f"{k} {a['step_ms'][k]:.2f}/{b['step_ms'][k]:.2f}" for k in ("median", "p90", "max"))
                            + f"; longest json {[round(x, 1) for x in a['step_ms']['longest']]}, same "
                            f"{[round(x, 1) for x in b['step_ms']['longest']]}", flush=True)
        if not profile:
            return out
    try:  # can this host fill masks in parallel at all? (diagnosis only)
        import mask_fill
        from transformers import AutoTokenizer

        doc = {"id": 4821, "name": "Ada Lovelace", "tags": ["math", "engine", "notes"], "active": True}
        host = out["host_parallelism"] = mask_fill.host_parallelism(
            AutoTokenizer.from_pretrained(str(tokenizer_dir)), tp.SCHEMA, doc, batches, [1, 2, 4, 8, 15])
        print(f"(f) host: {host['usable_cores']} usable cores, quota {host.get('/sys/fs/cgroup/cpu.max', 'n/a')}; "
              f"GIL-free hash speed-up on N threads {', '.join(f'{k}: {v:.1f}x' for k, v in host['hash_speedup'].items())}; "
              f"mask fill µs per step (one schema) {host['mask_fill_us_per_step']}", flush=True)
    except Exception as exc:  # noqa: BLE001
        out["host_parallelism"] = {"error": repr(exc)}
    for batch in batches:
        res = out[f"batch_{batch}"] = tp.item_f(model_dir, tokenizer_dir, batch, engine_mask_threads)
        gc.collect()
        torch.cuda.empty_cache()
        js = res["json_schema"]
        print(f"(f) batch {batch}: json_schema/unconstrained tok/s = {res['constrained_vs_unconstrained_tok_s']:.3f}x raw "
              f"(128 tokens each unconstrained vs the JSON's own lengths: mostly the ragged finish), "
              f"{res['constrained_vs_same_lengths_tok_s']:.3f}x against unconstrained to the same lengths (the constraint's "
              f"own cost); {js['valid_json']}/{batch} parse, {js['valid_schema']}/{batch} validate against the schema, "
              f"{js['mean_tokens']:.1f} tokens on average, {js['max_tokens']} at most, {js['forced_tokens']} jump-forwarded",
              flush=True)
        try:  # the profile is for diagnosis: its failure must not cost the ratio above
            prof = profile_steps.item_f(model_dir, tokenizer_dir, batch, mask_threads)
        except Exception as exc:  # noqa: BLE001
            import traceback

            traceback.print_exc()
            res["per_step"] = {"error": repr(exc)}
            continue
        finally:
            gc.collect()
            torch.cuda.empty_cache()
        keys = ("tokens", "max_tokens", "decode_steps", "overlapped_steps", "synchronous_steps", "decode_wall_ms_per_step",
                "forward_ms_per_step", "sampling_ms_per_step", "device_idle_ms_per_step", "mask_threads", "host_s")
        res["per_step"] = {k: {key: v.get(key) for key in keys} for k, v in prof.items() if isinstance(v, dict)}
        res["per_step_wall_ratio_same_lengths_over_json"] = prof["wall_ratio_same_lengths_over_constrained"]
        print(f"(f) batch {batch}, per decode step in-process (wall = the scheduler's step; device = forward + sampling "
              f"+ idle, the device waiting for the host):", flush=True)
        for k, v in res["per_step"].items():
            print(f"    {k:<28} {v['decode_wall_ms_per_step']:6.2f} ms wall | device {v['forward_ms_per_step']:5.2f} fwd + "
                  f"{v['sampling_ms_per_step']:4.2f} sampling + {v['device_idle_ms_per_step']:4.2f} idle | {v['decode_steps']} steps "
                  f"({v['synchronous_steps']} synchronous), {v['tokens']} tokens (max {v['max_tokens']}), "
                  f"mask threads {v['mask_threads']}", flush=True)
    return out


def throughput_items(items: set[str], report: dict, cfg: dict, d: Path, root: Path, v: int,
                     flops_per_token: float, ceil: dict, tokenizer_dir: str, f_batches: list[int],
                     f_threads: tuple[list[int] | None, int | None] = (None, None),
                     f_tables: tuple[list[str] | None, bool, bool, bool, tuple[bool, ...], tuple[tuple[str, ...], ...], int] = (
                         None, True, False, True, (False,), ((),), 1)
                     ) -> None:
    """Issue 8's items; each runs on its own and a failure is recorded, not fatal."""
    import gpu_throughput as tp

    jobs = {
        "b": lambda: tp.item_b(d, v, flops_per_token, ceil["bf16_matmul_flops"], cfg, not report.get("skip_transformers")),
        "e": lambda: tp.item_e(d, v),
        "f": lambda: item_f(model_dir_for({**cfg, "vocab_size": 49152}, root, "llama8b-smolvocab"), Path(tokenizer_dir),
                            f_batches, *f_threads, *f_tables),
        "g": lambda: tp.item_g(d, v),
    }
    for name, job in jobs.items():
        if name not in items:
            continue
        t = time.perf_counter()
        try:
            report[name] = job()
        except Exception as exc:  # noqa: BLE001 - record and go on to the next item
            import traceback

            traceback.print_exc()
            report[name] = {"error": repr(exc)}
        report[name]["wall_s"] = time.perf_counter() - t
        print(name, report[name], flush=True)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/gpu_suite.json")
    ap.add_argument("--skip-check", action="store_true")
    ap.add_argument("--skip-transformers", action="store_true",
                    help="no transformers figures: (a)'s decode and (b)'s 64-request sample")
    ap.add_argument("--items", default="a,c,d", help="which of a,b,c,d,e,f,g to run (a,c,d share one engine)")
    ap.add_argument("--tokenizer-dir", default=".gpu_assets/smollm_tok", help="real tokenizer for (f)")
    ap.add_argument("--f-batch", default="64,256", help="comma list of batch sizes for (f)")
    ap.add_argument("--f-mask-threads", default=None,
                    help="comma list of --grammar-mask-threads for (f)'s per-step JSON runs (default 0,1,cores-1)")
    ap.add_argument("--f-engine-mask-threads", type=int, default=None,
                    help="--grammar-mask-threads of (f)'s Engine tok/s run (default: the server default)")
    ap.add_argument("--f-state-table", default=None,
                    help="comma list of --grammar-state-table values (auto,off) run side by side for (f)'s Engine ratio")
    ap.add_argument("--f-skip-profile", action="store_true", help="(f): no host probe or per-step profile")
    ap.add_argument("--f-wait-tables", action="store_true",
                    help="(f) with --f-state-table: each JSON run starts once the schema's state table is completed "
                         "in the background (a server that has served the schema), not while it is")
    ap.add_argument("--f-no-shape-warmup", action="store_true",
                    help="(f) with --f-state-table: no staggered-length warm-up before the JSON run (before 2026-12-04 "
                         "evening: the JSON run was the first to meet each decode batch size, the same-length run after it)")
    ap.add_argument("--f-forced-rows", default="off",
                    help="(f) with --f-state-table: off, on or off,on (side by side, an Engine each): --enable-forced-rows, "
                         "grammar-forced tokens computed as extra decode rows (runtime/forced_rows.py)")
    ap.add_argument("--f-flag-arms", default="-",
                    help="(f) with --f-state-table: arms separated by ';', an Engine each, side by side: each arm a "
                         "'+'-joined list of boolean server options set on (ServerArgs field names) or RADIXLM_X=V "
                         "environment variables of the Engine's processes, '-' for none; e.g. "
                         "'-;enable_overlap_constrained_prefill' or '-;RADIXLM_ONE_TOKEN_PREFILL_AS_DECODE=1'")
    ap.add_argument("--f-repeats", type=int, default=1,
                    help="(f) with --f-state-table: the JSON and same-lengths runs N times each, in pairs of alternating "
                         "order on the warm Engine; the median JSON rate over the median same-lengths rate is the figure "
                         "(one run's ratio moves with its first steps)")
    args = ap.parse_args()
    root = Path(tempfile.mkdtemp(prefix="radixlm-gpu-"))
    report: dict = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "date": time.strftime("%Y-%m-%d"),
                    "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()}
    report["ceilings"] = ceil = measure_ceilings()
    print("ceilings", ceil, flush=True)
    if not args.skip_check:
        try:
            report["check"] = check_correctness(root)
        except Exception as exc:  # keep going: the timings are still worth having
            import traceback

            traceback.print_exc()
            report["check"] = {"error": repr(exc)}
        print("check", report["check"], flush=True)
    cfg = LLAMA_8B
    d = model_dir_for(cfg, root, "llama8b")
    h, i, layers, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"], cfg["vocab_size"]
    kv = cfg["num_key_value_heads"] * cfg["head_dim"]
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * i
    weight_bytes = 2 * (layers * per_layer + v * h)  # lm_head read every step; embedding table is not
    flops_per_token = 2 * (layers * per_layer + v * h)
    report["model"] = {"weight_bytes_per_step": weight_bytes, "flops_per_token": flops_per_token}
    items = set(args.items.split(","))
    report["skip_transformers"] = args.skip_transformers  # (a)'s transformers decode and (b)'s 64-request sample
    throughput_items(items, report, cfg, d, root, v, flops_per_token, ceil, args.tokenizer_dir,
                     [int(b) for b in args.f_batch.split(",")],
                     ([int(n) for n in args.f_mask_threads.split(",")] if args.f_mask_threads else None,
                      args.f_engine_mask_threads),
                     (args.f_state_table.split(",") if args.f_state_table else None, not args.f_skip_profile,
                      args.f_wait_tables, not args.f_no_shape_warmup,
                      tuple(v == "on" for v in args.f_forced_rows.split(",")),
                      tuple(tuple(f for f in arm.split("+") if f not in ("", "-")) for arm in args.f_flag_arms.split(";")),
                      args.f_repeats))
    if not items & {"a", "c", "d"}:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(report, indent=2))
        return
    report["engine"] = eng = run_engine_suite(d, v)
    print("engine", eng, flush=True)
    if not args.skip_transformers:
        report["transformers"] = tf = transformers_decode(cfg, v)
        print("transformers", tf, flush=True)
    floor_tok_s = ceil["copy_bytes_per_s"] / weight_bytes
    prefill_flops = 4 * 2048 * flops_per_token
    rows = [
        ("(a) batch-1 decode tok/s", eng["a_decode_tok_s"], f"floor {floor_tok_s:.0f} tok/s ({eng['a_decode_tok_s'] / floor_tok_s:.0%})"),
        ("(a) transformers batch-1 tok/s", report.get("transformers", {}).get("decode_tok_s", float("nan")),
         f"radixlm/transformers {eng['a_decode_tok_s'] / report.get('transformers', {}).get('decode_tok_s', float('nan')):.1f}x"),
        ("(c) TTFT 1,024 tokens ms (p50)", eng["c_ttft_ms_p50"], f"min {eng['c_ttft_ms_min']:.1f} ms; target <= 30"),
        ("(d) prefill 4x2,048 tok/s", eng["d_prefill_tok_s"],
         f"{prefill_flops / eng['d_prefill_s'] / 1e12:.0f} TFLOP/s = "
         f"{prefill_flops / eng['d_prefill_s'] / ceil['bf16_matmul_flops']:.0%} of matmul rate"),
    ]
    report["table"] = [{"item": a, "value": b, "note": c} for a, b, c in rows]
    print(f"\n{'item':<34}{'value':>12}  note")
    for a, b, c in rows:
        print(f"{a:<34}{b:>12.1f}  {c}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""The CPU quick start against llama.cpp and transformers, side by side in one run (issue 20).

Engines, all greedy on the same random prompt ids with the same thread count:
  radixlm        --quantization gguf: GGUF weights kept quantized (packed int4 matmuls below 8 rows,
                 dense bfloat16 copies above where the CPU has bf16 hardware)
  radixlm-fp32   --dtype float32 (weights dequantized to float32)
  transformers   float32 `generate` on the converted folder
  llama.cpp      llama-cpp-python (built from source in its own venv: --llama-python), same GGUF file,
                 every sequence of a batch in one llama_decode call (benchmarks/cpu_llamacpp.py)
For batch 1 and batch N (default 32), each with --input-len prompt tokens: prefill tok/s from the run
that makes 1 token, decode tok/s from the extra time a run making --output-len tokens takes. Each
repeat measures every engine once, in turn, so neighbours' load hits all of them alike; the best
repeat per engine is reported. Then greedy agreement of radixlm vs radixlm-fp32 on a fixed chat
prompt set (teacher-forced: the fp32 continuation is fed back and each position's argmax compared).

    python -m venv /tmp/llamacpp-venv && /tmp/llamacpp-venv/bin/pip install llama-cpp-python==0.3.36
    OMP_NUM_THREADS=2 python benchmarks/cpu.py --threads 2 --repeats 3 --llama-python /tmp/llamacpp-venv/bin/python

The last lines are a compact summary: the issue's goals (batch-1 decode >= 0.5x llama.cpp, batch-N
decode >= 2x transformers, prefill >= 1x transformers, agreement >= 97%) with the measured ratios,
and the load average before and after (the figures mean little on a loaded machine).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch

AGREEMENT_PROMPTS = [
    "What is the capital of France?", "Write a haiku about the sea.", "Explain photosynthesis in two sentences.",
    "List three prime numbers.", "Who wrote Romeo and Juliet?", "Translate 'good morning' into Spanish.",
    "What is 12 times 7?", "Give me a tip for learning to code.", "Describe a cat to someone who has never seen one.",
    "Why is the sky blue?", "Name a famous painting.", "What does a CPU do?",
    "Suggest a name for a bakery.", "How many legs does a spider have?", "What is the boiling point of water?",
    "Summarize the plot of Cinderella.",
]


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(100, vocab - 100) for _ in range(length)] for _ in range(n)]


def time_radixlm(engine: Any, prompts: list[list[int]], new_tokens: int) -> float:
    params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
    engine.flush_cache()
    start = time.perf_counter()
    outs = engine.generate(input_ids=prompts, sampling_params=params)
    elapsed = time.perf_counter() - start
    assert all(o["meta_info"]["completion_tokens"] == new_tokens for o in outs)
    return elapsed


def time_transformers(model: Any, prompts: list[list[int]], new_tokens: int) -> float:
    ids = torch.tensor(prompts)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new_tokens,
                             min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)
    elapsed = time.perf_counter() - start
    assert out.shape[1] == ids.shape[1] + new_tokens
    return elapsed


def time_llamacpp(python: str, gguf: str, threads: int, batches: dict[str, list[list[int]]], new_tokens: int,
                  no_extra_bufts: bool) -> dict:
    job = {"model": gguf, "threads": threads, "batches": batches, "new_tokens": new_tokens,
           "no_extra_bufts": no_extra_bufts}
    script = Path(__file__).resolve().parent / "cpu_llamacpp.py"
    done = subprocess.run([python, str(script)], input=json.dumps(job), capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def figures(n: int, inp: int, out: int, t1: float, tn: float) -> dict[str, float]:
    """Decode from the extra time of the longer run; NaN when noise made it no longer (a loaded machine)."""
    extra = tn - t1 if tn > t1 else float("nan")
    return {"t_1_s": t1, f"t_{out}_s": tn, "prefill_tok_s": n * inp / t1,
            "decode_tok_s": n * (out - 1) / extra, "decode_ms_per_step": extra / (out - 1) * 1e3}


def agreement(quant: Any, fp32: Any, new_tokens: int) -> dict[str, float]:
    """Teacher-forced greedy agreement of `quant` with `fp32` over AGREEMENT_PROMPTS."""
    tok = fp32.tokenizer
    prompts = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=False)
               for p in AGREEMENT_PROMPTS]
    params = {"temperature": 0, "max_new_tokens": new_tokens}
    ref = fp32.generate(prompts, params)
    same = total = exact = 0
    for prompt, r in zip(prompts, ref):
        prompt_ids = tok(prompt, add_special_tokens=False)["input_ids"]
        cont = tok(r["text"], add_special_tokens=False)["input_ids"]
        ids = prompt_ids + cont
        got = quant.generate(input_ids=ids, sampling_params={"temperature": 0, "max_new_tokens": 1},
                             return_logprob=True, logprob_start_len=len(prompt_ids) - 1, top_logprobs_num=1)
        tops = got["meta_info"]["input_top_logprobs"][1:] + [got["meta_info"]["output_top_logprobs"][0]]
        # position i predicts ids[len(prompt_ids) + i]; the last one has no reference token
        preds = [row[0][1] for row in tops][: len(cont)]
        same += sum(int(p == c) for p, c in zip(preds, cont))
        total += len(cont)
        free = quant.generate(prompt, params)
        exact += int(free["text"] == r["text"])
    return {"teacher_forced_top1": same / max(total, 1), "tokens": total,
            "identical_free_running": exact / len(prompts), "prompts": len(prompts)}


def goal_summary(rows: dict, batches: dict[str, int], llama_present: bool, agree: dict | None) -> list[str]:
    """One line per goal of issue 20: the measured figure, the goal, met or not."""
    lines = []
    big = next((b for b in batches if b != "batch_1"), "batch_1")
    ours = rows.get("radixlm")
    if ours is None:
        return ["radixlm was skipped"]

    def line(name: str, value: float, goal: float, unit: str = "x") -> None:
        lines.append(f"  {name:<44}{value:>8.2f}{unit}  goal >= {goal}{unit}  {'met' if value >= goal else 'NOT met'}")

    if llama_present:
        line("batch-1 decode vs llama.cpp", ours["batch_1"]["decode_tok_s"] / rows["llama.cpp"]["batch_1"]["decode_tok_s"], 0.5)
    if "transformers" in rows and big != "batch_1":
        hf = rows["transformers"]
        line(f"{big} decode vs transformers fp32", ours[big]["decode_tok_s"] / hf[big]["decode_tok_s"], 2.0)
    if "transformers" in rows:
        for batch in batches:
            line(f"{batch} prefill vs transformers fp32",
                 ours[batch]["prefill_tok_s"] / rows["transformers"][batch]["prefill_tok_s"], 1.0)
    if "radixlm-fp32" in rows:
        fp = rows["radixlm-fp32"]
        for batch in batches:
            lines.append(f"  {batch} decode vs radixlm --dtype float32{ours[batch]['decode_tok_s'] / fp[batch]['decode_tok_s']:>12.2f}x")
    lines.append(f"  batch-1 decode: radixlm {ours['batch_1']['decode_tok_s']:.1f} tok/s"
                 + (f", llama.cpp {rows['llama.cpp']['batch_1']['decode_tok_s']:.1f}" if llama_present else ""))
    if agree:
        line("greedy agreement vs fp32 (teacher-forced)", agree["teacher_forced_top1"] * 100, 97, "%")
    return lines


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=65)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-python", default=None, help="python of a venv with llama-cpp-python (skipped if absent)")
    ap.add_argument("--llama-no-extra-bufts", action="store_true",
                    help="load llama.cpp without its extra weight buffers (AMX / repacked): a GGML_NATIVE build "
                         "dies with SIGILL on VMs that list AMX but fault on it")
    ap.add_argument("--skip", default="", help="comma list of engines to leave out")
    ap.add_argument("--agreement-tokens", type=int, default=48, help="0 skips the agreement check")
    ap.add_argument("--out", default="benchmarks/results/cpu.json")
    args = ap.parse_args()

    import radixlm
    from radixlm.runtime.model_source import default_gguf_path

    load_before = os.getloadavg()
    torch.set_num_threads(args.threads)
    skip = set(filter(None, args.skip.split(",")))
    n, inp, out = args.batch, args.input_len, args.output_len
    common = dict(cpu_threads=args.threads, max_total_tokens=max(n * (inp + out) * 2, 16384),
                  max_running_requests=max(n, 8))
    engines = {}
    if "radixlm" not in skip:
        engines["radixlm"] = radixlm.Engine(quantization="gguf", **common)
    if "radixlm-fp32" not in skip:
        engines["radixlm-fp32"] = radixlm.Engine(dtype="float32", quantization="none", **common)
    first = next(iter(engines.values()))
    vocab = len(first.tokenizer)
    model_dir = first.model_path
    batches = {"batch_1": 1, f"batch_{n}": n}
    best: dict[str, dict[str, list[float]]] = {}

    def record(engine: str, batch: str, t1: float, tn: float) -> None:
        slot = best.setdefault(engine, {}).setdefault(batch, [float("inf"), float("inf")])
        slot[0], slot[1] = min(slot[0], t1), min(slot[1], tn)

    hf = None
    if "transformers" not in skip:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
        time_transformers(hf, random_prompts(2, 8, vocab, 99), 2)
    for engine in engines.values():
        time_radixlm(engine, random_prompts(4, 16, vocab, 99), 4)
    llama_version = None
    for rep in range(args.repeats):
        for batch, size in batches.items():
            a, b = random_prompts(size, inp, vocab, 10 + rep), random_prompts(size, inp, vocab, 20 + rep)
            for name, engine in engines.items():
                record(name, batch, time_radixlm(engine, a, 1), time_radixlm(engine, b, out))
            if hf is not None:
                record("transformers", batch, time_transformers(hf, a, 1), time_transformers(hf, b, out))
            print(f"repeat {rep + 1}/{args.repeats} {batch} done", file=sys.stderr, flush=True)
        if args.llama_python and "llama.cpp" not in skip:
            jobs = {batch: random_prompts(size, inp, vocab, 10 + rep) for batch, size in batches.items()}
            got = time_llamacpp(args.llama_python, str(default_gguf_path()), args.threads, jobs, out,
                                args.llama_no_extra_bufts)
            llama_version = got["version"]
            for batch, r in got["results"].items():
                record("llama.cpp", batch, r["t_1"], r["t_n"])
    rows = {name: {batch: figures(batches[batch], inp, out, *t) for batch, t in per.items()} for name, per in best.items()}
    agree = agreement(engines["radixlm"], engines["radixlm-fp32"], args.agreement_tokens) \
        if args.agreement_tokens and {"radixlm", "radixlm-fp32"} <= engines.keys() else None
    for engine in engines.values():
        engine.shutdown()

    print(f"\nCPU, {args.threads} threads, {inp}-token prompts, {out} new tokens, greedy; best of {args.repeats}")
    for batch in batches:
        print(f"\n{batch:<14}{'prefill tok/s':>15}{'decode tok/s':>15}{'ms/step':>10}")
        for name, per in rows.items():
            r = per[batch]
            print(f"{name:<14}{r['prefill_tok_s']:>15.1f}{r['decode_tok_s']:>15.1f}{r['decode_ms_per_step']:>10.1f}")
    ratios = {}
    for batch in batches:
        for other in ("transformers", "llama.cpp"):
            if "radixlm" in rows and other in rows:
                ratios[f"{batch} vs {other}"] = {k: rows["radixlm"][batch][k] / rows[other][batch][k]
                                                 for k in ("prefill_tok_s", "decode_tok_s")}
    print()
    for key, r in ratios.items():
        print(f"radixlm {key}: prefill {r['prefill_tok_s']:.2f}x, decode {r['decode_tok_s']:.2f}x")
    if agree:
        print(f"greedy agreement (quantized vs fp32, teacher-forced, {agree['tokens']} tokens): "
              f"{agree['teacher_forced_top1']:.1%}; identical free-running outputs: {agree['identical_free_running']:.0%}")
    load_after = os.getloadavg()
    summary = goal_summary(rows, batches, llama_present="llama.cpp" in rows, agree=agree)
    print(f"\nsummary ({args.threads} threads; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after)")
    for line in summary:
        print(line)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    record_json = {"config": vars(args), "machine": platform.node(), "cpu": platform.processor(), "commit": commit,
                   "date": time.strftime("%Y-%m-%d %H:%M"), "llama_cpp_python": llama_version, "results": rows,
                   "ratios": ratios, "agreement": agree, "torch": torch.__version__,
                   "load_average": {"before": load_before, "after": load_after}, "summary": summary}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record_json, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()

"""Shared-prefix workloads with the radix cache on and off, side by side in one run.

  (a) groups: G groups of R requests; a group shares one P-token system prompt, each request adds its
      own Q-token question and generates O tokens. All requests are sent in one batch, the groups
      interleaved (g0 q0, g1 q0, ..., g0 q1, ...); one more cache-on run sends them group by group.
  (b) chat:   C conversations of T turns, in lockstep (one batch per turn); turn k's prompt is turn
      k-1's prompt + its answer + a new user message.

For each workload and mode: prefill tokens computed (sum of prompt_tokens - cached_tokens, so a
retracted request's recomputation is not in it), the hit rate against the optimum, and throughput.
The optimum is what a perfect cache (unbounded, never evicts) could reuse given the submission
order: for each request, the longest prefix of its prompt that an earlier request computed (the
earlier prompts of the same batch, and prompt + answer of earlier batches; an answer's last token
is sampled but never run through the model, so it has no KV), at most len(prompt) - 1 tokens.

    python benchmarks/shared_prefix.py                      # CPU preset, default model
    python benchmarks/shared_prefix.py --gpu --out $OUT/shared_prefix-gpu.json
      (Llama-3.1-8B shape, random bf16 weights: --load-format dummy --skip-tokenizer-init)

Token ids are random and `ignore_eos` is set, so every request generates exactly O tokens.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from gpu_suite import LLAMA_8B  # the H200 suite's Llama-3.1-8B shape (this folder is on sys.path)

PRESETS = {
    "cpu": {"groups": 4, "per_group": 16, "prefix_len": 512, "question_len": 32, "output_len": 16,
            "chats": 4, "turns": 8, "opening_len": 256, "user_len": 64, "answer_len": 32},
    "gpu": {"groups": 16, "per_group": 32, "prefix_len": 1024, "question_len": 64, "output_len": 64,
            "chats": 32, "turns": 8, "opening_len": 1024, "user_len": 128, "answer_len": 128},
}


class PrefixTrie:
    """Every token sequence computed so far, as a trie of dicts: the contents of a perfect cache."""

    def __init__(self) -> None:
        self.root: dict[int, dict] = {}

    def insert(self, seq: list[int]) -> None:
        node = self.root
        for tok in seq:
            node = node.setdefault(tok, {})

    def longest_prefix(self, seq: list[int]) -> int:
        node, n = self.root, 0
        for tok in seq:
            nxt = node.get(tok)
            if nxt is None:
                break
            node, n = nxt, n + 1
        return n


class Tally:
    """Sums over the requests of one workload run with one engine."""

    def __init__(self) -> None:
        self.requests = self.prompt_tokens = self.cached_tokens = self.optimal_cached = 0
        self.output_tokens = self.retracted_requests = 0
        self.wall_s = self.sched_cpu_s = 0.0
        self.outputs: list[list[int]] = []

    def run_batch(self, engine, prompts: list[list[int]], new_tokens: int, trie: PrefixTrie) -> list[list[int]]:
        """Send one batch, time it, and account its cache use against the perfect cache `trie`."""
        for p in prompts:
            self.optimal_cached += min(trie.longest_prefix(p), len(p) - 1)
            trie.insert(p)
        params = {"temperature": 0, "max_new_tokens": new_tokens, "ignore_eos": True}
        cpu0 = scheduler_cpu_s(engine)
        start = time.perf_counter()
        outs = engine.generate(input_ids=prompts, sampling_params=params)
        self.wall_s += time.perf_counter() - start
        self.sched_cpu_s += scheduler_cpu_s(engine) - cpu0
        outs = outs if isinstance(outs, list) else [outs]
        answers = []
        for p, o in zip(prompts, outs):
            meta = o["meta_info"]
            assert meta["completion_tokens"] == new_tokens and meta["prompt_tokens"] == len(p), meta
            self.requests += 1
            self.prompt_tokens += meta["prompt_tokens"]
            self.cached_tokens += meta["cached_tokens"]
            self.output_tokens += meta["completion_tokens"]
            self.retracted_requests += bool(meta.get("num_retractions"))
            answers.append(list(o["output_ids"]))
            trie.insert(p + answers[-1][:-1])
        self.outputs.extend(answers)
        return answers

    def summary(self) -> dict:
        computed = self.prompt_tokens - self.cached_tokens
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "cached_tokens": self.cached_tokens,
            "prefill_tokens_computed": computed,
            "optimal_cached_tokens": self.optimal_cached,
            "optimal_prefill_tokens": self.prompt_tokens - self.optimal_cached,
            "hit_rate": self.cached_tokens / max(self.prompt_tokens, 1),
            "optimal_hit_rate": self.optimal_cached / max(self.prompt_tokens, 1),
            "hit_rate_vs_optimal": self.cached_tokens / max(self.optimal_cached, 1),
            "output_tokens": self.output_tokens,
            "retracted_requests": self.retracted_requests,
            "wall_s": self.wall_s,
            "scheduler_cpu_s": self.sched_cpu_s,
            "req_per_s": self.requests / self.wall_s,
            "output_tok_per_s": self.output_tokens / self.wall_s,
            "total_tok_per_s": (self.prompt_tokens + self.output_tokens) / self.wall_s,
        }


def scheduler_cpu_s(engine) -> float:
    """CPU seconds (user + system, all threads) the scheduler process has used so far. On shared
    cores this moves less with other jobs' load than wall time does."""
    pid = engine.tokenizer_manager.replicas[0].procs[0].pid
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rand_ids(rng: random.Random, n: int, vocab: int) -> list[int]:
    # Keep clear of the ends of the vocabulary, where the special tokens live.
    return [rng.randrange(100, vocab - 100) for _ in range(n)]


def groups_prompts(cfg: dict, vocab: int, order: str, seed: int = 1) -> list[list[int]]:
    rng = random.Random(seed)
    systems = [rand_ids(rng, cfg["prefix_len"], vocab) for _ in range(cfg["groups"])]
    grid = [[s + rand_ids(rng, cfg["question_len"], vocab) for _ in range(cfg["per_group"])] for s in systems]
    if order == "grouped":  # all of group 0, then all of group 1, ...
        return [p for group in grid for p in group]
    # interleaved: requests of different groups arrive mixed (g0 q0, g1 q0, ..., g0 q1, ...)
    return [grid[g][i] for i in range(cfg["per_group"]) for g in range(cfg["groups"])]


def run_groups(engine, cfg: dict, vocab: int, order: str) -> Tally:
    tally = Tally()
    tally.run_batch(engine, groups_prompts(cfg, vocab, order), cfg["output_len"], PrefixTrie())
    return tally


def run_chat(engine, cfg: dict, vocab: int, seed: int = 2) -> Tally:
    rng = random.Random(seed)
    convs = [rand_ids(rng, cfg["opening_len"], vocab) for _ in range(cfg["chats"])]
    tally, trie = Tally(), PrefixTrie()
    for _ in range(cfg["turns"]):
        answers = tally.run_batch(engine, convs, cfg["answer_len"], trie)
        convs = [c + a + rand_ids(rng, cfg["user_len"], vocab) for c, a in zip(convs, answers)]
    return tally


def warm_up(engine, vocab: int) -> None:
    """Compile/fault in the paths the workloads use (prefill with and without a cached prefix,
    decode), then start from an empty cache."""
    rng = random.Random(99)
    head = rand_ids(rng, 96, vocab)
    params = {"temperature": 0, "max_new_tokens": 4, "ignore_eos": True}
    engine.generate(input_ids=[head + rand_ids(rng, 16, vocab) for _ in range(2)], sampling_params=params)
    engine.generate(input_ids=[head + rand_ids(rng, 16, vocab) for _ in range(4)], sampling_params=params)
    assert engine.flush_cache()


def run_mode(engine_kwargs: dict, cfg: dict, disable: bool, with_grouped: bool) -> tuple[dict, dict]:
    import radixlm

    results: dict[str, Tally] = {}
    with radixlm.Engine(**engine_kwargs, disable_radix_cache=disable) as engine:
        info = engine.tokenizer_manager.info
        vocab = info.vocab_size
        warm_up(engine, vocab)
        mode = "off" if disable else "on"
        results["groups"] = run_groups(engine, cfg, vocab, "interleaved")
        progress(f"(a) cache {mode}", results["groups"])
        assert engine.flush_cache()
        if with_grouped:
            results["groups_grouped_order"] = run_groups(engine, cfg, vocab, "grouped")
            progress(f"(a) cache {mode}, grouped order", results["groups_grouped_order"])
            assert engine.flush_cache()
        results["chat"] = run_chat(engine, cfg, vocab)
        progress(f"(b) cache {mode}", results["chat"])
        server = engine.get_server_info()
        env = {"device": info.device, "dtype": info.dtype, "max_total_tokens": server["max_total_num_tokens"],
               "retractions": server["retractions"], "model": engine.model_path}
    return {k: v.summary() | {"_outputs": v.outputs} for k, v in results.items()}, env


def progress(what: str, tally: Tally) -> None:
    print(f"{what}: {tally.wall_s:.2f} s, {tally.cached_tokens}/{tally.optimal_cached} of optimal cached",
          file=sys.stderr, flush=True)


def llama8b_dir() -> Path:
    d = Path(tempfile.mkdtemp(prefix="radixlm-llama8b-"))
    (d / "config.json").write_text(json.dumps(LLAMA_8B))
    return d


def print_table(title: str, rows: dict[str, dict]) -> None:
    print(f"\n{title}")
    head = (f"{'cache':<16}{'requests':>9}{'prompt tok':>12}{'computed':>10}{'cached':>9}{'optimal':>9}"
            f"{'hit/opt':>9}{'wall s':>9}{'cpu s':>9}{'req/s':>8}{'out tok/s':>11}{'total tok/s':>13}")
    print(head)
    for name, r in rows.items():
        print(f"{name:<16}{r['requests']:>9}{r['prompt_tokens']:>12}{r['prefill_tokens_computed']:>10}"
              f"{r['cached_tokens']:>9}{r['optimal_cached_tokens']:>9}{r['hit_rate_vs_optimal']:>8.1%} "
              f"{r['wall_s']:>9.2f}{r['scheduler_cpu_s']:>9.2f}{r['req_per_s']:>8.2f}{r['output_tok_per_s']:>11.1f}{r['total_tok_per_s']:>13.1f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", action="store_true", help="the GPU preset on a Llama-3.1-8B-shaped random model")
    ap.add_argument("--model-path", default=None, help="CPU preset: the model (default: the default model)")
    ap.add_argument("--max-total-tokens", type=int, default=None,
                    help="KV pool size; CPU preset default 40960 (both engines alike; the automatic size "
                         "follows free RAM), GPU: from --mem-fraction-static's default")
    ap.add_argument("--cpu-threads", type=int, default=None, help="torch threads of the scheduler (CPU)")
    ap.add_argument("--skip-grouped-order", action="store_true",
                    help="skip the extra cache-on run of (a) with requests sent group by group")
    for key, value in PRESETS["cpu"].items():
        ap.add_argument("--" + key.replace("_", "-"), type=int, default=None, help=f"CPU preset: {value}")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/shared_prefix-<preset>.json)")
    args = ap.parse_args()

    preset = "gpu" if args.gpu else "cpu"
    cfg = {k: getattr(args, k) if getattr(args, k) is not None else v for k, v in PRESETS[preset].items()}
    if args.gpu:
        kwargs = {"model_path": str(llama8b_dir()), "load_format": "dummy", "skip_tokenizer_init": True,
                  "dtype": "bfloat16", "context_length": 8192}
    else:
        kwargs = {"model_path": args.model_path}
    if args.max_total_tokens or not args.gpu:
        kwargs["max_total_tokens"] = args.max_total_tokens or 40960
    if args.cpu_threads:
        kwargs["cpu_threads"] = args.cpu_threads

    # The code measured is the code at the start (the tree may change while this runs).
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                           text=True).stdout.strip()
    on, env = run_mode(kwargs, cfg, disable=False, with_grouped=not args.skip_grouped_order)
    off, _ = run_mode(kwargs, cfg, disable=True, with_grouped=False)

    report: dict = {}
    titles = {
        "groups": f"(a) {cfg['groups']} groups x {cfg['per_group']} requests, {cfg['prefix_len']}-token shared prefix "
                  f"+ {cfg['question_len']}-token question, {cfg['output_len']} output tokens",
        "chat": f"(b) {cfg['chats']} chats x {cfg['turns']} turns, {cfg['opening_len']}-token opening, "
                f"+{cfg['user_len']} user / {cfg['answer_len']} answer tokens a turn",
    }
    for name, title in titles.items():
        rows = {"on": on[name], "off": off[name]}
        if name == "groups" and "groups_grouped_order" in on:
            rows["on, grouped order"] = on["groups_grouped_order"]
        print_table(title, rows)
        speedup = off[name]["wall_s"] / on[name]["wall_s"]
        cpu_ratio = off[name]["scheduler_cpu_s"] / on[name]["scheduler_cpu_s"]
        same = sum(a == b for a, b in zip(on[name]["_outputs"], off[name]["_outputs"]))
        print(f"throughput on/off: {speedup:.2f}x (scheduler CPU time off/on {cpu_ratio:.2f}x); prefill tokens computed off/on: "
              f"{off[name]['prefill_tokens_computed'] / max(on[name]['prefill_tokens_computed'], 1):.2f}x; "
              f"greedy outputs equal on vs off: {same}/{len(on[name]['_outputs'])}")
        report[name] = {"on": rows["on"], "off": rows["off"], "throughput_on_over_off": speedup,
                        "scheduler_cpu_off_over_on": cpu_ratio,
                        "outputs_equal_on_off": same}
        if "on, grouped order" in rows:
            report[name]["on_grouped_order"] = rows["on, grouped order"]
    for r in (on, off):
        for v in r.values():
            v.pop("_outputs")

    record = {"preset": preset, "config": cfg, **env, "machine": platform.node(),
              "scheduler_cpu_threads": args.cpu_threads or torch.get_num_threads(),
              "torch": torch.__version__, "commit": commit + ("-dirty" if dirty else ""),
              "date": time.strftime("%Y-%m-%d"), "results": report}
    if args.gpu and torch.cuda.is_available():
        record["gpu"] = torch.cuda.get_device_name()
    out = Path(args.out or f"benchmarks/results/shared_prefix-{preset}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(record, indent=2))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()

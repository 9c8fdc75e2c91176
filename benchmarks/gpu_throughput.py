"""Throughput items of the H200 suite (issue: GPU throughput), run from benchmarks/gpu_suite.py:

  (b) offline: 1,000 requests, input U[128,1024], output U[64,512], random ids, vs the compute roofline,
      transformers on a 64-request sample in the same run
  (e) shared prefix (16 groups x 32, 1,024-token prefix, 64-token question, 64 out): radix cache on vs off
  (f) JSON-schema constrained vs unconstrained decode at batch 64 / 256 (real tokenizer for the grammar)
  (g) the HTTP server against the offline Engine on a slice of workload (b)
"""
from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

ENGINE_ARGS = dict(load_format="dummy", dtype="bfloat16", skip_tokenizer_init=True, context_length=4096)


def workload_b(n: int, vocab: int, seed: int = 3) -> tuple[list[list[int]], list[int]]:
    rng = random.Random(seed)
    lo, hi = min(1000, vocab // 4), max(vocab - 1000, vocab // 2)
    prompts = [[rng.randrange(lo, hi) for _ in range(rng.randint(128, 1024))] for _ in range(n)]
    return prompts, [rng.randint(64, 512) for _ in range(n)]


def warmup_b(vocab: int) -> list[list[int]]:
    """Prompts for a warm-up before (b)'s timed run: drawn like (b)'s but with another seed (the timed run finds
    none of them cached), ~16k tokens so the prefill runs full 8,192-token chunks with a prompt continued from
    one chunk to the next, as (b)'s 72 chunks do. Its kernels' variants are compiled (or loaded from Triton's
    cache) here: a warm-up of 8 of (b)'s own prompts (one ~4.6k-token chunk) left them to the timed run (12-04
    17:2x, one lease: the suite's (b) 31.3 s, a rerun minutes later 29.9 s, the difference all in the prefill
    phase by the status lines' times; RESULTS.md, thru8)."""
    return workload_b(24, vocab, seed=11)[0]


def params_for(outs: list[int]) -> list[dict]:
    return [{"temperature": 0, "max_new_tokens": o, "ignore_eos": True} for o in outs]


def item_b(model_dir: Path, vocab: int, flops_per_token: float, matmul_flops: float, hf_cfg: dict,
           hf_sample: bool = True) -> dict:
    """`hf_sample`: then transformers on 64 of the requests (~50 s on the H200: one padded batch to 512 tokens)."""
    import radixlm

    prompts, outs = workload_b(1000, vocab)
    with radixlm.Engine(str(model_dir), mem_fraction_static=0.85, **ENGINE_ARGS) as eng:
        t = time.perf_counter()
        warm = warmup_b(vocab)
        eng.generate(input_ids=warm, sampling_params=params_for([8] * len(warm)))
        warmup_s = time.perf_counter() - t
        t = time.perf_counter()
        res = eng.generate(input_ids=prompts, sampling_params=params_for(outs))
        dt = time.perf_counter() - t
        retractions = eng.get_server_info().get("retractions", 0)
    total = sum(map(len, prompts)) + sum(outs)
    assert sum(r["meta_info"]["completion_tokens"] for r in res) == sum(outs)
    roofline = matmul_flops / flops_per_token
    out = {"seconds": dt, "total_tok_s": total / dt, "output_tok_s": sum(outs) / dt, "roofline_tok_s": roofline,
           "fraction_of_roofline": total / dt / roofline, "retractions": retractions, "warmup_s": warmup_s}
    print(f"(b) {out['total_tok_s']:.0f} total tok/s in {dt:.2f} s ({out['fraction_of_roofline']:.0%} of the roofline), "
          f"{retractions} retractions (warm-up {warmup_s:.1f} s)", flush=True)
    if hf_sample:
        out["transformers_sample64"] = transformers_sample(hf_cfg, prompts[:64], outs[:64])
    return out


def transformers_sample(cfg: dict, prompts: list[list[int]], outs: list[int]) -> dict:
    from transformers import AutoModelForCausalLM, LlamaConfig

    hf_cfg = LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("architectures", "model_type", "torch_dtype")})
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(hf_cfg, dtype=torch.bfloat16).eval()
    width = max(map(len, prompts))
    ids = torch.zeros(len(prompts), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):  # left padding
        ids[i, width - len(p):] = torch.tensor(p)
        mask[i, width - len(p):] = 1
    torch.cuda.synchronize()
    t = time.perf_counter()
    with torch.no_grad():
        model.generate(ids.cuda(), attention_mask=mask.cuda(), max_new_tokens=max(outs), min_new_tokens=max(outs),
                       do_sample=False, pad_token_id=0)
    torch.cuda.synchronize()
    dt = time.perf_counter() - t
    del model
    gc.collect()
    torch.cuda.empty_cache()
    useful = sum(map(len, prompts)) + sum(outs)
    return {"seconds": dt, "useful_total_tok_s": useful / dt, "note": "one padded batch of 64, run to the longest output"}


def e_prompts(vocab: int) -> list[list[int]]:
    """Workload (e)'s prompts: 16 groups x 32 requests, a 1,024-token shared prefix and a 64-token question each,
    shuffled (fixed seed: every script that times (e) times the same requests)."""
    rng = random.Random(5)
    prompts = []
    for _ in range(16):
        prefix = [rng.randrange(1000, vocab - 1000) for _ in range(1024)]
        prompts += [prefix + [rng.randrange(1000, vocab - 1000) for _ in range(64)] for _ in range(32)]
    rng.shuffle(prompts)
    return prompts


def item_e(model_dir: Path, vocab: int) -> dict:
    import radixlm

    prompts = e_prompts(vocab)
    optimal_cached = 15 * 0 + (512 - 16) * 1024  # every prompt but each group's first reuses its prefix
    out: dict = {}
    outputs: dict[str, list[list[int]]] = {}
    # cache_on_plain_attention: the radix cache without cascade attention (the rows of a group then
    # read their shared prefix KV once each per step), so the run shows what cascade adds.
    for label, disable, cascade in (("cache_on", False, "auto"), ("cache_on_plain_attention", False, "off"),
                                    ("cache_off", True, "auto")):
        with radixlm.Engine(str(model_dir), mem_fraction_static=0.8, disable_radix_cache=disable,
                            cascade_attention=cascade, **ENGINE_ARGS) as eng:
            eng.generate(input_ids=[[5] * 16], sampling_params=params_for([4]))
            # Two passes over an empty cache: the first engine of a process pays inside its first pass
            # what the small warm-up did not (Triton JIT of new specializations, the allocator's first
            # cudaMallocs); the run of 2026-12-02 timed only that pass, cascade's engine first.
            # "seconds" is the second, warm pass.
            passes = []
            for _ in range(2):
                eng.flush_cache()
                before = eng.get_server_info()
                t = time.perf_counter()
                res = eng.generate(input_ids=prompts, sampling_params=params_for([64] * len(prompts)))
                passes.append(time.perf_counter() - t)
                info = eng.get_server_info()
        dt = passes[-1]
        cached = sum(r["meta_info"]["cached_tokens"] for r in res)
        outputs[label] = [r["output_ids"] for r in res]
        out[label] = {"seconds": dt, "first_pass_seconds": passes[0], "req_s": len(prompts) / dt, "cached_tokens": cached,
                      "hit_rate_vs_optimal": cached / optimal_cached,
                      **{k: info.get(k, 0) - before.get(k, 0) for k in ("cascade_decode_steps", "forward_steps")}}
    out["speedup_on_vs_off"] = out["cache_off"]["seconds"] / out["cache_on"]["seconds"]
    out["speedup_on_plain_attention_vs_off"] = out["cache_off"]["seconds"] / out["cache_on_plain_attention"]["seconds"]
    out["cascade_over_plain_seconds"] = out["cache_on"]["seconds"] / out["cache_on_plain_attention"]["seconds"]
    # Greedy on random bf16 weights: cascade and plain attention round differently, so a few rows may
    # part at near-ties; most must agree token for token (a wrong prefix would change every row).
    same = [a == b for a, b in zip(outputs["cache_on"], outputs["cache_on_plain_attention"])]
    out["cascade_vs_plain_identical_outputs"] = sum(same) / len(same)
    # Rounding parts rows late and at random; a wrong prefix would part them at the first tokens.
    common = [next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
              for a, b in zip(outputs["cache_on"], outputs["cache_on_plain_attention"])]
    out["cascade_vs_plain_first_token_identical"] = sum(c > 0 for c in common) / len(common)
    out["cascade_vs_plain_mean_common_prefix_tokens"] = sum(common) / len(common)
    return out


SCHEMA = {"type": "object", "properties": {
    "id": {"type": "integer"}, "name": {"type": "string", "maxLength": 24},
    "tags": {"type": "array", "items": {"type": "string", "maxLength": 12}, "maxItems": 4},
    "active": {"type": "boolean"}}, "required": ["id", "name", "tags", "active"], "additionalProperties": False}


def item_f(model_dir: Path, tokenizer_dir: Path, batch: int = 64, mask_threads: int | None = None,
           state_table: str | None = None) -> dict:
    return item_f_batches(model_dir, tokenizer_dir, [batch], mask_threads, state_table)[batch]


def item_f_batches(model_dir: Path, tokenizer_dir: Path, batches: list[int], mask_threads: int | None = None,
                   state_table: str | None = None, wait_tables: bool = False,
                   warm_shapes: bool = True, forced_rows: bool = False,
                   engine_flags: dict[str, Any] | None = None, repeats: int = 1) -> dict[int | str, dict]:
    """Item (f) at each batch size in turn, on one Engine (one start-up). With state tables on, a
    later batch finds the tables its schema's earlier runs filled (as a server would); a batch size
    named again (key "256#2") replays its earlier walks (same prompts and seeds): every state it
    reaches has its table row filled already, as in f_timeline's default warm-up.

    Every run is warmed by two requests of its own kind (for JSON: the schema compiled, the kernels
    of the masked draw run). `wait_tables`: after that warm-up the JSON run also waits until the
    schema's state table is completed in the background (a server that has served the schema for a
    few seconds); without it the first JSON run may race the completion ("table_wait_s" says how long
    the wait was). `engine_flags`: more Engine options (an A/B's arm).
    `warm_shapes`: after the first unconstrained run, the same prompts decode once more
    with staggered lengths (`warm_batch_sizes`), so that the JSON run is not the first to meet each
    decode batch size below the full one (the same-length run, after it, met them all warm: the H200's
    2026-12-04 mid round measured the JSON run's forward launches 51 ms longer in all at 64 rows, 120 ms
    at 256, the LM head's first calls at each new row count). `forced_rows`: --enable-forced-rows.
    `engine_flags` named RADIXLM_... are environment variables the Engine's processes start with (module
    constants read at import, e.g. runtime/prefill_as_decode.py's), not Engine options.
    `repeats` > 1: after the three runs, the JSON and same-lengths runs again in pairs, alternating which
    goes first (`repeat_pairs`): one run's ratio moves with its first steps, which vary 2-4x between
    Engines and runs (RESULTS.md, jf19), so the medians over repeats are the figure to compare."""
    import radixlm

    args = {**ENGINE_ARGS, "skip_tokenizer_init": False, "tokenizer_path": str(tokenizer_dir)}
    if mask_threads is not None:
        args["grammar_mask_threads"] = mask_threads
    if state_table is not None:
        args["grammar_state_table"] = state_table
    if forced_rows:
        args["enable_forced_rows"] = True
    env = {k: str(v) for k, v in (engine_flags or {}).items() if k.startswith("RADIXLM_")}
    args.update({k: v for k, v in (engine_flags or {}).items() if k not in env})
    from radixlm.runtime.loop_stats import ENV

    # the scheduler process's loop, per run (runtime/loop_stats.py): steps, time in them, waits
    loop_file = os.environ.setdefault(ENV, tempfile.mktemp(prefix="radixlm-loop-", suffix=".jsonl"))
    results: dict[int | str, dict] = {}
    with environ(env), radixlm.Engine(str(model_dir), mem_fraction_static=0.5, **args) as eng:
        for k, batch in enumerate(batches):
            rng = random.Random(7)
            prompts = [[rng.randrange(100, 40000) for _ in range(128)] for _ in range(batch)]
            again = batches[:k].count(batch)
            out: dict = results.setdefault(f"{batch}#{again + 1}" if again else batch, {"batch": batch})
            lengths: list[int] = []
            # The third run decodes unconstrained to exactly the constrained outputs' lengths: the same
            # steps and batch occupancy (the JSON ends early and unevenly, the first run decodes 128
            # tokens per request), so its ratio is the cost of the constraint alone.
            runs = {"unconstrained": {}, "json_schema": {"json_schema": json.dumps(SCHEMA)}, "unconstrained_same_lengths": {}}
            for label, extra in runs.items():
                sp = run_params(len(prompts), extra, lengths)
                eng.generate(input_ids=prompts[:2], sampling_params=sp[:2])  # compiles the grammar, warms up
                waited = wait_for_tables(eng) if extra and wait_tables else 0.0
                out[label] = {**timed_run(eng, prompts, sp, loop_file), "table_wait_s": waited}
                counts = out[label].pop("counts")
                if extra:
                    lengths = counts
                elif warm_shapes and not again and not lengths:
                    out["shape_warmup_s"] = warm_batch_sizes(eng, prompts)
            out["constrained_vs_unconstrained_tok_s"] = out["json_schema"]["tok_s"] / out["unconstrained"]["tok_s"]
            out["constrained_vs_same_lengths_tok_s"] = out["json_schema"]["tok_s"] / out["unconstrained_same_lengths"]["tok_s"]
            if repeats > 1:
                out["repeats"] = repeat_pairs(eng, prompts, runs["json_schema"], lengths, loop_file, repeats,
                                              out["json_schema"]["tok_s"], out["unconstrained_same_lengths"]["tok_s"])
    return results


def run_params(n: int, extra: dict, lengths: list[int]) -> list[dict]:
    """Item (f)'s sampling params for `n` rows: seeded, 128 new tokens, or request i's `lengths[i]` where given
    (the same-lengths run); unconstrained rows ignore EOS."""
    sp = [{"temperature": 1.0, "seed": i, "max_new_tokens": 128, "ignore_eos": not extra, **extra} for i in range(n)]
    return [{**p, "max_new_tokens": m} for p, m in zip(sp, lengths)] if lengths else sp


def timed_run(eng: Any, prompts: list[list[int]], sp: list[dict], loop_file: str) -> dict:
    """One timed generate of `prompts`: rate, lengths ("counts"), validity against SCHEMA, the scheduler's loop."""
    import jsonschema

    from radixlm.runtime.loop_stats import read_last

    # The Engine's front (tokenizer manager) runs in this process: the earlier runs' garbage (results, validators)
    # is collected here, not by a full collection inside the timed run (2026-12-06, H200: single JSON runs at 256
    # rows 0.2 s slower by the client's clock, 15.1k against ~18.2k tok/s, while the scheduler's busy period was as
    # long as the others').
    gc.collect()
    t = time.perf_counter()
    res = eng.generate(input_ids=prompts, sampling_params=sp)
    dt = time.perf_counter() - t
    time.sleep(0.05)  # the scheduler's loop writes its busy period's line once idle
    counts = [r["meta_info"]["completion_tokens"] for r in res]
    valid = valid_schema = 0
    for r in res:
        try:
            doc = json.loads(r["text"])
        except ValueError:
            continue
        valid += 1
        valid_schema += jsonschema.Draft202012Validator(SCHEMA).is_valid(doc)
    aborts = {r["meta_info"]["finish_reason"].get("message") for r in res
              if r["meta_info"]["finish_reason"]["type"] == "abort"}
    info = eng.get_server_info()  # grammar-forced tokens as extra decode rows (runtime/forced_rows.py), so far
    forced_rows = {k: info.get(k, 0) for k in ("forced_ride_tokens", "forced_guess_rows", "forced_guess_hits",
                                               "forced_guess_tokens", "forced_end_rows")}
    return {"scheduler_loop": read_last(loop_file), "forced_rows_so_far": forced_rows, "counts": counts,
            "seconds": dt, "tokens": sum(counts), "tok_s": sum(counts) / dt, "max_tokens": max(counts),
            "mean_tokens": sum(counts) / len(counts), "forced_tokens": sum(r["meta_info"].get("forced_tokens", 0) for r in res),
            "finished_by_stop": sum(r["meta_info"]["finish_reason"]["type"] == "stop" for r in res),
            "valid_json": valid, "valid_schema": valid_schema, "abort_messages": sorted(map(str, aborts))}


def repeat_pairs(eng: Any, prompts: list[list[int]], json_extra: dict, lengths: list[int], loop_file: str,
                 repeats: int, first_json_tok_s: float, first_same_tok_s: float) -> dict:
    """The JSON run and the same-lengths run `repeats - 1` more times on the warm Engine, in pairs whose order
    alternates (same first, then JSON first, ...: the first pair of item (f) ran JSON first), the same prompts
    and seeds (the same outputs). Returns every run's tok/s with the first pair's included, each pair's ratio,
    and the figure to compare: the median JSON rate over the median same-lengths rate."""
    json_sp, same_sp = run_params(len(prompts), json_extra, []), run_params(len(prompts), {}, lengths)
    rates: dict[str, list[float]] = {"json_schema": [first_json_tok_s], "unconstrained_same_lengths": [first_same_tok_s]}
    runs: list[dict] = []
    differ = 0
    for r in range(1, repeats):
        order = ("unconstrained_same_lengths", "json_schema") if r % 2 else ("json_schema", "unconstrained_same_lengths")
        for label in order:
            run = timed_run(eng, prompts, json_sp if label == "json_schema" else same_sp, loop_file)
            # seeded outputs repeat; a JSON run of other lengths is counted (its pair then compares other work)
            counts = run.pop("counts")
            differ += label == "json_schema" and counts != lengths
            loop = run.pop("scheduler_loop") or {}
            runs.append({"pair": r, "label": label, "step_ms": loop.get("step_ms"), **run})
            rates[label].append(run["tok_s"])
    pair_ratios = [j / s for j, s in zip(rates["json_schema"], rates["unconstrained_same_lengths"])]
    return {"tok_s": rates, "pair_ratios": pair_ratios, "runs": runs, "json_runs_of_other_lengths": differ,
            "valid_schema_min": min([run["valid_schema"] for run in runs if run["label"] == "json_schema"]),
            "median_pair_ratio": statistics.median(pair_ratios),
            "constrained_vs_same_lengths_tok_s_medians": statistics.median(rates["json_schema"])
            / statistics.median(rates["unconstrained_same_lengths"])}


@contextlib.contextmanager
def environ(env: dict[str, str]) -> Iterator[None]:
    """`env` set in os.environ while the block runs (processes spawned in it inherit it), then restored."""
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def warm_batch_sizes(eng: Any, prompts: list[list[int]]) -> float:
    """Decode `prompts` once, request i for i + 1 tokens: the decode batch takes every size from
    len(prompts) down to 1, each size's first-call costs (the LM head's GEMM at a new row count, a
    graph bucket's first replay) paid here. Returns the seconds it took."""
    t = time.perf_counter()
    eng.generate(input_ids=prompts, sampling_params=[{"temperature": 1.0, "seed": i, "max_new_tokens": i + 1,
                                                      "ignore_eos": True} for i in range(len(prompts))])
    return time.perf_counter() - t


def wait_for_tables(eng: Any, limit_s: float = 60.0) -> float:
    """Seconds until the Engine's state tables are all completed (each query is a scheduler turn, which
    files the rows the background walk sent); stops waiting after `limit_s`."""
    t = time.perf_counter()
    while eng.get_server_info().get("grammar_tables_completing", 0) and time.perf_counter() - t < limit_s:
        time.sleep(0.05)
    return time.perf_counter() - t


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def drive_server(url: str, prompts: list[list[int]], outs: list[int], limit: int = 0) -> float:
    """All requests at once on one session. limit=0 (unlimited pool): aiohttp's default of 100
    connections would cap the server at 100 concurrent requests while the Engine gets all at once."""
    import aiohttp

    connector = aiohttp.TCPConnector(limit=limit)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=3600), connector=connector) as session:
        async def one(p: list[int], o: int) -> None:
            body = {"input_ids": p, "sampling_params": {"temperature": 0, "max_new_tokens": o, "ignore_eos": True}}
            async with session.post(f"{url}/generate", json=body) as resp:
                data = await resp.json()
                assert resp.status == 200 and data["meta_info"]["completion_tokens"] == o, data

        t = time.perf_counter()
        await asyncio.gather(*(one(p, o) for p, o in zip(prompts, outs)))
        return time.perf_counter() - t


def item_g(model_dir: Path, vocab: int, n: int = 300) -> dict:
    import urllib.request

    import radixlm

    prompts, outs = workload_b(n, vocab, seed=11)
    total = sum(map(len, prompts)) + sum(outs)
    with radixlm.Engine(str(model_dir), mem_fraction_static=0.6, **ENGINE_ARGS) as eng:
        eng.generate(input_ids=prompts[:4], sampling_params=params_for([4] * 4))
        eng.flush_cache()
        t = time.perf_counter()
        eng.generate(input_ids=prompts, sampling_params=params_for(outs))
        engine_s = time.perf_counter() - t
    port = _free_port()
    cmd = [sys.executable, "-m", "radixlm.launch_server", "--model-path", str(model_dir), "--port", str(port),
           "--load-format", "dummy", "--dtype", "bfloat16", "--skip-tokenizer-init", "--context-length", "4096",
           "--mem-fraction-static", "0.6", "--log-level", "warning"]
    proc = subprocess.Popen(cmd, env=os.environ.copy())
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.time() > deadline or proc.poll() is not None:
                raise RuntimeError("server did not come up")
            time.sleep(1)
        asyncio.run(drive_server(url, prompts[:4], [4] * 4))
        with urllib.request.urlopen(f"{url}/flush_cache", timeout=30) as r:  # as the Engine run: no warm-up hits
            assert r.status == 200
        server_s = asyncio.run(drive_server(url, prompts, outs))
    finally:
        proc.terminate()
        proc.wait(30)
    return {"requests": n, "engine_tok_s": total / engine_s, "server_tok_s": total / server_s,
            "server_vs_engine": engine_s / server_s}

"""Issue 14.5 / trust: how long one request's fields can hold the scheduler's loop.

Part 1 runs the default model's Scheduler in-process on the CPU (as benchmarks/f_timeline.py does):
a request with a backtracking stop_regex beside a plain one; the longest Scheduler.step and the
median step, next to the same requests with a benign stop_regex (`base`). A run still busy after
--limit-s is cut there (on main's code the search never ends).
Part 2 times the sampler's per-row, per-step host work that a request's fields scale: a
whole-vocabulary logit_bias and the repetition penalty over a long prompt, as the result processor
hands them to apply_logit_adjustments at each step (the least of --reps, after a warm-up).
Part 3 times the finish check of one row at one step with long stop lists.
Part 4 (`--lora`, alone) times the steps of a plain request while a request arrives for an adapter
that --max-loaded-loras evicted from host memory (rank 64 on every module, ~78 MB of bfloat16):
read inside the step (the in-process path, as before fddc018) and on the scheduler process's
lora-load thread (AdapterLoads attached, as the scheduler process does).
Part 5 (`--input-logprobs`, alone) times one 2,048-row prefill chunk's input logprobs at top 0/20/100:
on the loop, `record_input_logprobs` and pickling the ReqOutput for the pipe; on the front, unpickling
it and making the per-token lists (`top_rows.expand`).
Part 6 (`--ngram`, alone) times the NGRAM index's host work per scheduler step: a drafter alone on a
--prompt-len prompt (each step's `propose`, the SpecDecoder's per-step budget set), and the default model's
Scheduler (`--speculative-algorithm NGRAM`, chunked prefill) on a prompt near its context, the index
syncs of each step summed.

    timeout 900 python benchmarks/stall_audit.py --out /tmp/stall_audit.json
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import threading
import time
from pathlib import Path

import torch

from radixlm.runtime.io_struct import TokenizedGenerateReq
from radixlm.runtime.model_source import resolve_model_path
from radixlm.runtime.request import Req
from radixlm.runtime.sampler import SampleRow, SamplingBatch, apply_logit_adjustments
from radixlm.runtime.sampling_params import SamplingParams
from radixlm.runtime.scheduler import Scheduler
from radixlm.runtime.server_args import ServerArgs

BACKTRACKING = r"(?:[\s\S]|[\s\S]{2})+(?:\x01|\x02)"  # exponential in the output's length, in re and regex
PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def run_scheduler(sched: Scheduler, reqs: list[TokenizedGenerateReq], limit_s: float) -> dict:
    """Steps on a thread so that a step that never returns is reported, not waited for."""
    steps: list[float] = []
    reasons: dict[str, object] = {}

    def loop() -> None:
        for r in reqs:
            sched.handle(r)
        while not sched.idle:
            t = time.perf_counter()
            sched.step()
            steps.append(time.perf_counter() - t)
            for out in sched.pop_outputs():
                if out.finished_reason is not None:
                    reasons[out.rid] = out.finished_reason.to_json()

    start = time.perf_counter()
    worker = threading.Thread(target=loop, daemon=True)
    worker.start()
    worker.join(limit_s)
    stalled = worker.is_alive()
    longest = max(steps + ([time.perf_counter() - start - sum(steps)] if stalled else [0.0]))
    return {"steps": len(steps), "longest_ms": round(longest * 1e3, 1), "stalled_past_limit": stalled,
            "median_step_ms": round(statistics.median(steps) * 1e3, 2) if steps else None, "finished": reasons}


def per_row_step_ms(row: SampleRow, vocab: int, reps: int) -> float:
    logits = torch.randn(1, vocab)
    times = []
    for _ in range(5):  # warm-up (first calls allocate)
        apply_logit_adjustments(logits.clone(), SamplingBatch.build([row], vocab, logits.device))
    for _ in range(reps):
        t = time.perf_counter()
        apply_logit_adjustments(logits.clone(), SamplingBatch.build([row], vocab, logits.device))
        times.append(time.perf_counter() - t)
    return round(min(times) * 1e3, 3)


def sampler_rows(vocab: int, prompt_len: int) -> dict[str, SampleRow]:
    """Rows as ResultProcessor.sample makes them (with the request's prompt mask where the code has it)."""
    out = list(range(5, 205))
    bias = SamplingParams(logit_bias=tuple((t, 0.5) for t in range(vocab)))
    one = SamplingParams(logit_bias=((7, 0.5),))
    rep = SamplingParams(repetition_penalty=1.1)
    prompt = [(i * 7919) % (vocab - 10) + 5 for i in range(prompt_len)]
    req = Req.from_wire(TokenizedGenerateReq(rid="r", input_ids=prompt, params=rep), seed=1)
    mask = req.prompt_mask(vocab, "cpu") if hasattr(req, "prompt_mask") else None
    extra = (mask,) if mask is not None else ()
    return {
        "logit_bias, 1 entry": SampleRow(one, 1, 200, out, prompt[:16]),
        f"logit_bias, whole vocabulary ({vocab})": SampleRow(bias, 1, 200, out, prompt[:16]),
        "repetition_penalty, 16-token prompt": SampleRow(rep, 1, 200, out, prompt[:16], (), *(
            (Req.from_wire(TokenizedGenerateReq(rid="s", input_ids=prompt[:16], params=rep), seed=1)
             .prompt_mask(vocab, "cpu"),) if extra else ())),
        f"repetition_penalty, {prompt_len}-token prompt": SampleRow(rep, 1, 200, out, prompt, (), *extra),
    }


def finish_check_ms(tok, reps: int) -> dict[str, float]:
    """Part 3: ResultProcessor.check_finish for one row at one step (a 200-token output), with stop
    lists as a 64-MB body could carry them (built directly, past the front's bounds) and at the bounds."""
    from radixlm.runtime.result_processor import ResultProcessor

    proc = ResultProcessor.__new__(ResultProcessor)
    proc.eos_ids, proc.tokenizer, proc.context_len = frozenset({0}), tok, 1 << 20
    cases = {
        "stop: 100,000 strings of 6 chars": SamplingParams(stop=tuple(f"q{i:05d}" for i in range(100_000))),
        "stop: 256 strings, 8,192 chars (the bound)": SamplingParams(stop=tuple("q" * 31 + f"{i:01d}" for i in range(256))),
        "stop_token_ids: 1,000,000 (one id repeated)": SamplingParams(stop_token_ids=(5,) * 1_000_000),
        "stop_token_ids: 4,096 distinct (the bound)": SamplingParams(stop_token_ids=tuple(range(1, 4097))),
    }
    out = {}
    for name, params in cases.items():
        req = Req.from_wire(TokenizedGenerateReq(rid="r", input_ids=[1, 2, 3], params=params), seed=1)
        req.output_ids = list(range(300, 500))
        times = []
        for _ in range(reps):
            t = time.perf_counter()
            proc.check_finish(req, 7, None)
            times.append(time.perf_counter() - t)
        out[name] = round(min(times[2:] or times) * 1e3, 3)
        print(name, out[name], "ms", flush=True)
    return out


def lora_read_back(model_dir: Path, tok, max_new: int) -> dict[str, dict]:
    """Part 4: the plain request's steps from the adapter request's arrival on, each way."""
    import tempfile

    from lora import write_adapter  # benchmarks/lora.py: a PEFT folder as peft writes it

    from radixlm.runtime.lora.background_load import AdapterLoads

    cfg = json.loads((model_dir / "config.json").read_text())
    out: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        paths = tuple(f"a{i}={write_adapter(Path(tmp) / f'a{i}', cfg, i, rank=64, device='cpu')}" for i in range(2))
        ids = tok.encode(PROMPT)
        for label, threaded in (("read in the step", False), ("lora-load thread", True)):
            args = ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096, enable_lora=True,
                              lora_paths=paths, max_loaded_loras=1, max_loras_per_batch=1, max_lora_rank=64)
            sched = Scheduler(args.resolve(), model_dir, tok)
            if threaded:
                sched.adapter_loads = AdapterLoads(sched.runner.lora)
            plain = SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)
            sched.handle(TokenizedGenerateReq(rid="plain", input_ids=ids, params=plain))
            steps: list[float] = []
            after: list[float] = []
            reasons: dict[str, object] = {}
            while not sched.idle:
                if len(steps) == 4:  # a0 left host memory as a1 was loaded at start-up
                    params = SamplingParams(temperature=0.0, max_new_tokens=8, ignore_eos=True)
                    sched.handle(TokenizedGenerateReq(rid="lora", input_ids=ids[:-1], params=params, lora_path="a0"))
                t = time.perf_counter()
                sched.step()
                (after if len(steps) >= 4 else []).append(time.perf_counter() - t)
                steps.append(time.perf_counter() - t)
                for o in sched.pop_outputs():
                    if o.finished_reason is not None:
                        reasons[o.rid] = o.finished_reason.to_json()
            out[label] = {"steps": len(steps), "longest_after_arrival_ms": round(max(after) * 1e3, 1),
                          "after_arrival_ms": [round(x * 1e3, 1) for x in after[:8]],
                          "median_step_ms": round(statistics.median(steps) * 1e3, 2), "finished": reasons}
            t = time.perf_counter()
            sched.runner.lora.read_back("a1")  # the read alone, on an idle loop
            out[label]["read_back_alone_ms"] = round((time.perf_counter() - t) * 1e3, 1)
            print(label, out[label], flush=True)
    return out


def top_form_ms(logits: torch.Tensor, k: int, reps: int) -> dict[str, float]:
    """The loop's part that the two forms differ in, side by side from one chunk's top-k tensors: lists of
    pairs (as the loop made before) or a TopRows, each made and pickled for the pipe."""
    import pickle

    from radixlm.runtime.sampler import token_logprobs
    from radixlm.runtime.top_rows import TopRows

    if k == 0:
        return {}
    _, vals, ids = token_logprobs(logits, torch.zeros(len(logits), dtype=torch.long), k)
    lists, arrays = [], []
    for _ in range(reps):
        t = time.perf_counter()
        pickle.dumps([list(zip(v, i)) for v, i in zip(vals.tolist(), ids.tolist())])
        t1 = time.perf_counter()
        pickle.dumps(TopRows(vals.numpy(), ids.numpy()))
        lists.append(t1 - t)
        arrays.append(time.perf_counter() - t1)
    return {"lists_and_pickle_ms": round(min(lists) * 1e3, 1), "arrays_and_pickle_ms": round(min(arrays) * 1e3, 2)}


def input_logprobs(vocab: int, rows: int, reps: int) -> dict[str, dict[str, float]]:
    """Part 5: the least of `reps` for each side, per top-k."""
    import pickle

    from radixlm.runtime import step_logprobs
    from radixlm.runtime.io_struct import ReqOutput
    from radixlm.runtime.top_rows import expand

    computed: list[float] = []  # log_softmax + topk (the same both ways): timed apart from the host work after it
    real = step_logprobs.token_logprobs

    def timed(*a, **kw):
        t = time.perf_counter()
        result = real(*a, **kw)
        computed.append(time.perf_counter() - t)
        return result

    step_logprobs.token_logprobs = timed
    torch.manual_seed(0)
    logits = torch.randn(rows, vocab) * 4
    out: dict[str, dict[str, float]] = {}
    for k in (0, 20, 100):
        loop, host, front = [], [], []
        for _ in range(reps):
            params = SamplingParams(temperature=0.0, max_new_tokens=1)
            req = Req.from_wire(TokenizedGenerateReq(rid="r", input_ids=list(range(rows + 1)), params=params,
                                                     return_logprob=True, logprob_start_len=0, top_logprobs_num=k), seed=1)
            t = time.perf_counter()
            step_logprobs.record_input_logprobs(req, logits, list(range(rows)), 1)
            wire = pickle.dumps(ReqOutput("r", [], None, rows + 1, 0, 0, input_token_logprobs=req.pending_input_logprobs,
                                          input_top_logprobs=req.pending_input_top))
            t1 = time.perf_counter()
            got = pickle.loads(wire)
            lists = expand(got.input_top_logprobs)
            front.append(time.perf_counter() - t1)
            loop.append(t1 - t)
            host.append(t1 - t - computed[-1])
            assert len(lists) == rows + 1
        out[f"top {k}"] = {"loop_ms": round(min(loop) * 1e3, 1), "loop_after_topk_ms": round(min(host) * 1e3, 1),
                           "front_ms": round(min(front) * 1e3, 1),
                           "wire_mb": round(len(wire) / 1e6, 2), **top_form_ms(logits, k, reps)}
        print(f"input logprobs, {rows} rows, top {k}", out[f"top {k}"], flush=True)
    step_logprobs.token_logprobs = real
    return out


def ngram_steps(model_dir: Path, tok, prompt_len: int, max_new: int) -> dict[str, dict]:
    from radixlm.runtime.speculative import ngram

    text = tok.encode(PROMPT * (prompt_len // 10))
    prompt = (text * (prompt_len // len(text) + 1))[:prompt_len]
    drafter, per_step, first = ngram.NgramDrafter(), [], None
    for step in range(200):
        drafter.step_tokens = getattr(ngram, "STEP_TOKENS", None)  # (the SpecDecoder's begin_step; None before)
        t = time.perf_counter()
        draft = drafter.propose(1, prompt, prompt[:8], 6)
        per_step.append((time.perf_counter() - t) * 1e3)
        if draft:
            first = step
            break
    out = {"drafter alone": {"prompt_tokens": prompt_len, "max_step_ms": max(per_step), "total_ms": sum(per_step),
                             "first_drafting_step": first}}
    spent: dict[int, float] = {}
    real, step_no = ngram.NgramIndex.sync, [0]

    def timed_sync(self, *a):
        t = time.perf_counter()
        try:
            return real(self, *a)
        finally:
            spent[step_no[0]] = spent.get(step_no[0], 0.0) + time.perf_counter() - t

    ngram.NgramIndex.sync = timed_sync
    sched = Scheduler(ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=16384,
                                 speculative_algorithm="NGRAM", chunked_prefill_size=2048).resolve(), model_dir, tok)
    if sched.spec is not None:
        sched.spec.payoff = None  # (drafting not left to the measured payoff)
    long_prompt = prompt[: sched.runner.context_len - max_new - 1]
    sched.handle(TokenizedGenerateReq(rid="long", input_ids=long_prompt,
                                      params=SamplingParams(temperature=0.0, max_new_tokens=max_new, ignore_eos=True)))
    steps = []
    while not sched.idle:
        t = time.perf_counter()
        sched.step()
        steps.append(time.perf_counter() - t)
        step_no[0] += 1
        sched.pop_outputs()
    ngram.NgramIndex.sync = real
    ms = [spent.get(i, 0.0) * 1e3 for i in range(len(steps))]
    out["scheduler"] = {"prompt_tokens": len(long_prompt), "steps": len(steps), "max_step_index_ms": max(ms),
                        "index_ms_per_step": [round(m, 2) for m in ms], "max_step_ms": max(steps) * 1e3,
                        "median_step_ms": statistics.median(steps) * 1e3}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path)
    ap.add_argument("--max-new", type=int, default=48)
    ap.add_argument("--limit-s", type=float, default=60.0)
    ap.add_argument("--prompt-len", type=int, default=30000, help="part 2's long prompt")
    ap.add_argument("--reps", type=int, default=30)
    ap.add_argument("--sampler-only", action="store_true", help="parts 2 and 3 only")
    ap.add_argument("--lora", action="store_true", help="part 4 only")
    ap.add_argument("--input-logprobs", action="store_true", help="part 5 only")
    ap.add_argument("--ngram", action="store_true", help="part 6 only")
    args = ap.parse_args()
    torch.set_num_threads(1)  # part 2: one thread (pool wake-ups on a loaded 2-core VM swamped the figures)
    model_dir = resolve_model_path(None, progress=False)
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    if args.input_logprobs:
        results = {"input_logprobs_per_chunk": input_logprobs(len(tok), 2048, 5)}
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return 0
    if args.ngram:
        results = {"ngram_index": ngram_steps(model_dir, tok, args.prompt_len, args.max_new)}
        print(json.dumps({k: {a: b for a, b in v.items() if a != "index_ms_per_step"}
                          for k, v in results["ngram_index"].items()}), flush=True)
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return 0
    if args.lora:
        results = {"lora_read_back": lora_read_back(model_dir, tok, args.max_new)}
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return 0
    results: dict[str, dict] = {"sampler_per_row_step_ms": {}}
    for name, row in sampler_rows(len(tok), args.prompt_len).items():
        results["sampler_per_row_step_ms"][name] = per_row_step_ms(row, len(tok), args.reps)
        print(name, results["sampler_per_row_step_ms"][name], "ms", flush=True)
    results["finish_check_per_row_step_ms"] = finish_check_ms(tok, 10)
    if args.sampler_only:
        if args.out:
            args.out.write_text(json.dumps(results, indent=1))
        return 0
    sched = Scheduler(ServerArgs(model_path=str(model_dir), device="cpu", max_total_tokens=4096).resolve(), model_dir, tok)
    ids = tok.encode(PROMPT)
    for label, pattern in (("base", r"\bzebra\b"), ("adversary", BACKTRACKING)):
        params = SamplingParams(temperature=0.0, max_new_tokens=args.max_new, ignore_eos=True, stop_regex=(pattern,))
        plain = SamplingParams(temperature=0.0, max_new_tokens=args.max_new, ignore_eos=True)
        reqs = [TokenizedGenerateReq(rid=f"{label}-stop_regex", input_ids=ids, params=params),
                TokenizedGenerateReq(rid=f"{label}-plain", input_ids=ids[:-1], params=plain)]
        results[f"stop_regex {label}"] = run_scheduler(sched, reqs, args.limit_s)
        print(label, results[f"stop_regex {label}"], flush=True)
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())

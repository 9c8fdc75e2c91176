"""Host cost of item (f)'s grammar work per decode step, per row, where it goes (issue 14.4).

Rows decode item (f)'s schema (gpu_throughput.SCHEMA) with the default model's tokenizer the way
the 8B random-weight model does at temperature 1: each token drawn from the mask with random
N(0, 1) logits (`walks`; a finished row is replaced by a new request, so the batch stays full).
The walks are drawn once, then replayed by every configuration, whose masks are checked to allow
every replayed token, so all configurations do the same work.

Two parts:
  runtime   GrammarRuntime as the scheduler drives it: advance_many (the commit), is_terminated
            per row (the finish checks), bitmask (masks taken), per --threads and --state-table
            (auto: masks gathered from the per-state table, filled once per state); µs per row,
            wall and thread CPU.
  fill      the mask fill alone (llguidance), every step at new states (the first fill of a
            state is what a decode step pays; a repeated fill of one state is served from the
            matcher's cache at ~5 µs): serial, and LLExecutor(N) over matchers that are deep
            copies of one compiled template or built apart (`LLMatcher(tokenizer, grammar)`).

    python benchmarks/grammar_host.py --batch 64,256 --steps 40 --threads 0,1,4,8,15
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


def cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def allowed_ids(row: torch.Tensor, vocab: int) -> np.ndarray:
    bits = np.unpackbits(row.numpy().view(np.uint8), bitorder="little")[:vocab]
    return np.flatnonzero(bits)


def walks(grammar: Any, rows: int, steps: int, seed: int) -> list[list[int]]:
    """Per row, `steps` + 1 tokens: documents drawn one after the other (each ends with an end
    token), each token the argmax of N(0, 1) logits + Gumbel noise over the allowed ones."""
    rng = np.random.default_rng(seed)
    vocab = grammar.info.vocab_size
    mask = torch.empty((1, (vocab + 31) // 32), dtype=torch.int32)
    out = []
    for _ in range(rows):
        seq: list[int] = []
        m = grammar.matcher()
        while len(seq) <= steps:
            if m.is_terminated():  # the scheduler finishes the request here (no end token sampled)
                m = grammar.matcher()
            m.fill_next_token_bitmask(mask, 0)
            ids = allowed_ids(mask[0], vocab)
            tok = int(ids[np.argmax(rng.standard_normal(len(ids)) + rng.gumbel(size=len(ids)))])
            assert m.advance(tok)
            seq.append(tok)
            if tok in grammar.info.end_token_ids:
                m = grammar.matcher()
        out.append(seq)
    return out


def _req(rid: str, grammar: Any, family: int) -> SimpleNamespace:
    return SimpleNamespace(rid=rid, grammar=grammar.matcher(family), finished=False, output_ids=[], sent_output_len=0,
                           forced_tokens=0, return_logprob=False, params=SimpleNamespace(max_new_tokens=4096))


def _check(mask: torch.Tensor, reqs: list[Any], tokens: list[int]) -> None:
    for i, (r, t) in enumerate(zip(reqs, tokens)):
        if not (int(mask[i, t >> 5]) >> (t & 31)) & 1:
            raise AssertionError(f"row {i} ({r.rid}): the mask refuses replayed token {t}")


def run_runtime(tok: Any, tok_path: str, grammar: Any, paths: list[list[int]], steps: int, threads: int,
                state_table: str = "off", warm_paths: list[list[int]] | None = None) -> dict:
    """GrammarRuntime's per-step calls, as the overlapped scheduler makes them, timed per phase.
    state_table "auto": the rows' matchers use the grammar's per-state mask table (a fresh, empty
    one: its first steps fill many states), masks are gathered from it; "warm": the same, the
    table first filled along `warm_paths` (other documents, as a server that served the schema);
    "warm-eager": warm, commits not lazy (llguidance takes every token at once, as before lazy commits);
    "complete": every state's row filed by the background walk (table_completion, run here in-line on
    its own DFA as its process does), with its DFA moves; "complete-rows": the rows only (before the
    moves were sent: the scheduler's DFA takes its own subset steps); "complete-replay": complete, and
    the measured walks taken once before (every (state, token) move cached: item (f)'s replayed run)."""
    from radixlm.runtime.grammar_runtime import GrammarRuntime
    from radixlm.runtime.server_args import ServerArgs

    rt = GrammarRuntime(ServerArgs(grammar_mask_threads=threads, grammar_state_table="off" if state_table == "off" else "lazy"),
                        tok, tok_path, grammar.info.vocab_size)
    grammar = rt._with_table(grammar)
    if state_table.startswith("warm") and warm_paths:
        _replay(grammar, warm_paths)
    if state_table.startswith("complete"):
        _complete(grammar, with_moves=state_table != "complete-rows")
    if state_table == "complete-replay":
        _replay(grammar, [p[: steps + 1] for p in paths])
    if state_table.endswith("eager"):
        grammar.table.lazy = False
    rows = len(paths)
    reqs = [_req(f"r{i}", grammar, rt._family()) for i in range(rows)]
    cpu = torch.device("cpu")
    phases: dict[str, list[float]] = {k: [] for k in ("commit", "finish checks", "masks taken", "total")}
    cpu_phases: dict[str, list[float]] = {k: [] for k in phases}
    try:
        mask = rt.bitmask(reqs, cpu)
        _check(mask, reqs, [p[0] for p in paths])
        for s in range(steps):
            tokens = [p[s] for p in paths]
            w0, c0 = time.perf_counter(), time.thread_time()
            rt.advance_many(reqs, tokens)
            w1, c1 = time.perf_counter(), time.thread_time()
            ended = [i for i, r in enumerate(reqs) if rt.is_terminated(r)]
            w2, c2 = time.perf_counter(), time.thread_time()
            for i in ended:  # a finished request leaves; a new one takes its row (untimed)
                rt.forget(reqs[i])
                reqs[i] = _req(f"r{i}.{s}", grammar, rt._family())
            w3, c3 = time.perf_counter(), time.thread_time()
            mask = rt.bitmask(reqs, cpu)
            w4, c4 = time.perf_counter(), time.thread_time()
            _check(mask, reqs, [p[s + 1] for p in paths])
            for k, (a, b) in zip(phases, ((w0, w1), (w1, w2), (w3, w4), (w0, w4 - (w3 - w2)))):
                phases[k].append((b - a) * 1e6 / rows)
            for k, (a, b) in zip(cpu_phases, ((c0, c1), (c1, c2), (c3, c4), (c0, c4 - (c3 - c2)))):
                cpu_phases[k].append((b - a) * 1e6 / rows)
    finally:
        rt.close()
    table = getattr(grammar, "table", None)
    return {"threads": threads, "state_table": state_table,
            "table_states": table.dfa.num_states if table is not None else None,
            "wall_us_per_row": {k: statistics.median(v) for k, v in phases.items()},
            "wall_us_per_row_mean": {k: statistics.fmean(v) for k, v in phases.items()},
            "thread_cpu_us_per_row": {k: statistics.median(v) for k, v in cpu_phases.items()}}


def _complete(grammar: Any, with_moves: bool) -> None:
    """What the scheduler's table holds once the background completion is filed (rows, then moves)."""
    from radixlm.constrained.table_completion import DfaMoves, file_moves, file_rows, walk_states
    from radixlm.constrained.table_grammar import TableGrammar

    renamed: dict[int, int] = {}
    for chunk in walk_states(TableGrammar.wrap(grammar.inner), pairs=False):  # the worker's own DFA
        if not isinstance(chunk, DfaMoves):
            file_rows(grammar.table, chunk, renamed)
        elif with_moves:
            sum(file_moves(grammar.table, chunk, renamed))


def _replay(grammar: Any, paths: list[list[int]]) -> None:
    """Walk `paths` through fresh matchers, filling every mask on the way (a table grammar keeps them)."""
    mask = torch.empty((1, (grammar.info.vocab_size + 31) // 32), dtype=torch.int32)
    for p in paths:
        m = grammar.matcher()
        for t in p:
            if m.is_terminated():  # finished: the walk's next document starts
                m = grammar.matcher()
            m.fill_next_token_bitmask(mask, 0)
            if t in grammar.info.end_token_ids:
                m = grammar.matcher()
            elif not m.advance(t):
                raise AssertionError(f"replayed token {t} refused")


MATCHERS = ("one family", "a family per thread", "families, one tokenizer", "built apart")


def run_fill(grammar: Any, paths: list[list[int]], steps: int, threads: int, matchers: str) -> dict:
    """The llguidance mask fill alone over the walks (commits untimed). `matchers`: deep copies of
    one template; of one template per thread (rows round-robin, passed grouped by family), each
    on its own tokenizer copy (the engine's families) or all on one tokenizer; or each matcher
    built from the grammar on the one tokenizer."""
    import llguidance

    from radixlm.constrained.backends.llguidance_backend import LLGuidanceMatcher, _lltokenizer, by_family, parser_limits

    lltok = _lltokenizer(grammar.info)

    made = [0]
    shared = [llguidance.LLMatcher(lltok, grammar.ll_grammar, log_level=0, limits=parser_limits())
              for _ in range(max(1, threads))] if matchers == "families, one tokenizer" else []

    def fresh() -> Any:
        made[0] += 1
        family = made[0] % max(1, threads)
        if matchers == "one family":
            return grammar.matcher(0)
        if matchers == "a family per thread":
            return grammar.matcher(family)
        if shared:
            return LLGuidanceMatcher(grammar, shared[family].deep_copy(), 0, False, family)
        return LLGuidanceMatcher(grammar, llguidance.LLMatcher(lltok, grammar.ll_grammar, log_level=0,
                                                               limits=parser_limits()), 0, False)

    rows = len(paths)
    words = (grammar.info.vocab_size + 31) // 32
    mask = torch.empty((rows, words), dtype=torch.int32)
    ms = [fresh() for _ in range(rows)]
    executor = llguidance.LLExecutor(num_threads=threads) if threads else None
    end = grammar.info.end_token_ids
    wall, cpu = [], []
    for s in range(steps):
        live = by_family([(m._m, i) for i, m in enumerate(ms)], [m.family for m in ms])
        w0, c0 = time.perf_counter(), time.process_time()
        if executor is not None:
            executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), words * 4, rows)
        else:
            for m, i in live:
                m.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
        wall.append((time.perf_counter() - w0) * 1e6 / rows)
        cpu.append((time.process_time() - c0) * 1e6 / rows)
        for i, p in enumerate(paths):
            if p[s] in end:
                ms[i] = fresh()
            elif ms[i]._m.try_consume_tokens([p[s]]) != 1:
                raise AssertionError(f"row {i}: replayed token {p[s]} refused")
            elif ms[i]._m.is_stopped():  # finished: the walk's next document starts
                ms[i] = fresh()
    return {"threads": threads, "matchers": matchers,
            "wall_us_per_row": statistics.median(wall), "process_cpu_us_per_row": statistics.median(cpu)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64,256")
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--threads", default="0,1", help="mask thread counts (0: inline)")
    ap.add_argument("--parts", default="runtime,fill")
    ap.add_argument("--state-table", default="off,auto,warm",
                    help="runtime part: off, auto (a fresh table), warm (a table filled by other walks first), "
                         "warm-eager (warm, llguidance commits every token at once: no lazy commits), complete "
                         "(every row and DFA move filed by the background walk), complete-rows (its rows only), "
                         "complete-replay (complete, the walks taken once before)")
    ap.add_argument("--tokenizer-dir", default=None, help="HF tokenizer folder (default: the default model's)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--out", default=None, help="JSON report (default: $OUT/grammar_host.json on the device "
                    "machine, else benchmarks/results/grammar_host.json)")
    args = ap.parse_args()
    import mask_fill
    from gpu_throughput import SCHEMA

    from radixlm import constrained as C

    tok = mask_fill.load_tokenizer(args.tokenizer_dir)
    tok_path = args.tokenizer_dir or tok.name_or_path
    grammar = C.compile(tok, json_schema=json.dumps(SCHEMA), cache=None)
    threads = [int(t) for t in args.threads.split(",")]
    parts = set(args.parts.split(","))
    report: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M"), "usable_cores": cores(),
                              "load_avg": os.getloadavg(), "steps": args.steps, "batches": {}}
    print(f"{cores()} usable cores, load average {os.getloadavg()[0]:.1f}", flush=True)
    for batch in (int(b) for b in args.batch.split(",")):
        t = time.perf_counter()
        paths = walks(grammar, batch, args.steps + 1, args.seed)
        ends = sum(t in grammar.info.end_token_ids for p in paths for t in p[: args.steps])
        res: dict[str, Any] = {"documents_finished": ends, "runtime": [], "fill": []}
        print(f"batch {batch}: walks drawn in {time.perf_counter() - t:.1f} s ({ends} documents finished in "
              f"{args.steps} steps)", flush=True)
        run_fill(grammar, paths, args.steps, 0, "one family")  # untimed: warms the template's lexer cache
        warm = walks(grammar, batch, args.steps + 1, args.seed + 1) if "warm" in args.state_table else None
        if "runtime" in parts:
            for table in args.state_table.split(","):
                for n in threads:
                    r = run_runtime(tok, tok_path, grammar, paths, args.steps, n, table, warm)
                    res["runtime"].append(r)
                    w, c = r["wall_us_per_row"], r["thread_cpu_us_per_row"]
                    print(f"  runtime table {table:<4} threads {n:>2}: µs/row wall (median) "
                          + ", ".join(f"{k} {v:.1f}" for k, v in w.items())
                          + f" (total mean {r['wall_us_per_row_mean']['total']:.1f}) | scheduler-thread CPU "
                          + ", ".join(f"{k} {v:.1f}" for k, v in c.items())
                          + (f" | {r['table_states']} DFA states" if r["table_states"] else ""), flush=True)
        if "fill" in parts:
            for kind in MATCHERS:
                for n in threads:
                    if kind.startswith(("a family", "families")) and n < 2:
                        continue
                    r = run_fill(grammar, paths, args.steps, n, kind)
                    res["fill"].append(r)
                    print(f"  fill {r['matchers']:<23} threads {n:>2}: {r['wall_us_per_row']:7.1f} µs/row wall, "
                          f"{r['process_cpu_us_per_row']:7.1f} process CPU", flush=True)
        report["batches"][str(batch)] = res
    out = Path(args.out or Path(os.environ.get("OUT") or HERE / "results") / "grammar_host.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

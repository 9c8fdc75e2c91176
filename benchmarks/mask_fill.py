"""Host cost of one constrained decode step: commit (advance every row's matcher by its sampled
token) + mask fill (every row's next-token bitmask), for a batch of rows walking real schemas'
documents, serial vs parallel (radixlm.constrained.mask_workers), per thread count.

    python benchmarks/mask_fill.py --batch 64,256 --threads 1,4,8,16 [--strategies native,threads]

Rows cycle over the schema corpus (tests/constrained/schema_corpus.py, each row one schema and
one of its valid documents, fed token by token as if sampled). Every parallel configuration's
masks are checked equal to the serial ones. `threads` counts mask threads (0 = serial on the
calling thread, the baseline); "native" is llguidance's LLExecutor, "threads" our pool over its
per-matcher calls. Compare with the device's decode step (H200, 8B shape, batch 64: ~5.5 ms).
Writes benchmarks/results/mask_fill.json (or --out).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the corpus lives in tests/constrained
    sys.path.insert(0, str(ROOT))


def load_tokenizer(tokenizer_dir: str | None) -> Any:
    if tokenizer_dir:
        import transformers

        return transformers.AutoTokenizer.from_pretrained(tokenizer_dir)
    spec = importlib.util.spec_from_file_location("bench_constrained", ROOT / "benchmarks" / "constrained.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.load_tokenizer()[0]  # the default model's tokenizer, as benchmarks/constrained.py finds it


def build_walks(tok: Any, backend: str, limit: int) -> list[tuple[Any, list[int]]]:
    """(grammar, token ids of one valid document + end token) per corpus schema that compiles."""
    from radixlm import constrained as C
    from tests.constrained.schema_corpus import CORPUS

    walks = []
    for _, schema, valid, _ in CORPUS:
        if not valid:
            continue
        try:
            grammar = C.compile(tok, json_schema=schema, backend=backend, cache=None)
        except ValueError:
            continue
        ids = tok(json.dumps(valid[0], ensure_ascii=False), add_special_tokens=False, split_special_tokens=True)["input_ids"]
        m = grammar.matcher()
        if not all(m.advance(t) for t in ids) or not m.is_accepting():
            continue  # tokenization the grammar does not allow (e.g. whitespace it constrains)
        walks.append((grammar, [*ids, min(grammar.info.end_token_ids)]))
        if len(walks) >= limit:
            break
    return walks


class Rows:
    """`batch` rows, row i walking walks[i % len(walks)], offset so rows sit at different depths."""

    def __init__(self, walks: list[tuple[Any, list[int]]], batch: int) -> None:
        self.walks = [walks[i % len(walks)] for i in range(batch)]
        self.matchers = [g.matcher() for g, _ in self.walks]
        self.pos = [0] * batch
        for i, (_, ids) in enumerate(self.walks):  # start at depth i mod len: a mix of states
            for t in ids[: i % max(1, len(ids) - 1)]:
                self.matchers[i].advance(t)
                self.pos[i] += 1

    def next_tokens(self) -> list[int]:
        """The token each row commits now; rows at the end of their document restart (untimed)."""
        out = []
        for i, (g, ids) in enumerate(self.walks):
            if self.pos[i] >= len(ids):
                self.matchers[i] = g.matcher()
                self.pos[i] = 0
            out.append(ids[self.pos[i]])
            self.pos[i] += 1
        return out


def bench(walks: list[tuple[Any, list[int]]], batch: int, threads: int, strategy: str, steps: int,
          reference: list[Any] | None) -> tuple[dict[str, Any], list[Any]]:
    from radixlm import constrained as C
    from radixlm.constrained.mask_workers import MaskWorkers

    rows = Rows(walks, batch)
    workers = MaskWorkers(threads, strategy)
    vocab = walks[0][0].info.vocab_size
    mask = C.allocate_token_bitmask(batch, vocab)
    commit_us, fill_us, masks = [], [], []
    try:
        for step in range(steps + 3):  # 3 warm-up steps (thread start, executor creation)
            tokens = rows.next_tokens()
            t0 = time.perf_counter()
            ok = workers.advance(rows.matchers, tokens)
            t1 = time.perf_counter()
            workers.fill([(m, i) for i, m in enumerate(rows.matchers)], mask)
            t2 = time.perf_counter()
            if not all(ok):
                raise AssertionError(f"a valid document's token was refused at step {step}")
            if step < 3:
                continue
            commit_us.append((t1 - t0) * 1e6)
            fill_us.append((t2 - t1) * 1e6)
            if len(masks) < 8:
                masks.append(mask.clone())
    finally:
        workers.close()
    if reference is not None and not all(a.equal(b) for a, b in zip(masks, reference)):
        raise AssertionError(f"batch {batch}, {threads} threads ({strategy}): masks differ from the serial fill")
    med_c, med_f = statistics.median(commit_us), statistics.median(fill_us)
    return {"batch": batch, "threads": threads, "strategy": strategy, "steps": steps,
            "commit_us_p50": med_c, "fill_us_p50": med_f, "step_us_p50": med_c + med_f,
            "fill_us_per_row": med_f / batch, "step_us_p90": sorted(c + f for c, f in zip(commit_us, fill_us))[int(0.9 * (steps - 1))],
            }, masks


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", default="64,256", help="comma list of batch sizes")
    ap.add_argument("--threads", default="1,4,8,16", help="comma list of mask thread counts (serial baseline always run)")
    ap.add_argument("--strategies", default="native,threads", help="native (LLExecutor) and/or threads (our pool)")
    ap.add_argument("--steps", type=int, default=60, help="timed decode steps per configuration")
    ap.add_argument("--schemas", type=int, default=64, help="at most this many corpus schemas")
    ap.add_argument("--backend", default="llguidance")
    ap.add_argument("--tokenizer-dir", default=None, help="HF tokenizer folder (default: the default model's)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "mask_fill.json"))
    args = ap.parse_args()
    tok = load_tokenizer(args.tokenizer_dir)
    t = time.perf_counter()
    walks = build_walks(tok, args.backend, args.schemas)
    print(f"{len(walks)} schemas compiled and walked in {time.perf_counter() - t:.1f} s; "
          f"{len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()} usable cores", flush=True)
    results = []
    print(f"{'batch':>6}{'threads':>8}{'strategy':>10}{'commit µs':>11}{'fill µs':>10}{'step µs':>10}{'p90 µs':>9}{'µs/row':>8}{'speed-up':>9}")
    for batch in (int(b) for b in args.batch.split(",")):
        # llguidance builds lexer states lazily and keeps them with the compiled grammar: one untimed
        # pass over the same steps first, so every configuration sees the warm steady state.
        bench(walks, batch, 0, "threads", args.steps, None)
        serial, reference = bench(walks, batch, 0, "threads", args.steps, None)
        serial["strategy"] = "serial"
        configs = [(n, s) for n in (int(x) for x in args.threads.split(",")) for s in args.strategies.split(",")]
        for res in [serial] + [bench(walks, batch, n, s, args.steps, reference)[0] for n, s in configs]:
            res["speedup_vs_serial"] = serial["step_us_p50"] / res["step_us_p50"]
            results.append(res)
            print(f"{res['batch']:>6}{res['threads']:>8}{res['strategy']:>10}{res['commit_us_p50']:>11.0f}{res['fill_us_p50']:>10.0f}"
                  f"{res['step_us_p50']:>10.0f}{res['step_us_p90']:>9.0f}{res['fill_us_per_row']:>8.1f}{res['speedup_vs_serial']:>8.2f}x", flush=True)
    report = {"date": time.strftime("%Y-%m-%d %H:%M"), "machine": platform.processor() or platform.machine(),
              "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
              "schemas": len(walks), "backend": args.backend, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()


def host_parallelism(tok: Any, schema: dict, doc: dict, batches: list[int], threads: list[int], steps: int = 20) -> dict:
    """Does this host run GIL-free work in parallel at all? (The 2026-12-02 H200 run saw no speed-up
    from llguidance's executor at any thread count.) Three readings: the CPU quota the kernel
    enforces, a GIL-free hash on N threads, and one schema's mask fill for `batch` rows at spread
    depths of one document, serial vs LLExecutor(N) (one grammar shared by every row, as in (f)).
    NB the fill repeats the same states, which llguidance serves from a per-matcher cache (~5 µs a
    row); a first fill at a new state, what a decode step pays, costs ~30-40 µs: benchmarks/grammar_host.py."""
    import hashlib
    import threading

    import llguidance
    import torch

    from radixlm import constrained as C

    out: dict[str, Any] = {"usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}
    for path in ("/sys/fs/cgroup/cpu.max", "/sys/fs/cgroup/cpu/cpu.cfs_quota_us"):
        if os.path.exists(path):
            out[path] = Path(path).read_text().strip()
    buf = os.urandom(1 << 22)

    def hashes(n: int) -> float:
        def work() -> None:
            for _ in range(8):
                hashlib.sha256(buf).digest()  # releases the GIL for large buffers

        ts = [threading.Thread(target=work) for _ in range(n)]
        t = time.perf_counter()
        for th in ts:
            th.start()
        for th in ts:
            th.join()
        return time.perf_counter() - t

    one = min(hashes(1) for _ in range(3))
    out["hash_speedup"] = {str(n): n * one / min(hashes(n) for _ in range(3)) for n in threads}
    grammar = C.compile(tok, json_schema=schema, cache=None)
    ids = tok(json.dumps(doc), add_special_tokens=False)["input_ids"]
    words = (grammar.info.vocab_size + 31) // 32
    out["mask_fill_us_per_step"] = {}
    for batch in batches:
        matchers = []
        for i in range(batch):
            m = grammar.matcher()
            for t in ids[: i % max(1, len(ids) - 1)]:
                m.advance(t)
            matchers.append(m)
        live = [(m._m, i) for i, m in enumerate(matchers)]  # type: ignore[attr-defined]
        mask = torch.empty((batch, words), dtype=torch.int32)
        res: dict[str, float] = {}
        for n in [0, *threads]:
            executor = llguidance.LLExecutor(num_threads=n) if n else None
            times = []
            for _ in range(steps + 2):
                t = time.perf_counter()
                if executor is not None:
                    executor.unsafe_compute_mask_ptr(live, mask.data_ptr(), words * 4, batch)
                else:
                    for m, i in live:
                        m.unsafe_compute_mask_ptr(mask[i].data_ptr(), words * 4)
                times.append(time.perf_counter() - t)
            res["serial" if n == 0 else f"executor_{n}"] = statistics.median(times[2:]) * 1e6
        out["mask_fill_us_per_step"][str(batch)] = res
    return out

"""JSON-schema coverage on real-world schemas (MaskBench dev slice), engines side by side.

    python benchmarks/schema_coverage.py [--data ../shared/data/maskbench-dev] [--engines radixlm,llguidance,outlines]
                                         [--timeout 10] [--workers 2] [--limit N] [--files names.txt]
                                         [--out benchmarks/results/schema_coverage.json]

Engines: `radixlm` (our compile(): keyword policy + rewriting + llguidance, cache off),
`llguidance` as-is (LLMatcher.grammar_from_json_schema with its default options) and
`outlines` as-is (outlines-core build_regex_from_schema + Index). Default model tokenizer.
Scoring (the data set's README, MaskBench's rule): a schema passes when it compiles within the
time limit, every valid instance (json.dumps, ensure_ascii=False), tokenized, is accepted token
by token and ends accepting, and every invalid instance is rejected. Each schema runs in a
worker process that is killed at the limit (a thread cannot stop native code).
Reports passes, refusals by reason, timeouts, invalid instances accepted, compile p50/p99 and
mask p50/p99 (fill_next_token_bitmask per token over the valid instances; wall clock, and the
thread's CPU time, which leaves out what other processes took on a loaded machine).
"""

from __future__ import annotations

import argparse
import collections
import importlib.util
import json
import multiprocessing as mp
import platform
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_constrained", HERE / "constrained.py")
_bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_bench)  # shared helpers of benchmarks/constrained.py
GOALS, encode, load_tokenizer, pct = _bench.GOALS, _bench.encode, _bench.load_tokenizer, _bench.pct

REPO = HERE.parent
DEFAULT_DATA = REPO.parent / "shared" / "data" / "maskbench-dev"
_STATE: dict[str, Any] = {}


def _reason(exc: BaseException) -> str:
    """Group refusals: keyword (and format value) for ours, the message's shape for the others."""
    from radixlm import constrained as C

    if isinstance(exc, C.UnsupportedSchemaError):
        fmt = re.search(r"format '([^']+)'", exc.reason)
        return f"{exc.keyword} ({fmt.group(1)})" if fmt else exc.keyword
    text = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
    text = re.sub(r"json_schema: ", "", text)
    text = re.sub(r"\[.*", "", re.sub(r"'[^']*'|\"[^\"]*\"", "…", text))
    return re.sub(r"\d+", "N", text)[:70]


Timings = tuple[list[float], list[float]]  # wall seconds, this thread's CPU seconds


def _timed(fill: Any, out: Timings) -> None:
    """One mask, timed twice: wall clock (what a step waits) and thread CPU time (the same work
    without the time other processes took the core: the figure that survives a loaded machine)."""
    t0, c0 = time.perf_counter(), time.thread_time()
    fill()
    out[1].append(time.thread_time() - c0)
    out[0].append(time.perf_counter() - t0)


class _LLGuidanceAsIs:
    """llguidance with its own defaults: no vetting, no rewriting, default parser limits."""

    def __init__(self, info: Any, schema: Any) -> None:
        import llguidance

        from radixlm.constrained.backends.llguidance_backend import _lltokenizer

        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema)
        self.matcher = llguidance.LLMatcher(_lltokenizer(info), grammar, log_level=0)
        if self.matcher.is_error():
            raise ValueError(self.matcher.get_error())
        self.words = (info.vocab_size + 31) // 32
        self.end_ids = info.end_token_ids

    def run(self, ids: list[int], masks: Timings | None, bitmask: Any) -> bool:
        m = self.matcher.deep_copy()
        for tid in ids:
            if masks is not None:
                _timed(lambda: m.unsafe_compute_mask_ptr(bitmask.data_ptr(), self.words * 4), masks)
            if m.try_consume_tokens([tid]) != 1:
                return False
        return m.is_accepting()


class _Ours:
    def __init__(self, grammar: Any) -> None:
        self.grammar = grammar

    def run(self, ids: list[int], masks: Timings | None, bitmask: Any) -> bool:
        m = self.grammar.matcher()
        for tid in ids:
            if masks is not None:
                _timed(lambda: m.fill_next_token_bitmask(bitmask, 0), masks)
            if not m.advance(tid):
                return False
        return m.is_accepting()


def _compile(engine: str, schema: Any) -> Any:
    from radixlm import constrained as C

    info = _STATE["info"]
    if engine == "radixlm":
        return _Ours(C.compile(info, json_schema=schema, cache=None, whitespace_max=_STATE["whitespace_max"]))
    if engine == "llguidance":
        return _LLGuidanceAsIs(info, schema)
    if engine == "outlines":
        from outlines_core.json_schema import build_regex_from_schema

        from radixlm.constrained.backends.outlines_backend import OutlinesGrammar

        regex = build_regex_from_schema(json.dumps(schema))
        return _Ours(OutlinesGrammar(info, "json_schema", json.dumps(schema), regex))
    raise ValueError(engine)


def _score(engine: str, path: str) -> dict[str, Any]:
    """Runs in the worker: compile, then every instance token by token."""
    from radixlm.constrained import allocate_token_bitmask

    case = json.loads(Path(path).read_text())
    row: dict[str, Any] = {"file": Path(path).name, "engine": engine}
    t0 = time.perf_counter()
    try:
        compiled = _compile(engine, case["schema"])
    except Exception as exc:  # refusal or backend error: a failure, grouped by reason
        row.update(status="refused", reason=_reason(exc), compile_s=time.perf_counter() - t0)
        return row
    row["compile_s"] = time.perf_counter() - t0
    bitmask = allocate_token_bitmask(1, _STATE["info"].vocab_size)
    masks: Timings = ([], [])
    valid_ok = invalid_accepted = 0
    valid_total = invalid_total = 0
    for test in case["tests"]:
        ids = encode(_STATE["tok"], json.dumps(test["data"], ensure_ascii=False))
        accepted = compiled.run(ids, masks if test["valid"] else None, bitmask)
        if test["valid"]:
            valid_total += 1
            valid_ok += accepted
        else:
            invalid_total += 1
            invalid_accepted += accepted
    row.update(valid_ok=valid_ok, valid_total=valid_total, invalid_accepted=invalid_accepted,
               invalid_total=invalid_total, masks=masks[0], masks_cpu=masks[1],
               status="pass" if valid_ok == valid_total and not invalid_accepted else "fail")
    if invalid_accepted:
        row["reason"] = "invalid instance accepted"
    elif valid_ok < valid_total:
        row["reason"] = "valid instance rejected"
    return row


def _worker(conn: Any, whitespace_max: int = 20) -> None:
    import jsonschema  # noqa: F401  (imported at server start too: request validation)

    from radixlm.constrained.vocab import TokenizerInfo

    tok, _ = load_tokenizer()
    _STATE.update(tok=tok, info=TokenizerInfo.from_tokenizer(tok), whitespace_max=whitespace_max)
    conn.send("ready")
    while True:
        job = conn.recv()
        if job is None:
            return
        conn.send(_score(*job))


class _Pool:
    """Worker processes, each killed and replaced when a job runs past the limit. A replacement
    starts in the background (loading the tokenizer takes seconds): the other workers keep going."""

    def __init__(self, n: int, timeout: float, whitespace_max: int, target: Any = None) -> None:
        self.ctx, self.timeout, self.whitespace_max = mp.get_context("spawn"), timeout, whitespace_max
        self.target = target or _worker  # a worker loop: ("ready", then one reply per job)
        self.slots = [self._start() for _ in range(n)]

    def _start(self) -> list[Any]:
        parent, child = self.ctx.Pipe()
        proc = self.ctx.Process(target=self.target, args=(child, self.whitespace_max), daemon=True)
        proc.start()
        return [proc, parent, None, 0.0, False]  # process, pipe, job, started, ready

    def run(self, jobs: list[tuple[str, str]]) -> list[dict[str, Any]]:
        pending, rows = list(reversed(jobs)), []
        while pending or any(s[2] for s in self.slots):
            for i, slot in enumerate(self.slots):
                proc, conn, job, started, ready = slot
                if not ready:
                    if conn.poll():
                        if conn.recv() != "ready":
                            raise RuntimeError("worker failed to start")
                        slot[4] = True
                    elif not proc.is_alive():
                        raise RuntimeError(f"worker exited with {proc.exitcode} while starting")
                elif job is None and pending:
                    slot[2], slot[3] = pending.pop(), time.perf_counter()
                    conn.send(slot[2])
                elif job is not None and conn.poll():
                    rows.append(conn.recv())
                    slot[2] = None
                    if len(rows) % 100 == 0:
                        print(f"{len(rows)}/{len(jobs)} done", file=sys.stderr, flush=True)
                elif job is not None and time.perf_counter() - started > self.timeout:
                    proc.kill()
                    proc.join()
                    rows.append({"file": Path(job[1]).name, "engine": job[0], "status": "timeout",
                                 "reason": f"over {self.timeout:g} s"})
                    self.slots[i] = self._start()
            time.sleep(0.002)
        return rows

    def close(self) -> None:
        for proc, conn, _, _, ready in self.slots:
            if ready:
                conn.send(None)
                proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()


def summarize(rows: list[dict[str, Any]], total: int) -> dict[str, Any]:
    compiled = [r["compile_s"] for r in rows if "masks" in r]
    masks = [m for r in rows for m in r.get("masks", ())]
    masks_cpu = [m for r in rows for m in r.get("masks_cpu", ())]
    status = collections.Counter(r["status"] for r in rows)
    reasons = collections.Counter(r["reason"] for r in rows if r["status"] in ("refused", "timeout"))
    fails = collections.Counter(r["reason"] for r in rows if r["status"] == "fail")
    return {
        "schemas": total, "passed": status["pass"], "pass_rate": round(status["pass"] / total, 4),
        "refused": status["refused"], "timeouts": status["timeout"], "failed": status["fail"],
        "invalid_accepted": sum(r.get("invalid_accepted", 0) for r in rows),
        "invalid_total": sum(r.get("invalid_total", 0) for r in rows),  # of compiled schemas
        "valid_accepted": sum(r.get("valid_ok", 0) for r in rows),
        "valid_total": sum(r.get("valid_total", 0) for r in rows),
        "schemas_with_invalid_accepted": sorted(r["file"] for r in rows if r.get("invalid_accepted")),
        "compile_p50_ms": round(pct(compiled, 0.5) * 1e3, 2), "compile_p99_ms": round(pct(compiled, 0.99) * 1e3, 1),
        "mask_p50_us": round(pct(masks, 0.5) * 1e6, 1), "mask_p99_us": round(pct(masks, 0.99) * 1e6, 1),
        "mask_cpu_p50_us": round(pct(masks_cpu, 0.5) * 1e6, 1), "mask_cpu_p99_us": round(pct(masks_cpu, 0.99) * 1e6, 1),
        "mask_samples": len(masks), "refusals_by_reason": dict(reasons.most_common()),
        "failures_by_reason": dict(fails.most_common()),
    }


def mask_tail(rows: list[dict[str, Any]], key: str = "masks", top: int = 20) -> dict[str, Any]:
    """Which schemas make the mask p99: the masks over the engine's p99 (and over the goal), by schema."""
    masks = [m for r in rows for m in r.get(key, ())]
    if not masks:
        return {}
    p99, goal = pct(masks, 0.99), GOALS["mask_p99_us"] * 1e-6
    per = [(r["file"], sum(m > p99 for m in r[key]), sum(m > goal for m in r[key]), len(r[key]),
            max(r[key])) for r in rows if r.get(key)]
    per.sort(key=lambda x: (-x[1], -x[2]))
    return {"over_p99": sum(x[1] for x in per), "over_goal": sum(x[2] for x in per),
            "schemas_over_goal": sum(1 for x in per if x[2]),
            "by_schema": {f: {"over_p99": a, "over_goal": b, "masks": n, "max_us": round(mx * 1e6)}
                          for f, a, b, n, mx in per[:top]}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--engines", default="radixlm,llguidance,outlines")
    ap.add_argument("--timeout", type=float, default=10.0, help="seconds per schema (compile + instances)")
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--limit", type=int, default=0, help="first N files only (0: all)")
    ap.add_argument("--files", type=Path, help="a text file of data file names, one a line: only these")
    ap.add_argument("--out", type=Path, default=HERE / "results" / "schema_coverage.json")
    ap.add_argument("--whitespace-max", type=int, default=20,
                    help="radixlm: whitespace run allowed between JSON tokens (compile()'s whitespace_max)")
    args = ap.parse_args()
    files = sorted(str(p) for p in args.data.glob("*.json"))
    if args.files:
        wanted = set(args.files.read_text().split())
        files = [f for f in files if Path(f).name in wanted]
    files = files[: args.limit] if args.limit else files
    engines = args.engines.split(",")
    pool = _Pool(args.workers, args.timeout, args.whitespace_max)
    started = time.perf_counter()
    rows = pool.run([(engine, f) for f in files for engine in engines])  # interleaved: same noise
    pool.close()
    summary = {e: summarize([r for r in rows if r["engine"] == e], len(files)) for e in engines}
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True,
                            text=True).stdout.strip()
    report = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
        "machine": f"{platform.node()} {platform.processor() or platform.machine()}, shared and noisy",
        "command": " ".join([Path(sys.argv[0]).name] + sys.argv[1:]), "data": str(args.data),
        "timeout_s": args.timeout, "workers": args.workers, "whitespace_max": args.whitespace_max,
        "wall_s": round(time.perf_counter() - started, 1),
        "goals": GOALS, "engines": summary,
        "per_schema": {e: {r["file"]: r["status"] + (f": {r['reason']}" if r.get("reason") else "")
                           for r in rows if r["engine"] == e} for e in engines},
        "mask_tail": {e: mask_tail([r for r in rows if r["engine"] == e]) for e in engines},
        "mask_tail_cpu": {e: mask_tail([r for r in rows if r["engine"] == e], "masks_cpu") for e in engines},
        "slowest_compiles_ms": {e: dict(sorted(((r["file"], round(r["compile_s"] * 1e3, 1)) for r in rows
                                                if r["engine"] == e and "masks" in r), key=lambda x: -x[1])[:20])
                                for e in engines},
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1) + "\n")
    print(f"{'engine':<11} {'pass':>12} {'refused':>8} {'timeout':>8} {'failed':>7} {'invalid acc.':>12} "
          f"{'compile p50/p99 ms':>19} {'mask p50/p99 us':>16} {'(CPU time)':>16}")
    for e, s in summary.items():
        print(f"{e:<11} {s['passed']:>5} ({s['pass_rate']:.1%}) {s['refused']:>8} {s['timeouts']:>8} {s['failed']:>7} "
              f"{s['invalid_accepted']:>12} {s['compile_p50_ms']:>9}/{s['compile_p99_ms']:<9} "
              f"{s['mask_p50_us']:>7}/{s['mask_p99_us']:<8} {s['mask_cpu_p50_us']:>7}/{s['mask_cpu_p99_us']:<8}")
    for e, s in summary.items():
        print(f"\n{e}: valid instances accepted {s['valid_accepted']}/{s['valid_total']}, invalid accepted "
              f"{s['invalid_accepted']}/{s['invalid_total']} (compiled schemas)")
        print(f"{e}: refusals {s['refusals_by_reason']}\n{e}: failures {s['failures_by_reason']}")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()

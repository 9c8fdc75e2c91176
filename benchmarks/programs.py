"""SGLang-paper-style workloads written as radixlm programs, run with the radix cache on and off.

Workloads: few-shot multiple choice with shared exemplars (MMLU-like), tree-of-thought with nested
forks, JSON extraction under a schema, and multi-turn chat. For each, two in-process Engines run one
after the other (radix cache on, then `disable_radix_cache=True`); throughput and prefix-cache hit
rate (cached_tokens / prompt_tokens, from get_server_info deltas) are printed side by side and
written to benchmarks/results/.

    python benchmarks/programs.py
    python benchmarks/programs.py --scale 2 --workloads mmlu chat
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import radixlm as sgl

# ------------------------------------------------------------------------------------------ data
_SUBJECTS = ["astronomy", "biology", "chemistry", "geography", "history", "physics"]
_EXEMPLARS = [
    ("Which planet is closest to the Sun?", ["Venus", "Mercury", "Mars", "Earth"], "B"),
    ("What gas do plants absorb from the air?", ["Oxygen", "Nitrogen", "Carbon dioxide", "Helium"], "C"),
    ("What is the chemical symbol for gold?", ["Au", "Ag", "Gd", "Go"], "A"),
    ("Which is the longest river in Africa?", ["Congo", "Niger", "Zambezi", "Nile"], "D"),
    ("In which year did the Second World War end?", ["1918", "1939", "1945", "1950"], "C"),
]
_QUESTIONS = [
    ("Which planet is known as the Red Planet?", ["Jupiter", "Mars", "Saturn", "Venus"]),
    ("What is the boiling point of water at sea level in Celsius?", ["90", "100", "110", "120"]),
    ("Which organ pumps blood through the body?", ["Liver", "Lung", "Heart", "Kidney"]),
    ("What is the capital of Australia?", ["Sydney", "Melbourne", "Perth", "Canberra"]),
    ("Which element has atomic number 1?", ["Helium", "Hydrogen", "Lithium", "Carbon"]),
    ("Who proposed the theory of general relativity?", ["Newton", "Bohr", "Einstein", "Curie"]),
    ("What is the largest ocean on Earth?", ["Atlantic", "Indian", "Arctic", "Pacific"]),
    ("How many bones are in the adult human body?", ["106", "206", "306", "406"]),
]
_DOCS = [
    "Maria Lopez, 34, works as a nurse in Madrid and has two cats.",
    "Kenji Sato is a 51-year-old architect living in Osaka.",
    "At 28, Amara Okafor teaches mathematics at a school in Lagos.",
    "The violinist Pierre Dubois (45) moved from Lyon to Montreal last year.",
    "Retired pilot Hans Berg, aged 67, spends his summers in Bergen.",
    "Li Wei, a 23-year-old software engineer, just relocated to Shenzhen.",
]
_PERSON_SCHEMA = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 24}, "age": {"type": "integer", "minimum": 0, "maximum": 120},
                   "city": {"type": "string", "maxLength": 20}},
    "required": ["name", "age", "city"],
    "additionalProperties": False,
}
_CHAT_SYSTEM = ("You are a concise travel assistant. You know geography, local food, transport and weather. "
                "Answer every question in one or two short sentences and never use lists.")
_CHAT_TOPICS = ["Lisbon", "Kyoto", "Cape Town", "Reykjavik", "Lima", "Hanoi", "Vienna", "Seoul"]
_CHAT_TURNS = ["What should I see first in {}?", "What local dish should I try there?", "How do I get around?",
               "When is the best season to visit?"]


# ------------------------------------------------------------------------------------------ programs
def _mc_block(question: str, options: list[str]) -> str:
    lines = [f"Question: {question}"] + [f"{letter}. {opt}" for letter, opt in zip("ABCD", options)]
    return "\n".join(lines) + "\nAnswer:"


@sgl.function
def few_shot_mc(s, subject, question, options):
    # Constant exemplars first: tracing finds them as the shared prefix and run_batch pre-caches it.
    s += "The following are multiple choice questions (with answers).\n\n"
    for q, opts, ans in _EXEMPLARS:
        s += _mc_block(q, opts) + f" {ans}\n\n"
    s += "Subject: " + subject + "\n"
    s += _mc_block(question, options)
    s += sgl.select("answer", choices=[" A", " B", " C", " D"])


@sgl.function
def tree_of_thought(s, question, max_tokens):
    s += "Solve the problem step by step. Propose an approach, then check it.\n"
    s += "Problem: " + question + "\n"
    plans = s.fork(3)
    plans += lambda i: f"Approach {i + 1}:" + sgl.gen("plan", max_tokens=max_tokens, stop="\n", temperature=0.7)
    checks = []
    for plan in plans:  # fork() waits for this plan only; earlier plans' checks already run
        group = plan.fork(2)
        group += lambda i: f"\nCheck {i + 1}:" + sgl.gen("check", max_tokens=max_tokens, stop="\n", temperature=0.7)
        checks.append(group)
    for group in checks:
        group.join()
    plans.join()
    s += "\nFinal answer:" + sgl.gen("final", max_tokens=max_tokens, stop="\n", temperature=0)


@sgl.function
def json_extract(s, doc):
    s += ("Extract the person described in the text as JSON with the keys name, age and city. "
          "Use the exact spelling from the text.\n\n")
    s += "Text: " + doc + "\nJSON: "
    s += sgl.gen("person", json_schema=_PERSON_SCHEMA, max_tokens=48, temperature=0)


@sgl.function
def multi_turn_chat(s, topic, turns, max_tokens):
    s += sgl.system(_CHAT_SYSTEM)
    for t in range(turns):
        s += sgl.user(_CHAT_TURNS[t % len(_CHAT_TURNS)].format(topic))
        s += sgl.assistant(sgl.gen(f"answer_{t}", max_tokens=max_tokens, temperature=0))


@dataclass
class Workload:
    name: str
    program: Any
    batch: list[dict[str, Any]]
    check: Callable[[Any], bool]  # did the program do what it should (not model quality)


_PROBLEMS = ["A train travels 60 km in 40 minutes. What is its speed in km/h?",
             "If 3 pencils cost 45 cents, how much do 7 pencils cost?"]


def _take(items: list[Any], count: int) -> list[Any]:
    return [items[i % len(items)] for i in range(max(1, count))]


def build_workloads(scale: float, max_tokens: int) -> dict[str, Workload]:
    """Scale 1: 8 MC questions, 2 tree-of-thought problems, 6 documents, 4 chats."""
    mmlu = [{"subject": _SUBJECTS[i % len(_SUBJECTS)], "question": q, "options": o}
            for i, (q, o) in enumerate(_take(_QUESTIONS, round(8 * scale)))]
    tot = [{"question": q, "max_tokens": max_tokens} for q in _take(_PROBLEMS, round(2 * scale))]
    docs = [{"doc": d} for d in _take(_DOCS, round(6 * scale))]
    chats = [{"topic": t, "turns": 3, "max_tokens": max_tokens} for t in _take(_CHAT_TOPICS, round(4 * scale))]
    return {
        "mmlu": Workload("few-shot MC (MMLU-like, select)", few_shot_mc, mmlu,
                         lambda st: st["answer"] in (" A", " B", " C", " D")),
        "tot": Workload("tree of thought (fork 3x2)", tree_of_thought, tot,
                        lambda st: len(st["plan"]) == 3 and "final" in st),
        "json": Workload("JSON extraction (json_schema)", json_extract, docs,
                         lambda st: isinstance(json.loads(st["person"]), dict)),
        "chat": Workload("multi-turn chat (3 turns)", multi_turn_chat, chats,
                         lambda st: len(st.messages()) >= 7),
    }


# ------------------------------------------------------------------------------------------ runner
def _counters(info: dict[str, Any]) -> tuple[int, int, int]:
    return int(info.get("prompt_tokens", 0)), int(info.get("cached_tokens", 0)), int(info.get("generated_tokens", 0))


def run_workload(backend: Any, wl: Workload, num_threads: int | str) -> dict[str, Any]:
    backend.flush_cache()
    p0, c0, g0 = _counters(backend.get_server_info())
    t0 = time.perf_counter()
    states = wl.program.run_batch(wl.batch, backend=backend, num_threads=num_threads)
    errors = [st.error() for st in states if st.error() is not None]
    elapsed = time.perf_counter() - t0
    p1, c1, g1 = _counters(backend.get_server_info())
    prompt, cached, generated = p1 - p0, c1 - c0, g1 - g0
    ok = sum(1 for st in states if st.error() is None and _safe(wl.check, st))
    return {
        "programs": len(states), "ok": ok, "errors": [repr(e) for e in errors[:3]],
        "seconds": round(elapsed, 3), "programs_per_s": round(len(states) / elapsed, 3),
        "prompt_tokens": prompt, "cached_tokens": cached, "generated_tokens": generated,
        "cache_hit_rate": round(cached / prompt, 4) if prompt else 0.0,
        "gen_tokens_per_s": round(generated / elapsed, 2),
        "prompt_tokens_per_s": round(prompt / elapsed, 1),
    }


def _safe(check: Callable[[Any], bool], state: Any) -> bool:
    try:
        return bool(check(state))
    except Exception:  # noqa: BLE001 - a failed check counts as not ok
        return False


def run_mode(radix: bool, workloads: dict[str, Workload], args: argparse.Namespace) -> dict[str, Any]:
    engine = sgl.Engine(model_path=args.model_path, max_total_tokens=args.max_total_tokens,
                        disable_radix_cache=not radix, cpu_threads=args.cpu_threads or None, log_level="warning")
    backend = sgl.EngineBackend(engine)
    try:
        warm = next(iter(workloads.values()))
        warm.program.run_batch(warm.batch[:2], backend=backend)  # first-call costs stay out of the figures
        results = {}
        for key, wl in workloads.items():
            results[key] = run_workload(backend, wl, args.num_threads)
            r = results[key]
            print(f"  [{'radix on ' if radix else 'radix off'}] {key:5s} {r['seconds']:7.2f}s "
                  f"hit {r['cache_hit_rate']:.2f}", file=sys.stderr)
        return results
    finally:
        engine.shutdown()


def print_table(workloads: dict[str, Workload], on: dict[str, Any], off: dict[str, Any]) -> None:
    head = (f"{'workload':34s} {'progs':>5s} | {'on: s':>7s} {'prog/s':>7s} {'gen tok/s':>9s} {'hit':>5s} | "
            f"{'off: s':>7s} {'prog/s':>7s} {'gen tok/s':>9s} {'hit':>5s} | {'speedup':>7s}")
    print(head)
    print("-" * len(head))
    for key, wl in workloads.items():
        a, b = on[key], off[key]
        speedup = b["seconds"] / a["seconds"] if a["seconds"] else float("nan")
        print(f"{wl.name:34s} {a['programs']:5d} | {a['seconds']:7.2f} {a['programs_per_s']:7.2f} "
              f"{a['gen_tokens_per_s']:9.1f} {a['cache_hit_rate']:5.2f} | {b['seconds']:7.2f} "
              f"{b['programs_per_s']:7.2f} {b['gen_tokens_per_s']:9.1f} {b['cache_hit_rate']:5.2f} | {speedup:6.2f}x")


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model-path", default=None, help="default: SmolLM2-135M-Instruct")
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of programs per workload")
    parser.add_argument("--max-tokens", type=int, default=12, help="per free-text gen")
    parser.add_argument("--max-total-tokens", type=int, default=16384)
    parser.add_argument("--num-threads", default="auto", help="program threads of run_batch")
    parser.add_argument("--cpu-threads", type=int, default=1,
                        help="torch threads on CPU; 1 is far steadier on a shared machine (0: torch's default)")
    parser.add_argument("--workloads", nargs="*", default=["mmlu", "tot", "json", "chat"])
    parser.add_argument("--output", default=None, help="JSON path (default: benchmarks/results/programs-<time>.json)")
    args = parser.parse_args(argv)
    if args.num_threads != "auto":
        args.num_threads = int(args.num_threads)

    all_workloads = build_workloads(args.scale, args.max_tokens)
    workloads = {k: all_workloads[k] for k in args.workloads}
    on = run_mode(True, workloads, args)
    off = run_mode(False, workloads, args)
    print_table(workloads, on, off)

    report = {
        "benchmark": "radixlm.benchmarks.programs",
        "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
        "host": {"machine": platform.machine(), "python": platform.python_version()},
        "args": {k: v for k, v in vars(args).items()},
        "workloads": {k: {"name": wl.name, "programs": len(wl.batch)} for k, wl in workloads.items()},
        "radix_on": on,
        "radix_off": off,
    }
    out = Path(args.output) if args.output else (
        Path(__file__).resolve().parent / "results" / f"programs-{time.strftime('%Y%m%d-%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    print(f"wrote {out}")
    return report


if __name__ == "__main__":
    main()

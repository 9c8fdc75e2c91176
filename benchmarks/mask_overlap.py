"""The host's critical path of one overlapped constrained decode step: commit (advance every row's
matcher) + next masks, beside the scheduler's per-row bookkeeping. Masks inline (threads 0, the
default), on a background thread started as main did (the woken thread waits for the GIL while the
scheduler runs Python), and started with the hand-over (mask_workers.start_fill now), alternated
round by round on the same rows.

    python benchmarks/mask_overlap.py --batch 64 --rounds 5 --steps 40

Rows: one corpus schema each, walking one of its valid documents (benchmarks/mask_fill.py). The
bookkeeping stand-in is per-row Python of the kind `ResultProcessor._append` does (append, a
finish test, an event tuple), timed alone too. Per step: wall from the commit to the masks in
hand. On a machine whose cores are busy elsewhere no overlap is possible: read the alone figures.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, NamedTuple

sys.path.insert(0, str(Path(__file__).resolve().parent))
import mask_fill  # noqa: E402

from radixlm.constrained.mask_workers import MaskWorkers, _run_all  # noqa: E402


class MainMaskWorkers(MaskWorkers):
    """start_fill as on main before this change: submit and return at once."""

    def start_fill(self, items: Any, bitmask: Any) -> Future[None]:
        jobs = self._prepare(items, bitmask)
        assert self._background is not None
        return self._background.submit(_run_all, jobs)


class Event(NamedTuple):
    row: int
    token: int
    finished: bool


def bookkeeping(outputs: list[list[int]], tokens: list[int], repeat: int) -> list[Event]:
    events = []
    for _ in range(repeat):
        events = []
        for i, tok in enumerate(tokens):
            out = outputs[i]
            out.append(tok)
            finished = tok < 0 or len(out) > 1 << 20 or (tok == 2 and not out)
            events.append(Event(i, tok, finished))
            out.pop()
    return events


def run(mode: str, walks: list, batch: int, steps: int, repeat: int) -> dict[str, float]:
    import torch

    rows = mask_fill.Rows(walks, batch)
    workers = {"inline": MaskWorkers(0), "background (main)": MainMaskWorkers(1),
               "background (hand-over)": MaskWorkers(1)}[mode]
    words = (walks[0][0].info.vocab_size + 31) // 32
    mask = torch.empty((batch, words), dtype=torch.int32)
    outputs: list[list[int]] = [[] for _ in range(batch)]
    step_us, book_us = [], []
    try:
        for step in range(steps + 3):
            tokens = rows.next_tokens()
            t0 = time.perf_counter()
            workers.advance(rows.matchers, tokens)
            done = workers.start_fill([(m, i) for i, m in enumerate(rows.matchers)], mask)
            tb = time.perf_counter()
            bookkeeping(outputs, tokens, repeat)
            te = time.perf_counter()
            done.result()
            t1 = time.perf_counter()
            if step >= 3:
                step_us.append((t1 - t0) * 1e6)
                book_us.append((te - tb) * 1e6)
    finally:
        workers.close()
    return {"step_us_p50": statistics.median(step_us), "bookkeeping_us_p50": statistics.median(book_us)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--steps", type=int, default=40)
    ap.add_argument("--bookkeeping-repeat", type=int, default=4, help="passes of the per-row stand-in per step")
    ap.add_argument("--tokenizer-dir", default=None)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / "mask_overlap.json"))
    args = ap.parse_args()
    tok = mask_fill.load_tokenizer(args.tokenizer_dir)
    walks = mask_fill.build_walks(tok, "llguidance", 64)
    modes = ["inline", "background (main)", "background (hand-over)"]
    run("inline", walks, args.batch, args.steps, args.bookkeeping_repeat)  # warm the grammars' lexer states
    rounds: dict[str, list[dict[str, float]]] = {m: [] for m in modes}
    for r in range(args.rounds):
        for mode in modes if r % 2 == 0 else modes[::-1]:  # alternate the order round by round
            rounds[mode].append(run(mode, walks, args.batch, args.steps, args.bookkeeping_repeat))
    print(f"batch {args.batch}, {len(walks)} schemas, {args.rounds} rounds x {args.steps} steps (median of round medians)")
    print(f"{'mode':<26}{'commit..masks µs':>18}{'bookkeeping µs':>16}{'per round':>40}")
    report: dict[str, Any] = {"batch": args.batch, "rounds": args.rounds, "steps": args.steps, "modes": {}}
    for mode in modes:
        step = statistics.median(x["step_us_p50"] for x in rounds[mode])
        book = statistics.median(x["bookkeeping_us_p50"] for x in rounds[mode])
        report["modes"][mode] = {"step_us": step, "bookkeeping_us": book, "rounds": rounds[mode]}
        per = " ".join(f"{x['step_us_p50']:.0f}" for x in rounds[mode])
        print(f"{mode:<26}{step:>18.0f}{book:>16.0f}   {per}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

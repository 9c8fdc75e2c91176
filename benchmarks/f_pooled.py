"""Item (f)'s repeated pairs pooled over Engines and runs, per card, row count and arm (issue 14 item 4).

One Engine's median ratio moves ~1.5% with the Engine (jf21: three default Engines on one H200 gave 0.963,
0.982 and 0.986 at 256 rows), as much as the levers left to decide: an arm is judged over every Engine
that ran it, in any `gpu_suite.py --items f --f-repeats N` output given. Prints, per (card, rows, arm),
each Engine's median ratio (median JSON tok/s over median same-lengths tok/s), their mean, and the median
of all their pair ratios. An arm is named by the flags its Engine set, so "defaults" are the defaults of the commit
that ran it: before c52066f (2026-12-06) the constrained prefill step ran synchronously by default and
`enable_overlap_constrained_prefill` overlapped it; since then the overlap is the default and
`disable_overlap_constrained_prefill` is the synchronous arm. Pool outputs of one side of that commit at a time.

    python benchmarks/f_pooled.py benchmarks/results/gpu_suite_f-jf21-h200-20261205.json $OUT/jf22/f.json
"""
from __future__ import annotations

import argparse
import json
import re
import statistics
from pathlib import Path


def arm_of(key: str) -> str:
    """The arm of an item-(f) result key: its flags after the state-table part, '#n' (an arm's n-th
    Engine) dropped; 'defaults' where none."""
    arm = re.sub(r"#\d+$", "", key).split("state_table_", 1)[-1]
    arm = arm.split("_", 1)[1] if "_" in arm else ""
    return arm or "defaults"


def pooled(paths: list[Path]) -> dict[tuple[str, int, str], list[tuple[str, float, list[float]]]]:
    """(card, rows, arm) -> per Engine: (where, median ratio, pair ratios)."""
    out: dict[tuple[str, int, str], list[tuple[str, float, list[float]]]] = {}
    for path in paths:
        report = json.loads(path.read_text())
        card = report.get("device", "?")
        for key, run in report.get("f", {}).items():
            if not isinstance(run, dict) or "repeats" not in run:
                continue
            rep = run["repeats"]  # (gpu_throughput.repeat_pairs: the Engine's figure and its pairs)
            out.setdefault((card, run["batch"], arm_of(key)), []).append(
                (f"{path.name}:{key}", rep["constrained_vs_same_lengths_tok_s_medians"], rep["pair_ratios"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("reports", nargs="+", type=Path, help="gpu_suite.py outputs with item (f) repeats")
    args = ap.parse_args()
    print(f"{'card':<22} {'rows':>4} {'arm':<40} {'engines':>7} {'Engine medians':<30} {'mean':>6} {'pairs':>5} "
          f"{'pooled':>6}")
    for (card, rows, arm), engines in sorted(pooled(args.reports).items()):
        pairs = [r for _, _, rs in engines for r in rs]
        medians = ", ".join(f"{m:.3f}" for _, m, _ in engines)
        print(f"{card:<22} {rows:>4} {arm:<40} {len(engines):>7} {medians:<30} "
              f"{statistics.mean(m for _, m, _ in engines):>6.3f} {len(pairs):>5} {statistics.median(pairs):>6.3f}")


if __name__ == "__main__":
    main()

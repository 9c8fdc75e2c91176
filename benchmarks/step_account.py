"""Seconds a forward step of each kind took in an Engine run, from its step counters sampled over time.

An offline run interleaves prefill, mixed and decode steps; the scheduler counts each kind. Sampled every few
seconds (`lora_issue.py --progress-s`, which also prints them), each window between two samples gives one equation
`window seconds = Σ_kind steps of that kind in the window × seconds a step of that kind`, and a least-squares fit over
the windows gives each kind's mean step time (issue 21: where the 64-adapter row's time goes — prefill steps against
slot-bound decode steps). Kinds with no step in any window are left out. It is a mean over the run: decode steps at
different batch sizes and contexts pool into one figure.

    python3 benchmarks/step_account.py LOG      (a lora_issue.py log with --progress-s lines)
"""
from __future__ import annotations

import re
import sys

import torch

KINDS = ("prefill_steps", "mixed_steps", "decode_steps")
_LINE = re.compile(r"^\[(\d+(?:\.\d+)?) s\] (\S+) so far: \d+ tokens, steps (\d+)/(\d+)/(\d+)")


MIN_WINDOWS = 3  # a kind is fitted only where its steps fall in at least this many windows (one mixed step fits anything)


def fit_step_costs(samples: list[tuple[float, dict[str, int]]]) -> dict | None:
    """`samples`: (seconds, cumulative step counters by kind) in time order, the first at the run's start.
    {kind: ms a step}, with the windows used, the seconds the fit explains against the elapsed ones and the
    largest window residual; kinds in fewer than MIN_WINDOWS windows are not fitted (their steps listed, their time
    in the residuals); None with fewer windows than fitted kinds."""
    windows = [(t1 - t0, {k: c1.get(k, 0) - c0.get(k, 0) for k in KINDS})
               for (t0, c0), (t1, c1) in zip(samples, samples[1:]) if t1 > t0]
    kinds = [k for k in KINDS if sum(w[k] > 0 for _, w in windows) >= MIN_WINDOWS]
    unfitted = {k: n for k in KINDS if k not in kinds and (n := sum(w[k] for _, w in windows))}
    if not kinds or len(windows) < len(kinds):
        return None
    a = torch.tensor([[float(w[k]) for k in kinds] for _, w in windows], dtype=torch.float64)
    b = torch.tensor([[s] for s, _ in windows], dtype=torch.float64)
    cost = torch.linalg.lstsq(a, b).solution[:, 0]
    residual = (a @ cost - b[:, 0]).abs().max().item()
    steps = a.sum(0)
    return {"ms_a_step": {k: 1e3 * cost[i].item() for i, k in enumerate(kinds)},
            "seconds_by_kind": {k: (steps[i] * cost[i]).item() for i, k in enumerate(kinds)},
            "windows": len(windows), "elapsed_s": b.sum().item(), "explained_s": (steps * cost).sum().item(),
            "max_window_residual_s": residual, "unfitted_steps": unfitted}


def samples_from_log(text: str, label: str | None = None) -> list[tuple[float, dict[str, int]]]:
    """The counter lines a lora_issue.py run printed (its first row's, or `label`'s), as samples; the row's start
    (no steps yet) is taken one interval before the first line."""
    rows = [(float(m[1]), m[2], {k: int(v) for k, v in zip(KINDS, m.groups()[2:])})
            for m in map(_LINE.match, text.splitlines()) if m]
    label = label or (rows[0][1] if rows else None)
    picked = [(t, c) for t, name, c in rows if name == label]
    if len(picked) < 2:
        return picked
    return [(2 * picked[0][0] - picked[1][0], dict.fromkeys(KINDS, 0)), *picked]


def main() -> None:
    if len(sys.argv) < 2:
        sys.exit(__doc__)
    samples = samples_from_log(open(sys.argv[1]).read(), sys.argv[2] if len(sys.argv) > 2 else None)
    fit = fit_step_costs(samples[1:])  # the first window's start is a guess: left out
    if fit is None:
        sys.exit("too few counter lines")
    for kind, ms in fit["ms_a_step"].items():
        print(f"{kind:<14} {ms:8.2f} ms a step, {fit['seconds_by_kind'][kind]:6.1f} s")
    print(f"{fit['windows']} windows: {fit['explained_s']:.1f} of {fit['elapsed_s']:.1f} s explained, largest window "
          f"residual {fit['max_window_residual_s']:.2f} s; steps not fitted {fit['unfitted_steps'] or '-'}")


if __name__ == "__main__":
    main()

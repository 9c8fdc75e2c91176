"""What a draft row costs a batch-1 decode step without overlap scheduling (the CPU), measured as it serves.

Without overlap scheduling a step whose one request drafts nothing is a plain decode step: at batch 1 the
only thing drafting changes is the step's rows (each draft is one more row of the verify forward), which
the draft budget prices. DraftPayoff's comparison of arms (tok/s per draft limit k, each arm timed over its
own stretch of the text) measured the text there, not k: an arm timed where the output copies its prompt
beats one timed where it paraphrases by more than any k does. On the 2-core CPU (2026-12-04, copy-heavy
set, batch 1) the payoff settled on k = 0 or 3 and ran 1.13-1.15x against 1.23-1.24x for the budget alone;
chat 0.99x against 1.10x (benchmarks/RESULTS.md). A step's time at a given row count does not depend on
the text, so at batch 1 the payoff steps aside (`DraftPayoff(measure_from=2)`) and the budget prices a draft
row by this measurement instead of the device's constant: each single-row decode step's interval is kept
per row count r (1 + drafts), and the relative cost of a draft row rho is the slope through the origin of
T(r) / T(1) - 1 over r - 1 (medians of each count's latest WINDOW intervals: a disturbed step does not
move it). The budget's beta is then rho / (1 - rho): at batch 1 its first draft pays exactly where the
acceptance beats rho. A CPU whose extra rows cost a whole row (no multi-row GEMV) measures rho near 1 and
stops drafting at batch 1; until a row count above 1 is measured, the device's prior beta holds.
"""
from __future__ import annotations

import statistics
from collections import deque

WINDOW = 15  # latest intervals kept per row count
MIN_SAMPLES = 3  # intervals that measure a row count
MAX_BETA = 1e3  # rho at or above 1 - 1/(1 + MAX_BETA): drafting never pays


class RowCost:
    """Single-row decode steps' intervals (one scheduler step start to the next) by their rows."""

    def __init__(self) -> None:
        self.times: dict[int, deque[float]] = {}
        self.medians: dict[int, float] = {}  # per row count measured MIN_SAMPLES times: its window's median
        self._open: tuple[float, int | None] | None = None  # (start, rows: None until scheduled as a decode step)
        self._beta: tuple[float, float] | None = None  # (prior, beta) computed since the last interval

    def begin_step(self, now: float, running: int) -> None:
        """Closes the previous step (kept if it was a single-row decode step and something still runs: after
        the last request's step this call comes after an idle gap) and opens this one if it has one row."""
        if self._open is not None and running:
            start, rows = self._open
            if rows is not None:  # (only this count's median changes: ~80 us a step when all were recomputed)
                window = self.times.setdefault(rows, deque(maxlen=WINDOW))
                window.append(now - start)
                if len(window) >= MIN_SAMPLES:
                    self.medians[rows] = statistics.median(window)
                    self._beta = None
        self._open = (now, None) if running == 1 else None

    def scheduled(self, plain_decode: bool, rows: int) -> None:
        """What the open step runs: only a plain decode batch (its request's row and drafts) is measured."""
        if self._open is not None and plain_decode:
            self._open = (self._open[0], rows)

    def relative_row_cost(self) -> float | None:
        """rho: a draft row's cost as a share of a one-row step; None until one row and more are measured."""
        one = self.medians.get(1)
        more = [(r, t) for r, t in self.medians.items() if r > 1]
        if not one or not more:
            return None
        return sum((r - 1) * (t / one - 1.0) for r, t in more) / sum((r - 1) ** 2 for r, _ in more)

    def beta(self, prior: float) -> float:
        """The draft budget's beta at batch 1: rho / (1 - rho) from the measured rho, else `prior`."""
        if self._beta is None or self._beta[0] != prior:
            rho = self.relative_row_cost()
            if rho is None:
                beta = prior
            else:
                rho = max(rho, 0.0)
                beta = MAX_BETA if rho >= 1.0 - 1.0 / (1.0 + MAX_BETA) else rho / (1.0 - rho)
            self._beta = (prior, beta)
        return self._beta[1]

"""One arm of the draft payoff (draft_payoff.py): a draft limit k's latest decode intervals, and what they say
(tokens per step, the median step time, tok/s)."""
from __future__ import annotations

import statistics
from collections import deque
from dataclasses import dataclass, field

MIN_SAMPLES = 3  # intervals that measure an arm (the median of three ignores one disturbed step)
WINDOW = 15  # an arm's latest intervals that count


@dataclass
class ArmRate:
    """One arm's latest WINDOW decode intervals (tokens, seconds); `samples` counts them all. Its mean tokens and
    median interval are kept until the next interval (the payoff reads them several times a step: recomputed, the
    median and sums of 15 intervals were ~100 us of host time a step on the 2-core CPU with drafting off)."""

    recent: deque[tuple[int, float]] = field(default_factory=lambda: deque(maxlen=WINDOW))
    samples: int = 0
    abandoned: bool = False  # its last run ended early: its drafts were not accepted
    _stats: tuple[float, float] | None = field(default=None, repr=False)  # (tokens per step, step seconds)

    def record(self, tokens: int, seconds: float) -> None:
        self.recent.append((tokens, seconds))
        self.samples += 1
        self._stats = None

    def _measured(self) -> tuple[float, float]:
        if self._stats is None:
            recent = self.recent
            self._stats = ((sum(t for t, _ in recent) / len(recent), statistics.median(s for _, s in recent))
                           if recent else (0.0, 0.0))
        return self._stats

    def explored(self) -> bool:
        return len(self.recent) >= MIN_SAMPLES

    def done(self) -> bool:
        """Measured, or given up on: exploration moves on."""
        return self.explored() or self.abandoned

    @property
    def tokens_per_step(self) -> float:
        return self._measured()[0]

    @property
    def step_s(self) -> float:
        """The median interval: one slow step (a GC pause, a compile) does not move it."""
        return self._measured()[1]

    @property
    def rate(self) -> float:
        step = self.step_s
        return self.tokens_per_step / step if step > 0 else 0.0

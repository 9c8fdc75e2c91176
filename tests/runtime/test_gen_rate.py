"""runtime/gen_rate.py: the scheduler's last-5-seconds generation throughput, in constant time per step, equal
to the window's sum (after its first entry) over its span, as the list it replaced computed it."""
from __future__ import annotations

import random

from radixlm.runtime.gen_rate import WINDOW_S, GenRate


def _reference(steps: list[tuple[float, int]]) -> float | None:
    now = steps[-1][0]
    window = [(t, n) for t, n in steps if now - t <= WINDOW_S]
    span = now - window[0][0] if len(window) > 1 else 0.0
    return sum(n for _, n in window[1:]) / span if span > 0 else None


def test_rate_equals_the_windows_sum_over_its_span():
    rng = random.Random(0)
    rate, steps, now = GenRate(), [], 0.0
    assert rate.add(0.0, 3) is None  # one entry spans no time
    steps.append((0.0, 3))
    for _ in range(3000):
        now += rng.choice([0.004, 0.004, 0.006, 0.5, 2.0, 6.0])  # decode steps, idle gaps, a gap past the window
        n = rng.randrange(0, 70)
        steps.append((now, n))
        got, want = rate.add(now, n), _reference(steps)
        assert (got is None) == (want is None)
        if want is not None:
            assert abs(got - want) <= 1e-9 * max(1.0, want)
    assert len(rate._window) < 2000  # entries older than the window went

"""benchmarks/step_account.py: per-kind step costs fitted from step counters sampled over a run (issue 21's account
of the 64-adapter row), and the counter lines of a lora_issue.py log read back."""
from __future__ import annotations

import random

import pytest

from radixlm.benchmarks.step_account import KINDS, fit_step_costs, samples_from_log


def _run(costs: dict[str, float], windows: list[dict[str, int]], jitter: float = 0.0, seed: int = 0):
    rng = random.Random(seed)
    t, total, samples = 0.0, dict.fromkeys(KINDS, 0), [(0.0, dict.fromkeys(KINDS, 0))]
    for w in windows:
        t += sum(costs[k] * n for k, n in w.items()) + rng.uniform(-jitter, jitter)
        total = {k: total[k] + w.get(k, 0) for k in KINDS}
        samples.append((t, dict(total)))
    return samples


def test_the_fit_recovers_each_kinds_step_time() -> None:
    """A slot-bound row's windows (a few 0.2-s prefill steps, hundreds of 9-ms decode steps each): exact without
    noise, within a few % with 0.1 s of noise a window; the fit explains the elapsed time."""
    costs = {"prefill_steps": 0.205, "decode_steps": 0.0089, "mixed_steps": 0.08}
    rng = random.Random(3)
    windows = [{"prefill_steps": rng.randrange(2, 12), "decode_steps": rng.randrange(240, 520),
                "mixed_steps": rng.randrange(0, 4)} for _ in range(12)]
    exact = fit_step_costs(_run(costs, windows))
    for kind, ms in exact["ms_a_step"].items():
        assert ms == pytest.approx(1e3 * costs[kind], rel=1e-9)
    assert exact["explained_s"] == pytest.approx(exact["elapsed_s"]) and exact["unfitted_steps"] == {}
    noisy = fit_step_costs(_run(costs, windows, jitter=0.1))
    assert noisy["ms_a_step"]["decode_steps"] == pytest.approx(8.9, rel=0.05)
    assert noisy["ms_a_step"]["prefill_steps"] == pytest.approx(205, rel=0.1)


def test_a_kind_in_too_few_windows_is_not_fitted() -> None:
    """One mixed step would fit any cost (its window's residual): it is listed, not fitted; too few windows: None."""
    costs = {"prefill_steps": 0.2, "decode_steps": 0.01, "mixed_steps": 5.0}
    windows = [{"prefill_steps": p, "decode_steps": d} for p, d in ((3, 300), (8, 200), (1, 450), (5, 350))]
    windows[2]["mixed_steps"] = 1
    fit = fit_step_costs(_run(costs, windows))
    assert set(fit["ms_a_step"]) == {"prefill_steps", "decode_steps"} and fit["unfitted_steps"] == {"mixed_steps": 1}
    assert fit["max_window_residual_s"] > 1.0
    assert fit_step_costs(_run(costs, windows[:1])) is None


def test_counter_lines_of_a_log_become_samples() -> None:
    log = """[46 s] LoRA engine up in 35.2 s; batch-1 nan ms
[51 s] b_64_adapters_8_slots so far: 30327 tokens, steps 10/0/266, swaps 7 (0 ahead)
[56 s] b_64_adapters_8_slots so far: 42334 tokens, steps 20/0/511, swaps 15 (2 ahead)
[61 s] b_64_adapters_8_slots so far: 78767 tokens, steps 24/1/1017, swaps 21 (3 ahead)
[98 s] b_64_adapters_8_slots: 16745 tok/s"""
    samples = samples_from_log(log)
    assert [t for t, _ in samples] == [46.0, 51.0, 56.0, 61.0]  # the row's start one interval before the first line
    assert samples[0][1] == dict.fromkeys(KINDS, 0)
    assert samples[-1][1] == {"prefill_steps": 24, "mixed_steps": 1, "decode_steps": 1017}
    assert samples_from_log(log, "b_8_adapters") == []

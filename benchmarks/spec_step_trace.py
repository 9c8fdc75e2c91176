"""speculative.py's step trace (issue 18's batch-1 goal): where a spec-on run's wall time goes, by the kind of
forward each interval launched, and what each kind costs the goal's figure.

The goal's figure is speed-up / mean tokens per verify step (a). A run of N tokens takes the prompt's prefill
P, n0 plain steps (the drafter found nothing, or the payoff's arm was k = 0; a token each) and the verify
steps (a tokens each on average): a x T_on = a P + a x (plain steps' time) + (verify steps' time) x a, where
the verify steps alone would give a x T_v(k) / (tokens they emitted) per token. So, set against spec off's
N x T0 + P: a plain step costs a x its time against the figure, a verify step its time per token x a; the
prefill costs a x P. `split` gives each kind's share of a x T_on, the terms the figure loses on.
"""
from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from radixlm.runtime.forward_batch import ForwardMode
from radixlm.runtime.scheduler import Scheduler


class StepTrace:
    """Per forward launched while installed: its start (host clock), kind, drafts per row, the payoff's arm and
    the (batch-1) request's n-gram draft depth as the step floors it; per verify result, drafts and accepted."""

    def __init__(self, sched: Scheduler, clock: Callable[[], float] = time.perf_counter) -> None:
        self.sched = sched
        self.clock = clock  # (a simulated device clock in CPU studies: its time before each forward's own)
        self.forwards: list[tuple[float, str, int, int, int]] = []  # (t, kind, drafts, step_k, depth)
        self.verified: list[tuple[int, int]] = []  # (drafted, accepted) per verify result
        self._forward = sched.runner.forward
        self._kept: tuple[Any, Any] = (None, None)

    def __enter__(self) -> StepTrace:
        sched, spec = self.sched, self.sched.spec
        self._kept = (vars(sched.runner).get("forward"), vars(spec).get("on_verified") if spec is not None else None)
        forward = self._forward

        def traced(fb: Any, *staged: Any) -> Any:
            if fb.mode is ForwardMode.DECODE:
                # (verify rows: one attention row per token, each with its request's req_to_token row)
                drafts = sum(fb.extend_seq_lens_cpu) - len(set(fb.req_pool_indices_cpu))
                kind = "verify" if drafts else "plain"
            else:
                kind, drafts = "prefill", 0
            drafter = getattr(spec, "drafter", None)
            depths = getattr(drafter, "depths", None) or {}
            # (the request's depth with the step's floor: NgramDrafter.min_depth)
            depth = max(next(iter(depths.values())).depth, drafter.min_depth) if len(depths) == 1 else 0
            self.forwards.append((self.clock(), kind, drafts, spec.step_k if spec else 0, depth))
            return forward(fb, *staged)
        sched.runner.forward = traced
        if spec is not None:
            on_verified = spec.on_verified

            def record(req: Any, drafted: int, accepted: int, emitted: int, depth: int | None = None) -> None:
                self.verified.append((drafted, accepted))
                on_verified(req, drafted, accepted, emitted, depth)
            spec.on_verified = record
        return self

    def __exit__(self, *exc: Any) -> None:
        # what was there before: an instance attribute (another wrapper, e.g. a simulated clock's) put back, else
        # deleted so the method shows again
        for obj, name, kept in ((self.sched.runner, "forward", self._kept[0]), (self.sched.spec, "on_verified", self._kept[1])):
            if obj is None:
                continue
            if kept is not None:
                setattr(obj, name, kept)
            else:
                delattr(obj, name)

    def split(self, start: float, end: float, rows: int = 1) -> dict:
        """Intervals from each launch to the next (the last to `end`; `start` to the first launch is the host's
        set-up, counted as prefill) grouped by kind: plain steps by the payoff's arm (k0: the payoff chose plain
        decoding; dry: a drafting arm whose drafter found nothing), verify steps by drafts per row and what
        limited them (the arm's k, the request's draft depth, else the n-gram match). `rows`: requests a step."""
        out: dict[str, dict[str, float]] = {}
        marks = [f[0] for f in self.forwards] + [end]
        verified = iter(self.verified)

        def add(key: str, seconds: float, tokens: int, drafts: int = 0, accepted: int = 0) -> None:
            cell = out.setdefault(key, {"n": 0, "ms": 0.0, "tokens": 0, "drafts": 0, "accepted": 0})
            cell["n"] += 1
            cell["ms"] += seconds * 1e3
            cell["tokens"] += tokens
            cell["drafts"] += drafts
            cell["accepted"] += accepted
        if self.forwards:
            add("setup", self.forwards[0][0] - start, 0)
        for (t, kind, drafts, step_k, depth), nxt in zip(self.forwards, marks[1:]):
            if kind == "prefill":  # (its rows' first tokens: counted as a plain step's)
                add("prefill", nxt - t, rows)
            elif kind == "plain":
                add("plain_k0" if step_k == 0 else "plain_dry", nxt - t, rows)
            else:
                results = [next(verified, (0, 0)) for _ in range(rows)]
                got = sum(a for _, a in results)
                why = "k" if drafts == step_k * rows else "depth" if rows == 1 and drafts == depth else "match"
                add(f"verify_d{drafts}_{why}", nxt - t, got + rows, drafts, got)
        for cell in out.values():
            cell["ms"] = round(cell["ms"], 3)
        return dict(sorted(out.items()))


def goal_terms(split: dict, off: dict) -> dict:
    """A spec-on run's trace (`split`) against spec off's (`off`, the same request): each kind's share of a x T_on
    over T_off (the goal: T_off / (a x T_on) >= 0.8, a the run's tokens per verify step): a kind of step loses the
    figure what its a x seconds exceed its tokens at spec off's time a token (its run's time over its tokens, prefill
    included: the terms sum to a x T_on / T_off - 1). Also the figure of the verify steps alone against spec off's
    plain decode step T0 (their tokens x T0 over a x their seconds: the mechanism's own share) and both runs' prefill."""
    def total(s: dict, key: str, prefix: str = "") -> float:
        return sum(c[key] for k, c in s.items() if k.startswith(prefix))
    steps = total(split, "n", "verify")
    verify_tokens, verify_s = total(split, "tokens", "verify"), total(split, "ms", "verify") / 1e3
    a = verify_tokens / steps if steps else 1.0
    on_s, off_s, tokens = total(split, "ms") / 1e3, total(off, "ms") / 1e3, total(split, "tokens")
    plain = off.get("plain_k0", {"n": 0})
    t0 = plain["ms"] / 1e3 / plain["n"] if plain["n"] else None
    per_token = off_s / tokens if tokens else 0.0
    terms = {key: round((a * c["ms"] / 1e3 - c["tokens"] * per_token) / off_s, 4) for key, c in split.items()} if off_s else {}
    return {"accept": round(a, 3), "on_s": round(on_s, 4), "off_s": round(off_s, 4),
            "x_per_accept": round(off_s / (a * on_s), 3) if on_s and off_s else None,
            "verify_x_per_accept": round(verify_tokens * t0 / (a * verify_s), 3) if t0 and verify_s else None,
            "t0_ms": round(t0 * 1e3, 3) if t0 else None,
            "prefill_ms": {"on": round(total(split, "ms", "prefill") + total(split, "ms", "setup"), 3),
                           "off": round(total(off, "ms", "prefill") + total(off, "ms", "setup"), 3)},
            "loss_share": terms}

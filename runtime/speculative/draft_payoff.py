"""Whether drafting pays at the current batch size, measured on this machine as it serves.

The draft budget (draft_budget.py) prices a draft token by the model's verify-step cost. What it
cannot see is the rest of the step: a step that may carry drafts must have the previous step's tokens
on the host, so it gives up overlap scheduling and the host's per-step work (scheduling, commit,
outputs) is no longer hidden behind the device. On the H200 at batch 64 that made NGRAM 15% slower
end to end at 1.43 tokens per verify step, although the verify forward itself cost only a few
percent more. So the decision is also measured: per batch-size bucket (powers of two), decode steps
are timed with drafting allowed and with it off, tokens per second compared, and the better arm
kept; the other arm is re-measured for a short run every so often, so a change in acceptance or
load is noticed. Only speed depends on this: outputs are the same either way.

An interval is from the start of one scheduler step to the start of the next, with the tokens
generated in it; intervals that contain anything but a plain decode step (prefill, mixed batches,
idle waits) are dropped, and so is the first interval of each run of one arm (with overlap the
previous arm's tokens land in it).
"""
from __future__ import annotations

from dataclasses import dataclass, field

RUN_STEPS = 8  # steps per measuring run of one arm (the first is dropped)
EXPLORE_STEPS = 4 * RUN_STEPS  # drafting is measured until RUN_STEPS - 1 steps carried drafts, or this many
PROBE_EVERY = 128  # steps of the preferred arm between re-measurements of the other
DECAY = 0.97  # per recorded interval: the last ~30 intervals of an arm count most


@dataclass
class ArmRate:
    """Decayed tokens and seconds of one arm's decode intervals; `samples` counts the informative
    ones (for drafting: steps that carried drafts), `steps` all."""

    tokens: float = 0.0
    seconds: float = 0.0
    samples: int = 0
    steps: int = 0

    def record(self, tokens: int, seconds: float, informative: bool) -> None:
        self.tokens = self.tokens * DECAY + tokens
        self.seconds = self.seconds * DECAY + seconds
        self.samples += informative
        self.steps += 1

    def explored(self) -> bool:
        return self.samples >= RUN_STEPS - 1 or self.steps >= EXPLORE_STEPS

    @property
    def rate(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Bucket:
    arms: dict[bool, ArmRate] = field(default_factory=lambda: {True: ArmRate(), False: ArmRate()})
    arm: bool | None = None  # the arm of the last step
    run_left: int = 0  # steps left in a re-measuring run of the other arm
    since_probe: int = 0

    def measured(self) -> bool:
        return all(a.explored() for a in self.arms.values())

    def preferred(self) -> bool:
        return self.arms[True].rate > self.arms[False].rate

    def next_arm(self) -> tuple[bool, bool]:
        """(arm for this step, whether it is the first of a run: its interval is dropped)."""
        if self.run_left > 0:
            self.run_left -= 1
            arm = bool(self.arm)
        elif not self.arms[True].explored():
            arm = True  # first measure drafting, then plain decoding
        elif not self.arms[False].explored():
            arm = False
        else:
            arm = self.preferred()
            self.since_probe += 1
            if self.since_probe >= PROBE_EVERY:
                self.since_probe = 0
                arm = not arm
                self.run_left = RUN_STEPS - 1
        first = arm != self.arm
        self.arm = arm
        return arm, first


class DraftPayoff:
    """Per batch-size bucket, whether this step may draft; fed the clock and the token count."""

    def __init__(self) -> None:
        self.buckets: dict[int, Bucket] = {}
        self._open: tuple[float, int, int, bool, bool] | None = None  # (start, tokens then, bucket, arm, first)
        self._plain_decode = False  # the open interval's step was a plain decode step
        self._drafted = False  # ... and carried drafts

    def begin_step(self, now: float, generated: int, running: int) -> bool:
        """Closes the previous interval (recorded if it was a whole decode step) and returns whether
        this step may carry drafts."""
        if self._open is not None:
            start, before, key, arm, first = self._open
            if self._plain_decode and not first:
                self.buckets[key].arms[arm].record(generated - before, now - start, self._drafted or not arm)
        self._open, self._plain_decode, self._drafted = None, False, False
        if running == 0:
            return False
        key = running.bit_length()
        bucket = self.buckets.setdefault(key, Bucket())
        arm, first = bucket.next_arm()
        self._open = (now, generated, key, arm, first)
        return arm

    def scheduled(self, plain_decode: bool, drafted: bool) -> None:
        """What the step that began runs: only plain decode steps (drafts or not) are measured."""
        self._plain_decode, self._drafted = plain_decode, drafted

    def info(self) -> dict[str, dict[str, float]]:
        return {f"bs<{1 << k}": {"draft_tok_s": round(b.arms[True].rate, 1), "plain_tok_s": round(b.arms[False].rate, 1)}
                for k, b in sorted(self.buckets.items()) if b.measured()}

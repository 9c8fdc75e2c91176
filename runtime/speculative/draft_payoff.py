"""How many tokens each request may draft this step (0: plain decoding), measured on this machine as it serves.

The draft budget (draft_budget.py) prices a draft token by a model of the verify step. What it
cannot see is the rest of the step: a step that may carry drafts must have the previous step's tokens
on the host, so it gives up overlap scheduling, exposes the host's per-step work, and runs the
drafter. On the H200 at batch 64 that made NGRAM 15% slower end to end at 1.43 tokens per verify
step, although the verify forward itself cost only a few percent more. So the depth k is chosen per
batch-size bucket (powers of two) from two measurements:

- per arm k (the step's draft limit), tokens per second of decode steps run with it, and its mean
  step time T(k) (verify + drafting + the lost overlap: the cost ratio T(k) / T(0) at this batch);
- the acceptance rate a of draft positions (decayed over the steps that drafted; it does not
  drift while nothing drafts: retrying is the probes' job, so that it backs off).

Plain decoding (k = 0) and the cheapest drafting arm (k = 1) are measured first (with DEEP_FIRST_ROWS, at batch
1 the deepest, whose verify step costs about what k = 1's does there; unmeasured arms' T then bounded by T(0), as
T(1) is not known). The best any k can
do is E(kmax) = 1 + a + ... + a^kmax tokens per row in a step costing at least T(1): while that does
not beat plain decoding by MARGIN, the bucket decodes plainly and only re-measures k = 1 for a short
run every `probe_every` steps (keeping a and T(1) fresh). Otherwise the deeper arms are measured,
deepest first, each only while E(k) over T(1) could still beat the fastest arm measured (at acceptance
~1 the deepest wins, and measuring the others would cost a run each), and the fastest arm is kept;
every `probe_every` steps the arm the acceptance model ranks next (E(k) / T(k), T of unmeasured arms
taken as T(1)) is re-measured. Only speed depends on k: outputs are the same either way.

Probing costs what a drafting step costs over a plain one (at batch 64 on the H200, about twice a
decode step), so it is kept small while drafts are not accepted (a random head, text the drafter
cannot follow): a drafting run ends as soon as ABORT_TRIES draft positions were tried without one
accepted (one step at batch 64), and the probe interval doubles after every drafting run that
accepted nothing (PROBE_EVERY up to MAX_PROBE_EVERY), back to PROBE_EVERY after one that accepted
something.

A plain step measured slower than a drafting step (SUSPECT_RATIO) was disturbed while measured (a
drafting step does a plain step's work and more): plain decoding is measured again, at most
MAX_REMEASURES times per bucket.

Robust to single slow steps: an arm's step time is the median of its last WINDOW intervals (arm_rate.py; a GC pause,
a graph capture or a first-use kernel compile is one interval; a mean of 7 once read 26 ms for a 6 ms
step on the H200), its tokens per step their mean.

Exploring never costs more than a bounded share of the time (the batch-64 loss on the H200, 0.83x at
15:14, was mostly measuring: with 128-token requests every batch-size bucket the batch shrank through
measured four drafting arms at ~2x a plain step each). Every drafting interval that is not the chosen
arm's is charged its loss, its seconds minus what plain decoding would have taken for its tokens
(negative where it paid); a drafting step that is not the chosen arm's runs only while the loss so far
plus the step's predicted loss stays within LOSS_SHARE of the decode time so far plus SLACK_STEPS
plain steps. Where drafting pays (batch 1 in a loop) its steps earn the budget back at once; where it
does not, a measuring run is cut short and resumed once plain decoding has earned the room again.

An interval is from the start of one scheduler step to the start of the next, with the tokens
generated in it; intervals that contain anything but a plain decode step (prefill, mixed batches,
idle waits: the interval of a step after which nothing runs) are dropped, and so is the first interval of each run of one arm (with overlap the
previous arm's tokens land in it).

Without overlap scheduling (the CPU) batch 1 is not measured (`measure_from` = 2): a step whose one request
drafts nothing is a plain step there, so arms timed over different stretches of the text compared the text,
not k; the budget decides alone, pricing a draft row by its measured cost (row_cost.py).
"""
from __future__ import annotations

from dataclasses import dataclass, field

from radixlm.runtime.speculative.arm_rate import MIN_SAMPLES, ArmRate
from radixlm.runtime.speculative.draft_budget import PRIOR_RATE, PRIOR_WEIGHT

RUN_STEPS = 6  # steps per measuring run of one arm (the first is dropped)
PROBE_EVERY = 256  # steps of the chosen arm between re-measurements of another (while drafts are accepted)
MIN_PROBE_GAP = 32  # ... or this many, while the exploring budget holds two runs of it
MAX_PROBE_EVERY = 8192  # ... doubling up to this while probes accept nothing
ABORT_TRIES = 16  # draft positions tried without one accepted that end a drafting run
ACCEPT_DECAY = 0.8  # per step that drafted
MARGIN = 0.03  # drafting must beat plain decoding by this much (measurement noise must not turn it on)
SUSPECT_RATIO = 1.1  # a plain step measured this much slower than a drafting one was disturbed: measure it again
MAX_REMEASURES = 2  # ... at most this often per bucket
LOSS_SHARE = 0.01  # exploring may lose at most this share of the decode time so far ...
SLACK_STEPS = 1.0  # ... plus this many plain decode steps
# Before anything is measured, a step that may draft is taken to cost T0 x (PRIOR_RATIO + PRIOR_PER_ROW
# x rows) and to gain nothing: the exposed host work grows with the rows (H200, 8B: 1.2x at batch 1,
# 1.6x at 32, 1.9x at 64, benchmarks/RESULTS.md).
PRIOR_RATIO = 1.15
PRIOR_PER_ROW = 0.0135
# Batches of up to this many rows measure the deepest arm first, not k = 1: at batch 1 a verify step costs about the
# same at any k (H200, 8B, verify steps launched ahead: T(1) / T(4) 4.40 / 4.82 ms, 2026-12-04), so on text the
# drafter follows the deepest arm wins, and a run of k = 1 first emitted ~1.9 tokens a step. 0 (off) until measured
# on the H200 (`benchmarks/speculative.py --deep-ab`, spec8; 1 turns it on for batch 1)
DEEP_FIRST_ROWS = 0


def chain_tokens(rate: float, k: int) -> float:
    """Expected tokens a row emits in a step with a chain of k drafts, each position accepted with `rate`."""
    return sum(rate**i for i in range(k + 1))


@dataclass
class Bucket:
    max_k: int
    first_k: int = 1  # the drafting arm measured first (max_k at batches of up to DEEP_FIRST_ROWS rows)
    arms: dict[int, ArmRate] = field(default_factory=dict)
    k: int | None = None  # the arm of the last step
    run_left: int = 0  # steps left in a measuring run of the current arm
    since_probe: int = 0
    probe_every: int = PROBE_EVERY
    run_accepted: int = 0  # draft positions accepted and tried since the current arm began
    run_tried: int = 0
    remeasures: int = 0  # times plain decoding's measurement was thrown away as disturbed
    probing: bool = False  # this step's arm is a probe that just fired

    def arm(self, k: int) -> ArmRate:
        arm = self.arms.get(k)  # (not setdefault: it built an ArmRate and its deque at every call)
        if arm is None:
            arm = self.arms[k] = ArmRate()
        return arm

    def _expected_tokens(self, k: int, accept: float) -> float:
        """Tokens per row an arm-k step is expected to emit. Once arm 1 is measured, from its measured
        gain over plain decoding, g = E(1) - 1 = (rows that draft) x a: E(k) = 1 + g (1 + a + ... +
        a^(k-1)). The acceptance a alone counts only the rows that drafted: at batch 8 on the CPU most
        rows found no n-gram or were granted nothing, so a = 0.64 predicted 2.5 tokens a row where arm 1
        measured 1.0, and every deeper arm was explored at a loss (benchmarks/RESULTS.md)."""
        plain, one = self.arm(0), self.arm(1)
        if not (one.explored() and plain.tokens_per_step > 0) or accept <= 0:
            return chain_tokens(accept, k)
        gain = max(one.tokens_per_step / plain.tokens_per_step - 1.0, 0.0)
        return 1.0 + gain * (chain_tokens(accept, k) - 1.0) / accept

    def _predicted(self, k: int, accept: float) -> float:
        """tok/s the acceptance model expects of arm k: plain decoding's tokens per step (its rows) times
        E(k), over arm k's step time (an unmeasured arm's taken as T(1); where the deepest arm was measured first
        and T(1) is not, as T(0): a drafting step costs at least a plain one)."""
        plain, one = self.arm(0), self.arm(1)
        if self.arm(k).explored():
            step = self.arm(k).step_s
        else:
            step = one.step_s if one.explored() or self.first_k == 1 else plain.step_s
        return plain.tokens_per_step * self._expected_tokens(k, accept) / step if step > 0 else 0.0

    def plain_step_disturbed(self) -> bool:
        """A drafting step does a plain step's work and more (and gives up overlap), so a plain step
        measured slower than a drafting one was disturbed while it was measured. On the H200 (batch
        64, repeat prompts) plain decoding's first run measured 26 ms a step against 6 ms later and
        13.7 ms for arm 1; arm 3 was kept and ran at 0.83x plain decoding."""
        plain = self.arm(0)
        return plain.explored() and any(
            self.arm(k).explored() and plain.step_s > SUSPECT_RATIO * self.arm(k).step_s
            for k in range(1, self.max_k + 1))

    def drafting_can_pay(self, accept: float) -> bool:
        return self._predicted(self.max_k, accept) > self.arm(0).rate * (1 + MARGIN)

    def best(self) -> int:
        """The measured arm with the best tok/s (drafting arms must beat plain decoding by MARGIN)."""
        plain = self.arm(0).rate * (1 + MARGIN)
        drafting = [k for k in range(1, self.max_k + 1) if self.arm(k).explored() and self.arm(k).rate > plain]
        return max(drafting, key=lambda k: self.arm(k).rate, default=0)

    def verified(self, accepted: int, tried: int) -> None:
        """The verify results of a step of this bucket: a drafting arm whose drafts are not accepted
        stops at once (ABORT_TRIES), before its run is over."""
        self.run_accepted += accepted
        self.run_tried += tried
        if self.k and self.run_tried >= ABORT_TRIES and not self.run_accepted:
            self.run_left = 0
            self.arm(self.k).abandoned = True

    def _leave(self) -> None:
        """The current arm's run is over: back off probing if its drafts were all rejected."""
        if self.run_tried:
            self.probe_every = min(self.probe_every * 2, MAX_PROBE_EVERY) if not self.run_accepted else PROBE_EVERY
            if self.run_accepted and self.k:
                self.arm(self.k).abandoned = False
        self.run_accepted = self.run_tried = 0

    def predicted(self, k: int, accept: float, rows: int) -> tuple[float, float]:
        """(step seconds, tokens) a step of arm k is expected to take and emit: its own intervals, else
        arm 1's step time with the acceptance model's tokens, else the prior: a step that may draft
        costs T0 x (PRIOR_RATIO + PRIOR_PER_ROW x rows) and emits what a plain one does."""
        plain, arm, one = self.arm(0), self.arm(k), self.arm(1)
        if arm.recent:
            return arm.step_s, arm.tokens_per_step
        if one.recent:
            return one.step_s, plain.tokens_per_step * self._expected_tokens(k, accept)
        return plain.step_s * (PRIOR_RATIO + PRIOR_PER_ROW * rows), plain.tokens_per_step

    def predicted_loss(self, k: int, accept: float, rows: int) -> float:
        """Seconds a step of arm k is expected to lose against plain decoding (negative: it gains)."""
        plain = self.arm(0)
        if plain.rate <= 0:
            return 0.0
        step, tokens = self.predicted(k, accept, rows)
        return step - tokens / plain.rate

    def next_arm(self, accept: float, budget: float = float("inf"), rows: int = 1) -> tuple[int, bool]:
        """(draft limit for this step, whether it is the first of a run: its interval is dropped).
        `budget`: seconds exploring may still lose; an arm other than the chosen one runs only while
        its predicted step loss fits. `rows`: the running requests."""
        if self.max_k == 0:
            k = 0
        elif self.run_left > 0:
            self.run_left -= 1
            k = int(self.k or 0)
        elif len(self.arm(0).recent) < RUN_STEPS - 1:  # plain decoding costs nothing to measure: a whole run
            k = 0
        elif self.remeasures < MAX_REMEASURES and self.plain_step_disturbed():
            self.arms[0] = ArmRate()
            self.remeasures += 1
            k = 0
        elif not self.arm(self.first_k).done():
            k = self.first_k
            self.run_left = RUN_STEPS - 1
        else:
            chosen, can_pay = self.best(), self.drafting_can_pay(accept)
            # unmeasured arms that could still beat the best measured one (at T(1), a lower bound)
            measured = max(self.arm(k).rate for k in range(self.max_k + 1) if self.arm(k).explored())
            unmeasured = [k for k in range(2, self.max_k + 1)
                          if not self.arm(k).done() and self._predicted(k, accept) > measured * (1 + MARGIN)]
            if chosen == 0 and not can_pay:
                k = self._probe(0, [1], accept, budget, rows)  # the cheapest depth keeps a and T(1) fresh
            elif unmeasured and can_pay:  # the deepest first, for a whole run
                k = unmeasured[-1]
                self.run_left = RUN_STEPS - 1
            else:
                others = sorted((k for k in range(self.max_k + 1) if k != chosen),
                                key=lambda k: self._predicted(k, accept) if k else self.arm(0).rate)
                k = self._probe(chosen, others[-1:], accept, budget, rows)
        if k and self.arm(0).explored() and k != self.best() and self._exceeds(k, accept, budget, rows):
            # exploring would lose more than the budget allows: the chosen arm, until plain decoding
            # (or a paying arm) has earned the room; a probe that fired tries again next step
            self.run_left = 0
            if self.probing:
                self.since_probe = self.probe_every - 1
            k = self.best()
        self.probing = False
        first = k != self.k
        if first:
            self._leave()
        self.k = k
        return k, first

    def steps_to_draft(self, accept: float, budget: float, rows: int) -> float:
        """About how many plain steps from now a step of this bucket may draft (0: it may now; inf: never), were
        only the clock to move: the probe timer (or plain decoding's measuring run) and the exploring budget,
        which grows by LOSS_SHARE of a plain step a plain step while a first run of arm 1 (the cheapest) needs
        (1 + MIN_SAMPLES) times its predicted loss (`_exceeds`). The n-gram index warms only this close to a
        drafting step."""
        if self.max_k == 0:
            return float("inf")
        if self.k or self.best():
            return 0.0
        plain = self.arm(0)
        if len(plain.recent) < RUN_STEPS - 1:
            timer = RUN_STEPS - 1 - len(plain.recent)
        elif not self.arm(self.first_k).done():
            timer = 0
        else:  # `_probe`: every probe_every steps, or from MIN_PROBE_GAP on while probes accept drafts
            gap = MIN_PROBE_GAP if self.probe_every == PROBE_EVERY else self.probe_every
            timer = max(min(self.probe_every, gap) - self.since_probe, 0)
        if plain.step_s > 0:
            loss, step = self.predicted_loss(1, accept, rows), plain.step_s
        else:  # (plain decoding not measured yet: the prior's loss and the slack, in plain steps)
            loss, step, budget = PRIOR_RATIO + PRIOR_PER_ROW * rows - 1.0, 1.0, SLACK_STEPS
        need = (1 + MIN_SAMPLES) * max(loss, 0.0) - budget
        return max(float(timer), need / (LOSS_SHARE * step)) if need > 0 else float(timer)

    def _exceeds(self, k: int, accept: float, budget: float, rows: int) -> bool:
        """Whether a step of arm k would lose more than `budget`; a run's first step must leave room for
        its measuring steps too (its own interval is dropped), else a run cut after its first step
        measures nothing for what it lost."""
        loss = self.predicted_loss(k, accept, rows)
        return (loss if k == self.k else (1 + MIN_SAMPLES) * max(loss, 0.0)) > budget

    def _probe(self, chosen: int, candidates: list[int], accept: float, budget: float, rows: int) -> int:
        """Every `probe_every` steps; while decoding plainly also sooner (from MIN_PROBE_GAP steps on)
        if drafts were last accepted and the budget holds two runs of the candidate: the budget paces
        probing, and a probe early in a request (its text not yet repeating) does not keep drafting
        off for 256 steps. (A paying arm is left alone: a probe's loss against it is not charged.)"""
        self.since_probe += 1
        early = (chosen == 0 and self.since_probe >= MIN_PROBE_GAP and self.probe_every == PROBE_EVERY
                 and bool(candidates) and not self._exceeds(candidates[0], accept, budget / 2, rows))
        if (self.since_probe < self.probe_every and not early) or not candidates:
            return chosen
        self.since_probe = 0
        self.run_left = RUN_STEPS - 1
        self.probing = True
        return candidates[0]


class DraftPayoff:
    """Per batch-size bucket, the draft limit of this step; fed the clock, the token count and verify results."""

    def __init__(self, max_k: int = 1, measure_from: int = 1, deep_first_rows: int = DEEP_FIRST_ROWS) -> None:
        self.max_k = max_k
        self.deep_first_rows = deep_first_rows  # (benchmarks/speculative.py sets 1 to measure the deepest arm first)
        # batches of fewer rows are not measured: they may draft up to max_k (the budget decides; row_cost.py)
        self.measure_from = measure_from
        self.buckets: dict[int, Bucket] = {}
        # Draft positions accepted and tried, decayed per step that drafted (kept while none does:
        # probes retry); this step's counts until it closes.
        self.accepted, self.tried = 0.0, 0.0
        self._accepted, self._tried = 0, 0
        self._open: tuple[float, int, int, int, bool] | None = None  # (start, tokens then, bucket, arm, first)
        # the current step's bucket (None: a batch not measured), exploring budget and running requests
        self._step: tuple[Bucket | None, float, int] | None = None
        self._plain_decode = False  # the open interval's step was a plain decode step
        self._drafted = False  # ... and carried drafts
        # The exploring budget (all buckets): seconds of plain-decode-batch intervals, and what the
        # drafting ones lost against plain decoding (signed; credit capped at LOSS_SHARE of decode_s).
        self.decode_s = 0.0
        self.lost_s = 0.0

    def begin_step(self, now: float, generated: int, running: int) -> int:
        """Closes the previous interval (recorded if it was a whole decode step) and returns how many
        tokens each request may draft this step."""
        if self._open is not None:
            start, before, key, arm, first = self._open
            # running == 0: the step finished every request, so this call comes after an idle gap (the
            # next request's arrival), which is not the arm's step time (one such gap made a batch-1 arm
            # look 10x slower than it was and dropped it)
            if self._plain_decode and running:
                self._charge(self.buckets[key], arm, first, generated - before, now - start)
            if self._tried:
                self.buckets[key].verified(self._accepted, self._tried)
        if self._tried:  # every step's verify results, measured or not
            self.accepted = self.accepted * ACCEPT_DECAY + self._accepted
            self.tried = self.tried * ACCEPT_DECAY + self._tried
        self._accepted = self._tried = 0
        self._open, self._plain_decode, self._drafted = None, False, False
        if running == 0:
            self._step = None
            return 0
        if running < self.measure_from:
            self._step = (None, 0.0, running)
            return self.max_k
        key = running.bit_length()
        bucket = self.buckets.get(key)
        if bucket is None:
            first = self.max_k if running <= self.deep_first_rows else min(1, self.max_k)
            bucket = self.buckets[key] = Bucket(self.max_k, first)
        budget = LOSS_SHARE * self.decode_s + SLACK_STEPS * bucket.arm(0).step_s - self.lost_s
        arm, first = bucket.next_arm(self.accept_rate, budget, running)
        self._open = (now, generated, key, arm, first)
        self._step = (bucket, budget, running)
        return arm

    def steps_to_draft(self) -> float:
        """About how many plain steps from the current one a step may draft (`Bucket.steps_to_draft` of its
        bucket; 0 where the batch is not measured: it may always draft; inf with nothing running)."""
        if self._step is None:
            return float("inf")
        bucket, budget, running = self._step
        if bucket is None:
            return 0.0
        return bucket.steps_to_draft(self.accept_rate, budget, running)  # (its `k`: this step's arm)

    def _charge(self, bucket: Bucket, arm: int, first: bool, tokens: int, seconds: float) -> None:
        """A decode interval: recorded for its arm (not the first of a run: the previous arm's tokens
        land in it) and, drafting, charged its loss against plain decoding, its seconds minus its tokens
        at plain decoding's rate (the first of a run too: the previous, overlapped step's tokens land in
        it with the rest of its time; charging it its time beyond a plain step instead overcharged the
        H200's batch-1 probe ~10 ms and kept drafting off)."""
        if not first:
            bucket.arm(arm).record(tokens, seconds)
        self.decode_s += seconds
        plain = bucket.arm(0)
        if arm and plain.rate > 0:
            self.lost_s = max(self.lost_s + seconds - tokens / plain.rate, -LOSS_SHARE * self.decode_s)

    def scheduled(self, plain_decode: bool, drafted: bool) -> None:
        """What the step that began runs: only plain decode steps (drafts or not) are measured."""
        self._plain_decode, self._drafted = plain_decode, drafted

    @property
    def accept_rate(self) -> float:
        return (self.accepted + PRIOR_RATE * PRIOR_WEIGHT) / (self.tried + PRIOR_WEIGHT)

    def on_verified(self, drafted: int, accepted: int) -> None:
        """A request's verify result (geometric: a run that stops early tried accepted + 1 positions)."""
        self._accepted += accepted
        self._tried += accepted + (1 if accepted < drafted else 0)

    def info(self) -> dict[str, dict[str, float | int]]:
        out: dict[str, dict[str, float | int]] = {}
        for key, b in sorted(self.buckets.items()):
            cell: dict[str, float | int] = {"k": b.best(), "accept_rate": round(self.accept_rate, 3)}
            for k, a in sorted(b.arms.items()):
                if a.samples:
                    cell[f"k{k}_n"] = a.samples
                if a.explored():
                    cell[f"k{k}_tok_s"] = round(a.rate, 1)
                    cell[f"k{k}_step_ms"] = round(a.step_s * 1e3, 3)
            out[f"bs<{1 << key}"] = cell
        return out

    def exploring(self) -> dict[str, float]:
        """The exploring budget's state: decode seconds measured, seconds drafting lost (negative: gained)."""
        return {"decode_s": round(self.decode_s, 4), "lost_s": round(self.lost_s, 4)}

"""Verify steps launched ahead of the previous one's results (NGRAM chains, the overlap schedule).

A verify step is synchronous: the next one continues the tokens it accepts, so the host used to wait
for its logits, process them, draft, build the next batch and only then launch it, the device idle
all the while (~1 ms of a ~5.5 ms batch-1 step on the H200, benchmarks/RESULTS.md). Here, while step
i runs, the host guesses its outcome: every draft accepted and the token after them the one the
n-gram continuation predicts (`SpecDecoder.guess_after`), and builds step i+1 on that guess (its
drafts, slots, req_to_token entries and device tensors). Once step i's target tokens are on the host
the guess is checked: where it holds for every row, step i+1 is launched at once and step i's results
are processed while it runs; where it fails, step i+1 is undone (its slots freed; nothing of it ran)
and rebuilt from step i's actual outcome (`build_after`: step i's rejected drafts' slots freed, the
drafts proposed after its accepted run and bonus, not yet appended), launched, and only then are step
i's results processed. A launched step i+1 computes exactly what it would have computed built after
the results (its prefix is step i's accepted tokens, its first token step i's bonus), so outputs do
not change, only when the host does its work.

While such a step is in flight its rows hold KV for positions whose tokens the host has not appended
yet: nothing may release them, insert them into the prefix cache or schedule around them until its
results are processed (`settle`; the scheduler settles before an abort or a control message, and
whenever the next step cannot be built ahead: a request to admit, a row that cannot draft).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from radixlm.runtime import step_order
from radixlm.runtime.forward_batch import ForwardBatch, ForwardMode
from radixlm.runtime.request import Req
from radixlm.runtime.schedule_batch import ScheduledBatch
from radixlm.runtime.step_results import drop_unverified

if TYPE_CHECKING:
    from radixlm.runtime.scheduler import Scheduler


@dataclass
class AheadStep:
    """A verify step launched before the previous one's results were processed."""

    batch: ScheduledBatch
    logits: torch.Tensor


def eligible(sched: Scheduler, batch: ScheduledBatch) -> bool:
    """Whether the step after `batch` (a decode batch just launched) may be built ahead: NGRAM chains on
    every running row, nothing to admit or extend, and no row whose results could need more than its
    target tokens (a grammar, logprobs, penalties, stop strings) or be cut short by a finish."""
    if sched.spec is None or not sched.spec_ahead or batch.mode is not ForwardMode.DECODE:
        return False
    if sched.uncommitted is not None or sched.jump_due or sched.partial:
        return False
    if step_order.may_admit(sched) and len(sched.running) < sched.max_running:
        return False
    if len(batch.reqs) != len(sched.running) or sched.runner.lora is not None:
        return False
    for req, drafts, parents in zip(batch.reqs, batch.drafts, batch.draft_parents):
        p = req.params
        if (not drafts or parents is not None or req.grammar is not None or req.return_logprob or req.finished
                or p.needs_output_history or p.stop or p.stop_regex):
            return False
    return True


def step(sched: Scheduler) -> bool:
    """A scheduler step while a verify step runs ahead (`Scheduler.ahead`): its results, and the next
    one launched ahead where it can be (`run`)."""
    ahead, sched.ahead = sched.ahead, None
    assert ahead is not None and sched.spec is not None
    sched.step_batches.append(ahead.batch)
    sched.spec.scheduled(True, True)
    if sched.grammars is not None:
        sched.grammars.file_completed_rows()
    sched.ahead = run(sched, ahead.batch, ahead.logits)
    return True


def run(sched: Scheduler, batch: ScheduledBatch, logits: torch.Tensor) -> AheadStep | None:
    """A launched verify batch (every row verifying drafts): draw its target tokens on the device, build
    the next step on the guess that every draft is accepted while it runs, then launch that step if the
    guess held, and process this one's results. Returns the step launched ahead, if any."""
    drawn = sched.results.verify_targets(batch, logits)
    host, done = drawn, None
    if drawn.is_cuda:  # copied as soon as drawn; the host builds the next step meanwhile
        host = torch.empty(drawn.shape, dtype=drawn.dtype, pin_memory=True)
        host.copy_(drawn, non_blocking=True)
        done = torch.cuda.Event()
        done.record()
    go_on = eligible(sched, batch)
    built = build_next(sched, batch) if go_on else None
    targets = wait(host, done)
    if built is not None:
        nxt, fb, staged = built
        if guessed_right(batch, nxt, targets):
            ahead = launch(sched, nxt, fb, staged)
            sched.process_results(batch, logits, targets)
            return ahead
        undo(sched, nxt)
    rebuilt = build_after(sched, batch, targets) if go_on else None
    if rebuilt is None:
        sched.process_results(batch, logits, targets)
        return None
    ahead = launch(sched, *rebuilt)
    sched.stats["ahead_rebuilt_steps"] += 1
    sched.process_results(batch, logits, targets, dropped=True)
    return ahead


def wait(host: torch.Tensor, done: torch.cuda.Event | None) -> list[int]:
    """The target tokens once on the host (the device wait of a step built ahead: benchmarks time it)."""
    if done is not None:
        done.synchronize()
    return host.tolist()


def build_next(sched: Scheduler, batch: ScheduledBatch) -> tuple[ScheduledBatch, ForwardBatch, Any] | None:
    """The verify step after `batch` as if all its drafts are accepted: each row starts with its guessed
    bonus token and verifies the drafts guessed after it. Its slots are allocated (never by evicting
    the prefix cache), then `assemble`d: `undo` takes all back."""
    assert sched.spec is not None
    conts = sched.spec.guess_after(batch.reqs, batch.drafts, sched.results.eos_ids)
    if conts is None:
        return None
    drafts = [c[1:] for c in conts]
    slots = sched.kv_pool.alloc(len(conts) + sum(len(d) for d in drafts))
    if slots is None:
        return None
    return assemble(sched, batch.reqs, [c[0] for c in conts], drafts, slots)


def build_after(sched: Scheduler, batch: ScheduledBatch, targets: list[int]
                ) -> tuple[ScheduledBatch, ForwardBatch, Any] | None:
    """The guess failed, `batch`'s outcome is known (`targets`) but not yet processed: the next verify step
    from that outcome, built and launched first (its results are processed while it runs). Each row's
    rejected drafts' slots are freed here (the results then drop none: `dropped`); the next step starts
    with the row's bonus and verifies what the drafter proposes after its run. None (nothing changed)
    unless every row gets drafts, no run token could end its request and the slots are free."""
    assert sched.spec is not None
    runs, start = [], 0
    for drafts in batch.drafts:
        got = targets[start : start + len(drafts) + 1]
        start += len(drafts) + 1
        j = next((i for i, (d, t) in enumerate(zip(drafts, got)) if d != t), len(drafts))
        runs.append(got[: j + 1])  # (accepted drafts equal their targets: the run is the targets up to the bonus)
    drafts = sched.spec.propose_after(batch.reqs, runs, [len(d) for d in batch.drafts], sched.results.eos_ids)
    if drafts is None:
        return None
    slots = sched.kv_pool.alloc(len(runs) + sum(len(d) for d in drafts))
    if slots is None:
        return None
    for req, run, old in zip(batch.reqs, runs, batch.drafts):
        drop_unverified(sched, req, len(old) + 1 - len(run))
    return assemble(sched, batch.reqs, [run[-1] for run in runs], drafts, slots)


def assemble(sched: Scheduler, reqs: list[Req], firsts: list[int], drafts: list[list[int]], slots: torch.Tensor
             ) -> tuple[ScheduledBatch, ForwardBatch, Any]:
    """A verify batch whose rows start with `firsts` (tokens not yet appended) on top of each row's KV:
    its device tensors, its req_to_token entries (recorded now) and its rows' kv_len grown, its inputs
    staged in its CUDA graph's buffers (after the step in flight reads them), so a launch is the
    graph's replay alone."""
    nxt = ScheduledBatch(ForwardMode.DECODE, [], [], [])
    nxt.set_decode_rows(list(reqs), slots, drafts, [None] * len(drafts))
    nxt.ahead_tokens = firsts
    fb, writes = nxt.to_forward_batch(sched.device, None, sched.runner.cascade)
    sched.req_to_token_pool.commit(writes)
    for req, ext in zip(nxt.reqs, nxt.extend_lens):
        req.kv_len += ext
    return nxt, fb, sched.runner.stage(fb)


def guessed_right(batch: ScheduledBatch, nxt: ScheduledBatch, targets: list[int]) -> bool:
    """Every row of `batch` accepted all its drafts and drew the bonus `nxt` starts with."""
    assert nxt.ahead_tokens is not None
    start = 0
    for drafts, bonus in zip(batch.drafts, nxt.ahead_tokens):
        n = len(drafts)
        if targets[start : start + n] != drafts or targets[start + n] != bonus:
            return False
        start += n + 1
    return True


def launch(sched: Scheduler, nxt: ScheduledBatch, fb: ForwardBatch, staged: Any) -> AheadStep:
    logits = sched.runner.forward(fb, staged)
    sched.decode_log.on_step(nxt.mode, sched.info)
    sched.reserve.on_decode_step()
    sched.stats["forward_steps"] += 1
    sched.stats["decode_steps"] += 1
    sched.stats["ahead_steps"] += 1
    sched.stats["cascade_decode_steps"] += fb.cascade is not None
    return AheadStep(nxt, logits)


def undo(sched: Scheduler, nxt: ScheduledBatch) -> None:
    """A step built ahead on a wrong guess: its slots back to the pool (req_to_token's entries past
    kv_len are dead, rewritten by the step that next uses those positions)."""
    for req, ext in zip(nxt.reqs, nxt.extend_lens):
        req.kv_len -= ext
    sched.kv_pool.free(torch.cat(nxt.new_slots))

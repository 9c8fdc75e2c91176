"""Where the scheduler process's loop spends a busy period, for benchmarks that drive the real Engine.

With `RADIXLM_LOOP_STATS=<file>` in its environment, the scheduler process appends one JSON line per
busy period (from the first message after idling to idle again): wall seconds, seconds inside
`Scheduler.step`, receiving + handling messages, sending outputs and waiting while a step found
nothing to run, the cyclic collector's pauses (inside those) and its full collections, the step
counts, and the scheduler's own step counters over the period (decode, overlapped, prefill, mixed).
Item (f) reads them to compare a constrained run with unconstrained decoding inside the Engine
(benchmarks/gpu_throughput.py); off, the loop pays one None test a turn.

`watch` adds parts of a step (inclusive seconds, nested in "step"): waiting for the device's sampled
tokens, the forward's launch, commits and sampling, the grammar's commit and masks. Where the host
waits for the device, the device is the bound; where it does not, the host's parts say what it is.
Each part's longest single call (`parts_max`), the parts of the period's first step (`first_step_parts`:
a batch's admission, its first forward) and the distribution of the steps' own times
(`step_ms`: median, p90, max, the five longest) tell a cost paid on every step from a few stalls
(item (f): a table's rows sent to the device on one step, a cold walk).
"""

from __future__ import annotations

import gc
import inspect
import json
import math
import os
import statistics
import time
from collections.abc import Callable
from typing import Any

ENV = "RADIXLM_LOOP_STATS"
_ABSENT = object()  # `watch`: the owner had no attribute of its own by that name
COUNTERS = ("forward_steps", "decode_steps", "overlapped_steps", "prefill_steps", "mixed_steps", "generated_tokens",
            "prefill_as_decode_steps")


class LoopStats:
    def __init__(self, path: str) -> None:
        self.path = path
        self.busy = False
        self._reset()
        self._gc_started = 0.0
        self._patched: list[tuple[Any, str, Any]] = []  # (owner, name, its own attribute before, or _ABSENT)
        gc.callbacks.append(self._on_gc)  # the cyclic collector's pauses, wherever they land

    def _on_gc(self, phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            self._gc_started = time.perf_counter()
        elif self.busy:
            self.seconds["gc"] += time.perf_counter() - self._gc_started
            self.gc_full += info.get("generation") == 2

    @staticmethod
    def from_env() -> LoopStats | None:
        path = os.environ.get(ENV)
        return LoopStats(path) if path else None

    def _reset(self) -> None:
        self.start = 0.0
        self.seconds = {"step": 0.0, "receive": 0.0, "send": 0.0, "wait": 0.0, "gc": 0.0}  # gc: inside the others
        self.turns = self.idle_turns = self.gc_full = 0
        self.counters: dict[str, int] = {}
        self.parts: dict[str, float] = {}
        self.parts_max: dict[str, float] = {}
        self.parts_calls: dict[str, int] = {}
        self.first_parts: dict[str, float] = {}  # the parts until the period's first step ended (a batch's admission)
        self.steps: list[float] = []  # each turn's seconds in `Scheduler.step`, turns that ran a step

    def watch(self, owner: Any, name: str, part: str) -> None:
        """Time `owner.name` (a method of an object, or of a class: every instance) into `part`
        while busy."""
        fn: Callable[..., Any] = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            if not self.busy:
                return fn(*args, **kwargs)
            start = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                took = time.perf_counter() - start
                self.parts[part] = self.parts.get(part, 0.0) + took
                self.parts_calls[part] = self.parts_calls.get(part, 0) + 1
                if not self.steps:
                    self.first_parts[part] = self.first_parts.get(part, 0.0) + took
                if took > self.parts_max.get(part, 0.0):
                    self.parts_max[part] = took

        static = isinstance(inspect.getattr_static(owner, name), staticmethod)
        self._patched.append((owner, name, vars(owner).get(name, _ABSENT)))
        setattr(owner, name, staticmethod(timed) if static else timed)

    def close(self) -> None:
        """Undo every `watch` (classes and modules are patched for the whole process) and stop timing the
        collector: for a scheduler that runs in-process beside others (tests, benchmarks)."""
        for owner, name, before in reversed(self._patched):
            if before is _ABSENT:
                delattr(owner, name)  # (it was the class's, or a base's: the lookup finds it again)
            else:
                setattr(owner, name, before)
        self._patched.clear()
        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)

    def watch_scheduler(self, sched: Any) -> None:
        """The step's parts that tell a host-bound loop from a device-bound one."""
        import torch

        from radixlm.runtime.grammar_runtime import GrammarRuntime

        if torch.cuda.is_available():
            self.watch(torch.cuda.Event, "synchronize", "device waits (sampled tokens)")
            self.watch(torch.cuda.CUDAGraph, "replay", "graph replay")  # (inside the forward's launch)
        self.watch(sched.runner, "forward", "forward launch")
        self.watch(sched, "_schedule_prefill", "schedule prefill")  # admission: prefix match, KV, grammar matchers
        self.watch(sched, "process_results", "synchronous results")  # a step not overlapped: waits, draw, commit
        self.watch(sched.results, "commit", "commit")  # (an overlapped step's grammar commit runs before it)
        self.watch(sched.results, "sample", "sample launch (incl. masks taken)")
        for name, part in (("advance_many", "grammar commit"), ("bitmask", "masks taken"), ("poll", "grammar poll"),
                           ("file_completed_rows", "table rows filed")):
            self.watch(GrammarRuntime, name, part)
        # inside the above: the draw's parts, the masks' gather and uploads; the schedule and the batch's inputs
        import radixlm.constrained as constrained
        import radixlm.constrained.base as constrained_base
        from radixlm.constrained.table_grammar import TableMatcher
        from radixlm.runtime import decode_schedule, forced_rows_batch, result_processor
        from radixlm.runtime import scheduler as scheduler_module
        from radixlm.runtime.grammar_tables import DeviceTables
        from radixlm.runtime.sampler import SamplingBatch
        from radixlm.runtime.schedule_batch import ScheduledBatch
        from radixlm.runtime.uncommitted_step import UncommittedStep

        for owner, name, part in ((SamplingBatch, "build", "sampling tensors"), (result_processor, "sample", "draw"),
                                  (constrained, "apply_token_bitmask_", "bitmask applied"),
                                  (DeviceTables, "gather", "mask gather"), (DeviceTables, "_synced", "table upload"),
                                  (DeviceTables, "commit", "table commit"), (sched, "_schedule_decode", "schedule decode"),
                                  (ScheduledBatch, "to_forward_batch", "forward inputs"),
                                  (UncommittedStep, "start", "sampled tokens' copy"),
                                  # llguidance inside the grammar's parts: masks of states first reached (may run on
                                  # a mask thread), lagging tokens taken by the backend
                                  (constrained_base, "fill_next_token_bitmasks", "backend mask fills"),
                                  (TableMatcher, "sync", "backend catch-ups"),
                                  # --enable-forced-rows' host parts; inside "forward inputs", the extra-rows step's
                                  # guess entries and its packed copy (the first such step of an Engine spent 130-157 ms
                                  # in "forward inputs" on the H200, 2026-12-06: these tell where)
                                  (decode_schedule, "plan_guesses", "plan guesses"),
                                  (scheduler_module, "resolve_guesses", "resolve guesses"),
                                  (scheduler_module, "plan_rides", "plan rides"),
                                  (forced_rows_batch, "_guess_pick_inputs", "guess pick inputs"),
                                  (forced_rows_batch, "pack_on", "extra-rows inputs' copy")):
            self.watch(owner, name, part)

    def begin(self, stats: dict[str, Any]) -> None:
        """The loop has work again (a message arrived while idle)."""
        if not self.busy:
            self.busy = True
            self._reset()
            self.start = time.perf_counter()
            self.counters = {k: int(stats.get(k, 0)) for k in COUNTERS}

    def add(self, part: str, seconds: float) -> None:
        self.seconds[part] += seconds

    def turn(self, ran: bool, step_seconds: float = 0.0) -> None:
        self.turns += 1
        self.idle_turns += not ran
        if ran:
            self.steps.append(step_seconds)

    def _step_ms(self) -> dict[str, Any]:
        if not self.steps:
            return {}
        ms = sorted(1e3 * s for s in self.steps)
        return {"median": statistics.median(ms), "p90": ms[math.ceil(0.9 * len(ms)) - 1], "max": ms[-1],
                "longest": ms[-5:][::-1]}

    def end(self, stats: dict[str, Any]) -> None:
        """The scheduler is idle: write the period's line."""
        if not self.busy:
            return
        self.busy = False
        line = {"wall_s": time.perf_counter() - self.start, "seconds": self.seconds, "parts": self.parts,
                "parts_max": self.parts_max, "parts_calls": self.parts_calls, "first_step_parts": self.first_parts,
                "step_ms": self._step_ms(),
                "turns": self.turns,
                "turns_without_a_step": self.idle_turns, "gc_full_collections": self.gc_full,
                **{k: int(stats.get(k, 0)) - v for k, v in self.counters.items()}}
        with open(self.path, "a") as f:
            f.write(json.dumps(line) + "\n")


def read_last(path: str) -> dict[str, Any] | None:
    """The last busy period's line (None when there is none)."""
    try:
        with open(path) as f:
            lines = [ln for ln in f if ln.strip()]
    except OSError:
        return None
    return json.loads(lines[-1]) if lines else None

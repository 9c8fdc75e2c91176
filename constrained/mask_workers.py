"""A whole decode batch of matchers at once: masks and token commits in parallel, off the GIL.

One constrained step needs a mask row per constrained request. Filled one by one on the
scheduler's thread they cost ~20-60 µs each, which at batch 64-256 is as long as the device's
whole decode step. llguidance computes masks and commits tokens with the GIL released, so rows
run on worker threads (its own Rust pool, `LLExecutor`, or ours over its per-matcher calls), and
`start_fill` runs a batch in the background while the caller does its per-request bookkeeping.
Results do not depend on the thread count: every row is computed by the same function.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

import torch

from .base import Matcher

# "native": the backend's own parallel batch call where it has one (llguidance's LLExecutor): the
# GIL is taken once per batch. "threads": our pool over the backend's per-matcher calls; each row
# retakes the GIL on return, which waits up to the interpreter's switch interval (5 ms) while the
# caller's thread runs Python, so it only pays when the caller waits (mask_fill.py compares both).
STRATEGIES = ("native", "threads")
MAX_DEFAULT_THREADS = 16
# --grammar-mask-threads' default beside a CUDA device (item (f), batch 256, H200 host: the step went
# from 20.9 ms inline to 12.5 ms with 8 threads, one matcher family each). Without one: inline, as the
# CPU forward wants the cores.
GPU_DEFAULT_THREADS = 8


def default_mask_threads(cap: int = MAX_DEFAULT_THREADS) -> int:
    """All usable cores but one (the scheduler's own thread), at most `cap`; 0 on a single core."""
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cpus = os.cpu_count() or 1
    return max(0, min(cap, cpus - 1))


class MaskWorkers:
    """`threads` = 0: everything inline on the caller's thread; 1: batches run on one background
    thread (overlapping the caller), serially; N > 1: each batch is split over N threads."""

    def __init__(self, threads: int, strategy: str = "native") -> None:
        if threads < 0:
            raise ValueError(f"threads: must be >= 0, got {threads}")
        if strategy not in STRATEGIES:
            raise ValueError(f"strategy: {strategy!r} is not one of {', '.join(STRATEGIES)}")
        self.threads = threads
        self.strategy = strategy
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="mask") if threads > 1 else None
        self._background = ThreadPoolExecutor(1, thread_name_prefix="mask-batch") if threads > 0 else None
        self._native: dict[str, Any] = {}

    def native(self, key: str, make: Callable[[int], Any]) -> Any:
        """A backend's own parallel executor, created on first use with `threads` threads."""
        executor = self._native.get(key)
        if executor is None:
            executor = self._native[key] = make(self.threads)
        return executor

    def run_chunks(self, fn: Callable[[Sequence[Any]], None], items: Sequence[Any]) -> None:
        """fn over contiguous slices of items, one per thread (inline when serial); waits, re-raises."""
        if self._pool is None or len(items) < 2:
            fn(items)
            return
        n = min(self.threads, len(items))
        step = -(-len(items) // n)
        futures = [self._pool.submit(fn, items[i : i + step]) for i in range(0, len(items), step)]
        for f in futures:
            f.result()

    def fill(self, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> None:
        """Row `index` of `bitmask` for each (matcher, index); rows not named are left alone."""
        for job in self._prepare(items, bitmask):
            job()

    def start_fill(self, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> Future[None]:
        """`fill` in the background; nothing may touch these matchers until the future is done.
        Checks run now (errors raise here); the background thread only enters the backend.

        Returns once the background thread holds the work: a woken thread needs the GIL to enter
        the backend, and while the caller runs Python it would get it only after the interpreter's
        switch interval (5 ms), i.e. typically when the caller next waits, so the masks would be
        computed after the caller's bookkeeping instead of beside it. Waiting here hands the GIL
        over at once; the backend call releases it again within microseconds."""
        jobs = self._prepare(items, bitmask)
        return self.start(lambda: _run_all(jobs))

    def start(self, job: Callable[[], None]) -> Future[None]:
        """Run a prepared job in the background (inline without threads), as `start_fill` does."""
        if self._background is None:
            done: Future[None] = Future()
            job()
            done.set_result(None)
            return done
        entered = threading.Event()

        def run() -> None:
            entered.set()
            job()

        future = self._background.submit(run)
        entered.wait()
        return future

    def _prepare(self, items: Sequence[tuple[Matcher, int]], bitmask: torch.Tensor) -> list[Callable[[], None]]:
        return [cls.prepare_fill(group, bitmask, self) for cls, group in _by_type(items).items()]

    def advance(self, matchers: Sequence[Matcher], tokens: Sequence[int]) -> list[bool]:
        """Commit one token per matcher. A refused token may leave its matcher unusable (the
        batched llguidance call enters its error state): the caller stops that request."""
        if not matchers:
            return []
        kind = type(matchers[0])
        if all(type(m) is kind for m in matchers):  # the usual batch: one kind, no regrouping
            return kind.advance_rows(matchers, tokens, self)
        ok = [False] * len(matchers)
        groups: dict[type[Matcher], list[int]] = {}
        for j, m in enumerate(matchers):
            groups.setdefault(type(m), []).append(j)
        for cls, idx in groups.items():
            for j, good in zip(idx, cls.advance_rows([matchers[j] for j in idx], [tokens[j] for j in idx], self)):
                ok[j] = good
        return ok

    def close(self) -> None:
        for pool in (self._background, self._pool):
            if pool is not None:
                pool.shutdown(wait=True)
        self._native.clear()


def _run_all(jobs: list[Callable[[], None]]) -> None:
    for job in jobs:
        job()


def _by_type(items: Sequence[tuple[Matcher, int]]) -> dict[type[Matcher], list[tuple[Matcher, int]]]:
    groups: dict[type[Matcher], list[tuple[Matcher, int]]] = {}
    for item in items:
        groups.setdefault(type(item[0]), []).append(item)
    return groups

"""Compile grammars off the scheduler loop, in worker processes that can be killed.

A pathological schema or regex can spend seconds inside native code, where a thread cannot
be interrupted; a process can. The scheduler calls `submit` when a request arrives (a spec in
the cache is answered there and then) and `poll` once per step (never blocks): finished grammars
come back, timed-out compiles come back as GrammarCompileError and their worker is restarted for
the rest of the queue. Several
workers (`workers`, 2 by default) take the queue in order, so one slow spec holds up the others
by no more than the time a worker is busy with it, not the whole queue for the timeout.

The whole compile runs there, the JSON-schema vetting and rewriting included (up to a second for
real schemas, without bound for hostile ones): the caller keys a job by the spec's text alone, so
`submit` costs a `json.dumps`, and a worker's own cache joins spellings of one canonical schema.
A worker's memory is capped (compile_worker.py): a spec whose compile would take the host's
memory ends as a failed compile of that request and a restarted worker, not a swapping host or an
OOM-killed scheduler.

The grammar a payload describes is rebuilt in the caller on a background thread (llguidance: its
parser built from the grammar text, p99 ~0.1 s and up to ~0.6 s for real schemas, once per matcher
family; the native build releases the GIL), so `poll` hands over grammars ready for matchers.

What crosses the process boundary is `Grammar.payload()`: llguidance -> its grammar text,
outlines-core -> the pickled token Index (serde; megabytes for large DFAs), xgrammar -> its
serialized CompiledGrammar JSON.
"""
from __future__ import annotations

import json
import multiprocessing as mp
import resource
import time
from collections import deque
from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from multiprocessing.connection import wait as wait_for_messages
from typing import Any

from .base import Grammar
from .compile_worker import CompileWorker, gib, load_tokenizer, worker_memory_limit
from .compiler import CACHE, WHITESPACE_MAX, GrammarCache, default_backend, grammar_from_payload
from .errors import GrammarCompileError
from .vocab import TokenizerInfo

_KINDS = ("regex", "json_schema", "ebnf", "choices")


@dataclass
class _Job:
    job_id: int
    kind: str
    spec: Any
    backend: str
    lenient: bool
    whitespace_max: int
    cache_key: Any
    waiters: list[Hashable] = field(default_factory=list)


class GrammarService:
    """Non-blocking grammar compilation for a scheduler loop (`workers` processes, jobs in order)."""

    def __init__(self, tokenizer_path: str, *, timeout_s: float = 10.0, backend: str | None = None,
                 tokenizer: Any = None, cache: GrammarCache | None = CACHE,
                 startup_timeout_s: float = 120.0, memory_limit: int | None = -1, families: int = 1,
                 workers: int = 2) -> None:
        self.tokenizer_path = str(tokenizer_path)
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        # bytes of private memory a worker may take (-1: worker_memory_limit(); None: no cap)
        self.memory_limit = worker_memory_limit() if memory_limit == -1 else memory_limit
        self.worker_memory_limit: int | None = None  # as the running workers report it
        self.families = families  # matcher families each grammar is built for before `poll` hands it over
        self._builder: ThreadPoolExecutor | None = None
        self._building: list[tuple[_Job, Future[Grammar | Exception]]] = []
        self.backend = backend or default_backend()
        self.cache = cache
        self._info = TokenizerInfo.from_tokenizer(tokenizer or load_tokenizer(self.tokenizer_path))
        self._ctx = mp.get_context("spawn")  # no forked torch/tokenizer thread state
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self._workers = [CompileWorker() for _ in range(workers)]
        self._queue: deque[_Job] = deque()
        self._by_key: dict[Any, _Job] = {}
        self._done: list[tuple[Hashable, Grammar | Exception]] = []
        self._next_id = 0
        self.restarts = 0

    # -- public API ---------------------------------------------------------------------
    @property
    def info(self) -> TokenizerInfo:
        """The tokenizer every grammar of this service is compiled for."""
        return self._info

    def submit(self, key: Hashable, spec: Mapping[str, Any]) -> Grammar | None:
        """Queue a compile, or answer it now: a spec whose grammar is in the cache gets it back at
        once (nothing queued, nothing for `poll`: a scheduler attaches matchers to a request of a
        served schema when it is received). spec: one of regex/json_schema/ebnf/choices, plus
        optional backend, lenient, whitespace_max. Bad arguments are answered at the next poll
        without the worker; everything that reads the spec itself (a schema's vetting and
        rewriting, refusals naming keyword and pointer) happens in the worker."""
        try:
            kinds = [k for k in _KINDS if spec.get(k) is not None]
            if len(kinds) != 1:
                raise ValueError(f"spec needs exactly one of {', '.join(_KINDS)}")
            kind = kinds[0]
            backend = spec.get("backend") or self.backend
            lenient = bool(spec.get("lenient", False))
            ws = int(spec.get("whitespace_max", WHITESPACE_MAX))
            cache_key = self._cache_key(kind, spec[kind], backend, lenient, ws)
        except ValueError as exc:
            self._done.append((key, exc))
            return None
        hit = self.cache.get(cache_key) if self.cache is not None else None
        if hit is not None:
            return hit
        job = self._by_key.get(cache_key)
        if job is None:
            job = _Job(self._next_id, kind, spec[kind], backend, lenient, ws, cache_key)
            self._next_id += 1
            self._by_key[cache_key] = job
            self._queue.append(job)
        job.waiters.append(key)
        self._pump()
        return None

    def _cache_key(self, kind: str, spec: Any, backend: str, lenient: bool, ws: int) -> Any:
        """The compile cache's key of a spec: its text as sent (a batch of requests with one schema
        shares it). Keys in canonical form would need the schema vetted here, in the scheduler's
        loop; the worker's own cache joins the spellings of one canonical schema instead."""
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        return ("sent", kind, text, self._info.fingerprint, backend, lenient, ws)

    def poll(self) -> list[tuple[Hashable, Grammar | Exception]]:
        """Finished (key, Grammar or exception) pairs since the last poll; never blocks."""
        self._pump()
        done, self._done = self._done, []
        return done

    def pending(self) -> int:
        return len(self._queue) + sum(w.job is not None for w in self._workers) + len(self._building)

    def wait(self, timeout_s: float = 60.0) -> list[tuple[Hashable, Grammar | Exception]]:
        """Blocking convenience for tests and offline use: poll until nothing is pending."""
        deadline = time.monotonic() + timeout_s
        out = self.poll()
        while self.pending() and time.monotonic() < deadline:
            conns = [w.conn for w in self._workers if w.conn is not None]
            if conns:
                wait_for_messages(conns, timeout=0.01)
            else:
                time.sleep(0.002)  # only grammars being rebuilt are pending
            out += self.poll()
        return out

    def close(self) -> None:
        for worker in self._workers:
            worker.stop()
        if self._builder is not None:
            self._builder.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GrammarService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker management --------------------------------------------------------------
    def _finish(self, job: _Job, result: Grammar | Exception) -> None:
        self._by_key.pop(job.cache_key, None)
        self._done.extend((key, result) for key in job.waiters)

    def _pump(self) -> None:
        if self._building:
            self._collect_built()
        for worker in self._workers:
            if worker.proc is None:
                # a worker starts when the queue holds more jobs than started workers can take now
                free = sum(w.proc is not None and w.job is None for w in self._workers)
                if len(self._queue) <= free:
                    continue
                worker.start(self._ctx, self.tokenizer_path, self.memory_limit)
            if not self._drain(worker):
                return  # every job failed (a worker that cannot start, another vocabulary)
            if worker.proc is None:
                continue  # it died with its job: started again at the next pump that finds the queue non-empty
            now = time.monotonic()
            if not worker.ready and now - worker.started_at > self.startup_timeout_s:
                self._fail_all(f"grammar worker did not start within {self.startup_timeout_s:g} s")
                return
            if worker.job is not None and now - worker.sent_at > self.timeout_s:
                job = worker.job
                worker.kill()
                self.restarts += 1
                self._finish(job, GrammarCompileError(
                    f"{job.kind} compilation timed out after {self.timeout_s:g} s (worker restarted)"))
                continue  # started again at the next pump that finds the queue non-empty
            if worker.ready and worker.job is None and self._queue:
                job = self._queue.popleft()
                worker.send(job, (job.job_id, job.kind, job.spec, job.backend, job.lenient, job.whitespace_max))

    def _drain(self, worker: CompileWorker) -> bool:
        """Take the worker's messages; False when they failed every job."""
        try:
            for tag, job_id, body in worker.messages():
                if tag == "ready":
                    fingerprint, limit = body
                    self.worker_memory_limit = None if limit == resource.RLIM_INFINITY else limit
                    if fingerprint != self._info.fingerprint:  # grammars would index the wrong vocabulary
                        self._fail_all(f"tokenizer at {self.tokenizer_path} differs from the caller's")
                        return False
                    worker.ready = True
                elif tag == "dead":
                    self._fail_all(f"grammar worker failed to start: {body}")
                    return False
                elif worker.job is not None and worker.job.job_id == job_id:
                    job, worker.job = worker.job, None
                    if tag == "ok":
                        if self._builder is None:
                            self._builder = ThreadPoolExecutor(1, thread_name_prefix="grammar-build")
                        self._building.append((job, self._builder.submit(self._rebuild, job, body)))
                    else:
                        self._finish(job, body)
        except (EOFError, OSError):  # worker died (OOM, native crash): fail its job, restart
            if not worker.ready:  # died while starting: restarting would only loop
                self._fail_all("grammar worker exited during startup")
                return False
            job = worker.job
            worker.kill()
            self.restarts += 1
            if job is not None:
                self._finish(job, GrammarCompileError(
                    f"{job.kind} compilation crashed the grammar worker (a native error, or more than its "
                    f"{gib(self.memory_limit)} of memory)"))
        return True

    def _collect_built(self) -> None:
        """Hand over (on the caller's thread) the grammars the build thread finished."""
        still = []
        for job, built in self._building:
            if not built.done():
                still.append((job, built))
                continue
            try:
                result = built.result()
            except Exception as exc:  # noqa: BLE001 - a native build error fails its requests only
                result = GrammarCompileError(f"{job.kind}: rebuilding the compiled grammar failed: {exc!r}")
            self._finish(job, result)
        self._building = still

    def _rebuild(self, job: _Job, payload: Any) -> Grammar | Exception:
        """On the build thread: the grammar from its payload, with its matcher families."""
        try:
            grammar = grammar_from_payload(self._info, job.backend, payload)
            grammar.prepare_families(self.families)
        except ValueError as exc:
            return exc
        if self.cache is not None:
            self.cache.put(job.cache_key, grammar)
        return grammar

    def _fail_all(self, message: str) -> None:
        jobs = [w.job for w in self._workers if w.job is not None] + list(self._queue)
        self._queue.clear()
        for worker in self._workers:
            worker.kill()
        for job in jobs:
            self._finish(job, GrammarCompileError(message))

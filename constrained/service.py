"""Compile grammars off the scheduler loop, in a worker process that can be killed.

A pathological schema or regex can spend seconds inside native code, where a thread cannot
be interrupted; a process can. The scheduler calls `submit` when a request arrives and
`poll` once per step (never blocks): finished grammars come back, timed-out compiles come
back as GrammarCompileError and the worker is restarted for the rest of the queue.

The whole compile runs there, the JSON-schema vetting and rewriting included (up to a second for
real schemas, without bound for hostile ones): the caller keys a job by the spec's text alone, so
`submit` costs a `json.dumps`, and the worker's own cache joins spellings of one canonical schema.
The worker's memory is capped (`worker_memory_limit`): a spec whose compile would take the host's
memory ends as a failed compile of that request and a restarted worker, not a swapping host or an
OOM-killed scheduler.

The grammar a payload describes is rebuilt in the caller on a background thread (llguidance: its
parser built from the grammar text, p99 ~0.1 s and up to ~0.6 s for real schemas, once per matcher
family; the native build releases the GIL), so `poll` hands over grammars ready for matchers.

What crosses the process boundary is `Grammar.payload()`: llguidance -> its grammar text
(rebuilding the parser in the caller takes about a millisecond, bounded by LLParserLimits),
outlines-core -> the pickled token Index (serde; megabytes for large DFAs), xgrammar -> its
serialized CompiledGrammar JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import resource
import time
from collections import deque
from collections.abc import Hashable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from .base import Grammar
from .compiler import CACHE, WHITESPACE_MAX, GrammarCache, compile, default_backend, grammar_from_payload
from .errors import GrammarCompileError
from .vocab import TokenizerInfo

_KINDS = ("regex", "json_schema", "ebnf", "choices")


def _load_tokenizer(path: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


MAX_WORKER_MEMORY = 8 << 30  # bytes; at most a quarter of the host's memory (`worker_memory_limit`)
MIN_WORKER_MEMORY = 2 << 30  # the tokenizer and the backend's tables need some room of their own


def worker_memory_limit() -> int:
    """The compile worker's cap on private memory (RLIMIT_DATA): a quarter of the host's RAM,
    between MIN_WORKER_MEMORY and MAX_WORKER_MEMORY."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return MAX_WORKER_MEMORY
    return max(MIN_WORKER_MEMORY, min(MAX_WORKER_MEMORY, ram // 4))


def _worker_main(conn: Any, tokenizer_path: str, memory_limit: int | None) -> None:
    """Worker loop: cap its memory, load the tokenizer once, then compile one job at a time."""
    try:
        if memory_limit is not None:
            hard = resource.getrlimit(resource.RLIMIT_DATA)[1]
            if hard != resource.RLIM_INFINITY:
                memory_limit = min(memory_limit, hard)
            try:
                resource.setrlimit(resource.RLIMIT_DATA, (memory_limit, hard))
            except (ValueError, OSError):  # a platform without the limit: the worker runs uncapped
                memory_limit = None
        tokenizer = _load_tokenizer(tokenizer_path)
        fingerprint = TokenizerInfo.from_tokenizer(tokenizer).fingerprint
    except Exception as exc:  # reported to the caller, which fails pending jobs
        conn.send(("dead", None, repr(exc)))
        return
    conn.send(("ready", None, (fingerprint, resource.getrlimit(resource.RLIMIT_DATA)[0])))
    cache = GrammarCache(64)  # one canonical schema sent in several spellings compiles once
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        job_id, kind, spec, backend, lenient, ws = job
        try:
            grammar = compile(tokenizer, **{kind: spec}, backend=backend, lenient=lenient,
                              whitespace_max=ws, cache=cache)
            conn.send(("ok", job_id, grammar.payload()))
        except MemoryError:
            cache.clear()
            conn.send(("err", job_id, GrammarCompileError(
                f"{kind} compilation needs more than the grammar worker's {_gib(memory_limit)} of memory")))
        except Exception as exc:
            err = exc if isinstance(exc, ValueError) else GrammarCompileError(f"{type(exc).__name__}: {exc}")
            conn.send(("err", job_id, err))


def _gib(limit: int | None) -> str:
    return "unlimited" if limit is None else f"{limit / (1 << 30):.1f} GiB"


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
    """Non-blocking grammar compilation for a scheduler loop (one worker, jobs in order)."""

    def __init__(self, tokenizer_path: str, *, timeout_s: float = 10.0, backend: str | None = None,
                 tokenizer: Any = None, cache: GrammarCache | None = CACHE,
                 startup_timeout_s: float = 120.0, memory_limit: int | None = -1, families: int = 1) -> None:
        self.tokenizer_path = str(tokenizer_path)
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
        # bytes of private memory the worker may take (-1: worker_memory_limit(); None: no cap)
        self.memory_limit = worker_memory_limit() if memory_limit == -1 else memory_limit
        self.worker_memory_limit: int | None = None  # as the running worker reports it
        self.families = families  # matcher families each grammar is built for before `poll` hands it over
        self._builder: ThreadPoolExecutor | None = None
        self._building: list[tuple[_Job, Future[Grammar | Exception]]] = []
        self.backend = backend or default_backend()
        self.cache = cache
        self._info = TokenizerInfo.from_tokenizer(tokenizer or _load_tokenizer(self.tokenizer_path))
        self._ctx = mp.get_context("spawn")  # no forked torch/tokenizer thread state
        self._proc: Any = None
        self._conn: Any = None
        self._ready = False
        self._started_at = 0.0
        self._queue: deque[_Job] = deque()
        self._by_key: dict[Any, _Job] = {}
        self._inflight: _Job | None = None
        self._sent_at = 0.0
        self._done: list[tuple[Hashable, Grammar | Exception]] = []
        self._next_id = 0
        self.restarts = 0

    # -- public API ---------------------------------------------------------------------
    @property
    def info(self) -> TokenizerInfo:
        """The tokenizer every grammar of this service is compiled for."""
        return self._info

    def submit(self, key: Hashable, spec: Mapping[str, Any]) -> None:
        """Queue a compile. spec: one of regex/json_schema/ebnf/choices, plus optional
        backend, lenient, whitespace_max. Bad arguments and cache hits are answered at the next
        poll without the worker; everything that reads the spec itself (a schema's vetting and
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
            return
        hit = self.cache.get(cache_key) if self.cache is not None else None
        if hit is not None:
            self._done.append((key, hit))
            return
        job = self._by_key.get(cache_key)
        if job is None:
            job = _Job(self._next_id, kind, spec[kind], backend, lenient, ws, cache_key)
            self._next_id += 1
            self._by_key[cache_key] = job
            self._queue.append(job)
        job.waiters.append(key)
        self._pump()

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
        return len(self._queue) + (self._inflight is not None) + len(self._building)

    def wait(self, timeout_s: float = 60.0) -> list[tuple[Hashable, Grammar | Exception]]:
        """Blocking convenience for tests and offline use: poll until nothing is pending."""
        deadline = time.monotonic() + timeout_s
        out = self.poll()
        while self.pending() and time.monotonic() < deadline:
            if self._conn is not None:
                self._conn.poll(0.01)
            else:
                time.sleep(0.002)  # only grammars being rebuilt are pending
            out += self.poll()
        return out

    def close(self) -> None:
        if self._proc is not None:
            try:
                self._conn.send(None)
            except (OSError, BrokenPipeError):
                pass
            self._proc.join(timeout=1.0)
            self._kill()
        if self._builder is not None:
            self._builder.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> GrammarService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker management --------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.tokenizer_path, self.memory_limit),
                                       daemon=True, name="radixlm-grammar")
        self._proc.start()
        child.close()
        self._conn, self._ready, self._started_at = parent, False, time.monotonic()

    def _kill(self) -> None:
        if self._proc is not None and self._proc.is_alive():
            self._proc.kill()
            self._proc.join(timeout=5.0)
        if self._conn is not None:
            self._conn.close()
        self._proc = self._conn = None
        self._ready = False

    def _finish(self, job: _Job, result: Grammar | Exception) -> None:
        self._by_key.pop(job.cache_key, None)
        self._done.extend((key, result) for key in job.waiters)

    def _pump(self) -> None:
        if self._building:
            self._collect_built()
        if self._proc is None:
            if not self._queue:
                return
            self._start()
        self._drain()
        now = time.monotonic()
        if not self._ready and now - self._started_at > self.startup_timeout_s:
            self._fail_all(f"grammar worker did not start within {self.startup_timeout_s:g} s")
            return
        if self._inflight is not None and now - self._sent_at > self.timeout_s:
            job, self._inflight = self._inflight, None
            self._kill()
            self.restarts += 1
            self._finish(job, GrammarCompileError(
                f"{job.kind} compilation timed out after {self.timeout_s:g} s (worker restarted)"))
            if self._queue:
                self._start()
            return
        if self._ready and self._inflight is None and self._queue:
            job = self._inflight = self._queue.popleft()
            self._sent_at = time.monotonic()
            self._conn.send((job.job_id, job.kind, job.spec, job.backend, job.lenient, job.whitespace_max))

    def _drain(self) -> None:
        try:
            while self._conn is not None and self._conn.poll(0):
                tag, job_id, body = self._conn.recv()
                if tag == "ready":
                    fingerprint, limit = body
                    self.worker_memory_limit = None if limit == resource.RLIM_INFINITY else limit
                    if fingerprint != self._info.fingerprint:  # grammars would index the wrong vocabulary
                        self._fail_all(f"tokenizer at {self.tokenizer_path} differs from the caller's")
                        return
                    self._ready = True
                elif tag == "dead":
                    self._fail_all(f"grammar worker failed to start: {body}")
                elif self._inflight is not None and self._inflight.job_id == job_id:
                    job, self._inflight = self._inflight, None
                    if tag == "ok":
                        if self._builder is None:
                            self._builder = ThreadPoolExecutor(1, thread_name_prefix="grammar-build")
                        self._building.append((job, self._builder.submit(self._rebuild, job, body)))
                    else:
                        self._finish(job, body)
        except (EOFError, OSError):  # worker died (OOM, native crash): fail its job, restart
            if not self._ready:  # died while starting: restarting would only loop
                self._fail_all("grammar worker exited during startup")
                return
            job, self._inflight = self._inflight, None
            self._kill()
            self.restarts += 1
            if job is not None:
                self._finish(job, GrammarCompileError(
                    f"{job.kind} compilation crashed the grammar worker (a native error, or more than its "
                    f"{_gib(self.memory_limit)} of memory)"))

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
        jobs = ([self._inflight] if self._inflight else []) + list(self._queue)
        self._inflight = None
        self._queue.clear()
        self._kill()
        for job in jobs:
            self._finish(job, GrammarCompileError(message))

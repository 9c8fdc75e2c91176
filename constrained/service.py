"""Compile grammars off the scheduler loop, in a worker process that can be killed.

A pathological schema or regex can spend seconds inside native code, where a thread cannot
be interrupted; a process can. The scheduler calls `submit` when a request arrives and
`poll` once per step (never blocks): finished grammars come back, timed-out compiles come
back as GrammarCompileError and the worker is restarted for the rest of the queue.

What crosses the process boundary is `Grammar.payload()`: llguidance -> its grammar text
(rebuilding the parser in the caller takes about a millisecond, bounded by LLParserLimits),
outlines-core -> the pickled token Index (serde; megabytes for large DFAs), xgrammar -> its
serialized CompiledGrammar JSON.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import time
from collections import deque
from collections.abc import Hashable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .base import Grammar
from .compiler import CACHE, WHITESPACE_MAX, GrammarCache, compile, default_backend, grammar_from_payload, prepare, spec_key
from .errors import GrammarCompileError
from .vocab import TokenizerInfo

_KINDS = ("regex", "json_schema", "ebnf", "choices")


def _load_tokenizer(path: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def _worker_main(conn: Any, tokenizer_path: str) -> None:
    """Worker loop: load the tokenizer once, then compile one job at a time."""
    try:
        tokenizer = _load_tokenizer(tokenizer_path)
        fingerprint = TokenizerInfo.from_tokenizer(tokenizer).fingerprint
    except Exception as exc:  # reported to the caller, which fails pending jobs
        conn.send(("dead", None, repr(exc)))
        return
    conn.send(("ready", None, fingerprint))
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
                              whitespace_max=ws, cache=None)
            conn.send(("ok", job_id, grammar.payload()))
        except Exception as exc:
            err = exc if isinstance(exc, ValueError) else GrammarCompileError(f"{type(exc).__name__}: {exc}")
            conn.send(("err", job_id, err))


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
                 startup_timeout_s: float = 120.0) -> None:
        self.tokenizer_path = str(tokenizer_path)
        self.timeout_s, self.startup_timeout_s = timeout_s, startup_timeout_s
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
        self._keys: dict[tuple[str, str, str, bool, int], Any] = {}
        self.restarts = 0

    # -- public API ---------------------------------------------------------------------
    @property
    def info(self) -> TokenizerInfo:
        """The tokenizer every grammar of this service is compiled for."""
        return self._info

    def submit(self, key: Hashable, spec: Mapping[str, Any]) -> None:
        """Queue a compile. spec: one of regex/json_schema/ebnf/choices, plus optional
        backend, lenient, whitespace_max. Cheap checks (bad arguments, unsupported schema
        keywords) and cache hits are answered at the next poll without the worker."""
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
        """The compile cache's key of a spec; vetting a schema for it costs ~0.4 ms, so the key of a
        spec text seen before (a batch of requests with one schema) is remembered."""
        text = spec if isinstance(spec, str) else json.dumps(spec, sort_keys=True)
        memo_key = (kind, text, backend, lenient, ws)
        key = self._keys.get(memo_key)
        if key is None:
            canonical, _ = prepare(kind, spec, backend, lenient, ws)
            key = spec_key(kind, canonical, self._info, backend, lenient, ws)
            if len(self._keys) >= 1024:
                self._keys.clear()
            self._keys[memo_key] = key
        return key

    def poll(self) -> list[tuple[Hashable, Grammar | Exception]]:
        """Finished (key, Grammar or exception) pairs since the last poll; never blocks."""
        self._pump()
        done, self._done = self._done, []
        return done

    def pending(self) -> int:
        return len(self._queue) + (self._inflight is not None)

    def wait(self, timeout_s: float = 60.0) -> list[tuple[Hashable, Grammar | Exception]]:
        """Blocking convenience for tests and offline use: poll until nothing is pending."""
        deadline = time.monotonic() + timeout_s
        out = self.poll()
        while self.pending() and time.monotonic() < deadline:
            if self._conn is not None:
                self._conn.poll(0.01)
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

    def __enter__(self) -> GrammarService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- worker management --------------------------------------------------------------
    def _start(self) -> None:
        parent, child = self._ctx.Pipe()
        self._proc = self._ctx.Process(target=_worker_main, args=(child, self.tokenizer_path),
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
                    if body != self._info.fingerprint:  # grammars would index the wrong vocabulary
                        self._fail_all(f"tokenizer at {self.tokenizer_path} differs from the caller's")
                        return
                    self._ready = True
                elif tag == "dead":
                    self._fail_all(f"grammar worker failed to start: {body}")
                elif self._inflight is not None and self._inflight.job_id == job_id:
                    job, self._inflight = self._inflight, None
                    self._finish(job, self._rebuild(job, body) if tag == "ok" else body)
        except (EOFError, OSError):  # worker died (OOM, native crash): fail its job, restart
            if not self._ready:  # died while starting: restarting would only loop
                self._fail_all("grammar worker exited during startup")
                return
            job, self._inflight = self._inflight, None
            self._kill()
            self.restarts += 1
            if job is not None:
                self._finish(job, GrammarCompileError(f"{job.kind} compilation crashed the grammar worker"))

    def _rebuild(self, job: _Job, payload: Any) -> Grammar | Exception:
        try:
            grammar = grammar_from_payload(self._info, job.backend, payload)
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

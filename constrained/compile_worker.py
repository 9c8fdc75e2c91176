"""One grammar-compile worker process: its loop, its memory cap, and the caller's handle on it.

The worker loads the tokenizer once and compiles one job at a time — the whole compile, a JSON
schema's vetting and rewriting included — sending back the grammar's payload or the error. Its
private memory is capped (RLIMIT_DATA, `worker_memory_limit`): a compile past it ends as a
MemoryError reported for that job, or as the worker's death, which the caller treats as a crash of
that job and a restart. GrammarService (service.py) runs several and owns their queue.
"""

from __future__ import annotations

import os
import resource
import time
from collections.abc import Iterator
from typing import Any

from .compiler import GrammarCache, compile
from .errors import GrammarCompileError
from .vocab import TokenizerInfo

MAX_WORKER_MEMORY = 8 << 30  # bytes; at most a quarter of the host's memory (`worker_memory_limit`)
MIN_WORKER_MEMORY = 2 << 30  # the tokenizer and the backend's tables need some room of their own


def worker_memory_limit() -> int:
    """A compile worker's cap on private memory (RLIMIT_DATA): a quarter of the host's RAM, between
    MIN_WORKER_MEMORY and MAX_WORKER_MEMORY."""
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return MAX_WORKER_MEMORY
    return max(MIN_WORKER_MEMORY, min(MAX_WORKER_MEMORY, ram // 4))


def gib(limit: int | None) -> str:
    return "unlimited" if limit is None else f"{limit / (1 << 30):.1f} GiB"


def load_tokenizer(path: str) -> Any:
    import transformers

    return transformers.AutoTokenizer.from_pretrained(path)


def worker_main(conn: Any, tokenizer_path: str, memory_limit: int | None) -> None:
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
        tokenizer = load_tokenizer(tokenizer_path)
        fingerprint = TokenizerInfo.from_tokenizer(tokenizer).fingerprint
        _warm_up(tokenizer)
    except Exception as exc:  # reported to the caller, which fails pending jobs
        conn.send(("dead", None, repr(exc)))
        return
    conn.send(("ready", None, (fingerprint, resource.getrlimit(resource.RLIMIT_DATA)[0])))
    cache = GrammarCache(64)  # one canonical schema sent in several spellings compiles once
    for job_id, kind, spec, backend, lenient, ws in jobs(conn):
        try:
            grammar = compile(tokenizer, **{kind: spec}, backend=backend, lenient=lenient,
                              whitespace_max=ws, cache=cache)
            conn.send(("ok", job_id, grammar.payload()))
        except MemoryError:
            cache.clear()
            conn.send(("err", job_id, GrammarCompileError(
                f"{kind} compilation needs more than the grammar worker's {gib(memory_limit)} of memory")))
        except Exception as exc:
            err = exc if isinstance(exc, ValueError) else GrammarCompileError(f"{type(exc).__name__}: {exc}")
            conn.send(("err", job_id, err))


def jobs(conn: Any) -> Iterator[Any]:
    """A worker's jobs as its caller sends them, until a None (stop) or the caller's end of the pipe closes."""
    while True:
        try:
            job = conn.recv()
        except EOFError:
            return
        if job is None:
            return
        yield job


def _warm_up(tokenizer: Any) -> None:
    """First-use costs paid before the worker reports ready, outside any job's timeout: importing
    `jsonschema` (which builds ~40 Lark grammars for its URI formats: 2-5 s on the 2-core VM), the
    backend's token trie, the schema pipeline's modules."""
    import jsonschema  # noqa: F401

    compile(tokenizer, json_schema={"type": "object", "properties": {"k": {"enum": ["a", 1]}}}, cache=None)


class CompileWorker:
    """The caller's handle on one worker process: started lazily, killed on a timeout or a crash and
    started again for the next job. `job` is the one it is compiling (sent at `sent_at`)."""

    def __init__(self) -> None:
        self.proc: Any = None
        self.conn: Any = None
        self.ready = False
        self.started_at = 0.0
        self.job: Any = None
        self.sent_at = 0.0

    def start(self, ctx: Any, tokenizer_path: str, memory_limit: int | None) -> None:
        parent, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, tokenizer_path, memory_limit), daemon=True,
                                name="radixlm-grammar")
        self.proc.start()
        child.close()
        self.conn, self.ready, self.started_at = parent, False, time.monotonic()

    def send(self, job: Any, message: tuple[Any, ...]) -> None:
        self.job, self.sent_at = job, time.monotonic()
        self.conn.send(message)

    def messages(self) -> list[tuple[str, Any, Any]]:
        """What the worker sent since the last call; raises EOFError / OSError if it died."""
        out = []
        while self.conn is not None and self.conn.poll(0):
            out.append(self.conn.recv())
        return out

    def stop(self) -> None:
        """Ask the worker to exit, then make sure it has."""
        end_process(self.proc, self.conn, ask_first=True)
        self.proc = self.conn = self.job = None
        self.ready = False

    def kill(self) -> None:
        end_process(self.proc, self.conn, ask_first=False)
        self.proc = self.conn = self.job = None
        self.ready = False


def end_process(proc: Any, conn: Any, ask_first: bool) -> None:
    """End a worker process and close its pipe: asked first (a None message, 1 s to exit) where
    `ask_first`, killed if still alive."""
    if proc is not None and ask_first:
        try:
            conn.send(None)
        except (OSError, BrokenPipeError):
            pass
        proc.join(timeout=1.0)
    if proc is not None and proc.is_alive():
        proc.kill()
        proc.join(timeout=5.0)
    if conn is not None:
        conn.close()
